"""Ingest: valid inputs normalize; each bad input stops with a one-line error naming file, line and field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import NormalizedTables, Texts, has_training_judgments, join_title, judgments, load_normalized, pair_texts, prepare_data, read_dataset
from pipeline.errors import DataError, PipelineError
from pipeline.mining import training_queries
from tests.conftest import write_beir

QUERIES = {"q1": "how to parse xml", "q2": "image viewer", "q3": "python linter"}
CORPUS = {"d1": ("", "An XML parsing library."), "d2": ("Viewer", "A fast image viewer."), "d3": ("", "Checks Python code.")}
QRELS = {"train": [("q1", "d1", 1)], "dev": [("q2", "d2", 1)], "test": [("q3", "d3", 1)]}


@pytest.fixture
def beir(tmp_path):
    return write_beir(tmp_path / "ds", QUERIES, CORPUS, QRELS)


def _error(source) -> str:
    with pytest.raises(DataError) as exc:
        read_dataset(source)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_beir_folder_round_trips_through_parquet(beir, tmp_path):
    stats = prepare_data(beir, tmp_path / "norm")
    assert stats["queries"] == 3 and stats["documents"] == 3
    assert stats["qrels"] == {"train": 1, "dev": 1, "test": 1}
    ds = load_normalized(tmp_path / "norm")
    assert ds.queries == QUERIES
    assert ds.corpus == CORPUS
    assert ds.passage("d2") == "Viewer. A fast image viewer."
    assert ds.relevant("test") == {"q3": {"d3": 1}}
    schema = pq.read_schema(tmp_path / "norm" / "qrels.parquet")
    assert schema.field("score").type == pa.int32()


def test_a_folder_without_dev_holds_out_a_tenth_of_its_training_queries(tmp_path):
    queries = {f"q{i}": f"query {i}" for i in range(400)}
    corpus = {f"d{i}": ("", f"passage {i}") for i in range(400)}
    train = [(f"q{i}", f"d{i}", 1) for i in range(300)] + [("q0", "d1", 2)]
    test = [(f"q{i}", f"d{i}", 1) for i in range(300, 400)]
    stats = prepare_data(write_beir(tmp_path / "ds", queries, corpus, {"train": train, "test": test}), tmp_path / "norm")
    dev, kept = judgments(tmp_path / "norm", "dev"), judgments(tmp_path / "norm", "train")
    assert 15 <= len(dev) <= 45 and stats["dev_from_train"] == stats["split_queries"]["dev"] == len(dev)
    assert not dev.keys() & kept.keys() and dev.keys() | kept.keys() == {f"q{i}" for i in range(300)}
    assert judgments(tmp_path / "norm", "test") == {q: {d: 1} for q, d, _ in test}
    assert all(dev[q] == {q.replace("q", "d"): 1} for q in dev if q != "q0")  # every judgment of a query moves with it
    # Held out means held out: neither judged nor as an unjudged query does a dev query train.
    trained = training_queries(read_dataset(tmp_path / "ds"), 0, -1, seed=12)
    assert not trained.keys() & dev.keys() and trained.keys() == kept.keys()
    # The same queries on every reading (a growing dataset's dates keep them out of training).
    again = prepare_data(write_beir(tmp_path / "more", {**queries, "q900": "new"}, corpus,
                                    {"train": train + [("q900", "d0", 1)], "test": test}), tmp_path / "norm2")
    assert dev.keys() <= judgments(tmp_path / "norm2", "dev").keys() and again["dev_from_train"] >= len(dev)


def test_files_saved_with_a_byte_order_mark_and_crlf_read_as_without(beir, tmp_path):
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
        path = beir / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    ds = read_dataset(beir)
    assert ds.queries == QUERIES and ds.corpus == CORPUS
    assert sorted(ds.qrels) == sorted((q, d, s, split) for split, rows in QRELS.items() for q, d, s in rows)


def test_a_folder_with_a_dev_split_keeps_it(beir, tmp_path):
    stats = prepare_data(beir, tmp_path / "norm")
    assert stats["dev_from_train"] == 0 and judgments(tmp_path / "norm", "train") == {"q1": {"d1": 1}}


def test_pair_texts_are_looked_up_in_arrow_as_the_dataset_gives_them(beir, tmp_path):
    prepare_data(beir, tmp_path / "norm")
    ds = load_normalized(tmp_path / "norm")
    qids, dids = ["q2", "q1", "q2", "q3"], ["d2", "d3", "d1", "d2"]
    assert pair_texts(tmp_path / "norm", qids, dids) == [(ds.queries[q], ds.passage(d)) for q, d in zip(qids, dids)]
    with pytest.raises(DataError, match=r"corpus\.parquet: field 'doc_id': 'd9' is not in the prepared data"):
        pair_texts(tmp_path / "norm", ["q1", "q2"], ["d1", "d9"])


def test_judgments_and_texts_are_those_of_the_whole_dataset(beir, tmp_path):
    prepare_data(beir, tmp_path / "norm")
    ds = load_normalized(tmp_path / "norm")
    for split in ("train", "dev", "test"):
        assert judgments(tmp_path / "norm", split) == ds.relevant(split)
    texts = NormalizedTables(tmp_path / "norm").texts()
    assert texts.query(["q2", "q1"]).to_pylist() == [ds.queries["q2"], ds.queries["q1"]]
    assert texts.passage(["d2", "d1", "d2"]).to_pylist() == [ds.passage(d) for d in ("d2", "d1", "d2")]


def test_texts_are_found_by_id_among_few_or_many():
    """A few ids are looked up in the part of a large table that holds them, many in the whole
    table: the same texts either way, and the same answer to which ids are there."""
    corpus = {f"d{i}": (f"t{i}" if i % 2 else "", f"text {i}") for i in range(40)}
    texts = Texts.of({"q1": "one", "q2": "two"}, corpus)
    for ids in (["d7", "d3", "d7"], [f"d{i}" for i in range(39, -1, -1)]):
        assert texts.passage(ids).to_pylist() == [join_title(*corpus[d]) for d in ids]
    asked = pa.array(["d1", "x", "d39", "d40"])
    assert texts.holds_passages(asked).tolist() == [True, False, True, False]
    assert texts.holds_queries(pa.array(["q2", "q3"])).tolist() == [True, False]
    with pytest.raises(DataError, match=r"corpus: field 'doc_id': 'x' is not in the prepared data"):
        texts.passage(["d1", "x"])


def test_missing_corpus_file(beir):
    (beir / "corpus.jsonl").unlink()
    msg = _error(beir)
    assert "corpus.jsonl" in msg and "missing file" in msg


def test_missing_test_qrels(beir):
    (beir / "qrels" / "test.tsv").unlink()
    assert "test.tsv" in _error(beir)


def test_qrel_with_unknown_query(beir):
    with open(beir / "qrels" / "train.tsv", "a") as f:
        f.write("q9\td1\t1\n")
    msg = _error(beir)
    assert "train.tsv:3" in msg and "'query-id'" in msg and "q9" in msg


def test_qrel_with_unknown_document(beir):
    with open(beir / "qrels" / "dev.tsv", "a") as f:
        f.write("q1\tnope\t1\n")
    msg = _error(beir)
    assert "dev.tsv:3" in msg and "'corpus-id'" in msg and "nope" in msg


def test_a_few_judgments_of_unknown_ids_count_for_nothing_and_many_stop_the_run(tmp_path, caplog):
    """Published qrels name the odd query or document their files lack (ArguAna, NFCorpus): up
    to DANGLING_SHARE of a file they pass with a warning; more means mismatched files."""
    queries = {f"q{i}": f"query {i}" for i in range(60)}
    corpus = {f"d{i}": ("", f"passage {i}") for i in range(60)}
    train = [(f"q{i}", f"d{i}", 1) for i in range(30)] + [("q-gone", "d1", 1)]
    test = [(f"q{i}", f"d{i}", 1) for i in range(30, 59)] + [("q59", "d-gone", 1)]  # q59's only positive is missing
    folder = write_beir(tmp_path / "ds", queries, corpus, {"train": train, "dev": [("q0", "d0", 1)], "test": test})
    stats = prepare_data(folder, tmp_path / "norm")
    assert stats["judgments_of_unknown_ids"] == {"qrels/train.tsv": 1, "qrels/test.tsv": 1}
    assert "test.tsv:31: field 'corpus-id': unknown document id 'd-gone'" in caplog.text
    assert "q59" not in judgments(tmp_path / "norm", "test") and "q-gone" not in judgments(tmp_path / "norm", "train")
    # A test query whose positive is missing is still a test query: never an unjudged training query.
    assert "q59" not in training_queries(read_dataset(folder), 0, -1, seed=12)
    with open(folder / "qrels" / "test.tsv", "a") as f:
        f.write("q1\td-gone-too\t1\n")
    msg = _error(folder)
    assert "test.tsv:31" in msg and "'corpus-id'" in msg and "d-gone" in msg


def test_qrels_in_trec_layout_or_without_a_header_read_as_with_one(beir, tmp_path):
    """MS MARCO ships TREC qrels with tabs, TREC with spaces (query-id, iteration, doc-id, grade),
    and some BEIR-style exports drop the header: each reads as BEIR's own layout does, and the
    cheap checks made before reading (training judgments, queries judged in two splits) agree."""
    qrels = beir / "qrels"
    (qrels / "train.tsv").write_text("q1 0 d1 1\n")
    (qrels / "dev.tsv").write_text("q2\t0\td2\t1\n")
    (qrels / "test.tsv").write_text("q3\td3\t1\n")
    ds = read_dataset(beir)
    assert sorted(ds.qrels) == sorted((q, d, s, split) for split, rows in QRELS.items() for q, d, s in rows)
    assert has_training_judgments(beir)
    from pipeline.data import splits_overlap

    assert not splits_overlap(beir)
    (qrels / "test.tsv").write_bytes(b"\xef\xbb\xbfq1 0 d3 1\n")  # q1 also judged in test, behind a byte order mark
    assert splits_overlap(beir)
    (qrels / "test.tsv").write_text("q3\td3\t1\nq1 0 d3 1\n")  # and in another layout than the file's
    assert splits_overlap(beir)
    # A layout is the file's: a row in another one is an error naming its line.
    msg = _error(beir)
    assert "test.tsv:2" in msg and "3 tab-separated columns" in msg
    (qrels / "train.tsv").write_text("q1 0 d1 1\nq1 d2 1\n")
    msg = _error(beir)
    assert "train.tsv:2" in msg and "4 columns (TREC qrels" in msg
    (qrels / "train.tsv").write_text("judgments follow\n")
    msg = _error(beir)
    assert "train.tsv:1" in msg and "header 'query-id<TAB>corpus-id<TAB>score'" in msg and "TREC" in msg


def test_gzip_compressed_files_read_as_the_plain_ones(beir, tmp_path):
    """The BEIR sets on the Hugging Face hub ship corpus.jsonl.gz and queries.jsonl.gz: any input
    file may be compressed, the checks made before reading agree with the reader, a broken or
    truncated stream is a one-line error naming its file, and a file given both ways is refused."""
    import gzip
    import shutil

    from pipeline.data import dataset_hash, holds_out_dev, splits_overlap

    plain = read_dataset(beir)
    packed = tmp_path / "packed"
    shutil.copytree(beir, packed)
    for path in [packed / "corpus.jsonl", packed / "queries.jsonl", *(packed / "qrels").glob("*.tsv")]:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    ds = read_dataset(packed)
    assert (ds.queries, ds.corpus, sorted(ds.qrels)) == (plain.queries, plain.corpus, sorted(plain.qrels))
    assert has_training_judgments(packed) and not holds_out_dev(packed) and not splits_overlap(packed)
    assert dataset_hash(packed) != dataset_hash(beir)  # the compressed files are the dataset's files
    # A pairs file and a language file may be compressed too.
    pairs = tmp_path / "pairs.jsonl.gz"
    pairs.write_bytes(gzip.compress((json.dumps({"query": "image viewer", "positive": "A fast image viewer."}) + "\n").encode()))
    assert list(read_dataset(pairs).queries.values()) == ["image viewer"]
    (packed / "queries.de.jsonl.gz").write_bytes(gzip.compress((json.dumps({"_id": "q2", "text": "Bildbetrachter"}) + "\n").encode()))
    assert read_dataset(packed).languages["de"][0] == {"q2": "Bildbetrachter"}
    # Broken streams, and a file given both ways.
    whole = (packed / "corpus.jsonl.gz").read_bytes()
    (packed / "corpus.jsonl.gz").write_bytes(whole[: len(whole) - 12])
    msg = _error(packed)
    assert "corpus.jsonl.gz" in msg and "ends early" in msg
    (packed / "corpus.jsonl.gz").write_bytes(b"not gzip at all\n")
    msg = _error(packed)
    assert "corpus.jsonl.gz:1" in msg and "gzip" in msg
    (packed / "corpus.jsonl.gz").write_bytes(whole)
    shutil.copy(beir / "qrels" / "test.tsv", packed / "qrels" / "test.tsv")
    msg = _error(packed)
    assert "test.tsv.gz" in msg and "keep one" in msg


def test_qrel_with_non_numeric_score(beir):
    with open(beir / "qrels" / "train.tsv", "a") as f:
        f.write("q1\td2\thigh\n")
    msg = _error(beir)
    assert "train.tsv:3" in msg and "'score'" in msg and "high" in msg


def test_empty_query_text(beir):
    with open(beir / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q4", "text": "   "}) + "\n")
    msg = _error(beir)
    assert "queries.jsonl:4" in msg and "'text'" in msg and "empty" in msg


def test_a_document_without_title_or_text_stays_as_an_empty_passage(beir, tmp_path, caplog):
    """Published corpora hold such rows (BEIR's FiQA): the dataset is read, the document kept
    (a judgment pointing to it stays, and counts as a miss), the count logged and recorded."""
    with open(beir / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "d4", "title": "", "text": " "}) + "\n")
    with open(beir / "qrels" / "test.tsv", "a") as f:
        f.write("q3\td4\t1\n")
    (beir / "corpus.de.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": ""}) + "\n"
                                          + json.dumps({"_id": "d2", "text": "Ein Bildbetrachter."}) + "\n")
    stats = prepare_data(beir, tmp_path / "norm")
    assert stats["documents"] == 4 and stats["documents_without_text"] == 1
    assert load_normalized(tmp_path / "norm").corpus["d4"] == ("", "")
    assert judgments(tmp_path / "norm", "test") == {"q3": {"d3": 1, "d4": 1}}
    assert "corpus.jsonl: 1 documents have neither title nor text (first on line 4)" in caplog.text
    # In a translation file an empty document is one not translated.
    assert read_dataset(beir).languages["de"][1] == {"d2": ("", "Ein Bildbetrachter.")}


def test_duplicate_document_id(beir):
    with open(beir / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "d2", "title": "", "text": "again"}) + "\n")
    msg = _error(beir)
    assert "corpus.jsonl:4" in msg and "'_id'" in msg and "duplicate id 'd2'" in msg and "line 2" in msg


def test_duplicate_query_id(beir):
    with open(beir / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q1", "text": "again"}) + "\n")
    assert "duplicate id 'q1' with a different text" in _error(beir)


def test_rows_repeated_whole_are_read_once(beir, tmp_path, caplog):
    """Published files hold exact copies of a row (MIRACL's corpora): the same id with the same
    text says nothing new, so it is read once, warned about and counted, where it stopped the run."""
    corpus, queries = (beir / "corpus.jsonl").read_text().splitlines(), (beir / "queries.jsonl").read_text().splitlines()
    (beir / "corpus.jsonl").write_text("\n".join([*corpus, corpus[1], corpus[0]]) + "\n")
    (beir / "queries.jsonl").write_text("\n".join([*queries, queries[0]]) + "\n")
    with caplog.at_level("WARNING"):
        stats = prepare_data(beir, tmp_path / "norm")
    ds = load_normalized(tmp_path / "norm")
    assert ds.corpus == CORPUS and ds.queries == QUERIES
    assert stats["documents"] == len(CORPUS) and stats["repeated_rows"] == {"corpus.jsonl": 2, "queries.jsonl": 1}
    assert f"corpus.jsonl: 2 rows repeat an earlier row's id and text and are read once (first on line {len(corpus) + 1})" in caplog.text
    from pipeline.report import _data_section

    assert "corpus.jsonl: 2 rows repeat an earlier row's id and text; each was read once." in _data_section(stats, {}, {})
    # The same id with another title is not a copy.
    (beir / "corpus.jsonl").write_text("\n".join([*corpus, json.dumps({**json.loads(corpus[0]), "title": "other"})]) + "\n")
    assert f"corpus.jsonl:{len(corpus) + 1}" in _error(beir) and "with a different text" in _error(beir)


def test_malformed_json_line(beir):
    with open(beir / "queries.jsonl", "a") as f:
        f.write('{"_id": "q5", "text": \n')
    msg = _error(beir)
    assert "queries.jsonl:4" in msg and "malformed JSON" in msg


def test_missing_field(beir):
    with open(beir / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"title": "x", "text": "y"}) + "\n")
    msg = _error(beir)
    assert "corpus.jsonl:4" in msg and "'_id'" in msg and "missing" in msg
    # A corpus in another tool's layout (Pyserini's id / contents): the error shows the row's fields.
    (beir / "corpus.jsonl").write_text(json.dumps({"id": "d1", "contents": "An XML parsing library."}) + "\n")
    assert _error(beir).endswith("field '_id': missing (the row has: id, contents)")


def test_non_utf8_bytes(beir):
    with open(beir / "corpus.jsonl", "ab") as f:
        f.write(b'{"_id": "d9", "text": "caf\xe9"}\n')
    msg = _error(beir)
    assert "corpus.jsonl:4" in msg and "UTF-8" in msg


def test_parallel_language_files_are_read(beir):
    with open(beir / "queries.de.jsonl", "w") as f:
        f.write(json.dumps({"_id": "q1", "text": "XML parsen"}) + "\n")
    with open(beir / "corpus.de.jsonl", "w") as f:
        f.write(json.dumps({"_id": "d1", "title": "", "text": "Eine XML-Bibliothek."}) + "\n")
    ds = read_dataset(beir)
    assert ds.languages["de"][0] == {"q1": "XML parsen"}


def test_pairs_jsonl_with_and_without_ids(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"query": "parse xml", "positive": "An XML library.", "split": "train"},
        {"query": "parse xml", "positive": "Another XML parser.", "split": "train"},
        {"query": "view images", "positive": "An image viewer.", "split": "test", "query_id": "qv", "positive_id": "dv"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = read_dataset(path)
    assert len(ds.queries) == 2 and len(ds.corpus) == 3
    assert ds.relevant("test") == {"qv": {"dv": 1}}
    assert len(ds.relevant("train")) == 1 and len(next(iter(ds.relevant("train").values()))) == 2


def test_pairs_parquet_missing_column(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": ["a"], "passage": ["b"]}), path)
    msg = _error(path)
    assert "pairs.parquet" in msg and "'positive'" in msg and "missing column" in msg


def test_pairs_parquet_reads(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": ["a b", "c d"], "positive": ["e f", "g h"]}), path)
    ds = read_dataset(path)
    assert sorted(ds.queries.values()) == ["a b", "c d"]


def test_pairs_empty_positive(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"query": "a", "positive": " "}) + "\n")
    msg = _error(path)
    assert "pairs.jsonl:1" in msg and "'positive'" in msg


def test_dataset_not_found(tmp_path):
    assert "dataset not found" in _error(tmp_path / "nothing")


def test_demo_dataset_is_valid():
    from tests.conftest import DEMO

    ds = read_dataset(DEMO)
    assert len(ds.relevant("train")) > 1000 and len(ds.relevant("test")) > 200
    assert {"de", "fr", "it"} <= set(ds.languages)


def test_multilingual_demo_dataset_is_the_partly_judged_one_with_translations():
    """The multilingual demo trains as the English demo does: its judgments are the partly judged
    folder's, and every query and passage of the full dataset is there, translations included."""
    from tests.conftest import DEMO

    full, partly, multi = read_dataset(DEMO), read_dataset(DEMO.parent / "debian-partly-judged"), read_dataset(DEMO.parent / "debian-multilingual")
    assert sorted(multi.qrels) == sorted(partly.qrels)
    assert len(multi.relevant("train")) == 600 < len(full.relevant("train"))
    assert multi.relevant("test") == full.relevant("test") and multi.relevant("dev") == full.relevant("dev")
    assert multi.queries == full.queries and multi.corpus == full.corpus
    assert multi.languages == full.languages and {"de", "fr", "it"} <= set(multi.languages)


def test_bad_data_ends_the_luigi_run_with_one_line_and_no_traceback(beir, tmp_path):
    """Through the command line a user runs: the DataError's line, a non-zero exit, no traceback."""
    import os
    import subprocess

    from tests.conftest import REPO, luigi_command

    with open(beir / "qrels" / "train.tsv", "a") as f:
        f.write("q9\td1\t1\n")
    cfg = tmp_path / "luigi.cfg"
    cfg.write_text("[core]\nlog_level = INFO\n[retcode]\ntask_failed = 30\nunhandled_exception = 40\nmissing_data = 20\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LUIGI_CONFIG_PATH": str(cfg)}
    args = luigi_command("PrepareData", {"dataset": beir, "output_dir": tmp_path / "run"}, "--local-scheduler")
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 30, log[-2000:]
    assert "Traceback" not in log, log[-3000:]
    [line] = [x for x in log.splitlines() if "train.tsv:3" in x]
    assert "field 'query-id'" in line and "q9" in line

    missing = luigi_command("TrainStudent", {"dataset": tmp_path / "no-such-folder", "output_dir": tmp_path / "run"}, "--local-scheduler")
    proc = subprocess.run(missing, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 30 and "Traceback" not in log, log[-3000:]
    assert any("no-such-folder: dataset not found" in x for x in log.splitlines()), log[-3000:]


def test_unexpected_errors_keep_their_traceback():
    import logging

    from tasks import OneLineErrors

    def record(error):
        try:
            raise error
        except Exception:
            import sys

            return logging.LogRecord("luigi-interface", logging.ERROR, __file__, 1, "failed %s", ("Task",), sys.exc_info())

    expected = record(DataError("q.tsv", 3, "query-id", "unknown query id 'q9'"))
    assert OneLineErrors().filter(expected) and expected.exc_info is None
    assert expected.getMessage() == "failed Task: q.tsv:3: field 'query-id': unknown query id 'q9'"
    unexpected = record(KeyError("boom"))
    assert OneLineErrors().filter(unexpected) and unexpected.exc_info[0] is KeyError

    def scheduling(error):
        """What luigi logs when a requires() or complete() raises: the traceback inside the message."""
        try:
            raise error
        except Exception:
            import traceback

            text = f"Will not run Task(a=1) or any dependencies due to error in deps() method:\n{traceback.format_exc()}"
            return logging.LogRecord("luigi-interface", logging.WARNING, __file__, 1, text, (), None)

    refused = scheduling(PipelineError("--label-only-loss X: this loss needs teacher scores"))
    assert OneLineErrors().filter(refused)
    assert refused.getMessage() == ("Will not run Task(a=1) or any dependencies due to error in deps() method: "
                                    "--label-only-loss X: this loss needs teacher scores")
    broken = scheduling(KeyError("boom"))
    assert OneLineErrors().filter(broken) and "Traceback" in broken.getMessage() and "KeyError: 'boom'" in broken.getMessage()


def test_unlabeled_queries_join_the_dataset_unjudged(beir, tmp_path):
    extra = tmp_path / "unlabeled.jsonl"
    extra.write_text(json.dumps({"_id": "u1", "text": "tiling window manager"}) + "\n")
    stats = prepare_data(beir, tmp_path / "norm", extra)
    assert (stats["queries"], stats["unjudged_queries"], stats["unlabeled_file_queries"]) == (4, 1, 1)
    ds = load_normalized(tmp_path / "norm")
    assert ds.queries["u1"] == "tiling window manager" and all(r[0] != "u1" for r in ds.qrels)


def test_empty_searches_in_a_log_of_unlabeled_queries_are_skipped(beir, tmp_path, caplog):
    extra = tmp_path / "unlabeled.jsonl"
    extra.write_text("".join(json.dumps({"_id": f"u{i}", "text": t}) + "\n" for i, t in enumerate(["tiling wm", "  ", "", "pdf viewer"])))
    stats = prepare_data(beir, tmp_path / "norm", extra)
    assert stats["unlabeled_file_queries"] == 2 and set(load_normalized(tmp_path / "norm").queries) >= {"u0", "u3"}
    assert "2 queries with no text skipped (first on line 2)" in caplog.text
    # In the dataset's own queries an empty text is still an error: a judged query must have one.
    with open(beir / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q4", "text": " "}) + "\n")
    assert "queries.jsonl:4" in _error(beir)


def test_a_plain_text_log_of_unlabeled_queries_reads_one_query_per_line(beir, tmp_path):
    """A search log is often one query per line: each non-blank line is a query, named by a hash
    of its text (spacing aside), so a repeated search is read once; gzip-compressed as well."""
    import gzip

    log = tmp_path / "log.txt"
    log.write_text("tiling window manager\n\n  pdf   viewer \ntiling window manager\npdf viewer\n")
    stats = prepare_data(beir, tmp_path / "norm", log)
    assert stats["unlabeled_file_queries"] == 2 and stats["unjudged_queries"] == 2
    added = {q: t for q, t in load_normalized(tmp_path / "norm").queries.items() if q not in QUERIES}
    assert sorted(added.values()) == ["pdf viewer", "tiling window manager"] and all(q.startswith("log-") for q in added)
    packed = tmp_path / "log.txt.gz"
    packed.write_bytes(gzip.compress(log.read_bytes()))
    assert prepare_data(beir, tmp_path / "norm-gz", packed)["unlabeled_file_queries"] == 2
    log.write_bytes(b"pdf viewer\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"log.txt:2: not valid UTF-8"):
        prepare_data(beir, tmp_path / "norm-bad", log)


def test_unlabeled_query_with_a_dataset_id_is_refused(beir, tmp_path):
    extra = tmp_path / "unlabeled.jsonl"
    extra.write_text(json.dumps({"_id": "u1", "text": "a"}) + "\n" + json.dumps({"_id": "q2", "text": "b"}) + "\n")
    with pytest.raises(DataError, match=f"^{extra}:2: field '_id': id 'q2' is already a query of the dataset$"):
        prepare_data(beir, tmp_path / "norm", extra)
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        prepare_data(beir, tmp_path / "norm", tmp_path / "missing.jsonl")
    assert not (tmp_path / "norm").exists()


def test_prepared_data_of_a_folder_without_dev_is_not_the_one_prepared_before_the_hold_out(beir, tmp_path):
    """Outputs prepared with no dev split must not be reused now that one is held out; a folder
    with its own dev split keeps its fingerprint, so its runs' artifacts stay valid."""
    import tasks
    from pipeline.artifacts import fingerprint
    from pipeline.data import dataset_hash

    def fps(folder):
        return tasks.PrepareData(dataset=str(folder), output_dir=str(tmp_path / "out")).fp, fingerprint("data", dataset_hash(folder))

    new, before = fps(beir)
    assert new == before
    (beir / "qrels" / "dev.tsv").unlink()
    new, before = fps(beir)
    assert new != before


def test_training_judgments_are_told_from_the_files(beir, tmp_path):
    """The cheap check that stops a teacher fine-tune before mining: a folder whose
    qrels/train.tsv is missing or holds only its header has none; a pairs file may."""
    assert has_training_judgments(beir)
    train = beir / "qrels" / "train.tsv"
    header = train.read_text().splitlines()[0]
    train.write_text(header + "\n\n")
    assert not has_training_judgments(beir)
    train.write_text(header + "\n\nq1\td1\t1\n")  # a blank line before the first row, which the reader skips
    assert has_training_judgments(beir)
    train.unlink()
    assert not has_training_judgments(beir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    assert has_training_judgments(pairs)


def test_a_query_judged_in_two_splits_keeps_the_one_it_is_evaluated_on(tmp_path, caplog):
    """qrels split by row rather than by query judge a query in train and test: it would train
    on what it is tested on. It keeps its test (else dev) judgments alone, with a warning, a
    count, and a new fingerprint for the prepared data; other folders keep theirs."""
    import tasks
    from pipeline.data import splits_overlap

    qrels = {"train": [("q1", "d1", 1), ("q2", "d1", 1), ("q3", "d2", 1)], "dev": [("q2", "d2", 1)], "test": [("q3", "d3", 1), ("q1", "d3", 1)]}
    folder = write_beir(tmp_path / "ds", QUERIES, CORPUS, qrels)
    clean = write_beir(tmp_path / "clean", QUERIES, CORPUS, QRELS)
    assert splits_overlap(folder) and not splits_overlap(clean)
    with caplog.at_level("WARNING"):
        stats = prepare_data(folder, tmp_path / "norm")
    assert "3 queries are judged in more than one split" in caplog.text and "first: 'q1', judged in train and test" in caplog.text
    assert stats["queries_in_several_splits"] == 3 and stats["split_queries"] == {"train": 0, "dev": 1, "test": 2}
    assert judgments(tmp_path / "norm", "test") == {"q1": {"d3": 1}, "q3": {"d3": 1}}
    assert judgments(tmp_path / "norm", "dev") == {"q2": {"d2": 1}} and judgments(tmp_path / "norm", "train") == {}
    from pipeline.report import _data_section

    assert any("3 queries were judged in more than one split" in line for line in _data_section(stats, {}, {}))

    def fp(path):
        return tasks.PrepareData(dataset=str(path), output_dir=str(tmp_path / "out")).fp

    from pipeline.artifacts import fingerprint
    from pipeline.data import dataset_hash

    assert fp(clean) == fingerprint("data", dataset_hash(clean)) and fp(folder) != fingerprint("data", dataset_hash(folder))
    # A pairs file whose split column names two splits for one query: the same rule.
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"query": "q", "positive": "a", "split": "train"}, {"query": "q", "positive": "b", "split": "test"},
            {"query": "r", "positive": "c", "split": "train"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = read_dataset(pairs)
    assert sorted(split for *_, split in ds.qrels) == ["test", "train"] and ds.queries_in_several_splits == 1
