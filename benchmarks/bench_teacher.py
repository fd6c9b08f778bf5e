"""Teacher recipes on dev: which fine-tuned teacher, and which student of it, the demo should use.

On the demo's partly judged data (600 judged training queries), starting from the bi-encoder the
demo's ensemble teacher fine-tunes first, this trains 6-layer cross-encoders by several recipes
(head, loss, learning rate), scores each alone and mixed with the bi-encoder at several shares on
the dev split's true top-20, then distils 2-layer students from the best mix and scores them on
dev too. One seed: it chooses settings; the test figures with seeds are ``make bench-partial``'s.

    make bench-teacher    # after make run (it reuses the demo's stages)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_e2e import TIMING_QUERIES, Split, speed_in_turns  # noqa: E402

# name -> (head, loss, learning rate)
RECIPES = {
    "cosine head, MNRL, lr 1e-4": ("cosine", "MultipleNegativesRankingLoss", 1e-4),
    "cosine head, BCE, lr 5e-5": ("cosine", "BinaryCrossEntropyLoss", 5e-5),
    "mean head, MNRL, lr 1e-4": ("mean", "MultipleNegativesRankingLoss", 1e-4),
}
SHARES = (0.3, 0.5, 0.7)
# name -> (backbone: "minilm" or "teacher", layers, head)
STUDENTS = {
    "all-MiniLM-L6-v2's first 2 layers, cosine head": ("minilm", 2, "cosine"),
    "all-MiniLM-L6-v2's first 2 layers, mean head": ("minilm", 2, "mean"),
    "the teacher's cross-encoder's first 2 layers": ("teacher", 2, "auto"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/demo", help="the demo run whose stages are reused")
    ap.add_argument("--work", default="runs/bench-teacher")
    ap.add_argument("--results", default="benchmarks/results/teacher")
    ap.add_argument("--timing-queries", type=int, default=TIMING_QUERIES, help="dev queries whose pairs every timed model scores (0: all)")
    args = ap.parse_args()

    import luigi
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    import tasks
    from benchmarks.bench_e2e import write_results
    from pipeline.data import Texts, load_normalized
    from pipeline.labels import PairValues, build_rows, to_dataset
    from pipeline.models import cut_student, load_bi_encoder, load_cross_encoder
    from pipeline.scoring import BiEncoderScorer, CrossEncoderScorer, zscore_per_query
    from pipeline.teacher import _cross_encoder_teacher, _judged_groups
    from pipeline.training import train_student

    entry = tasks.TrainStudent(output_dir=args.output_dir)
    ft = entry.clone(tasks.FineTuneTeacher)
    if not luigi.build([ft], local_scheduler=True, workers=1, log_level="WARNING"):
        raise SystemExit("the pipeline failed (see the log above)")
    data, mined = entry.clone(tasks.PrepareData).artifact(), entry.clone(tasks.MineHardNegatives).artifact()
    bi_dir = ft.artifact() / "bi-encoder"
    ds = load_normalized(data)
    dev = Split(ds, mined, "dev")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    length = ft.config.max_length
    bf16 = torch.bfloat16

    def ndcg(scores) -> float:
        return float(dev.per_query(scores)["ndcg@10"].mean())

    def ce_scorer(folder: Path):
        return CrossEncoderScorer(load_cross_encoder(str(folder), "cpu", length), "cpu", bf16)

    def ce_scores(folder: Path, pairs) -> np.ndarray:
        return np.asarray(ce_scorer(folder).score(pairs, desc=folder.name), np.float32)

    # Models whose speed the tables show: timed at the end, taking turns on the same dev pairs.
    timed = {}
    bi_scorer = BiEncoderScorer(load_bi_encoder(str(bi_dir), "cpu", length), "cpu", bf16)
    bi_dev = np.asarray(bi_scorer.score(dev.pairs), np.float32)
    timed["bi-encoder, fine-tuned"] = lambda pairs, qids: bi_scorer.score(pairs, show_progress=False)
    teachers = {"retriever's order": {"ndcg@10": ndcg(np.asarray(dev.retrieval, np.float32))},
                "bi-encoder, fine-tuned": {"ndcg@10": ndcg(bi_dev)}}
    untrained = work / "ce-untrained"
    if not (untrained / "config.json").exists():
        cut_student(str(bi_dir), 0, "cpu", length, head="cosine").save_pretrained(str(untrained))
    untrained_scorer = ce_scorer(untrained)
    teachers["cross-encoder, untrained"] = {"ndcg@10": ndcg(untrained_scorer.score(dev.pairs, desc=untrained.name))}
    timed["cross-encoder, untrained"] = lambda pairs, qids: untrained_scorer.score(pairs, show_progress=False)
    mixes, ce_dev = {}, {}
    for name, (head, loss, lr) in RECIPES.items():
        out = work / f"ce-{head}-{loss}-{lr:g}"
        if not (out / "stats.json").exists():
            config = dataclasses.replace(ft.config, kind="cross-encoder", loss=loss, learning_rate=lr, head=head)
            _cross_encoder_teacher(data, _judged_groups(mined), out, config, str(bi_dir))
        ce_dev[name] = ce_scores(out, dev.pairs)
        teachers[f"cross-encoder, {name}"] = {"ndcg@10": ndcg(ce_dev[name])}
        mixes[name] = {f"{w:g}": ndcg(w * zscore_per_query(ce_dev[name], dev.qids) + (1 - w) * zscore_per_query(bi_dev, dev.qids))
                       for w in SHARES}
        print(f"[dev] {name}: alone {teachers[f'cross-encoder, {name}']['ndcg@10']:.4f}, mixed {mixes[name]}", flush=True)

    best, share = max(((n, w) for n in mixes for w in SHARES), key=lambda nw: mixes[nw[0]][f"{nw[1]:g}"])
    head, loss, lr = RECIPES[best]
    best_dir = work / f"ce-{head}-{loss}-{lr:g}"
    groups = pq.read_table(mined / "groups.parquet")
    g = groups.to_pydict()
    keys = [(q, d) for q, pos, neg in zip(g["query_id"], g["positive_ids"], g["negative_ids"]) for d in list(pos) + list(neg)]
    texts = [(ds.queries[q], ds.passage(d)) for q, d in keys]
    qids = [q for q, _ in keys]
    mix = share * zscore_per_query(ce_scores(best_dir, texts), qids) + (1 - share) * zscore_per_query(bi_scorer.score(texts), qids)
    teacher = PairValues(pa.table({"query_id": qids, "doc_id": [d for _, d in keys], "score": mix}))
    rows = to_dataset(build_rows("ntuple-margin", groups, teacher, Texts.of(ds.queries, ds.corpus), num_negatives=3)[0])
    judged = int(pc.sum(pc.greater(pc.list_value_length(groups["positive_ids"]), 0)).as_py())
    students = {}
    for name, (backbone, layers, head) in STUDENTS.items():
        out = work / f"student-{backbone}-{layers}-{head}"
        if not (out / "config.json").exists():
            init = str(best_dir) if backbone == "teacher" else entry.student
            t0 = time.perf_counter()
            train_student(rows.shuffle(seed=12), "PackedMarginMSELoss", out, student=init, student_layers=layers, student_head=head,
                          epochs=1, batch_size=16, learning_rate=entry.learning_rate, max_length=entry.max_length, seed=12)
            print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        scorer = ce_scorer(out)
        students[name] = {"ndcg@10": ndcg(scorer.score(dev.pairs, desc=out.name))}
        timed[f"student: {name}"] = lambda pairs, qids, s=scorer: s.score(pairs, show_progress=False)
        print(f"[dev] student {name}: {students[name]['ndcg@10']:.4f}", flush=True)
    speed, timing = speed_in_turns(dev, timed, args.timing_queries)
    for name, figures in speed.items():
        table_row = students[name.removeprefix("student: ")] if name.startswith("student: ") else teachers[name]
        table_row.update(figures)

    results = {"meta": {"output_dir": args.output_dir, "dev_queries": len(dev.queries), "dev_pairs": len(dev.pairs),
                        "judged_train_queries": judged, "train_rows": len(rows), "chosen": {"recipe": best, "share": share}, "speed": timing,
                        "command": " ".join(sys.argv)},
               "teachers": teachers, "mixes": mixes, "students": students}
    write_results(results, Path(args.results), table, plot=False)


def table(r: dict) -> str:
    m = r["meta"]
    lines = [f"Dev split of `{m['output_dir']}`'s data: {m['dev_queries']} queries, {m['dev_pairs']} pairs (true top-20), seed 12, "
             f"teachers trained on {m['judged_train_queries']} judged queries. Speed: the models take turns on the "
             f"{m['speed']['pairs']:,} pairs of the first {m['speed']['queries']} dev queries, in bf16, after an untimed first block.", "",
             "| teacher | dev nDCG@10 | pairs/s (bf16) |", "|---|---:|---:|"]
    for name, x in r["teachers"].items():
        pps = f"{x['pairs_per_second']:.0f}" if "pairs_per_second" in x else ""
        lines.append(f"| {name} | {x['ndcg@10']:.4f} | {pps} |")
    lines += ["", "| mixed with the bi-encoder, cross-encoder share | " + " | ".join(f"{w:g}" for w in SHARES) + " |",
              "|---|" + "---:|" * len(SHARES)]
    lines += [f"| {n} | " + " | ".join(f"{v[f'{w:g}']:.4f}" for w in SHARES) + " |" for n, v in r["mixes"].items()]
    lines += ["", f"Students distilled from the chosen mix ({m['chosen']['recipe']}, share {m['chosen']['share']:g}) "
              f"on {m['train_rows']} training queries:", "", "| student | dev nDCG@10 | pairs/s (bf16) |", "|---|---:|---:|"]
    lines += [f"| {n} | {x['ndcg@10']:.4f} | {x['pairs_per_second']:.0f} |" for n, x in r["students"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
