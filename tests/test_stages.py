"""Unit checks of each stage's core: label arithmetic, scorer fidelity, negative selection,
embedding cache reuse, metrics against sentence-transformers' evaluator, and the loss table."""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest

from losses import LOSS_TABLE, build_loss, resolve_loss
from pipeline.errors import PipelineError
from pipeline.data import Texts
from pipeline.labels import NoRowsError, PairValues, build_rows, false_negatives
from pipeline.mining import GROUPS_SCHEMA, EmbeddingCache, select_negatives
from pipeline.scoring import write_scores, zscore_per_query

GROUPS = pa.table(
    {
        "query_id": ["q1", "q2"],
        "positive_ids": [["p1"], ["p2"]],
        "positive_scores": [[0.9], [0.8]],
        "negative_ids": [["n1", "n2"], ["n3"]],
        "negative_scores": [[0.7, 0.6], [0.5]],
        "negative_ranks": [[0, 1], [0]],
    },
    schema=GROUPS_SCHEMA,
)
TEACHER_SCORES = {("q1", "p1"): 5.0, ("q1", "n1"): 2.0, ("q1", "n2"): -1.5, ("q2", "p2"): 3.0, ("q2", "n3"): 3.5}
QUERIES = {"q1": "query one", "q2": "query two"}


def pair_values(scores: dict[tuple[str, str], float]) -> PairValues:
    return PairValues(pa.table({"query_id": [q for q, _ in scores], "doc_id": [d for _, d in scores], "score": list(scores.values())}))


TEACHER = pair_values(TEACHER_SCORES)


def passage(d):
    return f"text of {d}"


def build(fmt, groups, teacher, queries, **kwargs):
    """``build_rows`` with every passage of the groups given as 'text of <id>', its rows as Python columns."""
    docs = {d: ("", passage(d)) for col in ("positive_ids", "negative_ids") for ids in groups[col].to_pylist() for d in ids}
    rows, stats = build_rows(fmt, groups, teacher, Texts.of(queries, docs), **kwargs)
    return rows.to_pydict(), stats


def test_margin_labels_are_positive_minus_each_negative():
    cols, stats = build("ntuple-margin", GROUPS, TEACHER, QUERIES, num_negatives=2)
    assert cols["query"] == ["query one"]  # q2 has one negative: dropped and counted
    assert cols["negative_2"] == ["text of n2"]
    assert cols["label"] == [[3.0, 6.5]]
    assert stats["queries_short_of_negatives"] == 1


def test_margin_labels_scale():
    cols, _ = build("ntuple-margin", GROUPS, TEACHER, QUERIES, num_negatives=1, label_scale=2.0)
    assert cols["label"] == [[6.0], [-1.0]]


def test_pair_formats():
    cols, _ = build("pair-score", GROUPS, TEACHER, QUERIES, num_negatives=2)
    assert list(zip(cols["passage"], cols["label"])) == [
        ("text of p1", 5.0), ("text of n1", 2.0), ("text of n2", -1.5), ("text of p2", 3.0), ("text of n3", 3.5)
    ]
    cols, _ = build("pair-binary", GROUPS, None, QUERIES, num_negatives=2)
    assert cols["label"] == [1.0, 0.0, 0.0, 1.0, 0.0]
    cols, _ = build("pair-soft", GROUPS, TEACHER, QUERIES, num_negatives=1)
    assert cols["label"][0] == pytest.approx(1 / (1 + np.exp(-5.0)))


def test_list_format():
    cols, _ = build("list", GROUPS, TEACHER, QUERIES, num_negatives=2)
    assert cols["docs"][0] == ["text of p1", "text of n1", "text of n2"]
    assert cols["labels"] == [[5.0, 2.0, -1.5], [3.0, 3.5]]


def test_teacher_format_without_scores_is_refused():
    with pytest.raises(PipelineError, match="needs teacher scores"):
        build("ntuple-margin", GROUPS, None, QUERIES)


def test_select_negatives_excludes_positives_and_respects_range():
    ranked = ["a", "p", "b", "c", "d", "e"]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    ids, sc, ranks = select_negatives(ranked, scores, {"p"}, 2, range_min=1, range_max=4)
    assert ids == ["b", "c"] and sc == [0.7, 0.6] and ranks == [1, 2]
    ids, _, ranks = select_negatives(ranked, scores, {"p"}, 2, range_min=1, range_max=4, sampling="random")
    assert set(ids) <= {"b", "c", "d"} and "p" not in ids and ranks == sorted(ranks)


def test_embedding_cache_embeds_each_text_once(tmp_path):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.stack([np.full(4, len(t), np.float32) for t in texts])

    cache = EmbeddingCache(tmp_path)
    first = cache.get(["a", "bb", "a"], encode)
    assert calls == [["a", "bb"]] and first[:, 0].tolist() == [1, 2, 1]
    again = EmbeddingCache(tmp_path).get(["bb", "ccc"], encode)  # a new process: reads from disk
    assert calls[-1] == ["ccc"] and again[:, 0].tolist() == [2, 3]
    EmbeddingCache(tmp_path).get(["a", "bb", "ccc"], encode)
    assert len(calls) == 2


def test_scorer_matches_cross_encoder_predict(tiny_models):
    import torch

    from pipeline.models import load_cross_encoder
    from pipeline.scoring import CrossEncoderScorer

    model = load_cross_encoder(tiny_models["teacher"], "cpu", 64)
    pairs = [("short q", "a doc"), ("a much longer query here", "a much longer passage " * 20), ("q", "d")] * 5
    expected = model.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=4)
    got = CrossEncoderScorer(model, "cpu", torch.float32, batch_tokens=256).score(pairs)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_zscore_per_query():
    z = zscore_per_query(np.array([1.0, 3.0, 10.0, 10.0, 4.0]), ["a", "a", "b", "b", "c"])
    np.testing.assert_allclose(z, [-1, 1, 0, 0, 0])


def test_non_finite_teacher_scores_are_not_written(tmp_path):
    with pytest.raises(PipelineError, match="non-finite"):
        write_scores(tmp_path / "s.arrow", ["q"], ["d"], [float("nan")], {})
    assert not (tmp_path / "s.arrow").exists()


def test_metrics_match_sentence_transformers_evaluator(tiny_models):
    """Our ir-measures numbers equal CrossEncoderRerankingEvaluator's on the same candidates."""
    import torch
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    from pipeline.evaluation import ranking_metrics, to_run
    from pipeline.models import load_cross_encoder

    model = load_cross_encoder(tiny_models["teacher"], "cpu", 64)
    rng = np.random.default_rng(0)
    samples, qids, dids, qrels = [], [], [], {}
    for qi in range(6):
        docs = [f"doc {qi} number {j} " + "word " * int(rng.integers(1, 9)) for j in range(8)]
        pos = [docs[int(rng.integers(0, 8))]]
        samples.append({"query": f"query {qi}", "positive": pos, "documents": docs})
        qids += [f"q{qi}"] * 8
        dids += [f"q{qi}-d{j}" for j in range(8)]
        qrels[f"q{qi}"] = {f"q{qi}-d{docs.index(pos[0])}": 1}
    st = CrossEncoderRerankingEvaluator(samples, at_k=10, write_csv=False)(model)
    pairs = [(s["query"], d) for s in samples for d in s["documents"]]
    ours = ranking_metrics(to_run(qids, dids, model.predict(pairs, activation_fn=torch.nn.Identity())), qrels)
    assert ours["ndcg@10"] == pytest.approx(st["ndcg@10"], abs=1e-6)
    assert ours["mrr@10"] == pytest.approx(st["mrr@10"], abs=1e-6)
    assert ours["map"] == pytest.approx(st["map"], abs=1e-6)


def test_loss_table_covers_the_seed_document():
    seed_losses = {
        "CrossEntropyLoss", "BinaryCrossEntropyLoss", "MultipleNegativesRankingLoss",
        "CachedMultipleNegativesRankingLoss", "LambdaLoss", "PListMLELoss", "ListNetLoss", "RankNetLoss",
        "ListMLELoss", "MSELoss", "MarginMSELoss", "ADRMSELoss",
    }
    assert seed_losses <= set(LOSS_TABLE)
    for name in seed_losses:
        spec, cls = resolve_loss(name)
        assert cls.__name__ == name


def test_unknown_loss_and_bad_kwargs(tiny_models):
    from pipeline.models import load_cross_encoder

    with pytest.raises(PipelineError, match="unknown loss"):
        resolve_loss("NoSuchLoss")
    model = load_cross_encoder(tiny_models["teacher"], "cpu", 64)
    with pytest.raises(PipelineError, match="not valid JSON"):
        build_loss(model, "MarginMSELoss", "{bad")
    with pytest.raises(PipelineError, match="--loss-kwargs"):
        build_loss(model, "MarginMSELoss", {"no_such_option": 1})
    loss = build_loss(model, "MultipleNegativesRankingLoss", '{"scale": 5.0}')
    assert loss.scale == 5.0


def test_ensemble_teacher_is_weighted_sum_of_per_query_zscores(tiny_models):
    import torch

    from pipeline.models import load_bi_encoder, load_cross_encoder
    from pipeline.scoring import BiEncoderScorer, CrossEncoderScorer, TeacherSpec, load_teacher

    spec = TeacherSpec.parse(f"{tiny_models['teacher']},{tiny_models['embedder']}", "0.7,0.3")
    teacher = load_teacher(spec, "cpu", "fp32", max_length=64)
    assert [i["kind"] for i in teacher.identity] == ["cross-encoder", "bi-encoder"]
    assert teacher.identity[1]["activation"] == "cosine"
    pairs = [("q one", f"doc {i} " * (i + 1)) for i in range(4)] + [("q two", f"other {i}") for i in range(3)]
    qids = ["a"] * 4 + ["b"] * 3
    got = teacher.score(pairs, qids)
    ce = CrossEncoderScorer(load_cross_encoder(tiny_models["teacher"], "cpu", 64), "cpu", torch.float32).score(pairs)
    bi = BiEncoderScorer(load_bi_encoder(tiny_models["embedder"], "cpu", 64), "cpu", torch.float32).score(pairs)
    expected = 0.7 * zscore_per_query(ce, qids) + 0.3 * zscore_per_query(bi, qids)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(PipelineError, match="2 teachers"):
        TeacherSpec.parse("a,b", "1.0")


def test_list_gains_are_minmax_per_query():
    cols, _ = build("list-gains", GROUPS, TEACHER, QUERIES, num_negatives=2)
    assert cols["labels"] == [[1.0, pytest.approx(3.5 / 6.5), 0.0], [0.0, 1.0]]


def test_cross_entropy_without_two_classes_is_refused():
    with pytest.raises(PipelineError, match="two classes"):
        build("pair-class", GROUPS, None, QUERIES, num_negatives=0)


def test_length_grouped_batches_cover_every_row_once_with_less_padding():
    from datasets import Dataset

    from pipeline.training import LengthGroupedBatchSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, 1000)
    ds = Dataset.from_dict({"query": ["q"] * 1000, "positive": ["x" * n for n in lengths], "label": [0.0] * 1000})
    sampler = LengthGroupedBatchSampler(ds, batch_size=16, drop_last=False, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 63
    assert sorted(i for b in first for i in b) == list(range(1000))

    def padding(batches):  # characters of padding if each batch pads to its longest row
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)

    shuffled = [list(range(s, min(s + 16, 1000))) for s in range(0, 1000, 16)]  # the data is already random
    assert padding(first) < 0.2 * padding(shuffled)
    sampler.set_epoch(1)
    assert list(sampler) != first


UNJUDGED = pa.concat_tables([GROUPS, pa.table(
    {
        "query_id": ["q3"], "positive_ids": [[]], "positive_scores": [[]], "negative_ids": [["u1", "u2", "u3"]],
        "negative_scores": [[0.9, 0.8, 0.7]], "negative_ranks": [[0, 1, 2]],
    },
    schema=GROUPS_SCHEMA,
)])
UNJUDGED_TEACHER = pair_values({**TEACHER_SCORES, ("q3", "u1"): 1.0, ("q3", "u2"): 4.0, ("q3", "u3"): -2.0})
UNJUDGED_QUERIES = {**QUERIES, "q3": "query three"}


def test_an_unjudged_query_is_labelled_by_the_teacher_alone():
    """Its positive is the teacher's best candidate (u2, not the retriever's first), in margin and
    n-tuple formats; score and list formats take its candidates as they are; label-only formats
    skip it; the statistics count judged and unjudged queries."""
    def rows(fmt):
        return build(fmt, UNJUDGED, UNJUDGED_TEACHER, UNJUDGED_QUERIES, num_negatives=2)

    cols, stats = rows("ntuple-margin")
    assert cols["query"] == ["query one", "query three"]
    assert (cols["positive"][1], cols["negative_1"][1], cols["negative_2"][1]) == ("text of u2", "text of u1", "text of u3")
    assert cols["label"][1] == [3.0, 6.0]
    assert (stats["judged_queries"], stats["unjudged_queries"]) == (1, 1)
    cols, _ = rows("ntuple")
    assert cols["positive"][-1] == "text of u2" and "label" not in cols
    cols, stats = rows("list")
    assert cols["docs"][-1] == ["text of u2", "text of u1", "text of u3"] and cols["labels"][-1] == [4.0, 1.0, -2.0]
    assert stats["unjudged_queries"] == 1
    cols, _ = rows("pair-score")
    assert sum(q == "query three" for q in cols["query"]) == 3
    for fmt in ("pair-binary", "pair-class"):
        cols, stats = rows(fmt)
        assert "query three" not in cols["query"] and stats["unjudged_queries"] == 0 and stats["judged_queries"] == 2
    with pytest.raises(PipelineError, match="unjudged"):
        build("ntuple", UNJUDGED, None, UNJUDGED_QUERIES, num_negatives=2)
    # The false-negative check has no judged positive to compare an unjudged query's candidates with.
    kept, fn = false_negatives(UNJUDGED, UNJUDGED_TEACHER, 0.0, "drop")
    assert kept.column("negative_ids").to_pylist()[2] == ["u1", "u2", "u3"]


def _reference_rows(fmt, groups, teacher, queries, grades, n_neg, scale):
    """The formats read row by row, one group at a time, as the module docstring defines them."""
    cols, used = {}, {"judged_queries": 0, "unjudged_queries": 0}
    for qid, pos, negs in zip(*(groups[c].to_pylist() for c in ("query_id", "positive_ids", "negative_ids"))):
        kind = "judged_queries" if pos else "unjudged_queries"
        score = {d: teacher[(qid, d)] * scale for d in pos + negs} if teacher else {}
        if not pos:
            if fmt in ("pair-binary", "pair-class") or not negs:
                continue
            best = max(negs, key=score.get)
            pos, negs = [best], [d for d in negs if d != best]
        if fmt.startswith("ntuple") and len(negs) < n_neg:
            continue
        negs = negs[:n_neg]
        used[kind] += 1
        if fmt.startswith("ntuple"):
            for p in pos:
                row = {"query": queries[qid], "positive": passage(p), **{f"negative_{i + 1}": passage(n) for i, n in enumerate(negs)}}
                if fmt == "ntuple-margin":
                    row["label"] = [score[p] - score[n] for n in negs]
                for k, v in row.items():
                    cols.setdefault(k, []).append(v)
        elif fmt.startswith("list"):
            labels = [score[d] for d in pos + negs]
            if fmt == "list-gains":
                lo, hi = min(labels), max(labels)
                labels = [(x - lo) / (hi - lo) if hi > lo else 1.0 for x in labels]
            for k, v in (("query", queries[qid]), ("docs", [passage(d) for d in pos + negs]), ("labels", labels)):
                cols.setdefault(k, []).append(v)
        else:
            for d in pos + negs:
                label = {
                    "pair-score": lambda: score[d],
                    "pair-soft": lambda: 1 / (1 + np.exp(-score[d])),
                    "pair-binary": lambda: float(d in pos),
                    "pair-class": lambda: grades.get((qid, d), 1) if d in pos else 0,
                }[fmt]()
                for k, v in (("query", queries[qid]), ("passage", passage(d)), ("label", label)):
                    cols.setdefault(k, []).append(v)
    return cols, used


@pytest.mark.parametrize("seed", range(4))
def test_rows_equal_a_row_by_row_reading_of_the_formats(seed):
    """Random groups (judged, unjudged, short of negatives, tied teacher scores, graded
    positives): every format's rows and counts equal the straightforward per-group reading."""
    from losses.table import FORMATS

    rng = np.random.default_rng(seed)
    docs = [f"d{i}" for i in range(40)]
    groups, teacher, grades = {"query_id": [], "positive_ids": [], "negative_ids": []}, {}, {}
    for q in range(30):
        qid, picked = f"q{q}", [str(d) for d in rng.choice(docs, size=rng.integers(1, 9), replace=False)]
        n_pos = int(rng.integers(0, 3)) if len(picked) > 1 else 0
        groups["query_id"].append(qid)
        groups["positive_ids"].append(picked[:n_pos])
        groups["negative_ids"].append(picked[n_pos:])
        for d in picked:
            teacher[(qid, d)] = float(rng.integers(-3, 4))  # small integers: ties are common
        for d in picked[:n_pos]:
            if rng.random() < 0.5:
                grades[(qid, d)] = int(rng.integers(1, 4))
    groups = pa.table(groups)
    queries = {q: f"query {q}" for q in groups["query_id"].to_pylist()}
    grade_values = PairValues(pa.table({"query_id": [q for q, _ in grades], "doc_id": [d for _, d in grades], "score": list(grades.values())}))
    for fmt in FORMATS:
        for n_neg in (1, 3, None):
            most = max(len(x) for x in groups["negative_ids"].to_pylist())
            want, used = _reference_rows(fmt, groups, teacher, queries, grades, n_neg or most, 0.5)
            if not want:
                with pytest.raises(NoRowsError):
                    build(fmt, groups, pair_values(teacher), queries, grades=grade_values, num_negatives=n_neg)
                continue
            cols, stats = build(fmt, groups, pair_values(teacher), queries, grades=grade_values, num_negatives=n_neg, label_scale=0.5)
            assert cols.keys() == want.keys(), (fmt, n_neg)
            for k in want:
                assert cols[k] == ([pytest.approx(v) for v in want[k]] if "label" in k else want[k]), (fmt, n_neg, k)
            assert (stats["judged_queries"], stats["unjudged_queries"]) == (used["judged_queries"], used["unjudged_queries"])


def test_false_negatives_move_or_drop_exactly_the_suspects():
    """Each group's suspects are the negatives scored at least its lowest positive minus the
    margin; drop removes them from every negative column, relabel appends them to the positives."""
    groups = UNJUDGED
    teacher = {**TEACHER_SCORES, ("q3", "u1"): 1.0, ("q3", "u2"): 4.0, ("q3", "u3"): -2.0}
    for margin in (0.0, 3.5):
        dropped, stats = false_negatives(groups, pair_values(teacher), margin, "drop")
        relabelled, _ = false_negatives(groups, pair_values(teacher), margin, "relabel")
        g, d, r = groups.to_pydict(), dropped.to_pydict(), relabelled.to_pydict()
        suspected = 0
        for i, q in enumerate(g["query_id"]):
            floor = min((teacher[(q, p)] for p in g["positive_ids"][i]), default=np.inf) - margin
            sus = [j for j, n in enumerate(g["negative_ids"][i]) if teacher[(q, n)] >= floor]
            suspected += len(sus)
            for col in ("negative_ids", "negative_scores", "negative_ranks"):
                assert d[col][i] == r[col][i] == [x for j, x in enumerate(g[col][i]) if j not in sus]
            assert r["positive_ids"][i] == g["positive_ids"][i] + [g["negative_ids"][i][j] for j in sus]
            assert r["positive_scores"][i] == pytest.approx(g["positive_scores"][i] + [g["negative_scores"][i][j] for j in sus])
            assert d["positive_ids"][i] == g["positive_ids"][i]
        assert stats["suspected"] == suspected > 0


def test_a_paired_test_gives_the_interval_that_agrees_with_its_p_value():
    """The 95% interval of the mean per-query difference is the t interval, and excludes 0 exactly
    when p < 0.05; the report's table shows it."""
    import numpy as np
    from scipy import stats

    from pipeline.evaluation import paired_test
    from pipeline.report import significance_table

    rng = np.random.default_rng(0)
    seen = set()
    for shift in (0.0, 0.005, 0.01, 0.02, 0.05):
        a = rng.random(300)
        b = a - shift + rng.normal(0, 0.1, 300)
        t = paired_test(a, b)
        lo, hi = t["ci95"]
        d = a - b
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert (lo, hi) == pytest.approx((d.mean() - half, d.mean() + half))
        assert (lo > 0 or hi < 0) == (t["p_value"] < 0.05)
        seen.add(t["p_value"] < 0.05)
    assert seen == {True, False}
    assert paired_test(a, a)["ci95"] == [0.0, 0.0] and paired_test(a[:1], b[:1])["ci95"] is None
    table = significance_table({"student vs retriever": paired_test(a, b), "one query": paired_test(a[:1], b[:1])})
    assert f"[{lo:+.4f}, {hi:+.4f}]" in table and "| n/a |" in table


def test_the_verdict_says_beats_only_with_a_significant_gain():
    from pipeline.evaluation import verdict

    test = {"retriever": {"ndcg@10": 0.80}, "student": {"ndcg@10": 0.82}}
    significant = {"student vs retriever": {"diff": 0.02, "p_value": 0.01, "queries": 400}}
    noise = {"student vs retriever": {"diff": 0.02, "p_value": 0.4, "queries": 400}}
    assert verdict(test, significant)[0].startswith("The student beats the retriever's own order by +0.0200")
    assert "not significantly" in verdict(test, noise)[0] and "p = 0.4" in verdict(test, noise)[0]
    assert "does NOT beat" in verdict({**test, "student": {"ndcg@10": 0.79}}, noise)[0]
    assert "not significantly" in verdict(test)[0]  # no paired test: a gain is not shown
    assert verdict(test, significant)[0] != verdict(test)[0]


def test_the_verdict_names_the_fused_students_weight_and_compares_it_with_the_fused_baseline():
    from pipeline.evaluation import verdict

    test = {
        "retriever": {"ndcg@10": 0.80}, "teacher": {"ndcg@10": 0.90}, "student": {"ndcg@10": 0.79},
        "student_fused": {"ndcg@10": 0.83}, "student_label_only_fused": {"ndcg@10": 0.82},
    }
    sig = {
        "student_fused vs retriever": {"diff": 0.03, "p_value": 0.001, "queries": 100},
        "student_fused vs student_label_only_fused": {"diff": 0.01, "p_value": 0.3, "queries": 100},
    }
    lines = verdict(test, sig, {"student": {"weight": 0.65, "dev_queries": 223, "dev_ndcg@10": {}}})
    assert "The student fused with the retriever's score (weight 0.65 on the student, chosen on 223 dev queries) beats" in lines[2]
    assert any(line.startswith("Distillation shows NO significant gain over the label-only student fused") and "+0.0100 nDCG@10" in line
               for line in lines)
    assert "Fused with the retriever, the student keeps 92.2% of the teacher's nDCG@10." in lines
    assert not any("weight" in line for line in verdict(test, sig))  # no fusion chosen: no fused subject


def test_the_language_table_and_verdict_say_beats_only_with_a_significant_gain():
    """A student ahead of the retriever without a significant paired test is 'not shown', in the
    per-language table and sentence alike; a significant loss is 'NO'."""
    from pipeline.multilingual import language_verdict
    from pipeline.report import languages_table

    def entry(diff, p):
        rankers = {"retriever": 0.80, "student": 0.80 + diff, "student_source_only": 0.78, "student_untrained": 0.5}
        tests = {f"student vs {o}": {"diff": 0.80 + diff - rankers[o], "p_value": p, "queries": 100}
                 for o in ("retriever", "student_source_only", "student_untrained")}
        return {"rankers": {k: {"ndcg@10": v} for k, v in rankers.items()}, "significance": tests, "queries": 100, "pairs": 2000}

    langs = {"en": entry(0.02, 0.01), "de": entry(0.02, 0.3), "fr": entry(-0.03, 0.01)}
    row = next(line for line in languages_table(langs).splitlines() if line.startswith("| student beats the retriever? |"))
    assert row.split(" | ")[1:4] == ["yes (+0.0200, p = 0.01)", "not shown (+0.0200, p = 0.3)", "NO (-0.0300, p = 0.01) |"]
    en, de, fr = language_verdict(langs, "en")
    assert "beats the retriever's order" in en and "does NOT beat" not in en
    assert "is not shown to differ from the source-only student" in de and "does NOT beat the retriever" in de
    assert "is below the retriever's order" in fr and "does NOT beat the retriever" in fr
    assert "cosine-head" not in en
    langs["de"]["rankers"]["student_cosine"] = {"ndcg@10": 0.7512}
    assert "is not tested against the cosine-head student it started from (0.7512)." in language_verdict(langs, "en")[1]
    langs["de"]["significance"]["student vs student_cosine"] = {"diff": 0.07, "p_value": 0.0013, "queries": 100}
    assert "beats the cosine-head student it started from (0.7512; p = 0.0013)." in language_verdict(langs, "en")[1]


def test_rankers_are_timed_in_turns_on_whole_queries(monkeypatch):
    """Each ranker scores the first block once untimed, then every block of the timed queries
    timed, in an order that rotates and reverses from block to block; its figures are the pairs
    over its own seconds (a fake clock that each ranker advances by its cost per pair), on whole
    queries only, the untimed call left out; its timed scores come back in pair order."""
    from pipeline import evaluation

    clock = [0.0]
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: clock[0])
    qids = ["a"] * 3 + ["b"] * 2 + ["c"] * 4 + ["d"] * 1 + ["e"] * 2
    calls = []

    def ranker(name, cost):
        def score(part):
            calls.append((name, part.start, part.stop))
            clock[0] += cost * (part.stop - part.start)
            return [cost * 1000 + i for i in range(part.start, part.stop)]
        return score

    costs = {"teacher": 0.03, "student": 0.01, "retriever": 0.002}
    rankers = {name: ranker(name, cost) for name, cost in costs.items()}
    speed, measured, scored = evaluation.ranker_speed(rankers, qids, max_queries=4, turns=2)
    assert {k: measured[k] for k in ("queries", "pairs", "turns")} == {"queries": 4, "pairs": 10, "turns": 2}
    # Each turn's seconds, by ranker: every ranker scored the same block in a turn (5 pairs each here).
    assert measured["seconds_per_turn"] == {name: pytest.approx([cost * 5, cost * 5]) for name, cost in costs.items()}
    for name, cost in costs.items():
        assert scored[name].tolist() == pytest.approx([cost * 1000 + i for i in range(10)])
    assert calls[:3] == [("teacher", 0, 5), ("student", 0, 5), ("retriever", 0, 5)]  # the untimed first block
    timed = calls[3:]
    assert [c[0] for c in timed] == ["teacher", "student", "retriever", "teacher", "retriever", "student"]
    assert [c[1:] for c in timed] == [(0, 5)] * 3 + [(5, 10)] * 3  # blocks end where a query ends; 'e' is left out
    for name, cost in costs.items():
        assert speed[name]["pairs_per_second"] == pytest.approx(1 / cost, rel=1e-3)
        assert speed[name]["ms_per_query"] == pytest.approx(1000 * cost * 10 / 4, rel=1e-3)
    _, every, _ = evaluation.ranker_speed(rankers, qids, max_queries=0, turns=8)
    assert {k: every[k] for k in ("queries", "pairs", "turns")} == {"queries": 5, "pairs": 12, "turns": 5}  # 0: every query; no more turns than queries
