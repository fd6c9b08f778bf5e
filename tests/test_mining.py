"""Mining at scale: embedding reuse across runs, FAISS index choices, sentence-transformers'
filters and sampling, random negatives, and the teacher's false-negative filter."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.data import load_normalized, prepare_data, read_dataset
from pipeline.errors import PipelineError
from pipeline.labels import false_negatives
from pipeline.mining import (
    EmbeddingCache,
    MineConfig,
    NegativeFilter,
    TorchFlatIndex,
    SideEncoders,
    build_index,
    embed_corpus,
    encode_texts,
    mine,
    mine_hard_negatives,
    search,
    select_negatives,
)
from tests.conftest import write_beir
from tests.test_stages import GROUPS, TEACHER


@pytest.fixture(scope="module")
def prepared(small_beir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data(small_beir, out)
    return out


def _mine(prepared, tiny_models, out, cache, **kw):
    config = MineConfig(embedder=tiny_models["embedder"], cache_dir=str(cache), max_length=64, rerank_top_k=10, **kw)
    return mine_hard_negatives(prepared, out, config)


def test_rerun_embeds_nothing_and_added_documents_only_once(prepared, small_beir, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    first = _mine(prepared, tiny_models, tmp_path / "m1", cache, num_negatives=3)
    assert first["texts_embedded"] > 0
    # Different mining settings make a new artifact, but every text is already embedded.
    second = _mine(prepared, tiny_models, tmp_path / "m2", cache, num_negatives=2, range_min=1)
    assert second["encode_calls"] == 0 and second["texts_embedded"] == 0

    ds = read_dataset(small_beir)
    corpus = dict(ds.corpus)
    corpus.update({f"new-{i}": ("", f"a brand new package description number {i}") for i in range(5)})
    qrels = {}
    for q, d, s, split in ds.qrels:
        qrels.setdefault(split, []).append((q, d, s))
    grown = write_beir(tmp_path / "grown", ds.queries, corpus, qrels)
    prepare_data(grown, tmp_path / "grown-data")
    third = _mine(tmp_path / "grown-data", tiny_models, tmp_path / "m3", cache, num_negatives=3)
    assert third["encode_calls"] == 1 and third["texts_embedded"] == 5
    # A grown corpus changes every query's neighbours: nothing is taken from earlier searches.
    assert third["searches_from_cache"] == 0


def test_rerun_searches_only_queries_it_has_not_searched(prepared, small_beir, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    first = _mine(prepared, tiny_models, tmp_path / "m1", cache, num_negatives=3)
    held_out = first["dev_queries"] + first["test_queries"]
    assert first["queries_searched"] == first["train_queries"] + held_out and first["searches_from_cache"] == 0
    again = _mine(prepared, tiny_models, tmp_path / "m2", cache, num_negatives=3)
    assert again["queries_searched"] == 0
    for name in ("groups.parquet", "candidates-dev.parquet", "candidates-test.parquet"):
        assert pq.read_table(tmp_path / "m2" / name).equals(pq.read_table(tmp_path / "m1" / name)), name

    # A later date with three more training queries over the same corpus searches those three.
    ds = read_dataset(small_beir)
    qrels: dict[str, list] = {}
    for q, d, s, split in ds.qrels:
        qrels.setdefault(split, []).append((q, d, s))
    docs = list(ds.corpus)
    new = {f"new-q{i}": f"{ds.corpus[docs[i]][1][:60]} extra words {i}" for i in range(3)}
    qrels["train"] += [(q, docs[i], 1) for i, q in enumerate(new)]
    later = write_beir(tmp_path / "later", {**ds.queries, **new}, dict(ds.corpus), qrels)
    prepare_data(later, tmp_path / "later-data")
    third = _mine(tmp_path / "later-data", tiny_models, tmp_path / "m3", cache, num_negatives=3)
    assert third["train_queries"] == first["train_queries"] + 3
    assert third["queries_searched"] == 3 and third["searches_from_cache"] == first["train_queries"] + held_out
    fresh = _mine(tmp_path / "later-data", tiny_models, tmp_path / "m4", tmp_path / "fresh-cache", num_negatives=3)
    assert fresh["queries_searched"] == third["train_queries"] + held_out
    _assert_same_groups(pq.read_table(tmp_path / "m3" / "groups.parquet"), pq.read_table(tmp_path / "m4" / "groups.parquet"))


def _assert_same_groups(a, b):
    """The same queries, documents and ranks; the scores equal to fp32 rounding. The three new
    queries were embedded in a batch of their own in one run and among all the others in the
    other, and a CPU's fp32 reductions may differ in the last bit between the two (seen on an
    AVX2-only host: 6e-8, one time in three)."""
    assert a.schema == b.schema
    for name in a.column_names:
        if name.endswith("_scores"):
            x, y = (np.asarray(pc.list_flatten(t[name]).to_numpy(zero_copy_only=False), np.float64) for t in (a, b))
            assert pc.list_value_length(a[name]).equals(pc.list_value_length(b[name])), name
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=name)
        else:
            assert a[name].equals(b[name]), name


def test_mining_statistics_and_groups(prepared, tiny_models, tmp_path):
    stats = _mine(prepared, tiny_models, tmp_path / "m", tmp_path / "cache", num_negatives=4, random_share=0.5)
    groups = pq.read_table(tmp_path / "m" / "groups.parquet").to_pydict()
    for pos, negs, ranks in zip(groups["positive_ids"], groups["negative_ids"], groups["negative_ranks"]):
        assert not set(pos) & set(negs) and len(set(negs)) == len(negs) == 4
        assert sum(r < 0 for r in ranks) == 2  # half drawn at random from the corpus
    assert stats["random_negatives"] == 2 * stats["train_queries"]
    assert stats["negatives"] == 4 * stats["train_queries"]
    assert set(stats["negative_rank_quantiles"]) == {"p5", "p25", "p50", "p75", "p95"}
    on_disk = json.loads((tmp_path / "m" / "stats.json").read_text())
    assert on_disk["queries_short_of_negatives"] == stats["queries_short_of_negatives"] == 0


def test_cache_serves_a_memory_map_for_the_same_corpus(tmp_path):
    def encode(texts):
        return np.random.default_rng(len(texts)).normal(size=(len(texts), 8)).astype(np.float32)

    texts = [f"t{i}" for i in range(20)]
    first = EmbeddingCache(tmp_path).get(texts, encode)
    again = EmbeddingCache(tmp_path).get(texts, encode)
    assert isinstance(again, np.memmap) and not again.flags.writeable
    np.testing.assert_array_equal(first, again)
    shuffled = EmbeddingCache(tmp_path).get(texts[::-1], encode)
    np.testing.assert_array_equal(shuffled, first[::-1])


def test_corpus_is_embedded_chunk_by_chunk_as_in_one_piece(tmp_path, tiny_models):
    """Mining reads the corpus from Arrow a chunk at a time: the ids, vectors and corpus digest
    (the search cache's key) are those of one piece, and of the passages as the dataset gives them."""
    import hashlib

    import pyarrow as pa

    from pipeline.data import join_title

    titles = ["", "Viewer", None, "Editor", "", "Shell", "", "Mail"]
    texts = [f"package description number {i} with words" for i in range(8)]
    corpus = pa.table({"doc_id": [f"d{i}" for i in range(8)], "title": titles, "text": texts})
    whole = embed_corpus(corpus, SideEncoders(MineConfig(embedder=tiny_models["embedder"], cache_dir=str(tmp_path / "a"))))
    chunked = embed_corpus(corpus, SideEncoders(MineConfig(embedder=tiny_models["embedder"], cache_dir=str(tmp_path / "b"))), chunk=3)
    assert whole[0] == chunked[0] == [f"d{i}" for i in range(8)]
    np.testing.assert_allclose(whole[1], chunked[1], atol=1e-5)
    digest = hashlib.blake2b(digest_size=16)
    for i in range(8):
        digest.update(f"d{i}\x1f{join_title(titles[i] or '', texts[i])}\x1e".encode())
    assert whole[2] == chunked[2] == digest.hexdigest()


def test_ivf_and_hnsw_indexes_find_the_exact_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(16, 24))
    docs = (centers[rng.integers(0, 16, 2000)] + 0.3 * rng.normal(size=(2000, 24))).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    path = tmp_path / "v.f32"
    docs.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=docs.shape)
    queries = docs[:50] + 0.05 * rng.normal(size=(50, 24)).astype(np.float32)
    _, exact = search(build_index(docs), queries, 10)
    # Every IVF list probed: the same answer as exact search, from a memory-mapped matrix added in batches.
    _, ivf = search(build_index(mapped, "IVF16,Flat", nprobe=16, add_batch=300), queries, 10)
    np.testing.assert_array_equal(np.sort(ivf, 1), np.sort(exact, 1))
    _, hnsw = search(build_index(docs, "HNSW16", ef_search=256), queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw, exact)])
    assert recall > 0.95
    # The torch index (CUDA without faiss-gpu) on the CPU here, with a score block smaller than the corpus.
    flat = TorchFlatIndex(mapped, device="cpu", add_batch=300)
    flat.max_scores = 5000
    scores, ids = search(flat, queries, 10)
    np.testing.assert_array_equal(ids, exact)
    np.testing.assert_allclose(scores, search(build_index(docs), queries, 10)[0], rtol=1e-5)


def test_filters_follow_sentence_transformers_semantics():
    ranked = ["a", "p", "b", "c", "d", "e"]
    scores = [0.95, 0.8, 0.78, 0.6, 0.5, -0.2]
    skipped = Counter()
    ids, _, ranks = select_negatives(
        ranked, scores, {"p"}, 2, positive_score=0.8, filters=NegativeFilter(absolute_margin=0.05), skipped=skipped
    )
    assert ids == ["c", "d"] and ranks == [2, 3] and skipped == {"absolute_margin": 2}  # a above, b within 0.05
    ids, _, _ = select_negatives(ranked, scores, {"p"}, 3, positive_score=0.8, filters=NegativeFilter(relative_margin=0.1))
    assert ids == ["c", "d", "e"]  # drop above 0.8 - 0.08 = 0.72
    ids, _, _ = select_negatives(ranked, scores, {"p"}, 9, filters=NegativeFilter(max_score=0.7, min_score=0.0))
    assert ids == ["c", "d"]
    # range_min counts the survivors of the filters, as in sentence-transformers.
    ids, _, _ = select_negatives(ranked, scores, {"p"}, 1, range_min=1, filters=NegativeFilter(max_score=0.9))
    assert ids == ["c"]


def test_negatives_match_sentence_transformers_mine_hard_negatives(prepared, tiny_models):
    """Same embedder, same settings: the same negatives as sentence_transformers.util.mine_hard_negatives."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    ds = load_normalized(prepared)
    model = SentenceTransformer(tiny_models["embedder"], device="cpu")
    model.max_seq_length = 64
    train = ds.relevant("train")
    qids = [q for q in sorted(train) if len(train[q]) == 1]
    texts = [ds.queries[q] for q in qids]
    assert len(set(texts)) == len(texts)
    doc_ids = list(ds.corpus)
    doc_vecs = encode_texts(model, [ds.passage(d) for d in doc_ids], show_progress=False)
    query_vecs = encode_texts(model, texts, show_progress=False)
    pairs = Dataset.from_dict({"query": texts, "positive": [ds.passage(next(iter(train[q]))) for q in qids]})
    corpus = [ds.passage(d) for d in doc_ids]
    plain = mine(query_vecs, qids, doc_vecs, doc_ids, {q: train[q] for q in qids}, 3, 0, 20).to_pydict()
    # Thresholds at the medians of this model's scores, so each filter removes some candidates, not all.
    gap = float(np.median([p[0] - n[0] for p, n in zip(plain["positive_scores"], plain["negative_scores"])]))
    top = float(np.median([n[0] for n in plain["negative_scores"]]))
    # Not zero: passages that share the positive's first 64 tokens tie with it, and ties fall on
    # either side of a zero margin by float noise.
    share = float(np.median([(p[0] - n[0]) / abs(p[0]) for p, n in zip(plain["positive_scores"], plain["negative_scores"])]))
    # sentence-transformers retrieves a version-dependent number of spare candidates past range_max
    # (max_positives, plus one for the query's own text since 6.x); once filters empty most of the
    # window, the negatives come from those spares. Filtered settings therefore rank the whole corpus.
    everything = len(doc_ids)
    for settings in (
        dict(range_min=0, range_max=20),
        dict(range_min=2, range_max=everything, absolute_margin=-gap),
        dict(range_min=0, range_max=everything, relative_margin=share, max_score=top),
        dict(range_min=1, range_max=everything, min_score=top),
    ):
        theirs = st_mine(
            pairs, model, corpus=corpus, num_negatives=3, use_faiss=True, output_format="labeled-list",
            output_scores=True, verbose=False, **settings,
        )
        theirs = {r["query"]: sorted(r["scores"][1:]) for r in theirs}
        filt = NegativeFilter(**{k: v for k, v in settings.items() if k not in ("range_min", "range_max")})
        skipped = Counter()
        groups = mine(
            query_vecs, qids, doc_vecs, doc_ids, {q: train[q] for q in qids}, 3, settings["range_min"],
            settings["range_max"], "top", filters=filt, skipped=skipped,
        ).to_pydict()
        assert (sum(skipped.values()) > 0) == (filt != NegativeFilter()), (settings, skipped)
        ours = {ds.queries[q]: sorted(s) for q, s in zip(groups["query_id"], groups["negative_scores"])}
        assert 0 < sum(map(len, ours.values())), settings
        # Compared by score: the corpus holds passages whose first 64 tokens coincide, and the two
        # searches order such exact ties differently. Scores differ by float noise between the two
        # encoders' batchings; a candidate that close to a threshold may still go either way.
        same = sum(
            len(ours[t]) == len(theirs.get(t, [])) and np.allclose(ours[t], theirs.get(t, []), atol=1e-4)
            for t in texts  # sentence-transformers drops empty rows
        )
        assert same >= 0.95 * len(qids), settings


@pytest.mark.parametrize("prompt", [None, "query: "])
def test_token_budget_embeddings_equal_encode(prepared, tiny_models, prompt):
    """encode_texts batches by token budget; the vectors, their order and the default prompt are encode's."""
    from sentence_transformers import SentenceTransformer

    ds = load_normalized(prepared)
    model = SentenceTransformer(tiny_models["embedder"], device="cpu")
    model.max_seq_length = 16  # some texts truncated, some not: many distinct lengths
    if prompt:
        model.prompts, model.default_prompt_name = {"query": prompt}, "query"
    texts = [ds.passage(d) for d in ds.corpus] + list(ds.queries.values())
    expected = model.encode(texts, batch_size=4, normalize_embeddings=True, show_progress_bar=False)
    ours = encode_texts(model, texts, batch_tokens=64, show_progress=False)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    if prompt:  # the prompt changed the vectors, so the comparison above covered it
        model.default_prompt_name = None
        assert np.abs(encode_texts(model, texts, show_progress=False) - ours).max() > 1e-3


def test_false_negative_filter_drops_or_relabels():
    kept, stats = false_negatives(GROUPS, TEACHER, 0.0, "keep")
    assert kept.to_pydict() == GROUPS.to_pydict() and stats["suspected"] == 1  # q2's n3 outscores its positive
    dropped, stats = false_negatives(GROUPS, TEACHER, 0.0, "drop")
    assert dropped.column("negative_ids").to_pylist() == [["n1", "n2"], []]
    assert dropped.column("negative_ranks").to_pylist() == [[0, 1], []]
    relabelled, _ = false_negatives(GROUPS, TEACHER, 0.0, "relabel")
    assert relabelled.column("positive_ids").to_pylist() == [["p1"], ["p2", "n3"]]
    # A margin widens the net: n1 (2.0) is within 3.5 of p1 (5.0).
    wide, stats = false_negatives(GROUPS, TEACHER, 3.5, "drop")
    assert wide.column("negative_ids").to_pylist() == [["n2"], []] and stats["queries_with_suspects"] == 2
    with pytest.raises(PipelineError, match="unknown false-negative action"):
        false_negatives(GROUPS, TEACHER, 0.0, "ignore")


@pytest.fixture(scope="module")
def prompted_embedder(tiny_models, tmp_path_factory):
    """The tiny embedder with e5-style prompts for queries and documents."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_models["embedder"], device="cpu")
    model.prompts = {"query": "query: ", "document": "passage: "}
    path = tmp_path_factory.mktemp("prompted") / "embedder"
    model.save(str(path))
    return str(path)


def test_queries_and_passages_get_their_own_prompts(prepared, prompted_embedder, tmp_path):
    """Mining embeds queries with the embedder's 'query' prompt and passages with its 'document'
    prompt, as sentence-transformers' encode_query / encode_document do: the test candidates are
    the top-k of those embeddings, and differ from unprompted ones."""
    import pyarrow.parquet as pq
    from sentence_transformers import SentenceTransformer

    from pipeline.mining import side_prompt_name

    model = SentenceTransformer(prompted_embedder, device="cpu")
    model.max_seq_length = 64
    assert side_prompt_name(model, "query") == "query" and side_prompt_name(model, "document") == "document"
    with pytest.raises(PipelineError, match="not one of the embedder's prompts"):
        side_prompt_name(model, "query", "search_query")

    ds = load_normalized(prepared)
    doc_ids = list(ds.corpus)
    passages = model.encode([ds.passage(d) for d in doc_ids], prompt_name="document", normalize_embeddings=True)

    def top_k(query_prompt):
        c = pq.read_table(tmp_path / query_prompt / "candidates-test.parquet").to_pydict()
        return dict(zip(c["query_id"], c["doc_ids"]))

    config = MineConfig(embedder=prompted_embedder, cache_dir=str(tmp_path / "cache"), max_length=64, rerank_top_k=10)
    stats = mine_hard_negatives(prepared, tmp_path / "query", config)
    assert stats["test_queries"] > 0
    got = top_k("query")
    queries = model.encode([ds.queries[q] for q in got], prompt_name="query", normalize_embeddings=True)
    pos = {d: j for j, d in enumerate(doc_ids)}
    for i, (qid, docs) in enumerate(got.items()):
        sims = passages @ queries[i]
        tenth = np.sort(sims)[::-1][9]
        # The top 10 of the prompted embeddings, up to ties and last-bit batching noise at the 10th place.
        assert all(sims[pos[d]] >= tenth - 1e-5 for d in docs), qid

    # The prompts mattered: unprompted embeddings give other candidates for some query.
    bare_q = model.encode([ds.queries[q] for q in got], normalize_embeddings=True)
    bare_d = model.encode([ds.passage(d) for d in doc_ids], normalize_embeddings=True)
    bare = [{doc_ids[j] for j in np.argsort(-(bare_d @ bare_q[i]), kind="stable")[:10]} for i in range(len(got))]
    assert sum(set(docs) != b for docs, b in zip(got.values(), bare)) >= len(got) // 2


def test_a_passage_that_is_the_query_itself_is_neither_candidate_nor_negative(small_beir, tiny_models, tmp_path):
    """A corpus that holds its queries under their ids (BEIR's ArguAna, Quora): the query's own
    text is the retriever's first hit and nobody's answer, so it is left out (BEIR's
    ignore_identical_ids), unless a judgment names it."""
    ds = read_dataset(small_beir)
    corpus = {**ds.corpus, **{q: ("", text) for q, text in ds.queries.items()}}
    qrels = {s: [(q, d, g) for q, d, g, split in ds.qrels if split == s] for s in ("train", "dev", "test")}
    judged_self = qrels["test"][0][0]
    qrels["test"].append((judged_self, judged_self, 1))
    prepare_data(write_beir(tmp_path / "beir", ds.queries, corpus, qrels), tmp_path / "data")

    def mined(name, **kw):
        _mine(tmp_path / "data", tiny_models, tmp_path / name, tmp_path / "cache", num_negatives=3, **kw)
        groups = pq.read_table(tmp_path / name / "groups.parquet").to_pydict()
        cand = pq.read_table(tmp_path / name / "candidates-test.parquet").to_pydict()
        return dict(zip(groups["query_id"], groups["negative_ids"])), dict(zip(cand["query_id"], cand["doc_ids"]))

    negatives, candidates = mined("plain", ignore_identical_ids=False)
    assert sum(q in n for q, n in negatives.items()) > len(negatives) // 2  # the case arises: the own text ranks high
    assert sum(q in c for q, c in candidates.items()) > len(candidates) // 2
    negatives, candidates = mined("beir")
    assert not any(q in n for q, n in negatives.items()) and all(len(n) == 3 for n in negatives.values())
    assert not any(q in c for q, c in candidates.items() if q != judged_self)
    assert all(len(c) == 10 for c in candidates.values())
    assert judged_self in candidates[judged_self]  # judged relevant to itself: kept


def test_a_query_with_many_positives_lists_its_best_graded_one(small_beir, tiny_models, tmp_path):
    """NFCorpus-like judgments (dozens of relevant passages per query) would make a training row
    per positive; by default a group lists one, the best graded, while every judged positive is
    still kept out of its negatives."""
    ds = read_dataset(small_beir)
    qrels = {s: [(q, d, g) for q, d, g, split in ds.qrels if split == s] for s in ("train", "dev", "test")}
    query = qrels["train"][0][0]
    own = {d for q, d, _ in qrels["train"] if q == query}
    extra = [d for d in ds.corpus if d not in own][:4]
    qrels["train"] += [(query, extra[0], 2), (query, extra[1], 2), (query, extra[2], 1), (query, extra[3], 1)]
    prepare_data(write_beir(tmp_path / "beir", ds.queries, ds.corpus, qrels), tmp_path / "data")
    judged = own | set(extra)

    def group(name, **kw):
        stats = _mine(tmp_path / "data", tiny_models, tmp_path / name, tmp_path / "cache", num_negatives=3, **kw)
        g = pq.read_table(tmp_path / name / "groups.parquet").to_pydict()
        row = g["query_id"].index(query)
        return g["positive_ids"][row], g["negative_ids"][row], stats

    positives, negatives, stats = group("default")
    best = {d for q, d, grade in qrels["train"] if q == query and grade == 2}
    assert len(positives) == 1 and positives[0] in best and not judged & set(negatives)
    assert stats["positives_left_out"] == len(judged) - 1
    assert group("again")[0] == positives  # the draw among equals is seeded
    positives, negatives, stats = group("all", max_positives=0)
    assert set(positives) == judged and not judged & set(negatives) and stats["positives_left_out"] == 0
    positives, _, _ = group("three", max_positives=3)
    assert len(positives) == 3 and best <= set(positives)


def test_queries_with_the_text_of_an_evaluated_one_never_train(small_beir, tiny_models, tmp_path):
    """A search log holds the evaluated queries too, under other ids: one with the text of a dev
    or test query (case and spacing aside) never trains, judged or not; an unjudged repeat of a
    training query's text, or of an earlier logged one, is read once. Counted in the stats; a
    run left with no training query stops before the corpus is embedded."""
    from pipeline.mining import training_queries

    ds = read_dataset(small_beir)
    by_split = {}
    for q, _, _, split in ds.qrels:
        by_split.setdefault(split, []).append(q)
    test_q, dev_q, train_q, other_train_q = by_split["test"][0], by_split["dev"][0], by_split["train"][0], by_split["train"][1]
    # A judged training query with a dev query's text, under its own id.
    ds.queries[other_train_q] = ds.queries[dev_q]
    log = tmp_path / "log.jsonl"
    rows = {
        "u-test": "  " + ds.queries[test_q].upper() + " ",  # an evaluated query, as a log spells it
        "u-train": ds.queries[train_q],  # a judged training query again
        "u-new": "a tiling window manager",
        "u-new-again": "A  tiling window manager",  # the same search, logged twice
    }
    log.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in rows.items()))
    from pipeline.data import with_unlabeled_queries

    ds, _ = with_unlabeled_queries(ds, log)
    left_out = Counter()
    trained = training_queries(ds, 0, -1, seed=12, left_out=left_out)
    assert train_q in trained and other_train_q not in trained
    assert "u-new" in trained or "u-new-again" in trained
    assert not {"u-test", "u-train"} & set(trained) and not {"u-new", "u-new-again"} <= set(trained)
    assert left_out == {"text_of_an_evaluation_query": 2, "text_of_another_training_query": 2}
    assert len(trained) == len(ds.relevant("train"))  # the judged ones but one, and one logged search

    # Every training query with an evaluated text: a one-line stop, before any model loads.
    only = write_beir(tmp_path / "only", {"q1": "image viewer", "q2": "Image  viewer"}, {"d1": ("", "A viewer."), "d2": ("", "Another.")},
                      {"train": [("q1", "d1", 1)], "test": [("q2", "d2", 1)]})
    prepare_data(only, tmp_path / "only-data")
    with pytest.raises(PipelineError, match="no training query is left"):
        mine_hard_negatives(tmp_path / "only-data", tmp_path / "m", MineConfig(embedder=str(tmp_path / "no-such-model")))


def test_a_passage_with_a_positives_exact_text_is_never_its_negative(tiny_models, tmp_path):
    """Corpora hold the same passage under several ids (BEIR's TREC-COVID, web crawls). Its twin
    scores as the positive does, so it would be mined as the hardest negative and label the
    positive's own text irrelevant; sentence-transformers' mining de-duplicates the corpus by text
    and never does. Left out by default, counted; kept with exclude_text_twins=False."""
    queries = {"q1": "image viewer", "q2": "mail client", "q3": "text editor"}
    corpus = {
        "d1": ("Viewer", "A fast image viewer."), "d1-copy": ("Viewer", "A fast image viewer."),
        "d2": ("", "A mail client for the terminal."), "d3": ("", "A small text editor."),
        **{f"x{i}": ("", f"an unrelated package number {i}") for i in range(8)},
    }
    qrels = {"train": [("q1", "d1", 1), ("q2", "d2", 1)], "test": [("q3", "d3", 1)]}
    prepare_data(write_beir(tmp_path / "ds", queries, corpus, qrels), tmp_path / "data")

    def negatives(out: str, **kw) -> tuple[dict, dict]:
        # Every other passage is a negative, so that the tiny model's order does not matter.
        config = MineConfig(embedder=tiny_models["embedder"], cache_dir=str(tmp_path / "cache"), max_length=64, num_negatives=20, **kw)
        stats = mine_hard_negatives(tmp_path / "data", tmp_path / out, config)
        groups = pq.read_table(tmp_path / out / "groups.parquet").to_pylist()
        return {g["query_id"]: g["negative_ids"] for g in groups}, stats

    kept_out, stats = negatives("default")
    with_twin, stats_with = negatives("kept", exclude_text_twins=False)
    assert "d1-copy" in with_twin["q1"] and set(kept_out["q1"]) == set(with_twin["q1"]) - {"d1-copy"}
    assert stats["filtered"]["same_text_as_a_positive"] == 1 and "same_text_as_a_positive" not in stats_with["filtered"]
    assert kept_out["q2"] == with_twin["q2"]  # a query whose positive has no twin mines as before
