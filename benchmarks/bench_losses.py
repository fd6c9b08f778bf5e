"""Train the demo student with every loss of the table for the same budget, over several seeds;
tabulate quality (mean ± std over seeds) and time, with paired tests against the retriever's own
order and against the default loss.

Every run of one seed shares the mined groups, teacher and teacher scores, so only labels,
training and the student's evaluation differ. The budget is equal in (query, passage) pairs per
step: pair formats get (1 + num_negatives) times the rows per batch. Test candidates are the
retriever's true top-k; the loss is not chosen on them: the table is a comparison, and the
default loss (PackedMarginMSELoss) is the one the demo's dev check kept (docs/losses.md).

    make bench-losses            # writes benchmarks/results/losses.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAIR_FORMATS = {"pair-score", "pair-soft", "pair-binary", "pair-class"}
DEFAULT_LOSS = "PackedMarginMSELoss"


def evaluate(output_dir: str, name: str, seed: int) -> dict | None:
    """metrics.json of the demo run with ``name`` as the loss and ``seed`` for every stage."""
    import luigi

    import tasks
    from losses import LOSS_TABLE
    from pipeline.artifacts import read_json

    base = tasks.TrainStudent(output_dir=output_dir, loss=name, seed=seed)
    if LOSS_TABLE[name].format in PAIR_FORMATS:
        base = tasks.TrainStudent(output_dir=output_dir, loss=name, seed=seed, batch_size=base.batch_size * (1 + base.num_negatives))
    ev = base.clone(tasks.EvaluateStudent)
    if not luigi.build([ev], local_scheduler=True, workers=1, log_level="WARNING"):
        return None
    return read_json(ev.output().path)


def main() -> None:
    from losses import LOSS_TABLE
    from pipeline.artifacts import atomic_file, write_json
    from pipeline.evaluation import paired_test

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/bench-losses")
    ap.add_argument("--losses", default=",".join(LOSS_TABLE))
    ap.add_argument("--seeds", default="12,13,14", help="comma-separated; at least 3 for a claim")
    ap.add_argument("--results", default="benchmarks/results/losses")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = list(dict.fromkeys([DEFAULT_LOSS, *args.losses.split(",")]))

    per_query: dict[str, list[np.ndarray]] = {}
    rows, retriever = {}, None
    for name in names:
        runs = [evaluate(args.output_dir, name, seed) for seed in seeds]
        if any(m is None for m in runs):
            rows[name] = {"loss": name, "format": LOSS_TABLE[name].format, "error": "failed (see the log above)"}
            continue
        per_query[name] = [np.asarray(m["per_query_ndcg@10"]["student"]) for m in runs]
        retriever = retriever or runs[0]["test"]["retriever"] | {"per_query": np.asarray(runs[0]["per_query_ndcg@10"]["retriever"])}
        ndcg = [m["test"]["student"]["ndcg@10"] for m in runs]
        rows[name] = {
            "loss": name, "format": LOSS_TABLE[name].format, "ndcg@10": float(np.mean(ndcg)), "ndcg@10_std": float(np.std(ndcg, ddof=1)),
            "ndcg@10_seeds": ndcg, "seconds_per_epoch": float(np.mean([m["stages"]["FitStudent"]["seconds"] for m in runs])),
        }
        print(json.dumps(rows[name]), flush=True)
    for name, runs in per_query.items():
        mean = np.mean(runs, axis=0)
        rows[name]["vs_retriever"] = paired_test(mean, retriever["per_query"])
        if name != DEFAULT_LOSS and DEFAULT_LOSS in per_query:
            rows[name]["vs_default"] = paired_test(mean, np.mean(per_query[DEFAULT_LOSS], axis=0))

    out = Path(args.results)
    meta = {"machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores", "seeds": seeds,
            "retriever_ndcg@10": retriever["ndcg@10"] if retriever else None, "command": " ".join(sys.argv)}
    write_json(out.with_suffix(".json"), {"meta": meta, "rows": list(rows.values())})
    lines = [
        f"Demo data, true top-k test candidates, mean ± std over seeds {', '.join(map(str, seeds))}; the retriever's own "
        f"order: {meta['retriever_ndcg@10']:.4f} nDCG@10. p: paired t-test over test queries (each query averaged over seeds).",
        "",
        f"| loss | format | nDCG@10 | vs retriever (p) | vs {DEFAULT_LOSS} (p) | s/epoch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows.values(), key=lambda r: -r.get("ndcg@10", -1)):
        if "error" in r:
            lines.append(f"| {r['loss']} | {r['format']} | {r['error']} | | | |")
            continue
        vs = lambda t: f"{t['diff']:+.4f} ({t['p_value']:.2g})" if t else ""  # noqa: E731
        lines.append(f"| {r['loss']} | {r['format']} | {r['ndcg@10']:.4f} ± {r['ndcg@10_std']:.4f} | {vs(r.get('vs_retriever'))} | "
                     f"{vs(r.get('vs_default'))} | {r['seconds_per_epoch']:.0f} |")
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
