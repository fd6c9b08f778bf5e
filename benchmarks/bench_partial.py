"""Partly judged benchmark: judgments for a part of the training queries, a teacher for all of them.

The common case distillation is for: a team has judged a few hundred queries and has thousands
more from its logs. From a BEIR-style dataset this keeps the train judgments of ``--judged``
training queries (the rest stay in queries.jsonl, unjudged), then compares, on the same true
top-k test candidates:

- the distilled student: the pipeline with ``--max-unjudged-queries -1``: the teacher is
  fine-tuned on the judged queries only, then labels every training query (PackedMarginMSELoss;
  an unjudged query's positive is the teacher's best candidate);
- the label-only student: the same student, head, depth and budget trained with
  BinaryCrossEntropyLoss on the judged queries (the only ones it can use).

Each side's learning rate is chosen on dev from the two rates that won on the demo's full dev grid
(``make bench-e2e``: 1e-4 and 3e-4 for both sides), to keep the run within an hour on 2 cores;
test is reported over 3 seeds with paired t-tests.

    make bench-partial                              # the demo, 600 judged queries
    make bench-partial DATASET=path/to/beir-folder  # another BEIR-style folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_e2e import (  # noqa: E402
    SEEDS, Split, comparison_rows, dev_grid_rows, dev_ndcg, mean_std, row, train_project, write_results,
)

GRID = (1e-4, 3e-4)


def partly_judged(source: Path, out: Path, judged: int, seed: int) -> dict:
    """A copy of ``source`` whose train qrels keep ``judged`` queries (chosen by a seeded hash)."""
    if (out / "stats.json").exists():
        return json.loads((out / "stats.json").read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    lines = (tmp / "qrels" / "train.tsv").read_text().splitlines()
    header, body = lines[0], lines[1:]
    qids = sorted({x.split("\t")[0] for x in body}, key=lambda q: hashlib.sha1(f"{seed}:{q}".encode()).hexdigest())
    keep = set(qids[:judged])
    (tmp / "qrels" / "train.tsv").write_text("\n".join([header] + [x for x in body if x.split("\t")[0] in keep]) + "\n")
    stats = {"source": str(source), "judged_train_queries": len(keep), "unjudged_train_queries": len(qids) - len(keep)}
    (tmp / "stats.json").write_text(json.dumps(stats))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return stats


def upstream(dataset: Path, work: Path, loss: str) -> dict:
    """The pipeline's stages up to the labels for ``loss``, with luigi.cfg's [TrainStudent]
    settings, every training query (judged or not) and the unjudged ones labelled by the teacher."""
    import luigi

    import tasks

    entry = tasks.TrainStudent(
        dataset=str(dataset), output_dir=str(work / "project"), max_train_queries=0, max_unjudged_queries=-1, loss=loss
    )
    labels = entry.clone(tasks.BuildLabels)
    if not luigi.build([labels], local_scheduler=True, workers=1, log_level="WARNING"):
        raise SystemExit("the pipeline failed (see the log above)")
    fit = entry.clone(tasks.FitStudent)
    return {
        "params": {k: v for k, v in fit.param_kwargs.items() if isinstance(v, (int, float, str))},
        "data": entry.clone(tasks.PrepareData).artifact(),
        "mined": entry.clone(tasks.MineHardNegatives).artifact(),
        "labels": labels.artifact() / "dataset",
        "label_stats": labels.stats(),
        "teacher": tasks.stages.resolved_teacher(entry),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="data/debian-descriptions")
    ap.add_argument("--judged", type=int, default=600, help="training queries that keep their judgments")
    ap.add_argument("--work", default="runs/bench-partial")
    ap.add_argument("--results", default="benchmarks/results/partial")
    args = ap.parse_args()

    import torch
    from datasets import load_from_disk

    from pipeline.data import load_normalized
    from pipeline.evaluation import paired_test, timed_scores
    from pipeline.models import load_bi_encoder
    from pipeline.scoring import BiEncoderScorer, TeacherSpec, load_teacher

    work = Path(args.work)
    data_stats = partly_judged(Path(args.dataset), work / "dataset", args.judged, seed=12)
    distilled = upstream(work / "dataset", work, "PackedMarginMSELoss")
    label_only = upstream(work / "dataset", work, "BinaryCrossEntropyLoss")
    p = distilled["params"]
    ds = load_normalized(distilled["data"])
    dev, test = Split(ds, distilled["mined"], "dev"), Split(ds, distilled["mined"], "test")
    sides = {
        "distilled": lambda out, lr, seed: train_project(load_from_disk(str(distilled["labels"])), "PackedMarginMSELoss", out, p, lr, seed),
        "label-only (BCE)": lambda out, lr, seed: train_project(
            load_from_disk(str(label_only["labels"])), "BinaryCrossEntropyLoss", out, p, lr, seed
        ),
    }
    chosen, dev_grid = {}, {}
    for name, train in sides.items():
        dev_grid[name] = {f"{lr:g}": dev_ndcg(train, work / f"{name.split()[0]}-dev-lr{lr:g}", lr, dev, p) for lr in GRID}
        chosen[name] = max(GRID, key=lambda lr: dev_grid[name][f"{lr:g}"])
        print(f"[dev] {name}: {dev_grid[name]} -> lr {chosen[name]:g}", flush=True)

    rankers = {}
    retriever = BiEncoderScorer(load_bi_encoder(p["embedder"], "cpu", p["max_length"]), "cpu", torch.float32)
    rankers["retriever"] = row(test, [(np.asarray(test.retrieval, np.float32), timed_scores(lambda: retriever.score(test.pairs))[1])])
    teacher = load_teacher(TeacherSpec.parse(distilled["teacher"]), "cpu", "fp32", p["teacher_max_length"])
    rankers["teacher"] = row(test, [timed_scores(lambda: teacher.score(test.pairs, test.qids))])
    for name, train in sides.items():
        runs = []
        for seed in SEEDS:
            out = work / f"{name.split()[0]}-test-seed{seed}"
            if not (out / "config.json").exists():
                train(out, chosen[name], seed)
            runs.append(test.score(out, p["max_length"]))
            print(f"[test] {name} seed {seed}: nDCG@10 {test.per_query(runs[-1][0])['ndcg@10'].mean():.4f}", flush=True)
        rankers[f"student ({name})"] = row(test, runs)

    def compare(a: str, b: str) -> dict:
        return paired_test(np.asarray(rankers[a]["per_query_ndcg"]), np.asarray(rankers[b]["per_query_ndcg"]))

    pairs = (("student (distilled)", "student (label-only (BCE))"), ("student (distilled)", "retriever"),
             ("student (label-only (BCE))", "retriever"), ("teacher", "retriever"), ("student (distilled)", "teacher"))
    results = {
        "meta": {"dataset": args.dataset, **data_stats, "teacher": distilled["teacher"], "params": p, "seeds": list(SEEDS),
                 "grid": list(GRID), "test_queries": len(test.queries), "dev_queries": len(dev.queries),
                 "distilled_rows": distilled["label_stats"], "label_only_rows": label_only["label_stats"],
                 "command": " ".join(sys.argv)},
        "dev_grid": dev_grid,
        "chosen_lr": chosen,
        "test": rankers,
        "comparisons": {f"{a} vs {b}": compare(a, b) for a, b in pairs},
    }
    write_results(results, Path(args.results), table, plot=False)


def table(r: dict) -> str:
    m, p = r["meta"], r["meta"]["params"]
    d, b = m["distilled_rows"], m["label_only_rows"]
    lines = [
        f"`{m['dataset']}`: {m['judged_train_queries']} training queries judged, {m['unjudged_train_queries']} unjudged. "
        f"Teacher `{m['teacher']}` (fine-tuned on the judged queries). The distilled student trains on "
        f"{d.get('judged_queries', '?')} judged + {d.get('unjudged_queries', '?')} unjudged queries ({d.get('rows', '?')} rows); "
        f"the label-only student on {b.get('judged_queries', '?')} judged queries ({b.get('rows', '?')} rows). "
        f"{p['student_layers']}-layer students cut from `{p['student']}`, {p['epochs']:g} epoch, batch {p['batch_size']}. "
        f"Test: {m['test_queries']} queries, each reranking the retriever's true top-{p['rerank_top_k']}.",
        "",
        *dev_grid_rows(r, label="side (dev nDCG@10, seed 12)"),
    ]
    lines += ["", f"Test, students mean ± std over {len(m['seeds'])} seeds:", "", "| model | nDCG@10 | MRR@10 |", "|---|---:|---:|"]
    lines += [f"| {name} | {mean_std(x, 'ndcg@10')} | {mean_std(x, 'mrr@10')} |" for name, x in r["test"].items()]
    lines += ["", *comparison_rows(r["comparisons"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
