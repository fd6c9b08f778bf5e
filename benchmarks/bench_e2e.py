"""End-to-end benchmark: the project's pipeline against what a competent sentence-transformers user
writes from its documentation, on the same data, teacher and budget, in one run.

(a) the project: PrepareData → MineHardNegatives → ScoreWithTeacher → BuildLabels (luigi.cfg's
    [TrainStudent] settings), then ``train_student`` with PackedMarginMSELoss and the default head;
(b) the plain script: ``mine_hard_negatives`` → the teacher's scores (``CrossEncoder.predict``, or
    ``SentenceTransformer.similarity_pairwise`` for a bi-encoder teacher; an ensemble teacher's
    members each so, mixed as its ensemble.json says) → ``CrossEncoderTrainer``
    with ``MarginMSELoss`` on a standard ``CrossEncoder`` (sequence-classification head) cut from
    the same backbone to the same depth;
(c) label-only training: the project's student trained with BinaryCrossEntropyLoss on the judged
    positives and mined negatives, no teacher.

Both sides use the same fine-tuned teacher (trained once, not timed). Each side's learning rate
is chosen on the dev split from the same grid; test is reported, never tuned on. Every student
is trained with several seeds; a row is the mean ± std over seeds, and comparisons are paired
t-tests over test queries (each query's nDCG@10 averaged over seeds). Candidates are the
retriever's true top-k; every ranker is timed on the same test pairs with the same scorer.

    make bench-e2e                              # the demo
    make bench-e2e DATASET=path/to/beir-folder  # any BEIR-style folder (nothing tuned on it but the lr grid on its dev split)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The grid every side's learning rate is chosen from: sentence-transformers' usual fine-tuning
# rates (2e-5 is CrossEncoderTrainer's default) up to the rates a cut student needs.
GRID = (2e-5, 1e-4, 3e-4, 1e-3)
SEEDS = (12, 13, 14)
# Test queries whose candidates every ranker is timed on: the pipeline's --timing-queries default.
TIMING_QUERIES = 200


def student_params(fit) -> dict:
    """FitStudent's plain parameters, with the precision, input lengths and depth it resolves (bf16
    on CPUs with bf16 instructions; a length of 0 fitted to the dataset; with --student-speedup, the
    depth its ChooseStudentDepth stage measures here), in which the benchmarks train and score
    their models as the pipeline would."""
    import luigi

    import tasks
    from pipeline.depth import chosen_layers

    layers = fit.student_layers
    if "depth" in fit.requires():
        depth = fit.requires()["depth"]
        if not luigi.build([depth], local_scheduler=True, workers=1, log_level="WARNING"):
            raise SystemExit("the pipeline's depth stage failed (see the log above)")
        layers = chosen_layers(depth.artifact())
    return {
        **{k: v for k, v in fit.param_kwargs.items() if isinstance(v, (int, float, str))}, "precision": fit.config.precision,
        "max_length": fit.config.max_length, "teacher_max_length": tasks.stages.fitted_teacher_max_length(fit), "student_layers": layers,
    }


def project_upstream(args) -> dict:
    """The project's stages up to the labels, with luigi.cfg's [TrainStudent] settings."""
    import luigi

    import tasks

    entry = tasks.TrainStudent(dataset=args.dataset, output_dir=str(Path(args.work) / "project"))
    labels = entry.clone(tasks.BuildLabels)
    if not luigi.build([labels], local_scheduler=True, workers=1, log_level="WARNING"):
        raise SystemExit("the project's pipeline failed (see the log above)")
    stages = {name: entry.clone(getattr(tasks, name)).stats().get("seconds", 0.0)
              for name in ("PrepareData", "MineHardNegatives", "ScoreWithTeacher", "BuildLabels")}
    fit = entry.clone(tasks.FitStudent)
    return {
        "params": student_params(fit),
        "stages": stages,
        "data": entry.clone(tasks.PrepareData).artifact(),
        "mined": entry.clone(tasks.MineHardNegatives).artifact(),
        "labels": labels.artifact() / "dataset",
        "teacher": tasks.stages.resolved_teacher(entry),
    }


def plain_upstream(ds, p: dict, teacher: str) -> tuple[object, dict]:
    """The plain script's mining and teacher scores: MarginMSE rows as the documentation builds them."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    stages = {}
    t0 = time.perf_counter()
    train = ds.relevant("train")
    qids = sorted(train, key=lambda q: hashlib.sha1(f"{p['seed']}:{q}".encode()).hexdigest())[: p["max_train_queries"] or None]
    rows = [(ds.queries[q], ds.passage(d)) for q in qids for d in train[q]]
    embedder = SentenceTransformer(p["embedder"], device="cpu")
    embedder.max_seq_length = p["max_length"]
    mined = mine_hard_negatives(
        Dataset.from_dict({"query": [q for q, _ in rows], "positive": [d for _, d in rows]}), embedder,
        corpus=[ds.passage(d) for d in ds.corpus], num_negatives=p["num_negatives"], range_max=p["range_max"],
        use_faiss=True, output_format="n-tuple", verbose=False,
    )
    stages["mine"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cols = ["positive"] + [f"negative_{i}" for i in range(1, p["num_negatives"] + 1)]
    flat = [(r["query"], r[c]) for r in mined for c in cols]
    scores = plain_teacher_scores(teacher, flat, len(cols), p["teacher_max_length"]) * p["label_scale"]
    stages["score"] = time.perf_counter() - t0
    margins = (scores[:, :1] - scores[:, 1:]).tolist()
    data = Dataset.from_dict({"query": mined["query"], **{c: mined[c] for c in cols}, "label": margins})
    return data, stages


def plain_teacher_scores(teacher: str, flat: list, width: int, max_length: int) -> np.ndarray:
    """(rows, ``width``) teacher scores of ``flat`` pairs, a row's pairs next to each other, the
    way the documentation computes them: ``CrossEncoder.predict`` for a cross-encoder,
    ``SentenceTransformer.similarity_pairwise`` for a bi-encoder. The members of an ensemble
    folder (the pipeline's fine-tuned teacher, described by its ensemble.json) are each scored so
    and mixed as the folder says: the pipeline's z-scores within a row (a query's group), weighted."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.models import model_kind, strip_kind
    from pipeline.scoring import ensemble_members, zscore_per_query

    members = ensemble_members(teacher)
    rows = np.repeat(np.arange(len(flat) // width), width)
    mixed = np.zeros(len(flat))
    for ref, weight in members:
        if model_kind(ref) == "bi-encoder":
            model = SentenceTransformer(strip_kind(ref), device="cpu")
            model.max_seq_length = max_length
            q = model.encode([a for a, _ in flat], batch_size=32, convert_to_tensor=True)
            d = model.encode([b for _, b in flat], batch_size=32, convert_to_tensor=True)
            raw = model.similarity_pairwise(q, d).numpy()
        else:
            # The cosine head ships its code in the folder (docs/student.md), hence the flag.
            model = CrossEncoder(strip_kind(ref), device="cpu", max_length=max_length, trust_remote_code=True)
            raw = model.predict(flat, batch_size=32, activation_fn=torch.nn.Identity())
        raw = np.asarray(raw, np.float64)
        if len(members) == 1:
            return raw.reshape(-1, width)
        mixed += weight * zscore_per_query(raw, rows)
    return mixed.reshape(-1, width)


def bce_rows(labels_dir: Path):
    """Label-only rows from the project's own groups: (query, positive, 1) and (query, negative, 0)."""
    from datasets import Dataset, load_from_disk

    margin = load_from_disk(str(labels_dir))
    negs = sorted((c for c in margin.column_names if c.startswith("negative_")), key=lambda c: int(c.split("_")[1]))
    q, d, y = [], [], []
    for r in margin:
        for c, label in [("positive", 1.0)] + [(c, 0.0) for c in negs]:
            q.append(r["query"])
            d.append(r[c])
            y.append(label)
    return Dataset.from_dict({"query": q, "passage": d, "label": y})


def train_project(rows, loss: str, out: Path, p: dict, lr: float, seed: int) -> float:
    from pipeline.training import train_student

    stats = train_student(
        rows.shuffle(seed=seed, keep_in_memory=True), loss, out, student=p["student"], student_layers=p["student_layers"],
        student_head=p["student_head"], epochs=p["epochs"], batch_size=p["batch_size"], learning_rate=lr,
        max_length=p["max_length"], precision=p["precision"], seed=seed,
    )
    return stats["seconds"]


def train_plain(rows, out: Path, p: dict, lr: float, seed: int) -> float:
    """CrossEncoderTrainer + MarginMSELoss on a standard CrossEncoder cut to the student's depth."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import MarginMSELoss
    from transformers import set_seed

    from pipeline.models import cut_student

    set_seed(seed)
    model = cut_student(p["student"], p["student_layers"], "cpu", p["max_length"], head="cls")
    targs = CrossEncoderTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=p["epochs"], per_device_train_batch_size=p["batch_size"],
        learning_rate=lr, warmup_ratio=0.1, use_cpu=True, save_strategy="no", report_to="none", seed=seed, logging_steps=10,
    )
    t0 = time.perf_counter()
    CrossEncoderTrainer(model=model, args=targs, train_dataset=rows.shuffle(seed=seed), loss=MarginMSELoss(model)).train()
    seconds = time.perf_counter() - t0
    model.save_pretrained(str(out))
    return seconds


class Split:
    """One split's true top-k candidates, their texts and judgments."""

    def __init__(self, ds, mined: Path, split: str):
        import pyarrow.parquet as pq

        from pipeline.evaluation import candidate_pairs

        self.qids, self.dids, self.retrieval = candidate_pairs(pq.read_table(mined / f"candidates-{split}.parquet"))
        self.pairs = [(ds.queries[q], ds.passage(d)) for q, d in zip(self.qids, self.dids)]
        self.qrels = ds.relevant(split)
        self.queries = [q for q in dict.fromkeys(self.qids) if q in self.qrels]

    def per_query(self, scores) -> np.ndarray:
        from pipeline.evaluation import per_query_metrics, to_run

        return per_query_metrics(to_run(self.qids, self.dids, scores), self.qrels, self.queries)

    def scorer(self, model_dir: Path, max_length: int):
        """The student in ``model_dir``, in fp32 on the CPU like every row of the benchmark."""
        import torch

        from pipeline.models import load_cross_encoder
        from pipeline.scoring import CrossEncoderScorer

        return CrossEncoderScorer(load_cross_encoder(str(model_dir), "cpu", max_length), "cpu", torch.float32)

    def score(self, model_dir: Path, max_length: int) -> np.ndarray:
        """The student's scores of every candidate pair."""
        return np.asarray(self.scorer(model_dir, max_length).score(self.pairs, desc=model_dir.name), np.float32)


def speed_in_turns(split: Split, rankers: dict, queries: int = TIMING_QUERIES) -> tuple[dict, dict]:
    """Pairs/s and ms per query of each ranker, the rankers taking turns on the candidate pairs
    of the split's first ``queries`` queries (``pipeline.evaluation.ranker_speed``, as the
    pipeline's evaluation times them); ``rankers[name](pairs, qids)`` scores a block of pairs."""
    from pipeline.evaluation import ranker_speed

    blocks = {name: (lambda part, f=f: f(split.pairs[part], split.qids[part])) for name, f in rankers.items()}
    speed, timing, _ = ranker_speed(blocks, split.qids, queries)  # quality is scored apart, from every pair
    return speed, timing


def test_rows(
    test: Split, p: dict, teacher_ref: str, students: dict[str, list[Path]], timing_queries: int, untrained: bool = False,
    dev: Split | None = None,
) -> tuple[dict, dict]:
    """Every ranker's test row (``row``) and what was timed: the retriever's order, the teacher,
    with ``untrained`` the untrained student, and each side's students (a folder per seed), all in
    fp32. Quality comes from every pair; speed from the rankers taking turns (``speed_in_turns``),
    a side timed by its first seed's student, since the seeds share architecture and length.
    With a ``dev`` split, each side also gets a row fused with the retriever (``pipeline.fusion``),
    each seed's weight chosen on dev as the pipeline's evaluation chooses it."""
    import torch

    from pipeline.fusion import choose_weight, fused_scores
    from pipeline.models import cut_student, load_bi_encoder
    from pipeline.scoring import BiEncoderScorer, CrossEncoderScorer, TeacherSpec, load_teacher

    def blocks(scorer):
        return lambda pairs, qids: scorer.score(pairs, show_progress=False)

    retriever = BiEncoderScorer(load_bi_encoder(p["embedder"], "cpu", p["max_length"]), "cpu", torch.float32)
    teacher = load_teacher(TeacherSpec.parse(teacher_ref), "cpu", "fp32", p["teacher_max_length"])
    quality = {"retriever": [np.asarray(test.retrieval, np.float32)], "teacher": [np.asarray(teacher.score(test.pairs, test.qids), np.float32)]}
    timed = {"retriever": blocks(retriever), "teacher": lambda pairs, qids: teacher.score(pairs, qids, show_progress=False)}
    print(f"[test] teacher: nDCG@10 {test.per_query(quality['teacher'][0])['ndcg@10'].mean():.4f}", flush=True)
    if untrained:
        torch.manual_seed(SEEDS[0])
        scorer = CrossEncoderScorer(cut_student(p["student"], p["student_layers"], "cpu", p["max_length"], head=p["student_head"]), "cpu", torch.float32)
        quality["student (untrained)"] = [np.asarray(scorer.score(test.pairs, desc="untrained"), np.float32)]
        timed["student (untrained)"] = blocks(scorer)
    fused, weights = {}, {}
    for name, folders in students.items():
        runs = []
        for i, folder in enumerate(folders):
            scorer = test.scorer(folder, p["max_length"])
            runs.append(np.asarray(scorer.score(test.pairs, desc=folder.name), np.float32))
            print(f"[test] {name} {folder.name}: nDCG@10 {test.per_query(runs[-1])['ndcg@10'].mean():.4f}", flush=True)
            if i == 0:
                timed[f"student ({name})"] = blocks(scorer)
            if dev is not None:
                choice = choose_weight(dev.qids, dev.dids, dev.qrels, scorer.score(dev.pairs, desc=f"{folder.name} dev"), dev.retrieval)
                fused.setdefault(name, []).append(fused_scores(test.qids, runs[-1], test.retrieval, choice["weight"]))
                weights.setdefault(name, []).append(choice["weight"])
        quality[f"student ({name})"] = runs
    speed, timing = speed_in_turns(test, timed, timing_queries)
    rows = {name: row(test, runs, speed[name]) for name, runs in quality.items()}
    for name, runs in fused.items():
        # The retriever's score comes with every candidate: a fused row costs what its student costs.
        rows[f"student ({name}) fused"] = {**row(test, runs, speed[f"student ({name})"]), "weights": weights[name]}
    return rows, timing


def row(split: Split, runs: list[np.ndarray], speed: dict | None = None) -> dict:
    """Mean ± std over seeds of each metric, per-query nDCG@10 averaged over seeds, and the
    ranker's ``speed`` figures (``speed_in_turns``)."""
    per_seed = [split.per_query(scores) for scores in runs]
    out = {}
    for metric in ("ndcg@10", "mrr@10", "map"):
        means = [float(m[metric].mean()) for m in per_seed]
        out[metric] = float(np.mean(means))
        out[f"{metric}_std"] = float(np.std(means, ddof=1)) if len(means) > 1 else 0.0
        out[f"{metric}_seeds"] = means
    out.update(speed or {})
    out["per_query_ndcg"] = np.mean([m["ndcg@10"] for m in per_seed], axis=0).tolist()
    return out


def training_digest(labels: Path, p: dict) -> str:
    """A short digest of what a benchmark student is trained from: the labels (``<stage>/dataset``,
    named by the stage's fingerprint) and the training parameters. Students are kept by folder
    name so that an interrupted benchmark resumes; with this in the name, a student whose labels
    or settings changed upstream (a new teacher, another depth, another host's precision) is
    trained anew instead of reused."""
    from pipeline.artifacts import fingerprint

    return fingerprint(labels.parent.name, {k: v for k, v in p.items() if k != "output_dir"}, length=8)


def dev_ndcg(train, out: Path, lr: float, split: Split, p: dict) -> float:
    """Dev nDCG@10 of a student trained at ``lr`` (first seed); kept in ``out``/dev.json, so an
    interrupted benchmark reruns only what it had not finished."""
    done = out / "dev.json"
    if done.exists():
        return json.loads(done.read_text())["ndcg@10"]
    train(out, lr, SEEDS[0])
    value = float(split.per_query(split.score(out, p["max_length"]))["ndcg@10"].mean())
    done.write_text(json.dumps({"ndcg@10": value, "lr": lr}))
    return value


def choose_lr(name: str, train, split: Split, work: Path, p: dict, trained: str) -> tuple[float, dict]:
    """The grid's learning rate with the best dev nDCG@10 (first seed); ``trained`` names what the
    students are trained from (``training_digest``)."""
    dev = {}
    for lr in GRID:
        dev[f"{lr:g}"] = dev_ndcg(train, work / f"{name}-dev-L{p['student_layers']}-lr{lr:g}-{trained}", lr, split, p)
        print(f"[dev] {name} lr {lr:g}: nDCG@10 {dev[f'{lr:g}']:.4f}", flush=True)
    best = max(GRID, key=lambda lr: dev[f"{lr:g}"])
    return best, dev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="data/debian-descriptions")
    ap.add_argument("--work", default="runs/bench-e2e")
    ap.add_argument("--results", default="benchmarks/results/e2e")
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds per student on test (at least 3 for a claim)")
    ap.add_argument("--timing-queries", type=int, default=TIMING_QUERIES, help="test queries whose pairs every ranker is timed on (0: all)")
    ap.add_argument("--reuse-students", action="store_true",
                    help="score the test students already in --work again instead of retraining them; the training "
                         "seconds are then those of the results file that first reported them")
    ap.add_argument("--render", action="store_true", help="only rewrite --results' tables from its JSON (nothing runs)")
    args = ap.parse_args()
    if args.render:
        return render_again(Path(args.results), table)

    from pipeline.data import load_normalized
    from pipeline.evaluation import paired_test

    work = Path(args.work)
    seeds = SEEDS[: args.seeds] if args.seeds <= len(SEEDS) else tuple(range(12, 12 + args.seeds))
    up = project_upstream(args)
    p = up["params"]
    ds = load_normalized(up["data"])
    plain_rows, plain_stages = plain_upstream(ds, p, up["teacher"])
    from datasets import load_from_disk

    sides = {
        "project": lambda out, lr, seed: train_project(load_from_disk(str(up["labels"])), p["loss"], out, p, lr, seed),
        "plain": lambda out, lr, seed: train_plain(plain_rows, out, p, lr, seed),
        "label-only (BCE)": lambda out, lr, seed: train_project(bce_rows(up["labels"]), "BinaryCrossEntropyLoss", out, p, lr, seed),
    }
    dev, test = Split(ds, up["mined"], "dev"), Split(ds, up["mined"], "test")
    chosen, dev_grid = {}, {}
    # The plain side's rows come from the teacher's scores of the mined groups, which the labels'
    # fingerprint covers too.
    trained = training_digest(up["labels"], p)
    for name, train in sides.items():
        chosen[name], dev_grid[name] = choose_lr(name.split()[0], train, dev, work, p, trained)
    # The default depth, checked on dev against one layer less and one more at the chosen rate.
    dev_depth = {str(p["student_layers"]): dev_grid["project"][f"{chosen['project']:g}"]}
    for layers in (p["student_layers"] - 1, p["student_layers"] + 1):
        def train_depth(out, lr, seed, layers=layers):
            return train_project(load_from_disk(str(up["labels"])), p["loss"], out, {**p, "student_layers": layers}, lr, seed)

        dev_depth[str(layers)] = dev_ndcg(train_depth, work / f"project-dev-layers{layers}-{trained}", chosen["project"], dev, p)
    dev_retriever = float(dev.per_query(np.asarray(dev.retrieval, np.float32))["ndcg@10"].mean())

    folders, train_seconds = {}, {}
    earlier = json.loads(Path(args.results).with_suffix(".json").read_text())["stages"] if args.reuse_students else {}
    for name, train in sides.items():
        folders[name] = [work / f"{name.split()[0]}-test-L{p['student_layers']}-{trained}-seed{seed}" for seed in seeds]
        if args.reuse_students and all((f / "config.json").exists() for f in folders[name]):
            train_seconds[name] = earlier.get(name, {}).get("train", float("nan"))
            continue
        train_seconds[name] = float(np.mean([train(out, chosen[name], seed) for seed, out in zip(seeds, folders[name])]))
    rankers, timing = test_rows(test, p, up["teacher"], folders, args.timing_queries, dev=dev)

    def compare(a: str, b: str) -> dict:
        return paired_test(np.asarray(rankers[a]["per_query_ndcg"]), np.asarray(rankers[b]["per_query_ndcg"]))

    comparisons = {
        f"{a} vs {b}": compare(a, b)
        for a, b in (
            ("student (project)", "student (plain)"), ("student (project)", "student (label-only (BCE))"),
            ("student (project)", "retriever"), ("student (plain)", "retriever"), ("teacher", "retriever"),
            ("student (project)", "teacher"), ("student (project) fused", "retriever"),
            ("student (project) fused", "student (label-only (BCE)) fused"), ("student (project) fused", "teacher"),
        )
    }
    stages = {"project": {"mine": up["stages"]["PrepareData"] + up["stages"]["MineHardNegatives"],
                          "score": up["stages"]["ScoreWithTeacher"], "labels": up["stages"]["BuildLabels"],
                          "train": train_seconds["project"]},
              "plain": {**plain_stages, "train": train_seconds["plain"]}}
    results = {
        "meta": {"machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, CPU",
                 "dataset": args.dataset, "teacher": up["teacher"], "params": p, "seeds": list(seeds),
                 "grid": list(GRID), "test_queries": len(test.queries), "dev_queries": len(dev.queries), "speed": timing,
                 "command": " ".join(sys.argv), "reused_students": args.reuse_students},
        "dev_grid": dev_grid,
        "dev_depth": dev_depth,
        "dev_retriever": dev_retriever,
        "chosen_lr": chosen,
        "test": rankers,
        "comparisons": comparisons,
        "stages": stages,
    }
    write_results(results, Path(args.results))


def write_results(results: dict, out: Path, render=None, plot: bool = True) -> None:
    """``out``.json, the ``render``ed tables as ``out``.md (printed too) and, with ``plot``, the
    quality-against-speed plot as ``out``.png."""
    from pipeline.artifacts import atomic_file, write_json
    from pipeline.report import plot_quality_speed

    text = (render or table)(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), results)
    if plot:
        plot_quality_speed(results["test"], out.with_suffix(".png"))
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    print(text)


def dev_grid_rows(r: dict, label: str = "side") -> list[str]:
    """The dev nDCG@10 of each side at each learning rate of the grid, and the rate chosen."""
    grid = r["meta"]["grid"]
    lines = ["| " + label + " | " + " | ".join(f"lr {x:g}" for x in grid) + " | chosen |", "|---|" + "---:|" * (len(grid) + 1)]
    for side, dev in r["dev_grid"].items():
        lines.append(f"| {side} | " + " | ".join(f"{dev[f'{x:g}']:.4f}" for x in grid) + f" | {r['chosen_lr'][side]:g} |")
    return lines


def mean_std(x: dict, metric: str) -> str:
    """``metric`` of one test row, with its std over seeds when there are several."""
    return f"{x[metric]:.4f}" + (f" ± {x[f'{metric}_std']:.4f}" if len(x[f"{metric}_seeds"]) > 1 else "")


def comparison_rows(comparisons: dict) -> list[str]:
    def interval(c: dict) -> str:
        return f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c.get("ci95") else "n/a"

    return ["| comparison (nDCG@10, per query, averaged over seeds) | difference | 95% interval | p (paired t-test) |", "|---|---:|---:|---:|"] + [
        f"| {k} | {c['diff']:+.4f} | {interval(c)} | {c['p_value']:.3g} |" for k, c in comparisons.items()
    ]


def render_again(results_path: Path, render) -> None:
    """Rewrite a results file's tables from its JSON, each comparison recomputed from the per-query
    figures the file stores (so that a statistic added since, such as the interval, appears); the
    recomputed differences and p-values must be the stored ones."""
    from pipeline.evaluation import paired_test

    results = json.loads(results_path.with_suffix(".json").read_text())
    test = results["test"]
    for key, stored in results["comparisons"].items():
        a, b = key.split(" vs ")
        again = paired_test(np.asarray(test[a]["per_query_ndcg"]), np.asarray(test[b]["per_query_ndcg"]))
        assert np.isclose(again["diff"], stored["diff"]) and np.isclose(again["p_value"], stored["p_value"], rtol=1e-6), key
        results["comparisons"][key] = again
    write_results(results, results_path, render, plot=False)


def fusion_sentence(test: dict) -> list[str]:
    """How the fused rows of ``test`` were made, with each seed's weight; nothing without them."""
    fused = {name: x["weights"] for name, x in test.items() if "weights" in x}
    if not fused:
        return []
    weights = "; ".join(f"{k}: w = {', '.join(f'{w:g}' for w in v)}" for k, v in fused.items())
    return ["", "A fused row ranks by w × the student's score + (1 − w) × the retriever's, each z-normalised per query, "
            f"w chosen on dev for each seed's student ({weights})."]


def speed_sentence(meta: dict) -> str:
    """How the rows' pairs/s were measured (``meta["speed"]``, from ``speed_in_turns``)."""
    t = meta["speed"]
    return (f"every row reranks the same {t['pairs']:,} candidate pairs of the first {t['queries']} test queries in fp32 on this "
            f"machine's CPU, the models taking turns over {t['turns']} blocks after an untimed first block, in one process.")


def table(r: dict) -> str:
    m, p = r["meta"], r["meta"]["params"]
    seeds = len(m["seeds"])
    lines = [
        f"`{m['dataset']}`, {m['machine']}. Teacher `{m['teacher']}`; {p['max_train_queries'] or 'all'} training queries × "
        f"{p['num_negatives']} negatives; {p['student_layers']}-layer students cut from `{p['student']}`, {p['epochs']:g} epoch, "
        f"batch {p['batch_size']}. Test: {m['test_queries']} queries, each reranking the retriever's true top-{p['rerank_top_k']}.",
        "",
        f"Learning rate per side chosen on dev ({m['dev_queries']} queries, seed {m['seeds'][0]}) from {', '.join(f'{x:g}' for x in m['grid'])}:",
        "",
        *dev_grid_rows(r),
    ]
    depth = r.get("dev_depth", {})
    lines += [
        "",
        f"The retriever's own order on dev: {r['dev_retriever']:.4f}. Depth of the project's student on dev, at its chosen rate: "
        + ", ".join(f"{k} layers {v:.4f}" for k, v in sorted(depth.items(), key=lambda kv: int(kv[0]))) + ".",
        "",
        f"Test, students mean ± std over {seeds} seeds ({', '.join(map(str, m['seeds']))}). Speed: {speed_sentence(m)}",
        "",
        "| model | nDCG@10 | MRR@10 | pairs/s | ms/query |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, x in r["test"].items():
        lines.append(f"| {name} | {mean_std(x, 'ndcg@10')} | {mean_std(x, 'mrr@10')} | "
                     f"{x.get('pairs_per_second', float('nan')):.1f} | {x.get('ms_per_query', float('nan')):.0f} |")
    lines += [*fusion_sentence(r["test"]), "", *comparison_rows(r["comparisons"])]
    s = r["stages"]
    lines += ["", "| stage (seconds) | project | plain script |", "|---|---:|---:|"]
    lines += [f"| {k} | {s['project'].get(k, 0.0):.1f} | {s['plain'].get(k, 0.0):.1f} |" for k in ("mine", "score", "labels", "train")]
    lines += ["", "Training seconds are the mean over the test seeds; the teacher was fine-tuned once, before, for both sides."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
