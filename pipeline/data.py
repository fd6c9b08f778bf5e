"""Ingest: read a BEIR-style folder or a pairs file, validate it, and write normalized Parquet.

Validation runs before any model is loaded and stops at the first problem with
a one-line :class:`DataError` naming file, line and field.

Normalized tables (explicit Arrow schemas):
``queries``: query_id, text; ``corpus``: doc_id, title, text; ``qrels``: query_id, doc_id, score, split.
Parallel languages (``queries.<lang>.jsonl``, ``corpus.<lang>.jsonl``) become
``queries.<lang>.parquet`` / ``corpus.<lang>.parquet`` with the same schemas.
Any input file may be gzip-compressed (``corpus.jsonl.gz``, ``qrels/test.tsv.gz``), as the BEIR
sets on the Hugging Face hub are; line numbers in errors count its decompressed lines.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import atomic_dir, hash_files, write_json
from pipeline.errors import DataError

log = logging.getLogger(__name__)

QUERIES_SCHEMA = pa.schema([("query_id", pa.string()), ("text", pa.string())])
CORPUS_SCHEMA = pa.schema([("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string())])
QRELS_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.int32()), ("split", pa.string())]
)
SPLITS = ("train", "dev", "test")
_LANG_FILE = re.compile(r"^(queries|corpus)\.([A-Za-z_-]+)\.jsonl(\.gz)?$")


@dataclass
class Dataset:
    """A normalized dataset held in memory."""

    queries: dict[str, str]
    corpus: dict[str, tuple[str, str]]  # doc_id -> (title, text)
    qrels: list[tuple[str, str, int, str]]  # (query_id, doc_id, score, split)
    languages: dict[str, tuple[dict[str, str], dict[str, tuple[str, str]]]]  # lang -> (queries, corpus)
    dev_from_train: int = 0  # judged training queries held out as the dev split (a folder without one)
    judgments_of_unknown_ids: dict[str, int] = field(default_factory=dict)  # qrels file -> rows naming unknown ids
    repeated_rows: dict[str, int] = field(default_factory=dict)  # file -> rows repeating an earlier row's id and text
    queries_in_several_splits: int = 0  # judged in two splits: kept in the first of test, dev, train only

    def passage(self, doc_id: str) -> str:
        return join_title(*self.corpus[doc_id])

    def relevant(self, split: str) -> dict[str, dict[str, int]]:
        """query_id -> {doc_id: score} for one split (scores > 0 only)."""
        return positive_judgments((q, d, s) for q, d, s, sp in self.qrels if sp == split)


def positive_judgments(rows) -> dict[str, dict[str, int]]:
    """query_id -> {doc_id: score} of the (query_id, doc_id, score) rows with a score above 0."""
    out: dict[str, dict[str, int]] = {}
    for q, d, s in rows:
        if s > 0:
            out.setdefault(q, {})[d] = s
    return out


def join_title(title: str, text: str) -> str:
    return f"{title}. {text}" if title else text


def dataset_files(source: str | Path) -> list[Path]:
    """The input files that define a dataset (their content is its fingerprint)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(source, None, None, "dataset not found (expected a BEIR-style folder or a .jsonl/.parquet pairs file)")
    files = [*source.glob("*.jsonl"), *source.glob("*.jsonl.gz"), *(source / "qrels").glob("*.tsv"), *(source / "qrels").glob("*.tsv.gz")]
    return sorted(files)


def beir_file(folder: Path, name: str) -> Path | None:
    """The file ``name`` of a BEIR folder, as given or gzip-compressed (``name.gz``); None if neither."""
    plain, packed = folder / name, folder / f"{name}.gz"
    if plain.is_file() and packed.is_file():
        raise DataError(packed, None, None, f"{name} is there too: keep one of the two")
    return plain if plain.is_file() else packed if packed.is_file() else None


def _lines(path: Path):
    """(line number, raw bytes) of each line of a file, read through gzip when its name ends in .gz."""
    lineno = 0
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, 1):
                yield lineno, raw
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(path, lineno + 1, None, f"not a readable gzip file ({e})") from None
    except EOFError:
        raise DataError(path, lineno + 1, None, "the gzip stream ends early (a truncated download?)") from None


def dataset_hash(source: str | Path) -> str:
    return hash_files(dataset_files(source))[:16]


def read_dataset(source: str | Path) -> Dataset:
    """Read and validate a BEIR-style folder or a pairs file."""
    source = Path(source)
    if source.is_file():
        return read_pairs_file(source)
    if not source.is_dir():
        raise DataError(source, None, None, "dataset not found (expected a BEIR-style folder or a .jsonl/.parquet pairs file)")
    return read_beir(source)


def read_beir(folder: Path) -> Dataset:
    files = {name: beir_file(folder, name) for name in ("corpus.jsonl", "queries.jsonl")}
    for name, path in files.items():
        if path is None:
            raise DataError(folder / name, None, None, "missing file (a BEIR-style folder needs corpus.jsonl, queries.jsonl and qrels/*.tsv)")
    repeated: dict[str, int] = {}
    corpus = _read_corpus(files["corpus.jsonl"], repeated=repeated)
    queries = _read_queries(files["queries.jsonl"], repeated=repeated)
    qrels: list[tuple[str, str, int, str]] = []
    present = {s: beir_file(folder / "qrels", f"{s}.tsv") for s in SPLITS}
    present = {s: path for s, path in present.items() if path is not None}
    if "test" not in present:
        raise DataError(folder / "qrels" / "test.tsv", None, None, "missing file (the test split is needed for evaluation)")
    unknown: dict[str, int] = {}
    for split, path in present.items():
        qrels += _read_qrels(path, split, queries, corpus, unknown)
    qrels, several = one_split_per_query(qrels)
    held_out = 0
    if holds_out_dev(folder):
        qrels, held_out = hold_out_dev(qrels)
    languages = {}
    for path in sorted([*folder.glob("*.*.jsonl"), *folder.glob("*.*.jsonl.gz")]):
        m = _LANG_FILE.match(path.name)
        if not m:
            continue
        kind, lang, _ = m.groups()
        lq, lc = languages.setdefault(lang, ({}, {}))
        if kind == "queries":
            lq.update(_read_queries(path, known=queries))
        else:
            lc.update(_read_corpus(path, known=corpus))
    return Dataset(queries, corpus, qrels, languages, held_out, unknown, repeated, several)


def _jsonl_rows(path: Path):
    """Yield (line_number, dict) for each non-blank line."""
    for lineno, raw in _lines(path):
        try:
            line = _decode(raw, lineno)
        except UnicodeDecodeError as e:
            raise DataError(path, lineno, None, f"not valid UTF-8 (byte {e.start})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, lineno, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(path, lineno, None, "expected a JSON object")
        yield lineno, row


def _decode(raw: bytes, lineno: int) -> str:
    # Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the first field.
    return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")


def _field(path: Path, lineno: int, row: dict, name: str, required: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            # Other tools name the fields otherwise (Pyserini: id, contents): show what the row has.
            keys = ", ".join(map(str, list(row)[:8])) + (", ..." if len(row) > 8 else "")
            raise DataError(path, lineno, name, f"missing (the row has: {keys or 'no fields'})")
        return ""
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(path, lineno, name, f"expected a string, got {type(value).__name__}")
    value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # valid JSON ("\ud800") but not text: Arrow and the tokenizer would fail later
        raise DataError(path, lineno, name, f"not valid Unicode (a lone surrogate escape at character {e.start})") from None
    return value


def _read_corpus(path: Path, known: dict | None = None, repeated: dict | None = None) -> dict[str, tuple[str, str]]:
    """Documents of a JSONL file; with ``known``, every id must be one of it (a translation).
    ``repeated`` gets the count of rows that repeat an earlier row whole (:func:`_repeats`)."""
    out: dict[str, tuple[str, str]] = {}
    first_line: dict[str, int] = {}
    empty: list[int] = []
    repeats: list[int] = []
    for lineno, row in _jsonl_rows(path):
        doc_id = _field(path, lineno, row, "_id").strip()
        if not doc_id:
            raise DataError(path, lineno, "_id", "empty id")
        if known is not None and doc_id not in known:
            raise DataError(path, lineno, "_id", f"id '{doc_id}' is not in the source-language corpus")
        title = _field(path, lineno, row, "title", required=False).strip()
        text = _field(path, lineno, row, "text").strip()
        if _repeats(path, lineno, doc_id, (title, text), out, first_line):
            repeats.append(lineno)
            continue
        if not text and not title:
            if known is not None:
                continue  # a translation file: an empty document is one not translated
            empty.append(lineno)
        out[doc_id] = (title, text)
        first_line[doc_id] = lineno
    if not out:
        raise DataError(path, None, None, "no documents")
    _count_repeats(path, repeats, repeated)
    if empty:
        # Published corpora have them (BEIR's FiQA); dropping one would orphan its judgments,
        # and refusing the file would refuse the dataset. An empty passage is what BEIR scores.
        log.warning(
            "%s: %d documents have neither title nor text (first on line %d); they stay as empty passages, "
            "so a judgment that points to one counts as a miss", path, len(empty), empty[0],
        )
    return out


def _read_queries(path: Path, known: dict | None = None, taken: dict | None = None, repeated: dict | None = None) -> dict[str, str]:
    """Queries of a JSONL file; with ``known``, every id must be one of it, with ``taken`` (a file
    of unjudged queries, such as a search log), none may, and a query with no text is skipped.
    ``repeated`` gets the count of rows that repeat an earlier row whole (:func:`_repeats`)."""
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    empty: list[int] = []
    repeats: list[int] = []
    for lineno, row in _jsonl_rows(path):
        qid = _field(path, lineno, row, "_id").strip()
        if not qid:
            raise DataError(path, lineno, "_id", "empty id")
        if known is not None and qid not in known:
            raise DataError(path, lineno, "_id", f"id '{qid}' is not in the source-language queries")
        if taken is not None and qid in taken:
            raise DataError(path, lineno, "_id", f"id '{qid}' is already a query of the dataset")
        text = _field(path, lineno, row, "text").strip()
        if _repeats(path, lineno, qid, text, out, first_line):
            repeats.append(lineno)
            continue
        if not text and taken is not None:
            empty.append(lineno)  # logs hold empty searches; there is nothing to label
            continue
        if not text:
            raise DataError(path, lineno, "text", "empty text")
        out[qid] = text
        first_line[qid] = lineno
    if not out:
        raise DataError(path, None, None, "no queries")
    _count_repeats(path, repeats, repeated)
    if empty:
        log.warning("%s: %d queries with no text skipped (first on line %d)", path, len(empty), empty[0])
    return out


def _repeats(path: Path, lineno: int, key: str, value, seen: dict, first_line: dict) -> bool:
    """Whether this row repeats an earlier one whole (its id and its text): published files have
    such copies (MIRACL's corpora), and they say nothing new. The same id with another text is
    ambiguous, and stops the run."""
    if key not in seen:
        return False
    if seen[key] != value:
        raise DataError(path, lineno, "_id", f"duplicate id '{key}' with a different text (first on line {first_line[key]})")
    return True


def _count_repeats(path: Path, lines: list[int], repeated: dict | None) -> None:
    if not lines:
        return
    log.warning("%s: %d rows repeat an earlier row's id and text and are read once (first on line %d)", path, len(lines), lines[0])
    if repeated is not None:
        repeated[path.name] = len(lines)


def _qrels_layout(path: Path, lineno: int, line: str) -> str:
    """How a qrels file is laid out, from its first line: BEIR's header ('header'), BEIR's three
    columns without it ('rows'), or TREC's four (query-id, iteration, doc-id, grade; 'trec'), in
    which MS MARCO and TREC ship their judgments, tab- or space-separated."""
    cols = line.split("\t")
    if [c.strip() for c in cols[:3]] == ["query-id", "corpus-id", "score"]:
        return "header"
    words = line.split()
    # A tab-separated BEIR row may hold spaces in its ids: TREC's four columns are all tabs or all spaces.
    if len(cols) in (1, 4) and len(words) == 4 and _is_number(words[3]):
        return "trec"
    if len(cols) == 3 and _is_number(cols[2]):
        return "rows"
    raise DataError(
        path, lineno, None,
        "expected the header 'query-id<TAB>corpus-id<TAB>score', or judgments as those three tab-separated columns, or TREC "
        "qrels lines 'query-id 0 doc-id grade'",
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


DANGLING_SHARE = 0.05  # judgments of unknown ids pass with a warning up to this share of a qrels file


def _read_qrels(path: Path, split: str, queries: dict, corpus: dict, unknown_ids: dict | None = None) -> list[tuple[str, str, int, str]]:
    """The judgments of one qrels file. A row naming a query or document the dataset lacks counts
    for nothing, with a warning, while such rows are a few (published sets have them: ArguAna's
    test qrels name a document its corpus lacks, NFCorpus's name queries it lacks): no system
    could retrieve with or for it. More than ``DANGLING_SHARE`` of the file means a mismatched
    corpus or queries file, and stops the run on the first one. ``unknown_ids`` gets the count."""
    out = []
    dangling: list[DataError] = []
    layout = None
    for lineno, raw in _lines(path):
        try:
            line = _decode(raw, lineno).rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise DataError(path, lineno, None, f"not valid UTF-8 (byte {e.start})") from None
        if not line.strip():
            continue
        if layout is None:
            layout = _qrels_layout(path, lineno, line)
            if layout == "header":
                continue
        if layout == "trec":
            cols = line.split("\t") if "\t" in line else line.split()
            if len(cols) != 4:
                raise DataError(path, lineno, None, f"expected 4 columns (TREC qrels: query-id, iteration, doc-id, grade), got {len(cols)}")
            qid, did, score = cols[0].strip(), cols[2].strip(), cols[3].strip()
        else:
            cols = line.split("\t")
            if len(cols) < 3:
                raise DataError(path, lineno, None, f"expected 3 tab-separated columns, got {len(cols)}")
            qid, did, score = cols[0].strip(), cols[1].strip(), cols[2].strip()
        if qid not in queries:
            dangling.append(DataError(path, lineno, "query-id", f"unknown query id '{qid}' (not in queries.jsonl)"))
            continue
        if did not in corpus:
            dangling.append(DataError(path, lineno, "corpus-id", f"unknown document id '{did}' (not in corpus.jsonl)"))
            # Kept at grade 0, so its query stays judged in this split (a test query whose only
            # positive is missing must never become an unjudged training query) and is nobody's positive.
            out.append((qid, did, 0, split))
            continue
        try:
            value = float(score)
        except ValueError:
            raise DataError(path, lineno, "score", f"not a number: '{score}'") from None
        if value != value or value in (float("inf"), float("-inf")) or value != int(value):
            raise DataError(path, lineno, "score", f"expected an integer relevance grade, got '{score}'")
        out.append((qid, did, int(value), split))
    if dangling:
        rows = len(out) + sum(1 for e in dangling if e.field == "query-id")
        if len(dangling) > DANGLING_SHARE * rows:
            raise dangling[0]
        log.warning("%s: %d of %d judgments name ids the dataset lacks and count for nothing (first: %s)",
                    path, len(dangling), rows, dangling[0])
        if unknown_ids is not None:
            unknown_ids[f"qrels/{path.name}"] = len(dangling)
    return out


def read_pairs_file(path: Path) -> Dataset:
    """A JSONL or Parquet file with ``query`` and ``positive`` columns (optional ``query_id``,
    ``positive_id`` and ``split``); rows without a split are assigned train/dev/test by a hash
    of the query (80/10/10). ``query.<lang>`` and ``positive.<lang>`` columns hold parallel
    translations of the same row."""
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a broken file
            raise DataError(path, None, None, f"cannot read Parquet ({e})") from None
        for col in ("query", "positive"):
            if col not in table.column_names:
                raise DataError(path, None, col, "missing column")
        rows = enumerate(table.to_pylist(), 1)
    elif path.name.endswith((".jsonl", ".json", ".jsonl.gz")):
        rows = _jsonl_rows(path)
    else:
        raise DataError(path, None, None, "unknown pairs file type (use .jsonl, .jsonl.gz or .parquet)")

    queries: dict[str, str] = {}
    corpus: dict[str, tuple[str, str]] = {}
    languages: dict[str, tuple[dict[str, str], dict[str, tuple[str, str]]]] = {}
    qrels = []
    seen = set()
    for lineno, row in rows:
        q = _field(path, lineno, row, "query").strip()
        p = _field(path, lineno, row, "positive").strip()
        if not q:
            raise DataError(path, lineno, "query", "empty text")
        if not p:
            raise DataError(path, lineno, "positive", "empty text")
        qid = _field(path, lineno, row, "query_id", required=False).strip() or "q-" + _short_hash(q)
        did = _field(path, lineno, row, "positive_id", required=False).strip() or "d-" + _short_hash(p)
        if queries.get(qid, q) != q:
            raise DataError(path, lineno, "query_id", f"id '{qid}' already used for a different query text")
        if corpus.get(did, ("", p))[1] != p:
            raise DataError(path, lineno, "positive_id", f"id '{did}' already used for a different passage text")
        split = _field(path, lineno, row, "split", required=False).strip() or _hash_split(qid)
        if split not in SPLITS:
            raise DataError(path, lineno, "split", f"expected one of {', '.join(SPLITS)}, got '{split}'")
        queries[qid] = q
        corpus[did] = ("", p)
        if (qid, did) not in seen:
            seen.add((qid, did))
            qrels.append((qid, did, 1, split))
        # Parallel languages: query.<lang> / positive.<lang> columns; an empty cell means no translation.
        for name in row:
            kind, _, lang = str(name).partition(".")
            if kind not in ("query", "positive") or not lang:
                continue
            text = _field(path, lineno, row, name, required=False).strip()
            if text:
                lq, lc = languages.setdefault(lang, ({}, {}))
                if kind == "query":
                    lq[qid] = text
                else:
                    lc[did] = ("", text)
    if not qrels:
        raise DataError(path, None, None, "no pairs")
    qrels, several = one_split_per_query(qrels)
    return Dataset(queries, corpus, qrels, languages, queries_in_several_splits=several)


def has_training_judgments(source: str | Path) -> bool:
    """Whether ``source`` can hold judged training pairs, told from its files without reading them:
    a pairs file can (its rows default to a train split); a BEIR folder only with a row below the
    header of ``qrels/train.tsv``, which most BEIR sets (judged for test only) lack."""
    source = Path(source)
    if not source.is_dir():
        return True
    path = beir_file(source / "qrels", "train.tsv")
    return path is not None and next(_qrels_query_ids(path), None) is not None


def _qrels_query_ids(path: Path):
    """The query id of each row of a qrels file in any layout :func:`_qrels_layout` reads, the
    header skipped, nothing else validated (the reader does that)."""
    first = True
    for _, line in _lines(path):
        line = line.removeprefix(b"\xef\xbb\xbf") if first else line
        if not line.strip():  # blank lines are skipped, as the reader skips them
            continue
        if first:
            first = False
            if line.split(b"\t", 1)[0].strip() == b"query-id":
                continue
        yield line.split(b"\t", 1)[0].strip() if b"\t" in line else line.split(None, 1)[0]


def holds_out_dev(source: str | Path) -> bool:
    """Whether reading ``source`` moves training queries to dev (a BEIR folder without qrels/dev.tsv)."""
    return Path(source).is_dir() and beir_file(Path(source) / "qrels", "dev.tsv") is None


def splits_overlap(source: str | Path) -> bool:
    """Whether a BEIR folder's qrels judge a query in more than one split, read from their first
    column alone (what :func:`one_split_per_query` resolves; a pairs file's splits follow its rows)."""
    folder = Path(source)
    if not folder.is_dir():
        return False
    seen: dict[bytes, str] = {}
    for split in SPLITS:
        path = beir_file(folder / "qrels", f"{split}.tsv")
        if path is None:
            continue
        for q in _qrels_query_ids(path):
            if seen.setdefault(q, split) != split:
                return True
    return False


def one_split_per_query(qrels: list[tuple[str, str, int, str]]) -> tuple[list[tuple[str, str, int, str]], int]:
    """Each query's judgments in one split: test over dev over train. A query judged in test and
    also in train (qrels split by row rather than by query do this) would train on the query it
    is tested on and flatter every trained row of the evaluation; one in dev and train would
    flatter the choices made on dev. Its other splits' judgments are dropped with a warning;
    returns the kept judgments and how many queries had several splits."""
    rank = {"test": 0, "dev": 1, "train": 2}
    kept: dict[str, str] = {}
    for q, _, _, split in qrels:
        if q not in kept or rank[split] < rank[kept[q]]:
            kept[q] = split
    several = sorted({(q, split) for q, _, _, split in qrels if split != kept[q]})
    if not several:
        return qrels, 0
    queries = {q for q, _ in several}
    first, dropped = several[0]
    log.warning(
        "%d queries are judged in more than one split; each keeps the judgments of its test, else dev split "
        "and trains on none of the others (first: '%s', judged in %s and %s)", len(queries), first, dropped, kept[first],
    )
    return [r for r in qrels if r[3] == kept[r[0]]], len(queries)


def hold_out_dev(qrels: list[tuple[str, str, int, str]]) -> tuple[list[tuple[str, str, int, str]], int]:
    """Move a tenth of the judged training queries (chosen by a hash of the query id) to a dev split.

    Many BEIR folders ship no qrels/dev.tsv. Without a dev split nothing could be chosen or gated
    (the training check, the registry's promotion gate, a settings grid) without looking at test;
    hashing the id keeps the same queries out of training on every date of a growing dataset.
    """
    moved = {q for q, _, _, split in qrels if split == "train" and _hash_split(q) == "dev"}
    return [(q, d, s, "dev" if split == "train" and q in moved else split) for q, d, s, split in qrels], len(moved)


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _hash_split(qid: str) -> str:
    bucket = int(hashlib.sha1(qid.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


# ---- normalized Parquet -------------------------------------------------------------------

def write_normalized(
    ds: Dataset, out_dir: str | Path, source: str | Path, started: float | None = None, extra: dict | None = None
) -> dict:
    """Write the dataset as Parquet into ``out_dir`` (atomically) and return its statistics."""
    judged = {r[0] for r in ds.qrels}
    stats = {
        "source": str(source),
        **(extra or {}),
        "queries": len(ds.queries),
        "unjudged_queries": sum(1 for q in ds.queries if q not in judged),
        "documents": len(ds.corpus),
        "documents_without_text": sum(1 for title, text in ds.corpus.values() if not title and not text),
        "qrels": {s: sum(1 for r in ds.qrels if r[3] == s) for s in SPLITS},
        "split_queries": {s: len({r[0] for r in ds.qrels if r[3] == s}) for s in SPLITS},
        "dev_from_train": ds.dev_from_train,
        "judgments_of_unknown_ids": ds.judgments_of_unknown_ids,
        "repeated_rows": ds.repeated_rows,
        "queries_in_several_splits": ds.queries_in_several_splits,
        "languages": {lang: {"queries": len(q), "documents": len(c)} for lang, (q, c) in ds.languages.items()},
    }
    with atomic_dir(out_dir) as tmp:
        _write_tables(tmp, "", ds.queries, ds.corpus)
        pq.write_table(
            pa.table(
                {
                    "query_id": [r[0] for r in ds.qrels],
                    "doc_id": [r[1] for r in ds.qrels],
                    "score": pa.array([r[2] for r in ds.qrels], pa.int32()),
                    "split": [r[3] for r in ds.qrels],
                },
                schema=QRELS_SCHEMA,
            ),
            tmp / "qrels.parquet",
        )
        for lang, (q, c) in ds.languages.items():
            _write_tables(tmp, f".{lang}", q, c)
        if started is not None:
            stats["seconds"] = round(time.perf_counter() - started, 2)
        write_json(tmp / "stats.json", stats)
    return stats


def _write_tables(folder: Path, suffix: str, queries: dict, corpus: dict) -> None:
    texts = Texts.of(queries, corpus)
    pq.write_table(texts.queries, folder / f"queries{suffix}.parquet")
    pq.write_table(texts.corpus, folder / f"corpus{suffix}.parquet")


@dataclass(frozen=True)
class Texts:
    """One language's queries (``QUERIES_SCHEMA``) and passages (``CORPUS_SCHEMA``) as Arrow
    tables, looked up by id with Arrow's hash index: only the rows asked for are copied, and
    nothing becomes a Python string."""

    queries: pa.Table
    corpus: pa.Table
    folder: Path | None = None  # where the tables were read from, to name it in errors

    @classmethod
    def of(cls, queries: dict[str, str], corpus: dict[str, tuple[str, str]]) -> Texts:
        """The texts of an in-memory :class:`Dataset`'s dictionaries."""
        return cls(
            pa.table({"query_id": list(queries), "text": list(queries.values())}, schema=QUERIES_SCHEMA),
            pa.table(
                {"doc_id": list(corpus), "title": [t for t, _ in corpus.values()], "text": [x for _, x in corpus.values()]},
                schema=CORPUS_SCHEMA,
            ),
        )

    def query(self, ids: Sequence[str] | pa.Array) -> pa.Array:
        """The text of each query id."""
        table, rows = self._lookup(self.queries, "query_id", ids, "queries")
        return table["text"].take(rows)

    def passage(self, ids: Sequence[str] | pa.Array) -> pa.Array:
        """Each passage as :func:`join_title` gives it."""
        table, rows = self._lookup(self.corpus, "doc_id", ids, "corpus")
        return passage_texts(table["title"].take(rows), table["text"].take(rows))

    def holds_queries(self, ids: pa.Array) -> np.ndarray:
        """Whether each query id has a text here."""
        return self._holds(self.queries, "query_id", ids)

    def holds_passages(self, ids: pa.Array) -> np.ndarray:
        """Whether each passage id has a text here."""
        return self._holds(self.corpus, "doc_id", ids)

    def _holds(self, table: pa.Table, column: str, ids: pa.Array) -> np.ndarray:
        import pyarrow.compute as pc

        return pc.is_in(ids, value_set=_narrowed(table, column, ids)[column]).to_numpy(zero_copy_only=False)

    def _lookup(self, table: pa.Table, column: str, ids, name: str) -> tuple[pa.Table, pa.Array]:
        """The table (or the part of it holding these ids) and each id's row in it."""
        import pyarrow.compute as pc

        ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
        table = _narrowed(table, column, ids)
        rows = pc.index_in(ids, value_set=table[column])
        if rows.null_count:
            missing = ids[int(pc.index(pc.is_null(rows), True).as_py())]
            where = self.folder / f"{name}.parquet" if self.folder else name
            raise DataError(where, None, column, f"'{missing}' is not in the prepared data")
        return table, rows


def _narrowed(table: pa.Table, column: str, ids) -> pa.Table:
    """The rows of ``table`` whose ``column`` is among ``ids`` when they are few: hashing the few
    ids wanted beats hashing a whole corpus's."""
    import pyarrow.compute as pc

    wanted = pc.unique(ids)
    return table.filter(pc.is_in(table[column], value_set=wanted)) if table.num_rows > 4 * len(wanted) else table


def load_normalized(folder: str | Path) -> Dataset:
    """Read what :func:`write_normalized` wrote."""
    return NormalizedTables(folder).subset()


class NormalizedTables:
    """What :func:`write_normalized` wrote, as Arrow tables; :meth:`subset` makes the in-memory
    :class:`Dataset` of some queries and passages only, so a stage can work through a large
    dataset batch by batch without holding the whole corpus in Python dictionaries."""

    def __init__(self, folder: str | Path):
        self.folder = folder = Path(folder)
        self.tables = {"": self._texts(folder, "")}
        for p in sorted(folder.glob("queries.*.parquet")):
            lang = p.name.split(".")[1]
            self.tables[lang] = self._texts(folder, f".{lang}")
        self.qrels = pq.read_table(folder / "qrels.parquet")

    @staticmethod
    def _texts(folder: Path, suffix: str) -> tuple[pa.Table, pa.Table]:
        return pq.read_table(folder / f"queries{suffix}.parquet"), pq.read_table(folder / f"corpus{suffix}.parquet")

    def texts(self, lang: str = "") -> Texts:
        """The texts of one language ('' for the dataset's own), for lookups by id."""
        return Texts(*self.tables[lang], self.folder)

    def subset(self, query_ids: Sequence[str] | pa.Array | None = None, doc_ids: Sequence[str] | pa.Array | None = None) -> Dataset:
        """The dataset restricted to these query and document ids (None: all of them); the
        qrels kept are those of the queries kept."""
        import pyarrow.compute as pc

        query_ids, doc_ids = (None if ids is None else pa.array(ids, pa.string()) for ids in (query_ids, doc_ids))

        def only(table: pa.Table, column: str, ids: pa.Array | None) -> dict:
            if ids is not None:
                table = table.filter(pc.is_in(table[column], value_set=ids))
            return table.to_pydict()

        def texts(pair: tuple[pa.Table, pa.Table]):
            q, c = only(pair[0], "query_id", query_ids), only(pair[1], "doc_id", doc_ids)
            return dict(zip(q["query_id"], q["text"])), {d: (t, x) for d, t, x in zip(c["doc_id"], c["title"], c["text"])}

        queries, corpus = texts(self.tables[""])
        r = only(self.qrels, "query_id", query_ids)
        qrels = list(zip(r["query_id"], r["doc_id"], r["score"], r["split"]))
        languages = {lang: texts(pair) for lang, pair in self.tables.items() if lang}
        return Dataset(queries, corpus, qrels, languages)


def judgments(folder: str | Path, split: str) -> dict[str, dict[str, int]]:
    """query_id -> {doc_id: score} of one split's positive judgments in the prepared data, read
    without its texts."""
    t = pq.read_table(Path(folder) / "qrels.parquet", columns=["query_id", "doc_id", "score"], filters=[("split", "=", split)])
    return positive_judgments(zip(*(t[c].to_pylist() for c in t.column_names)))


def pair_texts(folder: str | Path, query_ids: Sequence[str], doc_ids: Sequence[str]) -> list[tuple[str, str]]:
    """The (query, passage) texts of these id pairs, looked up in the normalized Parquet files
    with Arrow's hash index: only the rows asked for become Python strings, so a shard of a
    million-passage corpus does not hold the whole corpus in dictionaries."""
    folder = Path(folder)
    texts = Texts(pq.read_table(folder / "queries.parquet"), pq.read_table(folder / "corpus.parquet"), folder)
    return list(zip(texts.query(query_ids).to_pylist(), texts.passage(doc_ids).to_pylist()))


def passage_texts(title: pa.Array, text: pa.Array) -> pa.Array:
    """Each passage as :func:`join_title` gives it ('title. text', or the text alone), in Arrow."""
    import pyarrow.compute as pc

    title = pc.fill_null(title, "")
    return pc.if_else(pc.equal(title, ""), text, pc.binary_join_element_wise(title, text, ". "))


def with_unlabeled_queries(ds: Dataset, path: str | Path) -> tuple[Dataset, int]:
    """``ds`` plus the queries nobody judged of a ``{"_id", "text"}`` JSONL file, or of a text
    file with one query per line (``.txt``, as a search log is often kept); returns the dataset
    and how many queries the file added.

    A JSONL id the dataset already has is refused (naming the file's line), since a silent merge
    would either drop the file's text or relabel a judged query as unjudged. A text file's query
    is named by a hash of its text, so a search repeated in the log is read once."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found (--unlabeled-queries)")
    extra = _read_query_lines(path, ds.queries) if path.name.endswith((".txt", ".txt.gz")) else _read_queries(path, taken=ds.queries)
    return Dataset({**ds.queries, **extra}, ds.corpus, ds.qrels, ds.languages), len(extra)


def _read_query_lines(path: Path, taken: dict) -> dict[str, str]:
    """The queries of a text file, one per line; blank lines (empty searches) skipped."""
    out: dict[str, str] = {}
    for lineno, raw in _lines(path):
        try:
            text = " ".join(_decode(raw, lineno).split())
        except UnicodeDecodeError as e:
            raise DataError(path, lineno, None, f"not valid UTF-8 (byte {e.start})") from None
        if not text:
            continue
        qid = "log-" + _short_hash(text)
        if qid in taken:
            raise DataError(path, lineno, None, f"the id this line's query is given, '{qid}', is already a query of the dataset")
        out.setdefault(qid, text)
    if not out:
        raise DataError(path, None, None, "no queries")
    return out


def prepare_data(source: str | Path, out_dir: str | Path, unlabeled_queries: str | Path = "") -> dict:
    """Stage entry: validate ``source`` (and the ``unlabeled_queries`` file, when given) and write
    them normalized to ``out_dir``."""
    t0 = time.perf_counter()
    ds, added = read_dataset(source), 0
    if unlabeled_queries:
        ds, added = with_unlabeled_queries(ds, unlabeled_queries)
    return write_normalized(ds, out_dir, source, started=t0, extra={"unlabeled_file_queries": added})


def sample_texts(source: str | Path, n: int = 2000, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` queries and ``n`` passages of a dataset drawn uniformly from its files (seeded), as
    its stages will read them (title and text joined), for decisions taken before the dataset is
    prepared (``fitting_max_length``). A whole file is read, but only the rows drawn are parsed:
    a corpus sorted by source, date or length is sampled as a whole, not by its first rows.

    Rows that do not parse are skipped here: PrepareData reports them, with file and line.
    """
    source = Path(source)
    if source.is_file():
        rows = _sampled_parquet_rows(source, n, seed, ["query", "positive"]) if source.suffix == ".parquet" else _sampled_rows(source, n, seed)
        return _texts(r.get("query") for r in rows), _texts(r.get("positive") for r in rows)
    if not source.is_dir():
        return [], []
    queries, corpus = beir_file(source, "queries.jsonl"), beir_file(source, "corpus.jsonl")
    return (
        _texts(r.get("text") for r in _sampled_rows(queries, n, seed)) if queries else [],
        _texts(join_title(str(r.get("title") or "").strip(), str(r.get("text") or "").strip()) for r in _sampled_rows(corpus, n, seed))
        if corpus else [],
    )


def _sampled_rows(path: Path, n: int, seed: int) -> list[dict]:
    """About ``n`` rows of a JSONL file, each line equally likely (a seeded reservoir over the raw
    lines), in file order; drawn lines that do not parse as objects are left out, and an
    unreadable file gives what was drawn before the fault."""
    rng = random.Random(seed)
    kept: list[tuple[int, bytes]] = []
    try:
        for i, (_, raw) in enumerate(_lines(path)):
            if i < n:
                kept.append((i, raw))
            elif (j := rng.randrange(i + 1)) < n:
                kept[j] = (i, raw)
    except DataError:  # an unreadable gzip file: PrepareData reports it
        pass
    rows = []
    for _, raw in sorted(kept):
        try:
            row = json.loads(raw)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _sampled_parquet_rows(path: Path, n: int, seed: int, columns: list[str]) -> list[dict]:
    """``n`` rows of a Parquet file drawn uniformly (seeded), in file order, reading only the row
    groups that hold them; none from a file that does not read (PrepareData says why)."""
    try:
        pf = pq.ParquetFile(path)
        total = pf.metadata.num_rows
        drawn = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
        rows, start = [], 0
        for g in range(pf.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            lo, hi = np.searchsorted(drawn, [start, start + size])
            if hi > lo:
                rows += pf.read_row_group(g, columns=columns).take(pa.array(drawn[lo:hi] - start)).to_pylist()
            start += size
        return rows
    except (OSError, ValueError, KeyError, pa.ArrowException):  # not Parquet, or without those columns: PrepareData says
        return []


def _texts(values) -> list[str]:
    return [text for text in (str(v or "").strip() for v in values) if text]
