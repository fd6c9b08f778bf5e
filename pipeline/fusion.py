"""Fusion with the retriever: a reranker's score interpolated with the retriever's own score of the
same candidate, each z-normalised within its query, the weight chosen on dev.

Every candidate arrives with the retriever's score, so the fusion costs nothing at serving time
beyond the reranker itself. A small student and the retriever make different mistakes; where the
student alone does not beat the retriever's order (a domain with few training queries), the two
together can. Weight 1 is the reranker alone and weight 0 the retriever's order; both are on the
grid, so on dev the chosen weight is never worse than either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.evaluation import per_query_metrics, to_run

# Beside a registry champion's weights, and beside a run's published student
# (<output-dir>/fusion.json): the fusion weight its evaluation chose, so that a serving process
# that loads the student fuses it as it was measured.
FUSION_FILE = "fusion.json"

WEIGHTS = tuple(i / 20 for i in range(21))  # the reranker's share, 0 to 1 in steps of 0.05


def per_query_z(qids: list[str], scores) -> np.ndarray:
    """Each score minus its query's mean, over its query's standard deviation (0 where a query's
    scores are all equal): the two scores' scales, unrelated as they come, become comparable."""
    scores = np.asarray(scores, np.float64)
    _, group = np.unique(np.asarray(qids, dtype=object), return_inverse=True)
    n = np.bincount(group)
    mean = np.bincount(group, scores) / n
    centred = scores - mean[group]
    std = np.sqrt(np.bincount(group, centred**2) / n)[group]
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def fused_scores(qids: list[str], reranker, retriever, weight: float) -> np.ndarray:
    """``weight`` × the reranker's z-scores + (1 − ``weight``) × the retriever's, per query."""
    return weight * per_query_z(qids, reranker) + (1 - weight) * per_query_z(qids, retriever)


def choose_weight(
    qids: list[str], dids: list[str], qrels: dict[str, dict[str, int]], reranker, retriever, weights=WEIGHTS
) -> dict:
    """The weight of ``weights`` whose fusion has the best mean nDCG@10 over the judged queries
    (ties go to the larger weight, the reranker's side), with every weight's figure."""
    rer, ret = per_query_z(qids, reranker), per_query_z(qids, retriever)
    queries = [q for q in dict.fromkeys(qids) if q in qrels]
    if not queries:
        raise ValueError("no judged query among the candidates to choose a fusion weight on")
    ndcg = {w: float(per_query_metrics(to_run(qids, dids, w * rer + (1 - w) * ret), qrels, queries)["ndcg@10"].mean()) for w in weights}
    best = max(weights, key=lambda w: (ndcg[w], w))
    return {"weight": best, "dev_queries": len(queries), "dev_ndcg@10": {f"{w:g}": round(v, 6) for w, v in ndcg.items()}}


def fusion_record(choice: dict, retriever: str) -> dict:
    """What a serving process needs to fuse a student as its evaluation chose: the weight, the
    retriever whose scores it was chosen with, and how the two are combined."""
    return {
        "weight": choice["weight"],
        "retriever": retriever,
        "dev_queries": choice["dev_queries"],
        "combination": "weight * z(student) + (1 - weight) * z(retriever), z within each query's candidates",
    }


def fusion_weight(folder: str | os.PathLike) -> float | None:
    """The fusion weight in ``folder``'s ``fusion.json`` (a registry student's folder, or a run's
    output folder), or None where it has none."""
    path = Path(folder) / FUSION_FILE
    return float(json.loads(path.read_text())["weight"]) if path.is_file() else None
