"""Scheduled retraining on the demo: the cost of a second date that adds 10% new training queries.

Two dated snapshots of a BEIR folder (the first without the last 10% of its training queries),
retrained one after the other with a fixed teacher, sharing the embedding and teacher-score
caches. Reports each date's wall time, seconds per stage, texts embedded and pairs scored
against pairs served from the cache, and the promotion decision.

    make bench-retrain      # writes benchmarks/results/retrain.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from pathlib import Path

import luigi

from pipeline.artifacts import atomic_file, write_json
from tasks import RetrainStudent

DATES = (datetime.date(2026, 11, 25), datetime.date(2026, 11, 26))


def snapshot(source: Path, dest: Path, drop_share: float) -> int:
    """Copy ``source``; drop the last ``drop_share`` of its training queries (judgments and texts)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest)
    if not drop_share:
        return 0
    lines = (dest / "qrels" / "train.tsv").read_text().splitlines()
    qids = list(dict.fromkeys(x.split("\t")[0] for x in lines[1:]))
    gone = set(qids[len(qids) - round(len(qids) * drop_share) :])
    (dest / "qrels" / "train.tsv").write_text("\n".join(x for x in lines if x.split("\t")[0] not in gone) + "\n")
    for name in [p.name for p in dest.glob("queries*.jsonl")]:
        rows = [json.loads(x) for x in (dest / name).read_text().splitlines() if x.strip()]
        (dest / name).write_text("".join(json.dumps(r) + "\n" for r in rows if r["_id"] not in gone))
    return len(gone)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="data/debian-descriptions")
    ap.add_argument("--teacher", default="models/all-MiniLM-L6-v2", help="a fixed, trained teacher")
    ap.add_argument("--work", default="runs/bench-retrain")
    ap.add_argument("--results", default="benchmarks/results/retrain")
    args = ap.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    new = snapshot(Path(args.dataset), work / "snapshots" / DATES[0].isoformat(), 0.10)
    snapshot(Path(args.dataset), work / "snapshots" / DATES[1].isoformat(), 0.0)
    rows = []
    for date in DATES:
        task = RetrainStudent(
            date=date, dataset=str(work / "snapshots" / "{date}"), output_dir=str(work / "runs"),
            registry=str(work / "registry"), teacher=args.teacher,
        )
        t0 = time.perf_counter()
        assert luigi.build([task], local_scheduler=True, workers=1, log_level="WARNING"), f"retrain of {date} failed"
        wall = time.perf_counter() - t0
        record = json.loads(Path(task.output().path).read_text())
        stages = record["stages"]
        rows.append({
            "date": date.isoformat(),
            "wall_seconds": round(wall, 1),
            "stage_seconds": record["timings"],
            "texts_embedded": stages["MineHardNegatives"].get("texts_embedded"),
            "pairs_scored": stages["ScoreWithTeacher"]["pairs_scored"],
            "pairs_from_cache": stages["ScoreWithTeacher"]["pairs_from_cache"],
            "promoted": record["promoted"],
            "gate": record["gate"],
            "student_ndcg@10": record["metrics"]["student"]["ndcg@10"],
            "retriever_ndcg@10": record["metrics"]["retriever"]["ndcg@10"],
        })
        print(json.dumps(rows[-1], indent=1), flush=True)

    results = {"dataset": args.dataset, "teacher": args.teacher, "new_training_queries": new, "dates": rows}
    out = Path(args.results)
    write_json(out.with_suffix(".json"), results)
    stage_names = list(rows[0]["stage_seconds"])
    lines = [
        f"`make bench-retrain` on `{args.dataset}` (teacher `{args.teacher}`, settings of luigi.cfg's [RetrainStudent] "
        f"and defaults): the second date adds {new} training queries (10%).",
        "",
        "| date | wall s | " + " | ".join(f"{s} s" for s in stage_names)
        + " | texts embedded | pairs scored | pairs from cache | gate (dev nDCG@10): challenger / retriever / champion | promoted |",
        "|---|---:|" + "---:|" * len(stage_names) + "---:|---:|---:|---|---|",
    ]

    def gate(g: dict) -> str:
        return " / ".join("n/a" if g.get(k) is None else f"{g[k]:.4f}" for k in ("challenger", "retriever", "champion"))

    for r in rows:
        lines.append(
            f"| {r['date']} | {r['wall_seconds']} | " + " | ".join(f"{r['stage_seconds'].get(s, 0):.1f}" for s in stage_names)
            + f" | {r['texts_embedded']} | {r['pairs_scored']} | {r['pairs_from_cache']} | {gate(r['gate'])} | {r['promoted']} |"
        )
    lines += ["", f"Second date's wall time: {rows[1]['wall_seconds'] / rows[0]['wall_seconds']:.2f} of the first's."]
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
