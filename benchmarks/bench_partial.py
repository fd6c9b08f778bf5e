"""Partly judged benchmark: judgments for a part of the training queries, a teacher for all of them.

The common case distillation is for: a team has judged a few hundred queries and has thousands
more from its logs. From a BEIR-style dataset this keeps the train judgments of ``--judged``
training queries (the rest stay in queries.jsonl, unjudged; ``--judged 0`` takes a dataset that is
partly judged already), then compares, on the same true top-k test candidates:

- the teacher the pipeline fine-tunes on the judged queries (luigi.cfg's settings);
- the distilled student: the pipeline with ``--max-unjudged-queries -1``: the teacher labels
  every training query (PackedMarginMSELoss; an unjudged query's positive is the teacher's best
  candidate);
- the plain distilled student: what ``TrainStudent`` publishes, in sentence-transformers' own
  modules on each distilled (cosine-head) student's encoder, taught by the teacher on the
  training queries' candidate lists (``pipeline.plain_student``);
- the label-only student: the same student, head, depth and budget trained with
  BinaryCrossEntropyLoss on the judged queries (the only ones it can use);
- the untrained student and the retriever's own order.

Each side's learning rate is chosen on dev from the two rates that won on the demo's full dev grid
(``make bench-e2e``: 1e-4 and 3e-4 for both sides), and the label-only side's epochs from 1 and 3;
with ``--defaults`` (a dataset the project has never seen) nothing is chosen on it and each side
trains at its defaults. Test is reported
over 3 seeds with paired t-tests, and every row is timed on the same test pairs.

    make bench-partial   # the demo: data/debian-partly-judged, reusing make run's stages
    make bench-unseen    # data/manpages, 350 judged training queries, defaults only
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_e2e import (  # noqa: E402
    SEEDS, TIMING_QUERIES, Split, comparison_rows, dev_ndcg, fusion_sentence, mean_std, render_again, speed_sentence, student_params, test_rows, train_project,
    training_digest, write_results,
)

# Each side's dev grid of (learning rate, epochs). The label-only side also tries 3 epochs: it sees
# 600 queries' pairs where the distilled side sees 2,544 queries' groups, so it gets the chance to
# make up the difference with more passes.
GRID = {"distilled": ((1e-4, 1.0), (3e-4, 1.0)), "label-only (BCE)": ((1e-4, 1.0), (3e-4, 1.0), (1e-4, 3.0), (3e-4, 3.0))}


def setting_name(setting) -> str:
    lr, epochs = setting
    return f"lr {lr:g}, {epochs:g} epoch{'s' if epochs != 1 else ''}"


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


def judged_counts(ds, source: Path) -> dict:
    """How many training queries a prepared dataset judges, and how many of its queries no split judges."""
    judged = {s: set(ds.relevant(s)) for s in ("train", "dev", "test")}
    unjudged = set(ds.queries) - judged["train"] - judged["dev"] - judged["test"]
    return {"source": str(source), "judged_train_queries": len(judged["train"]), "unjudged_train_queries": len(unjudged)}


def upstream(dataset: Path, out: Path, loss: str, num_negatives: int | None = None) -> dict:
    """The pipeline's stages up to the labels for ``loss``, with luigi.cfg's [TrainStudent]
    settings (``num_negatives``, where given, in place of its own), every training query (judged
    or not) and the unjudged ones labelled by the teacher."""
    import luigi

    import tasks

    given = {} if num_negatives is None else {"num_negatives": num_negatives}
    entry = tasks.TrainStudent(
        dataset=str(dataset), output_dir=str(out), max_train_queries=0, max_unjudged_queries=-1, loss=loss, **given
    )
    labels = entry.clone(tasks.BuildLabels)
    if not luigi.build([labels], local_scheduler=True, workers=1, log_level="WARNING"):
        raise SystemExit("the pipeline failed (see the log above)")
    fit = entry.clone(tasks.FitStudent)
    params = student_params(fit)  # runs the depth stage when luigi.cfg asks for a measured depth
    depth = fit.requires().get("depth")
    return {
        "params": params,
        "depth": depth.stats() if depth else {},
        "label_only_setting": (entry.label_only_learning_rate, entry.label_only_epochs),
        "data": entry.clone(tasks.PrepareData).artifact(),
        "mined": entry.clone(tasks.MineHardNegatives).artifact(),
        "labels": labels.artifact() / "dataset",
        "label_stats": labels.stats(),
        "teacher": tasks.stages.resolved_teacher(entry),
        "plain_config": entry.clone(tasks.PlainStudent).config,
        "teacher_stats": entry.clone(tasks.FineTuneTeacher).stats() if tasks.stages._needs_fine_tuned(entry.teacher) else {},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="data/debian-descriptions")
    ap.add_argument("--judged", type=int, default=600, help="training queries that keep their judgments; 0: the dataset as it is")
    ap.add_argument("--work", default="runs/bench-partial")
    ap.add_argument("--output-dir", default="", help="the pipeline's output folder (default <work>/project); the demo's reuses its stages")
    ap.add_argument("--defaults", action="store_true", help="no dev grid: each side at its default learning rate (unseen data)")
    ap.add_argument("--results", default="benchmarks/results/partial")
    ap.add_argument("--num-negatives", type=int, default=None, help="mined negatives per training query (default: luigi.cfg's)")
    ap.add_argument("--timing-queries", type=int, default=TIMING_QUERIES, help="test queries whose pairs every ranker is timed on (0: all)")
    ap.add_argument("--render", action="store_true", help="only rewrite --results' tables from its JSON (nothing runs)")
    args = ap.parse_args()
    if args.render:
        return render_again(Path(args.results), table)

    from datasets import load_from_disk

    from pipeline.data import load_normalized
    from pipeline.evaluation import paired_test

    work = Path(args.work)
    dataset = Path(args.dataset)
    if args.judged:
        data_stats = partly_judged(dataset, work / "dataset", args.judged, seed=12)
        dataset = work / "dataset"
    else:
        data_stats = None  # counted on the data the pipeline prepares below
    project = Path(args.output_dir or work / "project")
    distilled = upstream(dataset, project, "PackedMarginMSELoss", args.num_negatives)
    label_only = upstream(dataset, project, "BinaryCrossEntropyLoss", args.num_negatives)
    p = distilled["params"]
    ds = load_normalized(distilled["data"])
    data_stats = data_stats or judged_counts(ds, dataset)
    dev, test = Split(ds, distilled["mined"], "dev"), Split(ds, distilled["mined"], "test")
    def trainer(labels: Path, loss: str):
        return lambda out, setting, seed: train_project(load_from_disk(str(labels)), loss, out, {**p, "epochs": setting[1]}, setting[0], seed)

    depth = f"L{p['student_layers']}"
    labels = {"distilled": (distilled["labels"], "PackedMarginMSELoss"), "label-only (BCE)": (label_only["labels"], "BinaryCrossEntropyLoss")}
    sides = {name: trainer(rows, loss) for name, (rows, loss) in labels.items()}
    trained = {name: training_digest(rows, p) for name, (rows, _) in labels.items()}
    chosen, dev_grid = {}, {}
    if args.defaults:
        chosen = {"distilled": (p["learning_rate"], p["epochs"]), "label-only (BCE)": distilled["label_only_setting"]}
    else:
        for name, train in sides.items():
            grid = GRID[name]
            dev_grid[name] = {
                setting_name(x): dev_ndcg(train, work / f"{name.split()[0]}-dev-{depth}-lr{x[0]:g}-ep{x[1]:g}-{trained[name]}", x, dev, p)
                for x in grid
            }
            chosen[name] = max(grid, key=lambda x: dev_grid[name][setting_name(x)])
            print(f"[dev] {name}: {dev_grid[name]} -> {setting_name(chosen[name])}", flush=True)

    folders = {}
    for name, train in sides.items():
        lr, epochs = chosen[name]
        folders[name] = [work / f"{name.split()[0]}-test-{depth}-lr{lr:g}-ep{epochs:g}-{trained[name]}-seed{seed}" for seed in SEEDS]
        for seed, out in zip(SEEDS, folders[name]):
            if not (out / "config.json").exists():
                train(out, chosen[name], seed)
    folders["distilled, plain"] = [plain(distilled, out, seed) for seed, out in zip(SEEDS, folders["distilled"])]
    rankers, timing = test_rows(test, p, distilled["teacher"], folders, args.timing_queries, untrained=True, dev=dev)

    def compare(a: str, b: str) -> dict:
        return paired_test(np.asarray(rankers[a]["per_query_ndcg"]), np.asarray(rankers[b]["per_query_ndcg"]))

    pairs = (("student (distilled, plain)", "student (label-only (BCE))"), ("student (distilled, plain)", "retriever"),
             ("student (distilled, plain)", "student (distilled)"), ("student (distilled, plain)", "teacher"),
             ("student (distilled)", "student (label-only (BCE))"), ("student (distilled)", "retriever"),
             ("student (label-only (BCE))", "retriever"), ("teacher", "retriever"), ("student (distilled)", "teacher"),
             ("student (distilled) fused", "retriever"), ("student (distilled) fused", "student (label-only (BCE)) fused"),
             ("student (distilled) fused", "teacher"), ("student (distilled, plain) fused", "retriever"),
             ("student (distilled, plain) fused", "teacher"))
    results = {
        "meta": {"dataset": args.dataset, **data_stats, "teacher": distilled["teacher"], "teacher_stats": distilled["teacher_stats"],
                 "params": p, "student_depth": distilled["depth"], "seeds": list(SEEDS), "defaults": args.defaults,
                 "test_queries": len(test.queries), "dev_queries": len(dev.queries), "speed": timing,
                 "distilled_rows": distilled["label_stats"], "label_only_rows": label_only["label_stats"],
                 "command": " ".join(sys.argv)},
        "dev_grid": dev_grid,
        "chosen": {name: setting_name(x) for name, x in chosen.items()},
        "test": rankers,
        "comparisons": {f"{a} vs {b}": compare(a, b) for a, b in pairs},
    }
    write_results(results, Path(args.results), table, plot=False)


def plain(upstream: dict, cosine: Path, seed: int) -> Path:
    """The plain student the pipeline would publish for the cosine-head student at ``cosine``
    (kept by the name of its settings, so that a changed recipe trains anew)."""
    from pipeline.config import config_fingerprint
    from pipeline.plain_student import plain_student

    config = dataclasses.replace(upstream["plain_config"], seed=seed, max_dev_queries=0)
    out = cosine.with_name(f"{cosine.name}-plain-{config_fingerprint(config, str)[:8]}")
    if not (out / "config.json").exists():
        plain_student(upstream["data"], upstream["mined"], cosine, out, config)
    return out


def table(r: dict) -> str:
    m, p = r["meta"], r["meta"]["params"]
    d, b = m["distilled_rows"], m["label_only_rows"]
    lines = [
        f"`{m['dataset']}`: {m['judged_train_queries']} training queries judged, {m['unjudged_train_queries']} unjudged. "
        f"Teacher `{m['teacher']}` (fine-tuned on the judged queries, kind {p.get('teacher_kind', '?')}). The distilled student trains on "
        f"{d.get('judged_queries', '?')} judged + {d.get('unjudged_queries', '?')} unjudged queries ({d.get('rows', '?')} rows, "
        f"{p.get('num_negatives', '?')} mined negatives each); "
        f"the label-only student on {b.get('judged_queries', '?')} judged queries ({b.get('rows', '?')} rows). "
        f"{p['student_layers']}-layer students cut from `{p['student']}` (head {p['student_head']}), {p['epochs']:g} epoch, batch {p['batch_size']}, trained in {p['precision']}. "
        f"Input length: {p['max_length']} tokens per pair for the students and the retriever, {p.get('teacher_max_length', '?')} for the teacher. "
        f"Test: {m['test_queries']} queries, each reranking the retriever's true top-{p['rerank_top_k']}. "
        f"Speed: {speed_sentence(m)}",
        "",
    ]
    lines += depth_sentence(m.get("student_depth"))
    if m.get("defaults"):
        lines += [f"Nothing tuned on this dataset: each side at its default ({'; '.join(f'{k}: {v}' for k, v in r['chosen'].items())})."]
    else:
        lines += ["| side (dev nDCG@10, seed 12) | setting | nDCG@10 |", "|---|---|---:|"]
        for side, grid in r["dev_grid"].items():
            lines += [f"| {side} | {x}{' (chosen)' if x == r['chosen'][side] else ''} | {v:.4f} |" for x, v in grid.items()]
    lines += ["", f"Test, trained students mean ± std over {len(m['seeds'])} seeds:", "",
              "| model | nDCG@10 | MRR@10 | pairs/s | ms/query |", "|---|---:|---:|---:|---:|"]
    for name, x in r["test"].items():
        speed = f"{x['pairs_per_second']:.0f} | {x['ms_per_query']:.0f}" if "pairs_per_second" in x else "n/a | n/a"
        lines.append(f"| {name} | {mean_std(x, 'ndcg@10')} | {mean_std(x, 'mrr@10')} | {speed} |")
    lines += [*fusion_sentence(r["test"]), "", *comparison_rows(r["comparisons"])]
    return "\n".join(lines) + "\n"


def depth_sentence(d: dict | None) -> list[str]:
    """How the students' depth was measured (the pipeline's ChooseStudentDepth record), if it was."""
    if not d:
        return []
    t = d.get("timed_on", {})
    cuts = "; ".join(
        f"{n}: {s['times_teacher']:.2f}" + (f", at least {s['times_teacher_at_least']:.2f}" if "times_teacher_at_least" in s else "")
        for n, s in d["students"].items()
    )
    bound = f"its {d['confidence']:.0%} lower bound over the turns" if "confidence" in d else "the mean over the turns (before the lower bound)"
    return [
        f"Depth: {d['layers']} layers, measured by the pipeline's ChooseStudentDepth on {t.get('pairs')} {t.get('source', 'pairs')} "
        f"of {t.get('queries')} queries: the deepest cut whose pairs/s is at least {d['speedup']:g} times the teacher's by {bound} "
        f"(times the teacher, by layers: {cuts}).",
        "",
    ]


if __name__ == "__main__":
    main()
