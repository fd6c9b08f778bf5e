"""Property tests of the dataset readers: random valid datasets round-trip; random corruption of
any input file gives a clean DataError (file, line, field), never a traceback from a library."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_beir
from pipeline.data import read_dataset
from pipeline.errors import DataError

ids = st.text(alphabet=string.ascii_letters + string.digits + "-_.:", min_size=1, max_size=10)
# Any Unicode text (lone surrogates excluded: they cannot be written as UTF-8) with something visible in it.
texts = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30).filter(lambda t: t.strip())


@st.composite
def datasets(draw):
    qids = draw(st.lists(ids, min_size=1, max_size=6, unique=True))
    dids = draw(st.lists(ids, min_size=1, max_size=8, unique=True))
    queries = {q: draw(texts).strip() for q in qids}
    corpus = {d: (draw(st.one_of(st.just(""), texts)).strip(), draw(texts).strip()) for d in dids}
    qrels = {
        split: [(draw(st.sampled_from(qids)), draw(st.sampled_from(dids)), draw(st.integers(0, 3))) for _ in range(draw(st.integers(1, 5)))]
        for split in ("train", "dev", "test")  # a folder without dev gets one held out of train (test_data)
    }
    return queries, corpus, qrels


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=datasets())
def test_valid_datasets_round_trip(data, tmp_path_factory):
    queries, corpus, qrels = data
    folder = write_beir(tmp_path_factory.mktemp("valid"), queries, corpus, qrels)
    ds = read_dataset(folder)
    assert ds.queries == queries
    assert ds.corpus == corpus
    # A query judged in several splits keeps those of the first of test, dev, train it is in.
    evaluated = {q: next(split for split in ("test", "dev", "train") if any(r[0] == q for r in qrels[split]))
                 for rows in qrels.values() for q, _, _ in rows}
    assert sorted(ds.qrels) == sorted((q, d, s, split) for split, rows in qrels.items() for q, d, s in rows if evaluated[q] == split)


BASE_QUERIES = {"q1": "image viewer", "q2": "HTTP link parsing in Go", "q3": "tiling window manager"}
BASE_CORPUS = {"d1": ("", "A fast image viewer."), "d2": ("go", "Parses Link headers."), "d3": ("wm", "Tiles windows.")}
BASE_QRELS = {"train": [("q1", "d1", 1), ("q2", "d2", 1)], "test": [("q3", "d3", 1)]}


def _corrupt(data: bytes, op: str, pos: int, byte: int, length: int) -> bytes:
    pos = pos % (len(data) + 1)
    if op == "flip":
        return data[:pos] + bytes([byte]) + data[pos + 1 :]
    if op == "insert":
        return data[:pos] + bytes([byte]) * length + data[pos:]
    if op == "delete":
        return data[:pos] + data[pos + length :]
    return data[:pos]  # truncate


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file=st.sampled_from(["corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv", "queries.de.jsonl"]),
    op=st.sampled_from(["flip", "insert", "delete", "truncate"]),
    pos=st.integers(0, 10_000),
    byte=st.integers(0, 255),
    length=st.integers(1, 12),
)
def test_corrupted_files_give_a_data_error(file, op, pos, byte, length, tmp_path_factory):
    folder = write_beir(tmp_path_factory.mktemp("corrupt"), BASE_QUERIES, BASE_CORPUS, BASE_QRELS)
    (folder / "queries.de.jsonl").write_text(json.dumps({"_id": "q1", "text": "Bildbetrachter"}) + "\n")
    path = folder / file
    path.write_bytes(_corrupt(path.read_bytes(), op, pos, byte, length))
    try:
        read_dataset(folder)
    except DataError as e:
        message = str(e)
        assert "\n" not in message and str(folder) in message
    shutil.rmtree(folder)


def test_lone_surrogate_escape_is_a_data_error(tmp_path):
    """Valid JSON, invalid text: it used to pass the reader and fail later, deep inside pyarrow."""
    folder = write_beir(tmp_path / "beir", BASE_QUERIES, BASE_CORPUS, BASE_QRELS)
    path = folder / "corpus.jsonl"
    path.write_bytes(path.read_bytes().replace(b"fast", b"fast \\ud800"))
    try:
        read_dataset(folder)
    except DataError as e:
        assert str(e).startswith(f"{path}:1: field 'text': not valid Unicode")
    else:
        raise AssertionError("a lone surrogate was accepted")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(["flip", "insert", "delete", "truncate"]),
    pos=st.integers(0, 2_000),
    byte=st.integers(0, 255),
    length=st.integers(1, 12),
)
def test_corrupted_pairs_file_gives_a_data_error(op, pos, byte, length, tmp_path_factory):
    path = Path(tmp_path_factory.mktemp("pairs")) / "pairs.jsonl"
    rows = [{"query": "image viewer", "positive": "A fast image viewer.", "split": "train"},
            {"query": "window manager", "positive": "Tiles windows.", "split": "test", "query_id": 7}]
    path.write_bytes(_corrupt("".join(json.dumps(r) + "\n" for r in rows).encode(), op, pos, byte, length))
    try:
        read_dataset(path)
    except DataError as e:
        assert "\n" not in str(e) and str(path) in str(e)
