"""Train the demo student with every loss of the table for the same budget; tabulate quality and time.

Every run shares the mined groups, teacher and teacher scores (same fingerprints), so only
labels, training and the student's evaluation differ. The budget is equal in (query, passage)
pairs per step: pair formats get (1 + num_negatives) times the rows per batch.

    make bench-losses            # writes benchmarks/results/losses.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import luigi

import tasks
from losses import LOSS_TABLE
from pipeline.artifacts import atomic_file, read_json, write_json

PAIR_FORMATS = {"pair-score", "pair-soft", "pair-binary", "pair-class"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/demo")
    ap.add_argument("--losses", default=",".join(LOSS_TABLE))
    ap.add_argument("--results", default="benchmarks/results/losses")
    ap.add_argument("--table-only", action="store_true", help="tabulate the evaluations already in --output-dir")
    args = ap.parse_args()

    rows, reference = [], {}
    if args.table_only:
        rows, reference = collect(Path(args.output_dir), args.losses.split(","))
    for name in [] if args.table_only else args.losses.split(","):
        base = tasks.TrainStudent(output_dir=args.output_dir, loss=name)
        spec = LOSS_TABLE[name]
        if spec.format in PAIR_FORMATS:
            base = tasks.TrainStudent(
                output_dir=args.output_dir, loss=name, batch_size=base.batch_size * (1 + base.num_negatives)
            )
        ev = base.clone(tasks.EvaluateStudent)
        t0 = time.perf_counter()
        ok = luigi.build([ev], local_scheduler=True, workers=1, log_level="WARNING")
        wall = time.perf_counter() - t0
        if not ok:
            rows.append({"loss": name, "format": spec.format, "error": "failed (see the log above)"})
            continue
        m = read_json(ev.output().path)
        fit = m["stages"]["FitStudent"]
        rows.append(
            {
                "loss": name,
                "format": spec.format,
                "ndcg@10": m["test"]["student"]["ndcg@10"],
                "mrr@10": m["test"]["student"]["mrr@10"],
                "map": m["test"]["student"]["map"],
                "seconds_per_epoch": fit["seconds"] / max(fit["epochs"], 1e-9),
                "train_rows": fit["rows"],
                "batch_size": base.batch_size,
                "wall_seconds": round(wall, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        reference = {k: m["test"][k] for k in ("retriever", "teacher", "student_untrained")}

    out = Path(args.results)
    if out.with_suffix(".json").exists():  # a rerun of some losses updates their rows, keeps the others
        done = {r["loss"] for r in rows}
        previous = read_json(out.with_suffix(".json"))
        rows += [r for r in previous["rows"] if r["loss"] not in done]
        reference = reference or previous.get("reference", {})
    meta = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {_cores()} cores", "output_dir": args.output_dir}
    write_json(out.with_suffix(".json"), {"meta": meta, "reference": reference, "rows": rows})
    lines = [
        f"Demo data, {_cores()}-core CPU; the same mined groups, teacher scores and budget for every loss.",
        "",
        "| loss | format | nDCG@10 | MRR@10 | MAP | s/epoch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: -r.get("ndcg@10", -1)):
        if "error" in r:
            lines.append(f"| {r['loss']} | {r['format']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['loss']} | {r['format']} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | {r['map']:.4f} | {r['seconds_per_epoch']:.0f} |")
    lines += ["", "| reference | nDCG@10 | MRR@10 |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['ndcg@10']:.4f} | {v['mrr@10']:.4f} |" for k, v in reference.items()]
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def collect(output_dir: Path, names: list[str]) -> tuple[list[dict], dict]:
    """Rows from the newest evaluation of each loss under ``output_dir``/eval (for interrupted runs)."""
    newest: dict[str, tuple[float, dict]] = {}
    for path in output_dir.glob("eval/*/metrics.json"):
        m = read_json(path)
        name = m["params"]["loss"]
        if name in names and path.stat().st_mtime > newest.get(name, (0, None))[0]:
            newest[name] = (path.stat().st_mtime, m)
    rows, reference = [], {}
    for name in names:
        if name not in newest:
            rows.append({"loss": name, "format": LOSS_TABLE[name].format, "error": "not measured"})
            continue
        m = newest[name][1]
        fit = m["stages"]["FitStudent"]
        rows.append({
            "loss": name, "format": LOSS_TABLE[name].format, "ndcg@10": m["test"]["student"]["ndcg@10"],
            "mrr@10": m["test"]["student"]["mrr@10"], "map": m["test"]["student"]["map"],
            "seconds_per_epoch": fit["seconds"] / max(fit["epochs"], 1e-9), "train_rows": fit["rows"],
            "batch_size": m["params"]["batch_size"],
        })
        reference = {k: m["test"][k] for k in ("retriever", "teacher", "student_untrained")}
    return rows, reference


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
