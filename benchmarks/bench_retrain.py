"""Scheduled retraining on the demo: the cost of a second date that adds 10% new training queries,
and the quality of the student it continues.

Two dated snapshots of a BEIR folder (the first without the last 10% of its training queries),
retrained one after the other with a fixed teacher, sharing the embedding, search, teacher-score
and evaluation caches; the second date continues the first's champion on its new queries plus
as many replayed rows (RetrainStudent's defaults). Reports each date's wall time, seconds per
stage, texts embedded and pairs scored against pairs served from the cache, and the promotion
decision.

Then, on the second snapshot and its test split, the continued student against a student
trained from scratch on the whole snapshot, for each of 3 seeds (every test query): mean ± std
of nDCG@10 and a paired t-test over the queries of all seeds.

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
import numpy as np

from pipeline.artifacts import atomic_file, write_json
from pipeline.evaluation import paired_test
from pipeline.registry import Registry
from tasks import RetrainStudent, TrainStudent

DATES = (datetime.date(2026, 11, 25), datetime.date(2026, 11, 26))
SEEDS = (12, 13, 14)


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
    ap.add_argument("--teacher", default="", help="a fixed, trained teacher; default: the first date fine-tunes one (luigi.cfg's recipe) "
                    "and the second keeps it")
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
            "teacher": record["teacher"],
            "continued": "warm_start" in stages["FitStudent"],
            "student_rows": stages["FitStudent"]["rows"],
            "gate": record["gate"],
            "student_ndcg@10": record["metrics"]["student"]["ndcg@10"],
            "retriever_ndcg@10": record["metrics"]["retriever"]["ndcg@10"],
        })
        print(json.dumps(rows[-1], indent=1), flush=True)

    quality = continued_against_scratch(work)
    results = {"dataset": args.dataset, "teacher": args.teacher, "new_training_queries": new, "dates": rows,
               "date_2_cost_share": round(rows[1]["wall_seconds"] / rows[0]["wall_seconds"], 3), "students": quality}
    out = Path(args.results)
    write_json(out.with_suffix(".json"), results)
    stage_names = list(rows[0]["stage_seconds"])
    lines = [
        f"`make bench-retrain` on `{args.dataset}` (teacher: {args.teacher or 'fine-tuned by the first date, kept by the second'}; "
        f"settings of luigi.cfg's [RetrainStudent] and defaults): the second date adds {new} training queries (10%) and "
        f"{'continues the champion' if rows[1]['continued'] else 'trains a new student'}.",
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
    lines += ["", f"Second date's wall time: {rows[1]['wall_seconds'] / rows[0]['wall_seconds']:.2f} of the first's.", ""]
    q = quality
    lines += [
        f"Second snapshot, every test query ({q['test_queries']}), seeds {', '.join(map(str, SEEDS))}: nDCG@10 of the student "
        "continued from the first date's champion against a student trained from scratch on the whole snapshot.",
        "",
        "| student | nDCG@10 (mean ± std) | per seed | rows trained | training s (mean) |",
        "|---|---:|---|---:|---:|",
    ]
    for name in ("continued", "scratch"):
        x = q[name]
        lines.append(f"| {name} | {x['mean']:.4f} ± {x['std']:.4f} | {', '.join(f'{v:.4f}' for v in x['per_seed'])} | "
                     f"{x['rows']} | {x['train_seconds']:.1f} |")
    t = q["continued vs scratch"]
    lines += ["", f"Continued − scratch: {t['diff']:+.4f} nDCG@10 (paired t-test over {t['queries']} query-seed pairs: p = {t['p_value']:.3g})."]
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def continued_against_scratch(work: Path) -> dict:
    """The second snapshot's student, continued from the first date's student or trained from
    scratch, per seed, with the second date's teacher and everything else at RetrainStudent's
    settings; every test query."""
    first, second = (json.loads(Registry(work / "registry").run_record(d.isoformat()).read_text()) for d in DATES)
    warm = {
        "warm_start": first.get("registry_student") or first["student"],
        "seen_data": str(work / "runs" / DATES[0].isoformat() / "data" / first["data_fingerprint"]),
    }
    common = dict(dataset=str(work / "snapshots" / DATES[1].isoformat()), output_dir=str(work / "students"),
                  cache_dir=str(work / "runs" / "cache"), teacher=second["teacher"], max_eval_queries=0, label_only_loss="")
    out: dict = {}
    per_query: dict[str, list] = {}
    for name, extra in (("continued", warm), ("scratch", {})):
        scores, rows, seconds = [], [], []
        per_query[name] = []
        for seed in SEEDS:
            task = TrainStudent(seed=seed, **common, **extra)
            assert luigi.build([task], local_scheduler=True, workers=1, log_level="WARNING"), f"{name} seed {seed} failed"
            metrics = json.loads(Path(task.output()["metrics"].path).read_text())
            fit = metrics["stages"]["FitStudent"]
            scores.append(metrics["test"]["student"]["ndcg@10"])
            rows.append(fit["rows"])
            seconds.append(fit["seconds"])
            per_query[name] += metrics["per_query_ndcg@10"]["student"]
            out["test_queries"] = metrics["test_queries"]
            print(f"[students] {name} seed {seed}: nDCG@10 {scores[-1]:.4f} ({fit['rows']} rows, {fit['seconds']} s)", flush=True)
        out[name] = {"mean": float(np.mean(scores)), "std": float(np.std(scores, ddof=1)), "per_seed": scores,
                     "rows": int(np.mean(rows)), "train_seconds": float(np.mean(seconds))}
    out["continued vs scratch"] = paired_test(np.asarray(per_query["continued"]), np.asarray(per_query["scratch"]))
    return out


if __name__ == "__main__":
    main()
