"""Evaluation: rerank each query's retrieval candidates and compute nDCG@10, MRR@10 and MAP.

Every ranker sees the same candidates: the first-stage retriever's true top-k, nothing added, so
a judged positive the retriever missed is a miss for every reranker. The retriever's own order is
always a row: a reranker that does not beat it is worse than none. Metrics come from ir-measures
(pytrec_eval underneath) per query, so that any two rankers can be compared with a paired test.
Speed is measured apart from quality, on the same pairs for every ranker, text encoding included,
with the rankers taking turns in one process (``ranker_speed``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa

from pipeline.config import config_fingerprint, model, run_only

log = logging.getLogger(__name__)

METRIC_NAMES = {"nDCG@10": "ndcg@10", "RR@10": "mrr@10", "AP": "map"}
# Which rankers each evaluation compares, (a, b): does a beat b?
COMPARISONS = (
    ("teacher", "retriever"),
    ("student", "retriever"),
    ("student", "teacher"),
    ("student", "student_untrained"),
    ("student", "student_label_only"),
    ("student", "student_cosine"),
    ("student_label_only", "retriever"),
    ("student_fused", "retriever"),
    ("student_fused", "student"),
    ("student_fused", "teacher"),
    ("student_fused", "student_label_only_fused"),
)


def per_query_metrics(
    run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], query_ids: list[str] | None = None
) -> dict[str, np.ndarray]:
    """nDCG@10, MRR@10 and AP per query, in the order of ``query_ids`` (default: the judged
    queries of ``run``). A query whose ranking holds no judged positive scores 0."""
    import ir_measures
    from ir_measures import AP, RR, nDCG

    query_ids = [q for q in (query_ids if query_ids is not None else run) if q in qrels]
    pos = {q: i for i, q in enumerate(query_ids)}
    out = {name: np.zeros(len(query_ids)) for name in METRIC_NAMES.values()}
    judged = {q: qrels[q] for q in query_ids}
    for m in ir_measures.iter_calc([nDCG @ 10, RR @ 10, AP], judged, {q: run.get(q, {}) for q in query_ids}):
        out[METRIC_NAMES[str(m.measure)]][pos[m.query_id]] = m.value
    return out


def ranking_metrics(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """nDCG@10, MRR@10 and MAP of ``run``, the mean over the queries in ``run`` that have judgments."""
    return {name: float(v.mean()) if len(v) else 0.0 for name, v in per_query_metrics(run, qrels).items()}


def paired_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean difference a - b over queries, its 95% confidence interval, and the two-sided p-value
    of a paired t-test (the interval excludes 0 exactly when p < 0.05)."""
    from scipy import stats

    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    out = {"diff": float(diff.mean()), "ci95": [0.0, 0.0], "p_value": 1.0, "queries": int(len(diff)), "test": "paired t-test"}
    # No difference at all: the t statistic is undefined, and there is nothing to detect; from
    # one query nothing can be told.
    if diff.any() and len(diff) < 2:
        out["ci95"] = None
    elif diff.any():
        t = stats.ttest_rel(diff, np.zeros_like(diff))
        out["p_value"] = float(t.pvalue)
        out["ci95"] = [float(x) for x in t.confidence_interval(0.95)]
    return out


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


def judged_candidates(data_dir, mined_dir, split: str, max_queries: int | None = None):
    """The judgments of ``split`` and the retriever's true top-k candidates of its first
    ``max_queries`` queries, as (qrels, query ids, doc ids, retrieval scores); None when mining
    wrote no candidates for that split."""
    import pyarrow.parquet as pq

    from pipeline.data import judgments

    path = Path(mined_dir) / f"candidates-{split}.parquet"
    if not path.exists():
        return None
    return (judgments(data_dir, split), *candidate_pairs(pq.read_table(path), max_queries))


def to_run(qids: list[str], dids: list[str], scores) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for q, d, s in zip(qids, dids, scores):
        run.setdefault(q, {})[d] = float(s)
    return run


TIMING_TURNS = 8  # blocks of the timed queries; every ranker scores each block, the order changing


def ranker_speed(
    rankers: dict[str, Callable[[slice], object]], qids: list[str], max_queries: int = 0, turns: int = TIMING_TURNS
) -> tuple[dict[str, dict[str, float]], dict[str, int], dict[str, np.ndarray]]:
    """Pairs/s and milliseconds per query of each ranker on the candidate pairs of the first
    ``max_queries`` queries (0: all). ``qids`` holds each pair's query, a query's pairs next to
    each other; ``rankers[name](s)`` scores the pairs in slice ``s`` of that list.

    The queries are cut into ``turns`` blocks. Every ranker first scores the first block untimed
    (a model's first calls in a process pay for thread start-up, kernel set-up and allocations),
    then every block timed. Within a block the rankers take turns, in an order that rotates and
    reverses from block to block, so none always follows the same one. A shared machine's speed
    drifts by tens of percent from one minute to the next; timed one after another, a ranker
    takes whatever drift falls in its minutes, while turns spread it over all of them alike.
    Returns the figures by ranker; the queries, pairs and turns they were measured on, with each
    ranker's seconds in every turn (``seconds_per_turn``: turn by turn, the rankers scored the
    same pairs, so their ratios pair up); and each ranker's scores from its timed round, in pair
    order over those pairs (the first ``pairs`` of ``qids``'s), so that no caller scores them a
    second time.
    """
    starts = [i for i in range(len(qids)) if i == 0 or qids[i] != qids[i - 1]]
    n_queries = len(starts) if max_queries <= 0 else min(max_queries, len(starts))
    bounds = [*starts[:n_queries], starts[n_queries] if n_queries < len(starts) else len(qids)]
    if not n_queries:
        nothing = {"queries": 0, "pairs": 0, "turns": 0, "seconds_per_turn": {name: [] for name in rankers}}
        return {name: {} for name in rankers}, nothing, {name: np.zeros(0, np.float32) for name in rankers}
    blocks = [slice(bounds[b[0]], bounds[b[-1] + 1]) for b in np.array_split(np.arange(n_queries), min(turns, n_queries))]
    names = list(rankers)
    for name in names:
        rankers[name](blocks[0])
    per_turn = {name: [0.0] * len(blocks) for name in names}
    timed = {name: [None] * len(blocks) for name in names}
    for turn, part in enumerate(blocks):
        order = names[turn % len(names):] + names[: turn % len(names)]
        for name in order[::-1] if turn % 2 else order:
            t0 = time.perf_counter()
            timed[name][turn] = rankers[name](part)
            per_turn[name][turn] = time.perf_counter() - t0
    seconds = {name: sum(s) for name, s in per_turn.items()}
    n_pairs = bounds[-1]
    speed = {
        name: {"pairs_per_second": round(n_pairs / s, 2) if s > 0 else float("inf"), "ms_per_query": round(1000 * s / n_queries, 2)}
        for name, s in seconds.items()
    }
    scored = {name: np.concatenate([np.asarray(b, np.float32).reshape(-1) for b in parts]) for name, parts in timed.items()}
    measured = {
        "queries": n_queries, "pairs": n_pairs, "turns": len(blocks),
        "seconds_per_turn": {name: [round(x, 5) for x in s] for name, s in per_turn.items()},
    }
    return speed, measured, scored


def after_timing(timed: np.ndarray, score_rest: Callable[[], object], n_pairs: int) -> np.ndarray:
    """A ranker's scores of all ``n_pairs`` pairs: the timing's (:func:`ranker_speed`) for the
    timed pairs at the front, then ``score_rest()``'s for the others, called only if any."""
    rest = np.asarray(score_rest(), np.float32) if n_pairs > len(timed) else np.zeros(0, np.float32)
    return np.concatenate([timed, rest])


def evaluate_rankers(
    qids: list[str],
    dids: list[str],
    qrels: dict[str, dict[str, int]],
    rankers: dict[str, np.ndarray],
    comparisons=COMPARISONS,
    speed: dict[str, dict[str, float]] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict], dict]:
    """Metrics per ranker from its scores on the flattened candidate pairs, with its ``speed``
    figures (:func:`ranker_speed`) where it was timed; a paired test of nDCG@10 for each
    comparison whose rankers are present; and each ranker's nDCG@10 per query (``{"query_ids":
    [...], ranker: [...]}``), so that runs with other seeds can be compared query by query.
    """
    queries = [q for q in dict.fromkeys(qids) if q in qrels]
    out, ndcg = {}, {}
    for name, scores in rankers.items():
        per_query = per_query_metrics(to_run(qids, dids, scores), qrels, queries)
        out[name] = {k: float(v.mean()) if len(v) else 0.0 for k, v in per_query.items()} | (speed or {}).get(name, {})
        ndcg[name] = per_query["ndcg@10"]
    tests = {f"{a} vs {b}": paired_test(ndcg[a], ndcg[b]) for a, b in comparisons if a in ndcg and b in ndcg}
    return out, tests, {"query_ids": queries, **{name: np.round(v, 6).tolist() for name, v in ndcg.items()}}


ALPHA = 0.05  # a difference counts when a paired t-test gives p below this


def outcome(t: dict | None) -> str:
    """'yes' when a paired test shows A above B, 'NO' when it shows A below, else 'not shown'."""
    if t is None:
        return "n/a"
    if t["p_value"] >= ALPHA:
        return "not shown"
    return "yes" if t["diff"] > 0 else "NO"


def verdict(
    test: dict[str, dict[str, float]], significance: dict[str, dict] | None = None, fusion: dict[str, dict] | None = None
) -> list[str]:
    """Plain sentences on whether each reranker is worth running over the retriever."""
    significance, fusion = significance or {}, fusion or {}

    def p_of(a: str, b: str, with_diff: bool = False) -> str:
        t = significance.get(f"{a} vs {b}")
        if not t:
            return ""
        # A sentence that states a ratio, not the difference, names the difference the interval is of.
        diff = f"difference {t['diff']:+.4f}, " if with_diff else ""
        ci = f"{diff}95% interval of the difference [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]; " if t.get("ci95") else diff
        return f" ({ci}paired t-test over {t['queries']} queries: p = {t['p_value']:.3g})"

    subjects = {"teacher": "The teacher", "student": "The student"}
    if "student" in fusion:
        f = fusion["student"]
        subjects["student_fused"] = (
            f"The student fused with the retriever's score (weight {f['weight']:g} on the student, "
            f"chosen on {f['dev_queries']} dev queries)"
        )
    lines = []
    base = test["retriever"]["ndcg@10"]
    for name, subject in subjects.items():
        if name not in test:
            continue
        diff = test[name]["ndcg@10"] - base
        # Without a paired test a gain is not shown: "beats" needs the test, as in every table.
        if outcome(significance.get(f"{name} vs retriever")) == "yes":
            lines.append(f"{subject} beats the retriever's own order by {diff:+.4f} nDCG@10{p_of(name, 'retriever')}.")
        elif diff > 0:
            lines.append(
                f"{subject} is ahead of the retriever's own order by {diff:+.4f} nDCG@10, but not significantly"
                f"{p_of(name, 'retriever')}: it may not be worth running."
            )
        else:
            lines.append(
                f"{subject} does NOT beat the retriever's own order ({diff:+.4f} nDCG@10{p_of(name, 'retriever')}): "
                f"reranking with it makes results worse than no reranker."
            )
    if "student" in test and "student_untrained" in test:
        gain = test["student"]["ndcg@10"] - test["student_untrained"]["ndcg@10"]
        lines.append(f"Training moved the student {gain:+.4f} nDCG@10 from its untrained start{p_of('student', 'student_untrained')}.")
    if "student" in test and "student_cosine" in test:
        gain = test["student"]["ndcg@10"] - test["student_cosine"]["ndcg@10"]
        lines.append(
            f"The student, in sentence-transformers' own modules, ranks {gain:+.4f} nDCG@10 against the cosine-head student "
            f"whose encoder it started from{p_of('student', 'student_cosine')}."
        )
    for name, baseline, how in (
        ("student", "student_label_only", "the same student trained on the judgments alone"),
        ("student_fused", "student_label_only_fused", "the label-only student fused with the retriever the same way"),
    ):
        if name in test and baseline in test:
            gain = test[name]["ndcg@10"] - test[baseline]["ndcg@10"]
            better = outcome(significance.get(f"{name} vs {baseline}")) == "yes"
            if better:
                lines.append(f"Distillation adds {gain:+.4f} nDCG@10 over {how}{p_of(name, baseline)}.")
            else:
                lines.append(f"Distillation shows NO significant gain over {how}: {gain:+.4f} nDCG@10{p_of(name, baseline)}.")
    for name in ("student", "student_fused"):
        if name in test and "teacher" in test and test["teacher"]["ndcg@10"] > 0:
            q = test[name]["ndcg@10"] / test["teacher"]["ndcg@10"]
            subject = "The student" if name == "student" else "Fused with the retriever, the student"
            line = f"{subject} keeps {q:.1%} of the teacher's nDCG@10{p_of(name, 'teacher', with_diff=True)}"
            if "ms_per_query" in test[name] and "ms_per_query" in test["teacher"]:
                s = test["teacher"]["ms_per_query"] / max(test[name]["ms_per_query"], 1e-9)
                line += f" at {s:.1f}x its speed ({test[name]['ms_per_query']:.0f} against {test['teacher']['ms_per_query']:.0f} ms per query)"
            lines.append(line + ".")
    return lines


@dataclass(frozen=True)
class EvalConfig:
    """Settings of the test evaluation (``EvaluateStudent``)."""

    # 1: each ranker scores the timed pairs once, in turns, and those scores are its quality scores.
    # 2: fusion.json (the student's fusion weight) beside metrics.json, for TrainStudent to publish.
    REVISION: ClassVar[int] = 2

    teacher: str = model()
    teacher_weights: str = ""
    embedder: str = model()
    student: str = model()  # the backbone of the untrained student row
    student_layers: int = 3
    student_head: str = "auto"  # the task passes it resolved
    precision: str = "fp32"  # resolved, for the retriever and the students
    teacher_precision: str = "fp32"  # resolved, for the teacher (bf16 on CPUs that multiply bf16 natively)
    max_length: int = 256
    teacher_max_length: int = 512
    max_eval_queries: int = 0
    seed: int = 12
    timing_queries: int = 200  # the test queries every ranker is timed on (0: all)
    fusion_dev_queries: int = 1000  # dev queries the weight of each student's fusion with the retriever is chosen on (0: no fusion)
    device: str = run_only("cpu", "the same precision scores alike on every device, up to float rounding")
    baseline_cache: str = run_only("", "a folder of scores that do not depend on the student's training, keyed by everything they do")


# Settings that change how the rankers are timed or how each trained student is fused, never the
# retriever's, teacher's or untrained student's scores of the test pairs.
NOT_BASELINE = ("timing_queries", "fusion_dev_queries")


def baseline_key(config: EvalConfig, identity: Callable[[str], str]) -> str:
    """The name of ``config``'s baseline cache folder: the fingerprint of every setting the
    retriever, teacher and untrained-student scores depend on."""
    defaults = EvalConfig()
    return config_fingerprint(dataclasses.replace(config, **{n: getattr(defaults, n) for n in NOT_BASELINE}), identity)


def evaluate_student(data_dir, mined_dir, student_dir, out_dir, config: EvalConfig, run: dict, label_only_dir=None, cosine_dir=None) -> dict:
    """Stage entry: test metrics of retriever, teacher, untrained and trained student, of a
    student trained on the judgments alone (``label_only_dir``, when given) and of the cosine-head
    student a plain one started from (``cosine_dir``, when ``student_dir`` is PlainStudent's);
    metrics.json, report.md and plots in ``out_dir``.

    ``run`` holds what the report shows beside the metrics: ``params`` (the run's settings and
    fingerprint), ``stages`` (each upstream stage's statistics) and ``timings``.
    ``config.baseline_cache`` (a folder, named by the settings those rankers depend on) keeps the
    retriever, teacher and untrained-student scores, which do not depend on how the student was
    trained, in a file named by the exact test pairs: comparing many students, or a later date
    of a scheduled retrain with the same test candidates, pays for them once. Speed is always
    measured in this process, every ranker on the first ``config.timing_queries`` test queries'
    candidates (``ranker_speed``).
    """
    from pathlib import Path

    import pyarrow.parquet as pq
    import torch

    from pipeline.artifacts import atomic_dir, write_json
    from pipeline.data import judgments, pair_texts
    from pipeline.fusion import FUSION_FILE, fusion_record
    from pipeline.models import cut_student, load_bi_encoder, load_cross_encoder, resolve_precision
    from pipeline.report import plot_mining, plot_quality_speed, plot_scores, write_report
    from pipeline.scoring import BiEncoderScorer, CrossEncoderScorer, TeacherSpec, load_teacher

    qrels = judgments(data_dir, "test")
    cand = pq.read_table(Path(mined_dir) / "candidates-test.parquet")
    c = config
    qids, dids, retrieval = candidate_pairs(cand, c.max_eval_queries or None)
    pairs = pair_texts(data_dir, qids, dids)
    dtype = resolve_precision(c.precision, c.device)

    baseline_file = Path(c.baseline_cache) / f"{pairs_digest(qids, dids, pairs, retrieval)}.npz" if c.baseline_cache else None
    scores = _cached_baselines(baseline_file, len(pairs))
    from_cache = scores is not None
    # Every ranker is loaded at once: they are timed taking turns, before the quality pass.
    retriever = BiEncoderScorer(load_bi_encoder(c.embedder, c.device, c.max_length), c.device, dtype)
    teacher = load_teacher(TeacherSpec.parse(c.teacher, c.teacher_weights), c.device, c.teacher_precision, c.teacher_max_length)
    torch.manual_seed(c.seed)
    untrained = CrossEncoderScorer(cut_student(c.student, c.student_layers, c.device, c.max_length, head=c.student_head), c.device, dtype)
    folders = {"student": student_dir, "student_label_only": label_only_dir, "student_cosine": cosine_dir}
    trained = {n: CrossEncoderScorer(load_cross_encoder(str(f), c.device, c.max_length), c.device, dtype) for n, f in folders.items() if f}
    students = {"student_untrained": untrained, **trained}
    descs = {"student_untrained": "untrained student", "student": "student", "student_label_only": "label-only student", "student_cosine": "cosine-head student"}

    # The retriever's order is mining's; it is timed re-scoring the same pairs, texts embedded.
    timed = {
        "retriever": lambda part: retriever.score(pairs[part], show_progress=False),
        "teacher": lambda part: teacher.score(pairs[part], qids[part], show_progress=False),
        **{name: (lambda part, s=s: s.score(pairs[part], show_progress=False)) for name, s in students.items()},
    }
    log.info("timing %d rankers on up to %s test queries, taking turns", len(timed), c.timing_queries or "all")
    speed, timing, timing_scores = ranker_speed(timed, qids, c.timing_queries)
    # The timing scored the first pairs with the same models and precision; only
    # the rest (whole queries, so an ensemble's per-query mixing sees whole groups) is scored here.
    rest = slice(timing["pairs"], len(pairs))
    if scores is None:
        scores = {"retriever": np.asarray(retrieval, np.float32)}
        scores["teacher"] = after_timing(timing_scores["teacher"], lambda: teacher.score(pairs[rest], qids[rest]), len(pairs))
        scores["student_untrained"] = after_timing(
            timing_scores["student_untrained"],
            lambda: students["student_untrained"].score(pairs[rest], desc=descs["student_untrained"]),
            len(pairs),
        )
        _store_baselines(baseline_file, scores)
    for name, scorer in trained.items():
        scores[name] = after_timing(timing_scores[name], lambda name=name, s=scorer: s.score(pairs[rest], desc=descs[name]), len(pairs))
    # The cosine-head student is shown as it is: fusing it too would cost its dev pass for a row nobody serves.
    fusion = fuse_with_retriever(data_dir, mined_dir, c.fusion_dev_queries, {n: s for n, s in trained.items() if n != "student_cosine"})
    add_fused_rows(qids, scores, speed, fusion)
    test, significance, per_query = evaluate_rankers(qids, dids, qrels, scores, speed=speed)
    lines = verdict(test, significance, fusion)
    metrics = {
        "test": test,
        "significance": significance,
        "per_query_ndcg@10": per_query,
        "test_queries": len(set(qids)),
        "test_queries_with_positive_in_top_k": queries_with_positive(qids, dids, qrels),
        "test_pairs": len(pairs),
        "baselines_from_cache": from_cache,
        "speed": {**timing, "device": c.device},
        "fusion": fusion,
        "precision": {"students": c.precision, "teacher": c.teacher_precision},
        "verdict": lines,
        "params": run["params"],
        "stages": run["stages"],
        "timings": run["timings"],
    }
    plots = {"scatter": "teacher_vs_student.png", "quality_speed": "quality_vs_speed.png"}
    with atomic_dir(out_dir) as tmp:
        plot_scores(scores["teacher"], scores["student"], tmp / plots["scatter"])
        plot_quality_speed(test, tmp / plots["quality_speed"])
        if (Path(mined_dir) / "groups.parquet").exists():
            plots["mining"] = "mined_negatives.png"
            plot_mining(pq.read_table(Path(mined_dir) / "groups.parquet"), tmp / plots["mining"])
        if fusion.get("student"):
            # What a serving process reads to fuse this student as it was measured (fusion_weight).
            write_json(tmp / FUSION_FILE, fusion_record(fusion["student"], c.embedder))
        write_json(tmp / "metrics.json", metrics)
        write_report(tmp / "report.md", metrics, lines, plots)
    return metrics


def fuse_with_retriever(data_dir, mined_dir, max_queries: int, students: dict) -> dict[str, dict]:
    """Each student's weight in its fusion with the retriever (:mod:`pipeline.fusion`), chosen on
    the candidates of the first ``max_queries`` dev queries; nothing without judged dev candidates."""
    from pipeline.data import pair_texts

    found = judged_candidates(data_dir, mined_dir, "dev", max_queries) if max_queries > 0 and students else None
    if found is None:
        return {}
    qrels, qids, dids, retrieval = found
    return fusion_weights(qids, dids, qrels, lambda: pair_texts(data_dir, qids, dids), retrieval, students)


def fusion_weights(qids, dids, qrels, pairs: Callable[[], list], retrieval, students: dict, where: str = "") -> dict[str, dict]:
    """Each of ``students`` (name: scorer) scored on these dev candidates (``pairs()`` gives their
    texts, read only when a query is judged) and its fusion weight chosen on them; nothing when
    no query is judged."""
    from pipeline.fusion import choose_weight

    if not students or not any(q in qrels for q in qids):
        return {}
    texts = pairs()
    out = {}
    for name, scorer in students.items():
        out[name] = choose_weight(qids, dids, qrels, scorer.score(texts, desc=f"{name}{where} on dev"), retrieval)
        log.info("%s%s: fusion weight %g with the retriever, chosen on %d dev queries", name, where, out[name]["weight"], out[name]["dev_queries"])
    return out


def add_fused_rows(qids: list[str], scores: dict, speed: dict, fusion: dict[str, dict]) -> None:
    """A ``<name>_fused`` row in ``scores`` for each student in ``fusion``, at its student's speed:
    the retriever's score comes with every candidate."""
    from pipeline.fusion import fused_scores

    for name, choice in fusion.items():
        scores[f"{name}_fused"] = fused_scores(qids, scores[name], scores["retriever"], choice["weight"])
        speed[f"{name}_fused"] = speed[name]


def queries_with_positive(qids: list[str], dids: list[str], qrels: dict[str, dict[str, int]]) -> int:
    return len({q for q, d in zip(qids, dids) if qrels.get(q, {}).get(d, 0) > 0})


def pairs_digest(qids: list[str], dids: list[str], pairs: list[tuple[str, str]], retrieval=None) -> str:
    """A digest of exactly these candidate pairs (ids, texts and retrieval scores, in order)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for q, d, (qt, pt) in zip(qids, dids, pairs):
        h.update(f"{q}\x1f{d}\x1f{qt}\x1f{pt}\x1e".encode())
    if retrieval is not None:
        h.update(np.asarray(retrieval, np.float32).tobytes())
    return h.hexdigest()


def _cached_baselines(path, n_pairs: int) -> dict[str, np.ndarray] | None:
    if not path or not Path(path).exists():
        return None
    z = np.load(path)
    out = {name: z[name] for name in ("retriever", "teacher", "student_untrained") if name in z}
    return out if len(out) == 3 and all(len(v) == n_pairs for v in out.values()) else None


def _store_baselines(path, scores: dict[str, np.ndarray]) -> None:
    if not path:
        return
    from pipeline.artifacts import atomic_file

    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **scores)
