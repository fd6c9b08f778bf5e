"""Evaluation: rerank each test query's retrieval candidates and compute nDCG@10, MRR@10 and MAP.

Every ranker sees the same candidate lists: the first-stage retriever's own order (its cosine
scores), the teacher, the untrained student and the trained student. Metrics come from
ir-measures (pytrec_eval underneath); pairs/s is measured on this run's device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

METRIC_NAMES = {"nDCG@10": "ndcg@10", "RR@10": "mrr@10", "AP": "map"}


def ranking_metrics(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """nDCG@10, MRR@10 and MAP of ``run`` over the queries in ``run`` that have judgments."""
    import ir_measures
    from ir_measures import AP, RR, nDCG

    judged = {q: r for q, r in qrels.items() if q in run}
    agg = ir_measures.calc_aggregate([nDCG @ 10, RR @ 10, AP], judged, {q: run[q] for q in judged})
    return {METRIC_NAMES[str(m)]: float(v) for m, v in agg.items()}


def candidate_pairs(candidates: pa.Table, limit: int | None = None) -> tuple[list[str], list[str], list[float]]:
    """Flatten candidate lists into (query_id, doc_id, retrieval score) triples."""
    c = candidates.to_pydict()
    qids, dids, scores = [], [], []
    for i, (q, docs, ss) in enumerate(zip(c["query_id"], c["doc_ids"], c["scores"])):
        if limit and i >= limit:
            break
        qids += [q] * len(docs)
        dids += docs
        scores += ss
    return qids, dids, scores


def to_run(qids: list[str], dids: list[str], scores) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for q, d, s in zip(qids, dids, scores):
        run.setdefault(q, {})[d] = float(s)
    return run


def timed_scores(score: Callable[[], np.ndarray], n_pairs: int) -> tuple[np.ndarray, float]:
    """Run ``score`` and return (scores, pairs per second)."""
    t0 = time.perf_counter()
    out = score()
    seconds = time.perf_counter() - t0
    return np.asarray(out, np.float32), (n_pairs / seconds if seconds > 0 else float("inf"))


def evaluate_rankers(
    qids: list[str],
    dids: list[str],
    qrels: dict[str, dict[str, int]],
    rankers: dict[str, tuple[np.ndarray, float]],
) -> dict[str, dict[str, float]]:
    """Metrics per ranker from its scores on the flattened candidate pairs and its pairs/s."""
    out = {}
    for name, (scores, pps) in rankers.items():
        m = ranking_metrics(to_run(qids, dids, scores), qrels)
        m["pairs_per_second"] = float(round(pps, 2))
        out[name] = m
    return out


def verdict(test: dict[str, dict[str, float]]) -> list[str]:
    """Plain sentences on whether each reranker is worth running over the retriever."""
    lines = []
    base = test["retriever"]["ndcg@10"]
    for name in ("teacher", "student"):
        if name not in test:
            continue
        diff = test[name]["ndcg@10"] - base
        if diff > 0:
            lines.append(f"The {name} beats the retriever's own order by {diff:+.3f} nDCG@10.")
        else:
            lines.append(
                f"The {name} does NOT beat the retriever's own order ({diff:+.3f} nDCG@10): "
                f"reranking with it makes results worse than no reranker."
            )
    if "student" in test and "student_untrained" in test:
        gain = test["student"]["ndcg@10"] - test["student_untrained"]["ndcg@10"]
        lines.append(f"Training moved the student {gain:+.3f} nDCG@10 from its untrained start.")
    if "student" in test and "teacher" in test and test["teacher"]["ndcg@10"] > 0:
        q = test["student"]["ndcg@10"] / test["teacher"]["ndcg@10"]
        s = test["student"]["pairs_per_second"] / max(test["teacher"]["pairs_per_second"], 1e-9)
        lines.append(f"The student keeps {q:.1%} of the teacher's nDCG@10 at {s:.1f}x its speed.")
    return lines


def evaluate_student(
    data_dir,
    mined_dir,
    student_dir,
    out_dir,
    teacher: str,
    teacher_weights: str,
    student: str,
    student_layers: int,
    student_head: str,
    embedder: str,
    params: dict,
    stages: dict,
    timings: dict,
    device: str = "cpu",
    precision: str = "auto",
    max_length: int = 256,
    teacher_max_length: int = 512,
    max_eval_queries: int = 0,
    seed: int = 12,
    baseline_cache: str | None = None,
) -> dict:
    """Stage entry: test metrics of retriever, teacher, untrained and trained student; metrics.json,
    report.md and plots in ``out_dir``.

    ``baseline_cache`` (a file path) keeps the retriever, teacher and untrained-student scores,
    which do not depend on how the student was trained, so comparing many students pays for
    them once.
    """
    from pathlib import Path

    import pyarrow.parquet as pq
    import torch

    from pipeline.artifacts import atomic_dir, write_json
    from pipeline.data import load_normalized
    from pipeline.models import cut_student, load_bi_encoder, load_cross_encoder, resolve_precision
    from pipeline.report import plot_mining, plot_quality_speed, plot_scores, write_report
    from pipeline.scoring import BiEncoderScorer, CrossEncoderScorer, TeacherSpec, load_teacher

    ds = load_normalized(data_dir)
    qrels = ds.relevant("test")
    cand = pq.read_table(Path(mined_dir) / "candidates-test.parquet")
    qids, dids, retrieval = candidate_pairs(cand, max_eval_queries or None)
    pairs = [(ds.queries[q], ds.passage(d)) for q, d in zip(qids, dids)]
    dtype = resolve_precision(precision, device)

    rankers = _cached_baselines(baseline_cache, len(pairs))
    if rankers is None:
        # The retriever's scores come from mining; its speed is measured by re-scoring a sample.
        sample = pairs[: min(len(pairs), 256)]
        retriever = BiEncoderScorer(load_bi_encoder(embedder, device, max_length), device, dtype)
        _, retriever_pps = timed_scores(lambda: retriever.score(sample), len(sample))
        rankers = {"retriever": (np.asarray(retrieval, np.float32), retriever_pps)}

        t = load_teacher(TeacherSpec.parse(teacher, teacher_weights), device, precision, teacher_max_length)
        rankers["teacher"] = timed_scores(lambda: t.score(pairs, qids), len(pairs))
        del t

        torch.manual_seed(seed)
        untrained = CrossEncoderScorer(cut_student(student, student_layers, device, max_length, head=student_head), device, dtype)
        rankers["student_untrained"] = timed_scores(lambda: untrained.score(pairs, desc="untrained student"), len(pairs))
        _store_baselines(baseline_cache, rankers)
    trained = CrossEncoderScorer(load_cross_encoder(str(student_dir), device, max_length), device, dtype)
    rankers["student"] = timed_scores(lambda: trained.score(pairs, desc="student"), len(pairs))

    test = evaluate_rankers(qids, dids, qrels, rankers)
    lines = verdict(test)
    metrics = {
        "test": test,
        "test_queries": len(set(qids)),
        "test_pairs": len(pairs),
        "verdict": lines,
        "params": params,
        "stages": stages,
        "timings": timings,
    }
    plots = {"scatter": "teacher_vs_student.png", "quality_speed": "quality_vs_speed.png"}
    with atomic_dir(out_dir) as tmp:
        plot_scores(rankers["teacher"][0], rankers["student"][0], tmp / plots["scatter"])
        plot_quality_speed(test, tmp / plots["quality_speed"])
        if (Path(mined_dir) / "groups.parquet").exists():
            plots["mining"] = "mined_negatives.png"
            plot_mining(pq.read_table(Path(mined_dir) / "groups.parquet"), tmp / plots["mining"])
        write_json(tmp / "metrics.json", metrics)
        write_report(tmp / "report.md", metrics, lines, plots)
    return metrics


def _cached_baselines(path, n_pairs: int):
    if not path or not Path(path).exists():
        return None
    z = np.load(path)
    out = {name: (z[name], float(z[f"{name}_pps"])) for name in ("retriever", "teacher", "student_untrained")}
    return out if all(len(v[0]) == n_pairs for v in out.values()) else None


def _store_baselines(path, rankers) -> None:
    if not path:
        return
    from pipeline.artifacts import atomic_file

    arrays = {}
    for name, (scores, pps) in rankers.items():
        arrays[name] = scores
        arrays[f"{name}_pps"] = np.asarray(pps)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
