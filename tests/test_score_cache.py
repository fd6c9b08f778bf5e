"""The keyed store and the teacher score cache on it: exact keys, values found wherever their
part lies, parts merged when they pile up. How a lookup's cost follows the keys looked up, not the cache, is measured by
``make bench-scale``, not asserted here."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.keyed_store import SLICE, KeyedStore, digest_keys, sorted_find
from pipeline.score_cache import ScoreCache, pair_keys


def _pairs(n: int, tag: str = "") -> list[tuple[str, str]]:
    return [(f"query {i % 97}{tag}", f"passage {i}{tag}") for i in range(n)]


def test_keys_are_exact_texts():
    keys = pair_keys([("a", "bc"), ("ab", "c"), ("a", "bc")])
    assert keys.shape == (3, 2) and keys.dtype == np.uint64
    assert (keys[0] == keys[2]).all() and (keys[0] != keys[1]).any()  # the separator keeps "a|bc" from "ab|c"


def test_lookup_finds_scores_across_parts_and_misses_the_rest(tmp_path):
    cache = ScoreCache(tmp_path / "member")
    first, second, unseen = _pairs(500, "a"), _pairs(300, "b"), _pairs(50, "c")
    cache.add(pair_keys(first), np.arange(500, dtype=np.float32))
    cache.add(pair_keys(second), -np.arange(300, dtype=np.float32))
    ask = second[::-1] + unseen + first[::7]
    found, scores = cache.lookup(pair_keys(ask))
    assert found.tolist() == [True] * 300 + [False] * 50 + [True] * len(first[::7])
    np.testing.assert_array_equal(scores[:300], -np.arange(300, dtype=np.float32)[::-1])
    assert np.isnan(scores[300:350]).all()
    np.testing.assert_array_equal(scores[350:], np.arange(0, 500, 7, dtype=np.float32))


def test_parts_are_merged_when_they_pile_up_and_keep_every_score(tmp_path):
    cache = ScoreCache(tmp_path / "member", max_parts=4)
    batches = [_pairs(40, str(i)) for i in range(9)]
    for i, pairs in enumerate(batches):
        cache.add(pair_keys(pairs), np.full(len(pairs), i, np.float32))
        assert len(cache.parts()) <= 4
    # A pair written again (a rescored shard) keeps one row, with the newest score.
    cache.add(pair_keys(batches[0][:5]), np.full(5, 99.0, np.float32))
    cache.compact()
    assert len(cache.parts()) == 1 and len(cache) == 9 * 40
    found, scores = cache.lookup(pair_keys([p for b in batches for p in b]))
    assert found.all()
    expected = np.repeat(np.arange(9, dtype=np.float32), 40)
    expected[:5] = 99.0
    np.testing.assert_array_equal(scores, expected)


def test_broken_scores_are_not_cached(tmp_path):
    cache = ScoreCache(tmp_path / "member")
    cache.add(pair_keys(_pairs(3)), np.array([1.0, np.nan, 2.0], np.float32))
    assert cache.parts() == []


def test_store_keeps_fixed_width_rows_and_marks_misses(tmp_path):
    values = pa.schema([("ids", pa.list_(pa.int64(), 3)), ("scores", pa.list_(pa.float32(), 3))])
    store = KeyedStore(tmp_path / "searches", values, max_parts=2)
    keys = digest_keys(f"query {i}" for i in range(30))
    ids = np.arange(90, dtype=np.int64).reshape(30, 3)
    for part in np.array_split(np.arange(30), 4):  # four parts: merged along the way
        store.add(keys[part], {"ids": ids[part], "scores": -ids[part].astype(np.float32)})
    assert len(store.parts()) <= 2 and len(store) == 30
    ask = np.concatenate([keys[::-1], digest_keys([b"\x00\x01", "never added"])])
    found, got = store.lookup(ask)
    assert found.tolist() == [True] * 30 + [False] * 2
    np.testing.assert_array_equal(got["ids"][:30], ids[::-1])
    np.testing.assert_array_equal(got["scores"][:30], -ids[::-1].astype(np.float32))
    assert (got["ids"][30:] == -1).all() and np.isnan(got["scores"][30:]).all()


def test_sliced_search_finds_what_a_plain_search_finds():
    rng = np.random.default_rng(3)
    # Few distinct values: runs of equal keys span slice boundaries, where a slicing error would show.
    haystack = np.sort(rng.integers(10, 60, size=5 * SLICE + 123, dtype=np.uint64) * 1000)
    needles = np.sort(np.concatenate([haystack[:: 97], rng.integers(0, 70_000, size=4000, dtype=np.uint64)]))
    for hay in (haystack, haystack[:SLICE]):  # sliced, and in one piece
        pos, same = sorted_find(hay, needles)
        np.testing.assert_array_equal(pos, np.searchsorted(hay, needles))
        np.testing.assert_array_equal(same, np.isin(needles, hay))
    unique = np.sort(rng.integers(0, 2**63, size=3 * SLICE, dtype=np.uint64))
    pos, same = sorted_find(unique, unique)
    np.testing.assert_array_equal(pos, np.arange(len(unique)))
    assert same.all()
