"""End-to-end benchmark: the project's pipeline against a plain sentence-transformers script,
same models, same data, same budget, in one run.

(a) the project: PrepareData → MineHardNegatives → ScoreWithTeacher → BuildLabels → FitStudent;
(b) the plain script: ``mine_hard_negatives``, the teacher's scores (``CrossEncoder.predict`` for
    a cross-encoder teacher, ``SentenceTransformer.similarity`` for a bi-encoder one),
    ``CrossEncoderTrainer`` with ``MarginMSELoss``; and the same script with
    ``BinaryCrossEntropyLoss`` on the mined data and no teacher.

Both use the same trained teacher (fine-tuned once, before timing, as the demo does), the
same embedder, student backbone and training budget. Each job runs in its own subprocess, so
its peak memory is its own. Every model is then evaluated on the same test candidates.

    make bench-e2e                              # the demo
    make bench-e2e DATASET=path/to/beir-folder  # any BEIR-style folder
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The demo's settings (luigi.cfg [TrainStudent]); both sides get exactly these.
BUDGET = dict(
    max_train_queries=600, num_negatives=3, range_max=50, max_length=128, teacher_max_length=128,
    student_layers=3, epochs=1.0, batch_size=16, learning_rate=3e-4, label_scale=1.0, rerank_top_k=20,
    max_eval_queries=0, seed=12,
)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def luigi_params(args, out: Path) -> dict:
    p = {k: v for k, v in BUDGET.items()}
    p.update(
        dataset=args.dataset, output_dir=str(out), embedder=args.embedder, student=args.student,
        teacher=args.teacher, device="cpu", max_dev_queries=0,
    )
    return p


def job_project(args) -> dict:
    import luigi

    import tasks

    params = luigi_params(args, Path(args.work) / "project")
    # include_significant=True: luigi otherwise lists only significant parameters, which silently
    # dropped max_dev_queries=0 (and device) and gave the project's training a dev evaluation to pay for.
    params = {k: v for k, v in params.items() if k in tasks.FitStudent.get_param_names(include_significant=True)}
    t0 = time.perf_counter()
    ok = luigi.build([tasks.FitStudent(**params)], local_scheduler=True, workers=1, log_level="WARNING")
    wall = time.perf_counter() - t0
    if not ok:
        raise SystemExit("the project's pipeline failed (see the log above)")
    fit = tasks.FitStudent(**params)
    names = {"PrepareData": "prepare", "MineHardNegatives": "mine", "ScoreWithTeacher": "score",
             "BuildLabels": "labels", "FitStudent": "train"}
    stages = {}
    for cls_name, key in names.items():
        stages[key] = fit.clone(getattr(tasks, cls_name)).stats().get("seconds", 0.0)
    train = fit.stats()
    return {
        "seconds": wall, "stages": stages, "peak_mib": peak_mib(), "student": str(fit.artifact()),
        "samples_per_second": train["samples_per_second"], "rows": train["rows"],
        "mined": str(fit.clone(tasks.MineHardNegatives).artifact()),
        "prepared": str(fit.clone(tasks.PrepareData).artifact()),
        "labels": str(fit.clone(tasks.BuildLabels).artifact() / "dataset"),
    }


def _plain_mined(ds, model):
    """The plain script's mining: mine_hard_negatives over the same training queries."""
    import hashlib

    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    train = ds.relevant("train")
    qids = sorted(train, key=lambda q: hashlib.sha1(f"{BUDGET['seed']}:{q}".encode()).hexdigest())
    qids = qids[: BUDGET["max_train_queries"]]
    rows = [(ds.queries[q], ds.passage(d)) for q in qids for d in train[q]]
    pairs = Dataset.from_dict({"query": [q for q, _ in rows], "positive": [p for _, p in rows]})
    return mine_hard_negatives(
        pairs, model, corpus=[ds.passage(d) for d in ds.corpus], num_negatives=BUDGET["num_negatives"],
        range_max=BUDGET["range_max"], use_faiss=True, output_format="n-tuple", verbose=False,
    )


def _plain_student(args):
    from pipeline.models import cut_student

    # What the plain way gives: CrossEncoder(backbone, num_labels=1), a [CLS] head, cut to N layers.
    return cut_student(args.student, BUDGET["student_layers"], "cpu", BUDGET["max_length"], head="cls")


def _plain_train(model, train_ds, loss, out: Path) -> float:
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from transformers import set_seed

    set_seed(BUDGET["seed"])
    targs = CrossEncoderTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=BUDGET["epochs"],
        per_device_train_batch_size=BUDGET["batch_size"], learning_rate=BUDGET["learning_rate"], warmup_ratio=0.1,
        use_cpu=True, save_strategy="no", report_to="none", seed=BUDGET["seed"], logging_steps=10,
    )
    t0 = time.perf_counter()
    CrossEncoderTrainer(model=model, args=targs, train_dataset=train_ds, loss=loss).train()
    seconds = time.perf_counter() - t0
    model.save_pretrained(str(out))
    return seconds


def job_plain(args) -> dict:
    """What a user writes with sentence-transformers alone."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.cross_encoder.losses import MarginMSELoss

    from pipeline.data import load_normalized
    from pipeline.models import model_kind

    out = Path(args.work) / "plain"
    stages = {}
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    ds = load_normalized(args.prepared)  # same parsing cost as the project's PrepareData, which is timed there
    embedder = SentenceTransformer(args.embedder, device="cpu")
    embedder.max_seq_length = BUDGET["max_length"]
    mined = _plain_mined(ds, embedder)
    stages["mine"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n = BUDGET["num_negatives"]
    cols = ["positive"] + [f"negative_{i}" for i in range(1, n + 1)]
    flat = [(r["query"], r[c]) for r in mined for c in cols]
    if model_kind(args.teacher) == "bi-encoder":
        teacher = SentenceTransformer(args.teacher, device="cpu")
        teacher.max_seq_length = BUDGET["teacher_max_length"]
        q = teacher.encode([a for a, _ in flat], batch_size=32, convert_to_tensor=True)
        p = teacher.encode([b for _, b in flat], batch_size=32, convert_to_tensor=True)
        scores = teacher.similarity_pairwise(q, p).numpy()
    else:
        teacher = CrossEncoder(args.teacher, device="cpu", max_length=BUDGET["teacher_max_length"])
        scores = teacher.predict(flat, batch_size=32, activation_fn=torch.nn.Identity())
    scores = np.asarray(scores, np.float64).reshape(len(mined), n + 1) * BUDGET["label_scale"]
    stages["score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    margins = (scores[:, :1] - scores[:, 1:]).tolist()
    train_ds = Dataset.from_dict({"query": mined["query"], **{c: mined[c] for c in cols}, "label": margins}).shuffle(seed=BUDGET["seed"])
    student = _plain_student(args)
    stages["train"] = _plain_train(student, train_ds, MarginMSELoss(student), out / "margin-mse")
    train_seconds = stages["train"]
    seconds = time.perf_counter() - t_all
    peak = peak_mib()

    # The no-teacher baseline: BCE on (query, positive, 1) and (query, negative_i, 0) from the same mined rows.
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    pairs = [(r["query"], r[c], 1.0 if c == "positive" else 0.0) for r in mined for c in cols]
    bce_ds = Dataset.from_dict({"query": [a for a, _, _ in pairs], "passage": [b for _, b, _ in pairs],
                                "label": [y for _, _, y in pairs]}).shuffle(seed=BUDGET["seed"])
    bce = _plain_student(args)
    _plain_train(bce, bce_ds, BinaryCrossEntropyLoss(bce), out / "bce")
    return {
        "seconds": seconds, "stages": stages, "peak_mib": peak, "student": str(out / "margin-mse"),
        "bce_student": str(out / "bce"), "samples_per_second": len(train_ds) * BUDGET["epochs"] / train_seconds,
        "rows": len(train_ds),
    }


def job_evaluate(args) -> dict:
    """Every model on the project's test candidates: the retriever's top-k of each test query."""
    import luigi

    import tasks
    from pipeline.data import load_normalized
    from pipeline.evaluation import candidate_pairs, evaluate_rankers, timed_scores
    from pipeline.models import load_cross_encoder
    from pipeline.scoring import CrossEncoderScorer

    import pyarrow.parquet as pq
    import torch

    params = luigi_params(args, Path(args.work) / "project")
    ev = tasks.EvaluateStudent(**params)
    assert luigi.build([ev], local_scheduler=True, workers=1, log_level="WARNING")
    metrics = json.loads(Path(ev.output().path).read_text())
    test = metrics["test"]
    test["student (project)"] = test.pop("student")

    ds = load_normalized(args.prepared)
    cand = pq.read_table(Path(args.mined) / "candidates-test.parquet")
    qids, dids, _ = candidate_pairs(cand, BUDGET["max_eval_queries"])
    pairs = [(ds.queries[q], ds.passage(d)) for q, d in zip(qids, dids)]
    rankers = {}
    for name, path in (("student (plain script)", args.plain_student), ("student (BCE, no teacher)", args.bce_student)):
        scorer = CrossEncoderScorer(load_cross_encoder(path, "cpu", BUDGET["max_length"]), "cpu", torch.float32)
        rankers[name] = timed_scores(lambda: scorer.score(pairs), len(pairs))
    test.update(evaluate_rankers(qids, dids, ds.relevant("test"), rankers))
    return {"test": test, "report": str(Path(ev.output().path).parent / "report.md")}


def job_train_ab(args) -> dict:
    """Training speed alone, alternating in one process: the plain trainer + MarginMSELoss against
    the project's train_student (PackedMarginMSELoss, length-grouped batches), same rows, N rounds.

    The end-to-end jobs run in separate processes, and on a shared VM one process can run 15-50%
    slower than the next; alternating in one process cancels that drift.
    """
    from datasets import Dataset
    from sentence_transformers.cross_encoder.losses import MarginMSELoss

    from pipeline.training import train_student

    rows = Dataset.load_from_disk(args.labels).shuffle(seed=BUDGET["seed"]).select(range(args.ab_rows))
    out = Path(args.work) / "train-ab"
    plain, project = [], []
    for _ in range(args.ab_rounds):
        student = _plain_student(args)
        plain.append(len(rows) / _plain_train(student, rows, MarginMSELoss(student), out / "plain"))
        stats = train_student(
            rows, "PackedMarginMSELoss", out / "project", args.student, BUDGET["student_layers"], epochs=1.0,
            batch_size=BUDGET["batch_size"], learning_rate=BUDGET["learning_rate"], max_length=BUDGET["max_length"],
        )
        shutil.rmtree(out / "project")
        project.append(stats["samples_per_second"])
    return {"rows": len(rows), "plain": plain, "project": project,
            "median_ratio": float(np.median(project) / np.median(plain))}


def run_job(job: str, args, extra: list[str]) -> dict:
    out = Path(args.work) / f"{job}.json"
    cmd = [sys.executable, __file__, "--job", job, "--result", str(out), "--work", args.work, "--dataset", args.dataset,
           "--embedder", args.embedder, "--student", args.student, "--teacher", args.teacher, *extra]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(out.read_text())


def ensure_teacher(args) -> str:
    """The demo's teacher (FineTuneTeacher with luigi.cfg's settings), trained once and shared."""
    if args.teacher:
        return args.teacher
    import luigi

    import tasks

    t = tasks.TrainStudent(dataset=args.dataset, output_dir=str(Path(args.work) / "teacher")).clone(tasks.FineTuneTeacher)
    assert luigi.build([t], local_scheduler=True, workers=1, log_level="WARNING")
    return str(t.artifact())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="data/debian-descriptions")
    ap.add_argument("--embedder", default="models/all-MiniLM-L6-v2")
    ap.add_argument("--student", default="models/all-MiniLM-L6-v2")
    ap.add_argument("--teacher", default="", help="a trained teacher; default: fine-tune the demo's once")
    ap.add_argument("--work", default="runs/bench-e2e")
    ap.add_argument("--results", default="benchmarks/results/e2e")
    ap.add_argument("--ab-rows", type=int, default=320, help="rows per round of the training-speed A/B")
    ap.add_argument("--ab-rounds", type=int, default=3)
    ap.add_argument("--ab-only", action="store_true", help="rerun only the training A/B on the last run's labels")
    ap.add_argument("--job", choices=["project", "plain", "evaluate", "train-ab"], help=argparse.SUPPRESS)
    ap.add_argument("--labels", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--prepared", help=argparse.SUPPRESS)
    ap.add_argument("--mined", help=argparse.SUPPRESS)
    ap.add_argument("--plain-student", help=argparse.SUPPRESS)
    ap.add_argument("--bce-student", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        jobs = {"project": job_project, "plain": job_plain, "evaluate": job_evaluate, "train-ab": job_train_ab}
        result = jobs[args.job](args)
        Path(args.result).write_text(json.dumps(result))
        return

    work = Path(args.work)
    args.work = str(work)
    out = Path(args.results)
    ab_args = ["--ab-rows", str(args.ab_rows), "--ab-rounds", str(args.ab_rounds)]
    if args.ab_only:
        results = json.loads(out.with_suffix(".json").read_text())
        from bench_student import margin_labels  # other studies may have built other formats there

        labels = margin_labels(work / "project") / "dataset"
        results["train_ab"] = run_job("train-ab", args, ["--labels", str(labels), *ab_args])
        write_results(results, out)
        return
    for side in ("project", "plain"):  # both start cold: no embedding or score caches
        shutil.rmtree(work / side, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    args.teacher = ensure_teacher(args)
    project = run_job("project", args, [])
    plain = run_job("plain", args, ["--prepared", project["prepared"]])
    ev = run_job("evaluate", args, ["--prepared", project["prepared"], "--mined", project["mined"],
                                    "--plain-student", plain["student"], "--bce-student", plain["bce_student"]])
    results = {
        "meta": {"machine": f"{platform.machine()}, {shutil.os.cpu_count()} cores, CPU", "dataset": args.dataset,
                 "teacher": args.teacher, "budget": BUDGET, "command": " ".join(sys.argv)},
        "project": {k: v for k, v in project.items() if k not in ("prepared", "mined", "labels")},
        "plain": plain,
        "test": ev["test"],
        "train_ab": run_job("train-ab", args, ["--labels", project["labels"], *ab_args]),
    }
    write_results(results, out)


def write_results(results: dict, out: Path) -> None:
    from pipeline.artifacts import atomic_file, write_json
    from pipeline.report import plot_quality_speed

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), results)
    plot_quality_speed(results["test"], out.with_suffix(".png"))
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text(table(results))
    print(table(results))


def table(r: dict) -> str:
    test, p, s = r["test"], r["project"], r["plain"]
    teacher = test["teacher"]
    lines = [
        f"`{r['meta']['dataset']}`, {r['meta']['machine']}; {r['meta']['budget']['max_train_queries']} training queries × "
        f"{r['meta']['budget']['num_negatives']} negatives, {r['meta']['budget']['student_layers']}-layer student, "
        f"{r['meta']['budget']['epochs']:g} epoch, lr {r['meta']['budget']['learning_rate']:g}; "
        f"{r['meta']['budget']['max_eval_queries'] or 'all'} test queries × top-{r['meta']['budget']['rerank_top_k']}.",
        "",
        "| model | nDCG@10 | MRR@10 | pairs/s | nDCG ÷ teacher | speed ÷ teacher |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in test.items():
        lines.append(
            f"| {name} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['pairs_per_second']:.1f} | "
            f"{m['ndcg@10'] / teacher['ndcg@10']:.3f} | {m['pairs_per_second'] / teacher['pairs_per_second']:.2f} |"
        )
    lines += [
        "",
        "| stage (seconds) | project | plain script | plain ÷ project |",
        "|---|---:|---:|---:|",
    ]
    p_stages = dict(p["stages"])
    p_stages["mine"] = p_stages.pop("prepare", 0) + p_stages["mine"]  # the plain script parses the data inside mining
    for k in ("mine", "score", "labels", "train"):
        a, b = p_stages.get(k, 0.0), s["stages"].get(k, 0.0)
        lines.append(f"| {k} | {a:.1f} | {b:.1f} | {b / a:.2f} |" if a and b else f"| {k} | {a:.1f} | {b:.1f} | |")
    lines += [
        f"| **total (process wall)** | {p['seconds']:.1f} | {s['seconds']:.1f} | {s['seconds'] / p['seconds']:.2f} |",
        f"| peak memory (MiB) | {p['peak_mib']:.0f} | {s['peak_mib']:.0f} | {s['peak_mib'] / p['peak_mib']:.2f} |",
        f"| training samples/s | {p['samples_per_second']:.2f} | {s['samples_per_second']:.2f} | "
        f"{p['samples_per_second'] / s['samples_per_second']:.2f}× project |",
        "",
        "The plain script's total covers MarginMSE only; its BCE baseline is trained afterwards, outside the timing.",
    ]
    ab = r.get("train_ab")
    if ab:
        lines += [
            "",
            f"Training speed alone, alternating in one process ({len(ab['plain'])} rounds of {ab['rows']} rows): "
            f"plain trainer + MarginMSELoss {' / '.join(f'{x:.2f}' for x in ab['plain'])} samples/s, project "
            f"{' / '.join(f'{x:.2f}' for x in ab['project'])}: **{ab['median_ratio']:.2f}×** by median.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
