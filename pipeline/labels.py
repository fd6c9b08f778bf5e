"""Labels: turn teacher-scored candidate groups into training rows in a loss table format.

One group (query, positives, negatives) becomes, per format:
``ntuple-margin``: (query, positive, negative_1..n) with [s(pos) - s(neg_i)] (MarginMSE);
``ntuple``: the same columns, no label (MultipleNegativesRankingLoss);
``pair-score`` / ``pair-soft``: one (query, passage) row per document with its teacher score
(raw, or through a sigmoid into [0, 1]);
``pair-binary`` / ``pair-class``: one row per document with 1/0 or the qrels grade;
``list``: (query, [docs]) with [scores]; ``list-gains``: the same with scores min-max scaled per
query into [0, 1] (LambdaLoss reads labels as gains 2^label - 1, which negative logits would break).
Rows with fewer than ``num_negatives`` mined negatives are dropped from n-tuple formats
(their column count must be fixed) and counted.

A query that nobody judged (a group without positives) is labelled by the teacher alone: score
and list formats take its candidates with their teacher scores; n-tuple formats take the
teacher's best candidate as the positive; label-only formats (``pair-binary``, ``pair-class``)
skip it, having no label for it.

Before that, ``false_negatives`` can drop, or relabel as positives, the mined negatives that the
teacher scores within a margin of (or above) the query's lowest-scored positive: the best known
flaw of mined negatives is that many are unjudged relevant passages.

The stage works through the groups in batches (``GROUPS_PER_BATCH``), each with only its own
teacher scores in memory, builds each batch's rows with Arrow and NumPy operations over the whole
batch (texts are looked up by id and never become Python strings), and streams them to Arrow,
from which the ``datasets`` folder is written: its memory follows the batch, not the number of
training queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from losses.table import FORMATS
from pipeline.data import Texts
from pipeline.errors import PipelineError

GROUPS_PER_BATCH = 25_000


class NoRowsError(PipelineError):
    """A format got no training rows from the groups it was given. ``stats`` counts what those
    groups held (queries short of negatives), so that a caller building rows from more groups
    than these still reports them."""

    def __init__(self, message: str, stats: dict | None = None):
        super().__init__(message)
        self.stats = stats or {}


class PairValues:
    """Values keyed by (query_id, doc_id), looked up in Arrow: the teacher's scores, or judged grades."""

    def __init__(self, table: pa.Table, column: str = "score", what: str = "teacher score"):
        self.keys = _pair_keys(table["query_id"], table["doc_id"])
        self.values = table[column].to_numpy().astype(np.float64)
        self.what = what

    @classmethod
    def of_queries(cls, table: pa.Table, query_ids: pa.Array, column: str = "score", what: str = "teacher score") -> PairValues:
        """The rows of these queries only."""
        return cls(table.filter(pc.is_in(table["query_id"], value_set=query_ids)), column, what)

    def get(self, query_ids: pa.Array, doc_ids: pa.Array, default: float | None = None) -> np.ndarray:
        """float64 values of these pairs; a pair without one stops the stage, unless ``default`` is given."""
        rows = pc.index_in(_pair_keys(query_ids, doc_ids), value_set=self.keys)
        if rows.null_count and default is None:
            i = int(pc.index(pc.is_null(rows), True).as_py())
            raise PipelineError(
                f"no {self.what} for query '{query_ids[i]}', passage '{doc_ids[i]}': the scores do not cover "
                "the mined groups (were they computed for another mining run?)"
            )
        found = pc.fill_null(rows, -1).to_numpy(zero_copy_only=False)
        out = np.full(len(found), np.nan if default is None else default)
        out[found >= 0] = self.values[found[found >= 0]]
        return out


def _pair_keys(query_ids, doc_ids) -> pa.Array:
    keys = pc.binary_join_element_wise(query_ids, doc_ids, "\x1f")
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def train_grades(qrels: pa.Table) -> PairValues:
    """The positive judgments of the training split, by (query_id, doc_id)."""
    return PairValues(qrels.filter(pc.and_(pc.equal(qrels["split"], "train"), pc.greater(qrels["score"], 0))), what="grade")


def list_elements(groups: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """A list column as (the row of each element, the length of each list, the elements)."""
    col = groups[column]
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(col)
    return np.repeat(np.arange(len(lengths)), lengths), lengths, values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """Each element's position within its group, for elements sorted by group."""
    return np.arange(len(group)) - np.searchsorted(group, group)


def false_negatives(groups: pa.Table, teacher: PairValues, margin: float = 0.0, action: str = "drop") -> tuple[pa.Table, dict]:
    """Groups with suspected false negatives dropped or moved to the positives, and their counts.

    A negative is suspect when its teacher score >= (lowest positive teacher score) - ``margin``.
    ``action`` is ``keep`` (count only), ``drop`` or ``relabel``.
    """
    if action not in ("keep", "drop", "relabel"):
        raise PipelineError(f"unknown false-negative action '{action}' (choose keep, drop or relabel)")
    qids = groups["query_id"]
    pos_group, n_pos, pos_ids = list_elements(groups, "positive_ids")
    neg_group, _, neg_ids = list_elements(groups, "negative_ids")
    floor = np.full(len(n_pos), np.inf)  # an unjudged query's positive is the teacher's choice: nothing to check
    np.minimum.at(floor, pos_group, teacher.get(qids.take(pos_group), pos_ids))
    suspect = teacher.get(qids.take(neg_group), neg_ids) >= floor[neg_group] - margin
    stats = {
        "action": action, "margin": margin, "suspected": int(suspect.sum()),
        "queries_with_suspects": int(len(np.unique(neg_group[suspect]))),
    }
    if not suspect.any() or action == "keep":
        return groups, stats
    columns = {name: groups[name] for name in groups.column_names}
    flat = {name: list_elements(groups, name)[2] for name in columns if name != "query_id"}
    keep = np.flatnonzero(~suspect)
    for name in ("negative_ids", "negative_scores", "negative_ranks"):
        if name in columns:
            columns[name] = grouped_lists(neg_group[keep], flat[name].take(keep), len(n_pos))
    if action == "relabel":  # each group's positives, then its suspects in their mined order
        moved = np.flatnonzero(suspect)
        for name, neg_name in (("positive_ids", "negative_ids"), ("positive_scores", "negative_scores")):
            if name in columns:
                values = pa.concat_arrays([flat[name], flat[neg_name].take(moved)])
                by_group = np.concatenate([pos_group, neg_group[moved]])
                order = np.argsort(by_group, kind="stable")
                columns[name] = grouped_lists(by_group[order], values.take(order), len(n_pos))
    return pa.table(columns, schema=groups.schema), stats


def grouped_lists(group: np.ndarray, values: pa.Array, num_groups: int) -> pa.ListArray:
    """A list array of ``num_groups`` lists from elements sorted by their list's row
    (:func:`list_elements` undone)."""
    return _lists(np.bincount(group, minlength=num_groups), values)


def build_rows(
    fmt: str,
    groups: pa.Table,
    teacher: PairValues | None,
    texts: Texts,
    grades: PairValues | None = None,
    num_negatives: int | None = None,
    label_scale: float = 1.0,
) -> tuple[pa.Table, dict]:
    """The training rows of ``fmt`` from these groups (a table of ``rows_schema``), and statistics
    about what was built. Every step is an Arrow or NumPy operation over the whole batch."""
    qids = groups["query_id"].combine_chunks()
    pos_group, n_pos, pos_ids = list_elements(groups, "positive_ids")
    neg_group, n_neg_mined, neg_ids = list_elements(groups, "negative_ids")
    n_neg = _check_rows_input(fmt, n_pos, n_neg_mined, teacher, num_negatives)
    label_only = fmt in ("pair-binary", "pair-class")
    unjudged = n_pos == 0
    included = ~unjudged | ((not label_only) & (n_neg_mined > 0))
    scored = teacher is not None and not label_only
    pos_score = teacher.get(qids.take(pos_group), pos_ids) * label_scale if scored else np.zeros(len(pos_ids))
    neg_score = teacher.get(qids.take(neg_group), neg_ids) * label_scale if scored else np.zeros(len(neg_ids))

    # An unjudged query's positive is the teacher's best candidate (the first of equals).
    chosen = included[neg_group] & unjudged[neg_group]
    best = np.full(len(n_pos), -np.inf)
    np.maximum.at(best, neg_group[chosen], neg_score[chosen])
    tops = np.flatnonzero(chosen & (neg_score == best[neg_group]))
    tops = tops[np.unique(neg_group[tops], return_index=True)[1]]
    # Positives: (group, document, score), by group.
    p_group = np.concatenate([pos_group, neg_group[tops]])
    order = np.argsort(p_group, kind="stable")
    p_group, p_doc = p_group[order], pa.concat_arrays([pos_ids, neg_ids.take(tops)]).take(order)
    p_score = np.concatenate([pos_score, neg_score[tops]])[order]
    # Negatives: the rest of an included group's candidates, in mined order, the first n_neg.
    rest = np.ones(len(neg_ids), bool)
    rest[tops] = False
    rest &= included[neg_group]
    kept = np.flatnonzero(rest)
    n_rest = np.bincount(neg_group[kept], minlength=len(n_pos))
    kept = kept[_rank_in_group(neg_group[kept]) < n_neg]
    n_group, n_doc, n_score = neg_group[kept], neg_ids.take(kept), neg_score[kept]

    short = 0
    if fmt.startswith("ntuple"):
        valid = included & (n_rest >= n_neg)
        short = int((included & ~valid).sum())
        table, rows_of = _ntuple_rows(fmt, qids, texts, valid, n_neg, (p_group, p_doc, p_score), (n_group, n_doc, n_score))
    else:
        table, rows_of = _candidate_rows(fmt, qids, texts, grades, len(n_pos), (p_group, p_doc, p_score), (n_group, n_doc, n_score))
    if table.num_rows == 0:
        if short:
            why = f": {short} queries had fewer than {n_neg} mined negatives"
        elif label_only and unjudged.all():
            why = f": it takes judged queries only, and none of these {len(n_pos)} training queries is judged"
        else:
            why = ""
        raise NoRowsError(f"no training rows in format '{fmt}'{why}", {"queries_short_of_negatives": short})
    stats = {
        "format": fmt, "rows": table.num_rows, "queries_short_of_negatives": short, "num_negatives": n_neg,
        "judged_queries": int((rows_of & ~unjudged).sum()), "unjudged_queries": int((rows_of & unjudged).sum()),
    }
    stats.update(label_summary(fmt, table))
    if fmt == "pair-class" and len(np.unique(table["label"].to_numpy())) < 2:
        raise PipelineError(
            "CrossEntropyLoss needs at least two classes: judged grades in qrels/train.tsv, "
            "or mined negatives as class 0 (use --num-negatives 1 or more)"
        )
    return table, stats


def _check_rows_input(fmt: str, n_pos: np.ndarray, n_neg: np.ndarray, teacher, num_negatives: int | None) -> int:
    """Stop on a format the groups cannot fill; returns the negatives per group to use."""
    if fmt not in FORMATS:
        raise PipelineError(f"unknown data format '{fmt}' (one of {', '.join(FORMATS)})")
    label_only = fmt in ("pair-binary", "pair-class")
    unjudged = int((n_pos == 0).sum())
    needs_teacher = fmt in ("ntuple-margin", "pair-score", "pair-soft", "list", "list-gains") or (unjudged and not label_only)
    if needs_teacher and teacher is None:
        raise PipelineError(
            f"format '{fmt}' needs teacher scores" + (f" for its {unjudged} unjudged queries" if unjudged else "")
            + "; run ScoreWithTeacher first"
        )
    n = num_negatives if num_negatives is not None else int(n_neg.max(initial=0))
    if fmt.startswith("ntuple") and n < 1:
        raise PipelineError(f"format '{fmt}' needs at least one mined negative per query; got none")
    return n


def _ntuple_rows(fmt, qids, texts, valid, n_neg, positives, negatives) -> tuple[pa.Table, np.ndarray]:
    """One (query, positive, negative_1..n) row per positive of a group with n negatives; margins
    s(positive) - s(negative_i) for ``ntuple-margin``."""
    p_group, p_doc, p_score = positives
    n_group, n_doc, n_score = negatives
    rows = np.flatnonzero(valid[p_group])
    group = p_group[rows]
    negs = np.flatnonzero(valid[n_group])  # n_neg per valid group, by group
    # Row r's negatives start at its group's place among the valid groups, n_neg apiece.
    first = (np.cumsum(valid) - 1)[group] * n_neg
    passages = texts.passage(pa.concat_arrays([p_doc.take(rows), n_doc.take(negs)]))  # one lookup for both
    columns = {"query": texts.query(qids.take(group)), "positive": passages.slice(0, len(rows))}
    for i in range(n_neg):
        columns[f"negative_{i + 1}"] = passages.take(len(rows) + first + i)
    if fmt == "ntuple-margin":
        margins = p_score[rows, None] - n_score[negs].reshape(-1, n_neg)[first // n_neg]
        columns["label"] = _lists(np.full(len(rows), n_neg), margins.ravel())
    rows_of = np.zeros(len(valid), bool)
    rows_of[group] = True
    return _table(fmt, columns, n_neg), rows_of


def _candidate_rows(fmt, qids, texts, grades, num_groups, positives, negatives) -> tuple[pa.Table, np.ndarray]:
    """A group's positives then negatives: one (query, [docs]) row per group with their scores for
    the list formats (min-max gains for ``list-gains``), one (query, passage) row per document for
    the pair formats, labelled as ``fmt`` says."""
    p_group, p_doc, p_score = positives
    n_group, n_doc, n_score = negatives
    group = np.concatenate([p_group, n_group])
    order = np.argsort(group, kind="stable")
    group, doc = group[order], pa.concat_arrays([p_doc, n_doc]).take(order)
    score = np.concatenate([p_score, n_score])[order]
    is_pos = np.concatenate([np.ones(len(p_group), bool), np.zeros(len(n_group), bool)])[order]
    sizes = np.bincount(group, minlength=num_groups)
    rows_of = sizes > 0
    if fmt.startswith("list"):
        present = np.flatnonzero(rows_of)
        if fmt == "list-gains":
            starts, of = np.searchsorted(group, present), np.searchsorted(present, group)
            lo, hi = np.minimum.reduceat(score, starts)[of], np.maximum.reduceat(score, starts)[of]
            score = np.where(hi > lo, (score - lo) / np.where(hi > lo, hi - lo, 1.0), 1.0)
        sizes = sizes[present]
        columns = {
            "query": texts.query(qids.take(present)),
            "docs": _lists(sizes, texts.passage(doc)),
            "labels": _lists(sizes, score),
        }
        return _table(fmt, columns), rows_of
    if fmt == "pair-score":
        label = score
    elif fmt == "pair-soft":
        label = 1.0 / (1.0 + np.exp(-score))
    elif fmt == "pair-binary":
        label = is_pos.astype(np.float64)
    else:  # pair-class: a judged positive's grade (1 when its qrels give none), 0 for a negative
        grade = grades.get(qids.take(group), doc, default=1) if grades is not None else np.ones(len(group))
        label = np.where(is_pos, grade, 0).astype(np.int64)
    columns = {"query": texts.query(qids.take(group)), "passage": texts.passage(doc), "label": label}
    return _table(fmt, columns), rows_of


def _lists(sizes: np.ndarray, values) -> pa.ListArray:
    """A list array of lists of these sizes, in order, from their elements (float32 from NumPy)."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]), pa.int32())
    if isinstance(values, np.ndarray):
        values = pa.array(values.astype(np.float32), pa.float32())
    elif isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return pa.ListArray.from_arrays(offsets, values)


def _table(fmt: str, columns: dict, num_negatives: int = 0) -> pa.Table:
    schema = rows_schema(fmt, num_negatives)
    arrays = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns.values()]
    return pa.Table.from_arrays(
        [pa.array(a.astype(f.type.to_pandas_dtype()), f.type) if isinstance(a, np.ndarray) else a for a, f in zip(arrays, schema)],
        schema=schema,
    )


def rows_schema(fmt: str, num_negatives: int = 0) -> pa.Schema:
    """The Arrow types of ``fmt``'s training columns (labels last, as sentence-transformers expects)."""
    if fmt.startswith("ntuple"):
        fields = [("query", pa.string()), ("positive", pa.string())] + [(f"negative_{i + 1}", pa.string()) for i in range(num_negatives)]
        return pa.schema(fields + ([("label", pa.list_(pa.float32()))] if fmt == "ntuple-margin" else []))
    if fmt.startswith("list"):
        return pa.schema([("query", pa.string()), ("docs", pa.list_(pa.string())), ("labels", pa.list_(pa.float32()))])
    return pa.schema([("query", pa.string()), ("passage", pa.string()), ("label", pa.int64() if fmt == "pair-class" else pa.float32())])


def label_summary(fmt: str, rows: pa.Table) -> dict:
    """Mean and spread of the labels, or the number of classes for ``pair-class``."""
    if "label" not in rows.column_names:
        return {}
    labels = rows["label"]
    flat = (pc.list_flatten(labels) if pa.types.is_list(labels.type) else labels).to_numpy().astype(np.float64)
    if fmt == "pair-class":
        return {"num_classes": int(flat.max()) + 1}
    return {"label_mean": float(flat.mean()), "label_std": float(flat.std())}


def to_dataset(rows: pa.Table):
    """A ``datasets.Dataset`` of training rows, with their Arrow types."""
    from datasets import Dataset

    return Dataset(rows)


@dataclass(frozen=True)
class LabelConfig:
    """Settings of label building (``BuildLabels``)."""

    fmt: str = "ntuple-margin"  # a format of losses.table.FORMATS
    num_negatives: int | None = None  # None: every mined negative
    label_scale: float = 1.0
    false_negatives: str = "keep"  # keep, drop or relabel
    false_negative_margin: float = 0.0


def build_labels(data_dir, mined_dir, scores_path, out_dir, config: LabelConfig) -> dict:
    """Stage entry: training rows in ``config.fmt`` saved as a ``datasets`` folder (atomically)."""
    return write_labels(data_dir, mined_dir, scores_path, out_dir, config, format_rows(config))


def format_rows(config: LabelConfig) -> Callable:
    """The ``rows`` function of :func:`write_labels` for ``config``: a batch's rows in its format."""

    def rows(groups, teacher, tables, grades, num_negatives):
        return build_rows(config.fmt, groups, teacher, tables.texts(), grades, num_negatives, config.label_scale)

    return rows


def write_labels(
    data_dir, mined_dir, scores_path, out_dir, config: LabelConfig, rows: Callable, groups_per_batch: int = GROUPS_PER_BATCH
) -> dict:
    """The rows ``rows(groups, teacher, tables, grades, num_negatives) -> (table, stats)`` makes from
    the mined groups (false negatives handled first), saved as a ``datasets`` folder with their
    statistics.

    ``rows`` sees a batch of groups at a time, with the teacher's scores of that batch only
    (:class:`PairValues`), the prepared data's Arrow tables
    (:class:`~pipeline.data.NormalizedTables`) and the training judgments' grades; ``num_negatives`` is the configured count, or
    else the most negatives any group kept, so every batch's n-tuples have the same columns."""
    import time
    from pathlib import Path

    import pyarrow.parquet as pq
    from datasets import Dataset

    from pipeline.artifacts import atomic_dir, write_json
    from pipeline.data import NormalizedTables
    from pipeline.scoring import read_scores

    t0 = time.perf_counter()
    tables = NormalizedTables(data_dir)
    grades = train_grades(tables.qrels)
    scores = read_scores(scores_path)[0] if scores_path else None
    if scores is None and config.false_negatives != "keep":
        raise PipelineError(f"--false-negatives {config.false_negatives} needs teacher scores")

    def teacher_of(batch: pa.Table) -> PairValues | None:
        return PairValues.of_queries(scores, batch["query_id"].combine_chunks()) if scores is not None else None

    # Each batch with its teacher scores, looked up once: the false-negative pass keeps every
    # group (it moves or drops negatives), so the rows below read the same queries' scores.
    batches, filter_stats = [], {}
    for batch in pq.read_table(Path(mined_dir) / "groups.parquet").to_batches(groups_per_batch):
        batch = pa.Table.from_batches([batch])
        teacher = teacher_of(batch)
        if teacher is not None:
            batch, found = false_negatives(batch, teacher, config.false_negative_margin, config.false_negatives)
            _add_stats(filter_stats, found)
        batches.append((batch, teacher))
    lengths = [pc.max(pc.list_value_length(b["negative_ids"])).as_py() for b, _ in batches if b.num_rows]
    num_negatives = config.num_negatives if config.num_negatives is not None else max((n or 0 for n in lengths), default=0)

    stats: dict = {}
    empty: NoRowsError | None = None
    with atomic_dir(out_dir) as tmp:
        stream, writer = tmp / "rows.arrow", None
        for batch, teacher in batches:
            try:
                table, built = rows(batch, teacher, tables, grades, num_negatives)
            except NoRowsError as e:
                empty = empty or e
                _add_stats(stats, e.stats)
                continue
            if writer is None:
                writer = pa.ipc.new_stream(str(stream), table.schema)  # the first batch's; the rest must match it
            writer.write_table(table)
            _add_stats(stats, built)
        if writer is None:
            raise empty or NoRowsError(f"no training rows in format '{config.fmt}': no mined groups")
        writer.close()
        dataset = Dataset.from_file(str(stream))
        dataset.save_to_disk(str(tmp / "dataset"))
        stats.update(rows=dataset.num_rows, **label_summary(config.fmt, dataset.data.table))
        if "num_negatives" in stats:
            stats["num_negatives"] = num_negatives
        del dataset
        stream.unlink()
        if filter_stats:
            stats["false_negatives"] = filter_stats
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(tmp / "stats.json", stats)
    return stats


def _add_stats(total: dict, part: dict) -> None:
    """Add one batch's statistics to the running ones: counts add up, the rest is the first batch's."""
    for key, value in part.items():
        if isinstance(value, dict):
            _add_stats(total.setdefault(key, {}), value)
        elif isinstance(value, int) and not isinstance(value, bool) and key in total:
            total[key] += value
        else:
            total.setdefault(key, value)
