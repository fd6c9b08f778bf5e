"""Fusion with the retriever: per-query normalisation, and a weight chosen on judged queries."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.fusion import WEIGHTS, choose_weight, fused_scores, per_query_z


def test_scores_are_normalised_within_each_query_wherever_its_pairs_lie():
    qids = ["a", "b", "a", "b", "a", "c", "c"]
    scores = [1.0, 10.0, 2.0, 30.0, 6.0, 5.0, 5.0]
    z = per_query_z(qids, scores)
    for q in "ab":
        rows = [i for i, x in enumerate(qids) if x == q]
        assert z[rows].mean() == pytest.approx(0.0, abs=1e-12) and z[rows].std() == pytest.approx(1.0)
        assert list(np.argsort(z[rows])) == list(np.argsort(np.asarray(scores)[rows]))
    assert z[5] == z[6] == 0.0  # a query whose scores are all equal adds nothing


def test_the_ends_of_the_grid_rank_as_each_side_alone():
    qids = ["q"] * 4
    reranker, retriever = [0.1, 0.4, 0.3, 0.2], [9.0, 1.0, 5.0, 7.0]
    assert list(np.argsort(fused_scores(qids, reranker, retriever, 1.0))) == list(np.argsort(reranker))
    assert list(np.argsort(fused_scores(qids, reranker, retriever, 0.0))) == list(np.argsort(retriever))


def _complementary():
    # In q1 the reranker puts the positive a just below b and the retriever ranks it first; in q2
    # the other way round. Each alone gets one query wrong; an even mix gets both right.
    qids = ["q1"] * 3 + ["q2"] * 3
    dids = ["a", "b", "c"] * 2
    reranker = [0.9, 1.0, -1.9, 1.0, -1.0, 0.0]
    retriever = [1.0, -1.0, 0.0, 0.9, 1.0, -1.9]
    qrels = {"q1": {"a": 1}, "q2": {"a": 1}}
    return qids, dids, qrels, reranker, retriever


def test_the_chosen_weight_mixes_two_rankers_that_fail_on_different_queries():
    qids, dids, qrels, reranker, retriever = _complementary()
    choice = choose_weight(qids, dids, qrels, reranker, retriever)
    dev = choice["dev_ndcg@10"]
    assert 0 < choice["weight"] < 1 and dev[f"{choice['weight']:g}"] == pytest.approx(1.0)
    assert dev["0"] < 1.0 and dev["1"] < 1.0 and choice["dev_queries"] == 2
    assert set(dev) == {f"{w:g}" for w in WEIGHTS}


def test_ties_go_to_the_reranker_and_unjudged_candidates_are_refused():
    qids, dids, qrels, reranker, _ = _complementary()
    assert choose_weight(qids, dids, qrels, reranker, reranker)["weight"] == 1.0
    with pytest.raises(ValueError, match="no judged query"):
        choose_weight(qids, dids, {"other": {"a": 1}}, reranker, reranker)
