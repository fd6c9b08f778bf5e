"""Time the plain student's training step with its backbone's attention dropout, as
sentence-transformers trains a model (its config as saved), and with ``PlainStudentConfig``'s,
taking turns in one process on the same batches.

On CPU, any dropout on the attention probabilities takes PyTorch's scaled-dot-product attention
off its fused kernel onto the one that builds every (query, key) weight and a random mask for it.
The step is the stage's: the demo's candidate lists in length-grouped batches of 3, one forward
pass, ListNetLoss, backward, AdamW, in the training precision. The targets are the retriever's
order (the teacher's scores would not change the time).

    make bench-train-step   # after make run; writes benchmarks/results/train-step.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def step_models(stage, work: Path) -> tuple[dict, list, int, str, dict]:
    """The plain student's start saved twice (its backbone's attention dropout; the stage's), the
    batches of list rows the stage would train on, the pairs in a forward pass, the training
    precision, and each start's attention dropout."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.labels import to_dataset
    from pipeline.models import load_cross_encoder, resolve_precision, set_attention_dropout
    from pipeline.plain_student import candidate_lists, list_rows, mean_head_student
    from pipeline.training import LengthGroupedBatchSampler

    c, inputs = stage.config, stage.input()
    student = load_cross_encoder(inputs["student"].path, "cpu", c.max_length)
    cand, _, pairs = candidate_lists(inputs["data"].path, inputs["mined"].path, c.list_size, c.seed)
    sizes = [len(d) for d in cand["doc_ids"].to_pylist()]
    targets = np.concatenate([-np.arange(n, dtype=np.float32) for n in sizes])  # the retriever's order
    rows = to_dataset(list_rows(cand, pairs, targets))
    start = mean_head_student(student, pairs[:2000], targets[:2000], "cpu", c.max_length)
    folders = {"backbone's": work / "backbone", "stage's": work / "stage"}
    start.save_pretrained(str(folders["backbone's"]))
    key = set_attention_dropout(start[0].model.config, c.attention_dropout)
    start.save_pretrained(str(folders["stage's"]))
    dropout = {name: json.loads((f / "config.json").read_text())[key] for name, f in folders.items()}
    models = {name: CrossEncoder(str(f), device="cpu").train() for name, f in folders.items()}
    for m in models.values():
        m.max_seq_length = c.max_length
    batches = [rows[b] for b in LengthGroupedBatchSampler(rows, c.batch_size, False, seed=c.seed)]
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolve_precision(c.precision, "cpu"), "fp32")
    return models, batches, c.batch_size * max(sizes), precision, dropout


def time_steps(models: dict, batches: list, pairs_per_pass: int, precision: str, steps: int, learning_rate: float) -> dict:
    """Seconds per training step of each model, the models taking turns batch by batch (the
    order alternates), after 3 untimed warm-up steps each."""
    import torch
    from sentence_transformers.cross_encoder.losses import ListNetLoss

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    losses = {name: ListNetLoss(m, mini_batch_size=pairs_per_pass) for name, m in models.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=learning_rate, fused=True) for name, m in models.items()}
    seconds = {name: [] for name in models}
    names = list(models)
    for i, batch in enumerate(batches[: steps + 3]):
        inputs = [batch["query"], batch["docs"]]
        labels = [torch.tensor(x) for x in batch["labels"]]
        for name in names if i % 2 else names[::-1]:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = losses[name](inputs, labels)
            loss.backward()
            optims[name].step()
            optims[name].zero_grad()
            if i >= 3:
                seconds[name].append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    import luigi
    import torch

    import tasks
    from pipeline.models import native_bf16_cpu

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/demo", help="the run whose stages to reuse (make run's)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--results", default="benchmarks/results/train-step")
    args = ap.parse_args()

    stage = tasks.TrainStudent(output_dir=args.output_dir).clone(tasks.PlainStudent)
    needs = list(stage.requires().values())
    if not all(t.complete() for t in needs) and not luigi.build(needs, local_scheduler=True, workers=1, log_level="WARNING"):
        raise SystemExit("the pipeline failed (see the log above)")
    work = Path(args.output_dir) / "bench-train-step"
    shutil.rmtree(work, ignore_errors=True)
    try:
        models, batches, pairs_per_pass, precision, dropout = step_models(stage, work)
        seconds = time_steps(models, batches, pairs_per_pass, precision, args.steps, stage.config.learning_rate)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (base, ours) = models
    per_batch = np.asarray(seconds[base]) / np.asarray(seconds[ours])
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "native_bf16": native_bf16_cpu()},
        "precision": precision, "steps": len(per_batch), "batch_lists": stage.config.batch_size, "list_size": stage.config.list_size,
        "attention_dropout": dropout,
        "seconds_per_step_median": {name: float(np.median(s)) for name, s in seconds.items()},
        "ratio_per_batch_median": float(np.median(per_batch)),
        "ratio_per_batch_quartiles": [float(np.quantile(per_batch, q)) for q in (0.25, 0.75)],
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    med = result["seconds_per_step_median"]
    lines = [
        f"# The plain student's training step, attention dropout {result['attention_dropout'][base]} (the backbone's) "
        f"against {result['attention_dropout'][ours]} (the stage's)",
        "",
        f"{result['steps']} steps each, taking turns on the same batches; {precision}, {result['machine']['threads']} threads, {result['machine']['cpu']} "
        f"({'with' if result['machine']['native_bf16'] else 'without'} native bf16).",
        "",
        "| attention dropout | seconds per step (median) |",
        "|---|---:|",
        f"| {result['attention_dropout'][base]} (backbone's: sentence-transformers trains the config as saved) | {med[base]:.3f} |",
        f"| {result['attention_dropout'][ours]} (`PlainStudentConfig.attention_dropout`) | {med[ours]:.3f} |",
        "",
        f"The backbone's step takes **{result['ratio_per_batch_median']:.2f}×** the stage's (median over batches; "
        f"quartiles {result['ratio_per_batch_quartiles'][0]:.2f}–{result['ratio_per_batch_quartiles'][1]:.2f}).",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
