"""Student settings study: train students with different heads, learning rates, depths and
budgets on one run's labels, and evaluate each on that run's dev and test candidates.

The README's tables in "The student's head" come from these calls. Every student trains with
``train_student`` on the same shuffled rows (seed 12) and is scored by the pipeline's scorer.

    python benchmarks/bench_student.py --run runs/demo \
        --config cosine:3e-4:2 --config cosine:3e-4:3 --config mean:1e-3:2:1:16

A config is ``head:learning_rate:layers[:epochs[:batch_size]]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected one {pattern}, found {len(found)}; pass it explicitly")
    return found[0]


def margin_labels(run: Path) -> Path:
    """The run's MarginMSE labels (its labels/<fp> whose stats say ntuple-margin)."""
    found = [p for p in sorted((run / "labels").glob("*")) if json.loads((p / "stats.json").read_text()).get("format") == "ntuple-margin"]
    if len(found) != 1:
        raise SystemExit(f"{run}/labels: expected one ntuple-margin labels folder, found {len(found)}; pass --labels")
    return found[0]


def candidates(ds, mined: Path, split: str, limit: int) -> tuple[list[str], list[str], list[float], list[tuple[str, str]]]:
    """(query ids, doc ids, retrieval scores, (query, passage) texts) of ``split``'s rerank candidates."""
    import pyarrow.parquet as pq

    from pipeline.evaluation import candidate_pairs

    qids, dids, retrieval = candidate_pairs(pq.read_table(mined / f"candidates-{split}.parquet"), limit or None)
    return qids, dids, retrieval, [(ds.queries[q], ds.passage(d)) for q, d in zip(qids, dids)]


def ndcg(ds, split: str, qids, dids, scores) -> float:
    from pipeline.evaluation import ranking_metrics, to_run

    return ranking_metrics(to_run(qids, dids, scores), ds.relevant(split))["ndcg@10"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="an --output-dir whose data, mined and labels stages ran")
    ap.add_argument("--data", help="default: the run's only data/<fp>")
    ap.add_argument("--mined", help="default: the run's only mined/<fp>")
    ap.add_argument("--labels", help="default: the run's only ntuple-margin labels/<fp>")
    ap.add_argument("--student", default="models/all-MiniLM-L6-v2")
    ap.add_argument("--config", action="append", required=True, help="head:lr:layers[:epochs[:batch_size]]")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--work", default="runs/bench-student")
    ap.add_argument("--results", default="benchmarks/results/student")
    args = ap.parse_args()

    import torch
    from datasets import load_from_disk

    from pipeline.artifacts import write_json
    from pipeline.data import load_normalized
    from pipeline.models import load_cross_encoder
    from pipeline.scoring import CrossEncoderScorer
    from pipeline.training import train_student

    run = Path(args.run)
    data = Path(args.data) if args.data else only(run / "data", "*")
    mined = Path(args.mined) if args.mined else only(run / "mined", "*")
    labels = Path(args.labels) if args.labels else margin_labels(run)
    ds = load_normalized(data)
    splits = {f"{s}_{n or 'all'}": (s, candidates(ds, mined, s, n)) for s, n in (("test", 150), ("test", 0), ("dev", 0))}
    rows = [{"model": "retriever's own order", **{k: ndcg(ds, s, q, d, r) for k, (s, (q, d, r, _)) in splits.items()}}]
    train = load_from_disk(str(labels / "dataset")).shuffle(seed=12, keep_in_memory=True)
    for config in args.config:
        head, lr, layers, *rest = config.split(":")
        epochs = float(rest[0]) if rest else 1.0
        batch = int(rest[1]) if len(rest) > 1 else 16
        out = Path(args.work) / config.replace(":", "_")
        stats = train_student(
            train, "PackedMarginMSELoss", out, student=args.student, student_layers=int(layers), student_head=head,
            epochs=epochs, batch_size=batch, learning_rate=float(lr), max_length=args.max_length,
        )
        model = load_cross_encoder(str(out), "cpu", args.max_length)
        row = {"model": config, "train_seconds": stats["seconds"], "train_loss": stats["train_loss"]}
        scorer = CrossEncoderScorer(model, "cpu", torch.float32)
        row.update({k: ndcg(ds, s, q, d, scorer.score(pairs, desc=k)) for k, (s, (q, d, _, pairs)) in splits.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    write_json(results.with_suffix(".json"), {"run": str(run), "labels": str(labels), "rows": rows})
    lines = ["| student (head:lr:layers[:epochs[:batch]]) | test, 150 | test, all | dev, all |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['test_150']:.4f} | {r['test_all']:.4f} | {r['dev_all']:.4f} |" for r in rows]
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
