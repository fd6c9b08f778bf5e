"""Multilingual distillation: rows per language view carry the source labels; the DAG runs with
two target languages, one of them missing ids."""

from __future__ import annotations

import json
import shutil

import luigi
import pyarrow as pa
import pytest

from conftest import dag_params
from pipeline.data import Texts, join_title, read_dataset
from pipeline.multilingual import multilingual_rows, restrict_groups, texts_of, training_views
from tests.test_stages import pair_values
from tasks import TrainMultilingualStudent


def translate(text: str, lang: str) -> str:
    """A stand-in translation: every word tagged with the language, so texts differ but stay parallel."""
    return " ".join(f"{w}_{lang}" for w in text.split())


@pytest.fixture(scope="module")
def parallel_beir(small_beir, tmp_path_factory):
    """small_beir plus 'xx' (everything translated) and 'yy' (every third query and document missing)."""
    folder = tmp_path_factory.mktemp("parallel") / "beir"
    shutil.copytree(small_beir, folder)
    ds = read_dataset(small_beir)
    for lang, keep in (("xx", lambda i: True), ("yy", lambda i: i % 3 != 0)):
        with open(folder / f"queries.{lang}.jsonl", "w") as f:
            for i, (q, text) in enumerate(ds.queries.items()):
                if keep(i):
                    f.write(json.dumps({"_id": q, "text": translate(text, lang)}) + "\n")
        with open(folder / f"corpus.{lang}.jsonl", "w") as f:
            for i, (d, (title, text)) in enumerate(ds.corpus.items()):
                if keep(i):
                    f.write(json.dumps({"_id": d, "title": translate(title, lang), "text": translate(text, lang)}) + "\n")
    return folder


def test_views_carry_the_source_labels_and_skip_missing_ids(parallel_beir):
    ds = read_dataset(parallel_beir)
    train = ds.relevant("train")
    qids = sorted(train)[:12]
    others = [d for d in ds.corpus if all(d not in train[q] for q in qids)]
    groups = pa.table({
        "query_id": qids,
        "positive_ids": [sorted(train[q]) for q in qids],
        "negative_ids": [others[i : i + 6] for i in range(len(qids))],
    })
    teacher = {(q, d): float(len(q) % 7 + i) for q in qids for i, d in enumerate(list(ds.corpus))}
    texts = {lang: Texts.of(*texts_of(ds, lang, "en")) for lang in ("en", "xx", "yy")}
    rows, stats = multilingual_rows("ntuple-margin", groups, pair_values(teacher), texts, ["xx", "yy"], "en", cross_lingual=True, num_negatives=2)
    cols = rows.to_pydict()

    assert [v for v in stats["views"]] == ["en", "xx", "yy", "xx-en", "en-xx", "yy-en", "en-yy"]
    assert stats["views"]["en"]["rows"] == stats["views"]["xx"]["rows"] == sum(len(train[q]) for q in qids)
    yy = stats["views"]["yy"]
    assert yy["missing_query"] + yy["missing_positive"] > 0 and yy["rows"] < stats["views"]["en"]["rows"]
    assert stats["rows"] == sum(v["rows"] for v in stats["views"].values()) == len(cols["query"])

    # A translated row has the translated texts and exactly its source row's margins.
    xq, xc = ds.languages["xx"]
    rows = list(zip(cols["query"], cols["positive"], cols["negative_1"], cols["label"]))
    for q in qids:
        p = sorted(train[q])[0]
        src = [r for r in rows if r[:2] == (ds.queries[q], ds.passage(p))]
        xx = [r for r in rows if r[:2] == (xq[q], join_title(*xc[p]))]
        assert len(src) == len(xx) == 1
        assert xx[0][3] == src[0][3]
        assert xx[0][2] == translate(src[0][2], "xx")

    # yy keeps negatives in order, leaving out the untranslated ones.
    yq, yc = ds.languages["yy"]
    kept, skipped = restrict_groups(groups, texts["yy"])
    for q, negs in zip(kept["query_id"].to_pylist(), kept["negative_ids"].to_pylist()):
        source_negs = groups["negative_ids"].to_pylist()[qids.index(q)]
        assert negs == [n for n in source_negs if n in yc]
    assert skipped["negatives_missing"] > 0
    # Counted as the docstring says: a missing query first, then a missing positive, then the
    # untranslated negatives of the groups kept.
    g = groups.to_pydict()
    no_query = [q not in yq for q in g["query_id"]]
    no_positive = [not nq and any(p not in yc for p in pos) for nq, pos in zip(no_query, g["positive_ids"])]
    dropped_negs = sum(n not in yc for nq, np_, negs in zip(no_query, no_positive, g["negative_ids"]) if not (nq or np_) for n in negs)
    assert skipped == {"missing_query": sum(no_query), "missing_positive": sum(no_positive), "negatives_missing": dropped_negs}
    assert kept["query_id"].to_pylist() == [q for q, nq, np_ in zip(g["query_id"], no_query, no_positive) if not (nq or np_)]
    assert training_views(["xx"], "en", False) == [("en", "en"), ("xx", "xx")]


def test_multilingual_dag_runs_with_two_languages(parallel_beir, tiny_models, tmp_path):
    out = tmp_path / "run"
    params = dag_params(parallel_beir, tiny_models, out, TrainMultilingualStudent, languages="xx,yy", negative_pool=6)
    assert luigi.build([TrainMultilingualStudent(**params)], local_scheduler=True, workers=1, log_level="WARNING")

    m = json.loads((out / "metrics.json").read_text())
    assert list(m["languages"]) == ["en", "xx", "yy"]
    trained = ("student_source_only", "student")
    for lang, entry in m["languages"].items():
        assert set(entry["rankers"]) == {"retriever", "teacher", "student_untrained", *trained, *(f"{n}_fused" for n in trained)}
        assert entry["queries"] > 0
        # Each trained student's weight is the best of its language's dev grid, the larger on a tie.
        for name in trained:
            f = entry["fusion"][name]
            best = max(f["dev_ndcg@10"].values())
            assert f["weight"] == max(float(w) for w, v in f["dev_ndcg@10"].items() if v == best)
        assert "student_fused vs retriever" in entry["significance"]
    # A language with fewer translations has fewer dev queries to choose its weight on.
    assert 0 < m["languages"]["yy"]["fusion"]["student"]["dev_queries"] < m["languages"]["xx"]["fusion"]["student"]["dev_queries"]
    assert m["fusion"] == m["languages"]["en"]["fusion"]
    assert m["languages"]["yy"]["skipped"]["missing_query"] > 0
    assert m["languages"]["yy"]["queries"] < m["languages"]["xx"]["queries"]
    assert m["test"] == m["languages"]["en"]["rankers"]
    views = m["stages"]["BuildMultilingualLabels"]["views"]
    assert views["xx"]["rows"] == views["en"]["rows"] > views["yy"]["rows"] > 0
    assert m["stages"]["FitStudent"]["rows"] == sum(v["rows"] for v in views.values())
    # The report's count of queries the retriever failed is the source language's, not all of them.
    assert 0 < m["test_queries_with_positive_in_top_k"] == m["languages"]["en"]["queries_with_positive_in_top_k"] <= m["test_queries"]
    for entry in m["languages"].values():
        assert entry["speed"]["pairs"] > 0 and all(entry["rankers"][n]["pairs_per_second"] > 0 for n in entry["rankers"] if n != "retriever")
    report = (out / "report.md").read_text()
    assert "## Languages" in report and "student_source_only" in report
    assert "| student_fused beats the retriever? |" in report and "Fused with the retriever's score (w = " in report
    assert f"the {m['test_queries'] - m['test_queries_with_positive_in_top_k']} queries whose judged positives" in report
    assert (out / "languages.png").stat().st_size > 0
    assert (out / "student" / "config.json").exists()

    # With --fusion-dev-queries 0 the evaluation has no fused rows.
    params["fusion_dev_queries"] = 0
    assert luigi.build([TrainMultilingualStudent(**params)], local_scheduler=True, workers=1, log_level="WARNING")
    m = json.loads((out / "metrics.json").read_text())
    assert all(not e["fusion"] and not any(n.endswith("_fused") for n in e["rankers"]) for e in m["languages"].values())
    assert "student_fused" not in (out / "report.md").read_text()


def test_candidate_lists_in_each_language_keep_their_translated_passages_and_source_targets(parallel_beir):
    import numpy as np

    from pipeline.multilingual import translated_lists

    ds = read_dataset(parallel_beir)
    docs = list(ds.corpus)
    qids = list(ds.queries)[:9]
    lists = [docs[i : i + 2 + i % 4] for i in range(len(qids))]
    cand = pa.table({"query_id": qids, "doc_ids": lists})
    targets = np.arange(sum(map(len, lists)), dtype=np.float32) / 7
    texts = {lang: Texts.of(*texts_of(ds, lang, "en")) for lang in ("en", "xx", "yy")}
    rows, counts = translated_lists(cand, targets, texts, ["xx", "yy"], "en", cross_lingual=True)

    source_target = {(q, d): t for q, d, t in zip(np.repeat(qids, [len(x) for x in lists]), [d for x in lists for d in x], targets)}
    views = counts["views"]
    assert list(views) == ["en", "xx", "yy", "xx-en", "en-xx", "yy-en", "en-yy"]
    assert views["en"] == {"lists": 9, "pairs": len(targets)} and views["xx"]["lists"] == 9 and views["xx"]["pairs"] == len(targets)
    yq, yc = ds.languages["yy"]
    expected = [
        (q, [d for d in x if d in yc]) for q, x in zip(qids, lists) if q in yq and sum(d in yc for d in x) >= 2
    ]
    assert views["yy"]["lists"] == len(expected) < 9 and views["yy"]["pairs"] == sum(len(x) for _, x in expected)
    assert views["yy"]["missing_query"] == sum(q not in yq for q in qids)
    assert views["yy"]["missing_query"] + views["yy"]["under_two_passages"] + views["yy"]["lists"] == 9

    # Each list reads in its view's languages, with its source pairs' targets in the source order.
    got = rows.to_pydict()
    assert rows.num_rows == sum(v["lists"] for k, v in views.items() if k != "en")
    start = views["xx"]["lists"]
    for (q, kept), query, passages, labels in zip(expected, got["query"][start:], got["docs"][start:], got["labels"][start:]):
        assert query == yq[q] and passages == [join_title(*yc[d]) for d in kept]
        assert labels == pytest.approx([source_target[(q, d)] for d in kept])
    # Mixed views: the query in one language, the passages in the other.
    xq, xc = ds.languages["xx"]
    mixed = list(zip(got["query"], got["docs"]))
    assert (xq[qids[0]], [ds.passage(d) for d in lists[0]]) in mixed
    assert (ds.queries[qids[0]], [join_title(*xc[d]) for d in lists[0]]) in mixed


def test_the_multilingual_run_publishes_a_plain_student_beside_its_cosine_head_start(parallel_beir, tiny_models, tmp_path):
    from sentence_transformers.cross_encoder import CrossEncoder

    import tasks

    out = tmp_path / "run"
    params = dag_params(parallel_beir, tiny_models, out, TrainMultilingualStudent, languages="xx,yy", negative_pool=6,
                        student=tiny_models["embedder"], student_head="cosine", teacher=f"bi:{tiny_models['embedder']}",
                        plain_min_steps=40, plain_list_size=4)
    task = TrainMultilingualStudent(**params)
    assert luigi.build([task], local_scheduler=True, workers=1, log_level="WARNING")

    plain = task.clone(tasks.MultilingualPlainStudent)
    assert (out / "student").resolve() == plain.artifact().resolve()
    assert CrossEncoder(str(out / "student")).predict([("q", "d")]).shape == (1,)  # no trust_remote_code
    m = json.loads((out / "metrics.json").read_text())
    stats = m["stages"]["PlainStudent"]
    assert stats["started_from"] == str(task.clone(tasks.FitMultilingualStudent).artifact())
    assert stats["views"]["xx"]["lists"] == stats["views"]["en"]["lists"] > stats["views"]["yy"]["lists"] > 0
    assert stats["rows"] == sum(v["lists"] for v in stats["views"].values())
    # Lists of 4 of each query's top 10, each with its translations: 40 steps of 3 take more
    # lists than the queries have, drawn anew, with their translations (how many the new lists
    # have decides the last step or two).
    assert stats["lists"] > stats["queries"] and stats["steps"] >= task.plain_min_steps == 40
    assert stats["teacher_scoring"]["pairs"] == stats["pairs"] == stats["views"]["en"]["pairs"] == 4 * stats["lists"]
    for lang, entry in m["languages"].items():
        assert {"student", "student_cosine", "student_fused"} <= set(entry["rankers"]) and "student_cosine_fused" not in entry["rankers"]
        assert "student vs student_cosine" in entry["significance"]
    assert all("the cosine-head student it started from (" in line for line in m["verdict"])
    translated = sum(v["lists"] for v in stats["views"].values()) - stats["lists"]
    assert f"{stats['lists']} candidate lists of {stats['queries']} training queries and {translated} translations of them" in (out / "report.md").read_text()


def test_pairs_file_with_a_column_per_language(tmp_path):
    rows = [
        {"query": "image viewer", "positive": "A fast image viewer.", "split": "train",
         "query.de": "Bildbetrachter", "positive.de": "Ein schneller Bildbetrachter."},
        {"query": "window manager", "positive": "Tiles windows.", "split": "test", "query.de": "", "positive.de": None},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = read_dataset(path)
    dq, dc = ds.languages["de"]
    qid = next(q for q, t in ds.queries.items() if t == "image viewer")
    did = next(d for d, (_, t) in ds.corpus.items() if t == "A fast image viewer.")
    assert dq == {qid: "Bildbetrachter"} and dc == {did: ("", "Ein schneller Bildbetrachter.")}
