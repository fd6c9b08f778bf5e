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
texts and teacher scores in memory, and streams the rows to Arrow before they become a
``datasets`` folder: its memory follows the batch, not the number of training queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from losses.table import FORMATS
from pipeline.errors import PipelineError

GROUPS_PER_BATCH = 25_000


class NoRowsError(PipelineError):
    """A format got no training rows from the groups it was given."""


def score_lookup(scores: pa.Table, query_ids: pa.Array | None = None) -> dict[tuple[str, str], float]:
    """(query_id, doc_id) -> teacher score, for the rows of ``query_ids`` only when given."""
    if query_ids is not None:
        import pyarrow.compute as pc

        scores = scores.filter(pc.is_in(scores["query_id"], value_set=query_ids))
    d = scores.to_pydict()
    return dict(zip(zip(d["query_id"], d["doc_id"]), d["score"]))


def false_negatives(
    groups: pa.Table, teacher: dict[tuple[str, str], float], margin: float = 0.0, action: str = "drop"
) -> tuple[pa.Table, dict]:
    """Groups with suspected false negatives dropped or moved to the positives, and their counts.

    A negative is suspect when its teacher score >= (lowest positive teacher score) - ``margin``.
    ``action`` is ``keep`` (count only), ``drop`` or ``relabel``.
    """
    if action not in ("keep", "drop", "relabel"):
        raise PipelineError(f"unknown false-negative action '{action}' (choose keep, drop or relabel)")
    g = groups.to_pydict()
    found = queries_hit = 0
    for i, qid in enumerate(g["query_id"]):
        if not g["positive_ids"][i]:  # unjudged: its positive is the teacher's choice, nothing to check
            continue
        floor = min(teacher[(qid, p)] for p in g["positive_ids"][i]) - margin
        suspect = [j for j, d in enumerate(g["negative_ids"][i]) if teacher[(qid, d)] >= floor]
        found += len(suspect)
        queries_hit += bool(suspect)
        if not suspect or action == "keep":
            continue
        if action == "relabel":
            g["positive_ids"][i] = g["positive_ids"][i] + [g["negative_ids"][i][j] for j in suspect]
            g["positive_scores"][i] = g["positive_scores"][i] + [g["negative_scores"][i][j] for j in suspect]
        for col in ("negative_ids", "negative_scores", "negative_ranks"):
            g[col][i] = [x for j, x in enumerate(g[col][i]) if j not in suspect]
    stats = {"action": action, "margin": margin, "suspected": found, "queries_with_suspects": queries_hit}
    return pa.table(g, schema=groups.schema), stats


def build_rows(
    fmt: str,
    groups: pa.Table,
    teacher: dict[tuple[str, str], float] | None,
    queries: dict[str, str],
    passage: Callable[[str], str],
    grades: dict[str, dict[str, int]] | None = None,
    num_negatives: int | None = None,
    label_scale: float = 1.0,
) -> tuple[dict[str, list], dict]:
    """Columns of the training dataset for ``fmt`` and statistics about what was built."""
    g = groups.to_pydict()
    n_neg = _check_rows_input(fmt, g, teacher, num_negatives)
    label_only = fmt in ("pair-binary", "pair-class")
    add = {"ntuple": _ntuple_rows, "list": _list_rows, "pair": _pair_rows}[fmt.split("-")[0]]
    cols: dict[str, list] = {}
    short = 0
    used = {"judged_queries": 0, "unjudged_queries": 0}

    def score(q: str, d: str) -> float:
        return float(teacher[(q, d)]) * label_scale

    for qid, pos_ids, neg_ids in zip(g["query_id"], g["positive_ids"], g["negative_ids"]):
        kind = "judged_queries" if pos_ids else "unjudged_queries"
        if not pos_ids:
            if label_only or not neg_ids:
                continue
            best = max(neg_ids, key=lambda d: score(qid, d))  # the teacher's choice is the positive
            pos_ids, neg_ids = [best], [d for d in neg_ids if d != best]
        if fmt.startswith("ntuple") and len(neg_ids) < n_neg:
            short += 1
            continue
        rows_before = len(cols.get("query", []))
        add(cols, fmt, qid, queries[qid], pos_ids, neg_ids[:n_neg], passage, lambda d, q=qid: score(q, d), grades)
        if len(cols.get("query", [])) > rows_before:
            used[kind] += 1
    rows = len(cols.get("query", []))
    if rows == 0:
        raise NoRowsError(
            f"no training rows in format '{fmt}': {short} queries had fewer than {n_neg} mined negatives"
            if short
            else f"no training rows in format '{fmt}'"
        )
    stats = {"format": fmt, "rows": rows, "queries_short_of_negatives": short, "num_negatives": n_neg, **used}
    stats.update(label_summary(fmt, cols))
    if fmt == "pair-class" and len(set(cols["label"])) < 2:
        raise PipelineError(
            "CrossEntropyLoss needs at least two classes: judged grades in qrels/train.tsv, "
            "or mined negatives as class 0 (use --num-negatives 1 or more)"
        )
    return cols, stats


def _check_rows_input(fmt: str, g: dict, teacher, num_negatives: int | None) -> int:
    """Stop on a format the groups cannot fill; returns the negatives per group to use."""
    if fmt not in FORMATS:
        raise PipelineError(f"unknown data format '{fmt}' (one of {', '.join(FORMATS)})")
    label_only = fmt in ("pair-binary", "pair-class")
    unjudged = sum(1 for p in g["positive_ids"] if not p)
    needs_teacher = fmt in ("ntuple-margin", "pair-score", "pair-soft", "list", "list-gains") or (unjudged and not label_only)
    if needs_teacher and teacher is None:
        raise PipelineError(
            f"format '{fmt}' needs teacher scores" + (f" for its {unjudged} unjudged queries" if unjudged else "")
            + "; run ScoreWithTeacher first"
        )
    n_neg = num_negatives if num_negatives is not None else max((len(x) for x in g["negative_ids"]), default=0)
    if fmt.startswith("ntuple") and n_neg < 1:
        raise PipelineError(f"format '{fmt}' needs at least one mined negative per query; got none")
    return n_neg


def _ntuple_rows(cols, fmt, qid, q, pos_ids, negs, passage, score, grades) -> None:
    """One (query, positive, negative_1..n) row per positive; margins for ``ntuple-margin``."""
    for p in pos_ids:
        cols.setdefault("query", []).append(q)
        cols.setdefault("positive", []).append(passage(p))
        for i, n in enumerate(negs, 1):
            cols.setdefault(f"negative_{i}", []).append(passage(n))
        if fmt == "ntuple-margin":
            cols.setdefault("label", []).append([score(p) - score(n) for n in negs])


def _list_rows(cols, fmt, qid, q, pos_ids, negs, passage, score, grades) -> None:
    """One (query, [docs]) row per group with the teacher's scores (min-max gains for ``list-gains``)."""
    docs = list(pos_ids) + list(negs)
    scores = [score(d) for d in docs]
    if fmt == "list-gains":
        lo, hi = min(scores), max(scores)
        scores = [(x - lo) / (hi - lo) if hi > lo else 1.0 for x in scores]
    cols.setdefault("query", []).append(q)
    cols.setdefault("docs", []).append([passage(d) for d in docs])
    cols.setdefault("labels", []).append(scores)


def _pair_rows(cols, fmt, qid, q, pos_ids, negs, passage, score, grades) -> None:
    """One (query, passage) row per document, labelled as ``fmt`` says."""
    for d, is_pos in [(p, True) for p in pos_ids] + [(n, False) for n in negs]:
        if fmt == "pair-score":
            label = score(d)
        elif fmt == "pair-soft":
            label = 1.0 / (1.0 + math.exp(-score(d)))
        elif fmt == "pair-binary":
            label = 1.0 if is_pos else 0.0
        else:  # pair-class
            label = int((grades or {}).get(qid, {}).get(d, 1)) if is_pos else 0
        cols.setdefault("query", []).append(q)
        cols.setdefault("passage", []).append(passage(d))
        cols.setdefault("label", []).append(label)


def label_summary(fmt: str, cols: dict[str, list] | pa.Table) -> dict:
    """Mean and spread of the labels, or the number of classes for ``pair-class``."""
    names = cols.column_names if isinstance(cols, pa.Table) else cols
    if "label" not in names:
        return {}
    labels = cols["label"]
    if isinstance(labels, pa.ChunkedArray):
        import pyarrow.compute as pc

        flat = (pc.list_flatten(labels) if pa.types.is_list(labels.type) else labels).to_numpy().astype(np.float64)
    else:
        flat = np.asarray(labels, np.float64).ravel()
    if fmt == "pair-class":
        return {"num_classes": int(flat.max()) + 1}
    return {"label_mean": float(flat.mean()), "label_std": float(flat.std())}


def rows_schema(cols: dict[str, list]) -> pa.Schema:
    """The Arrow types of training columns (labels last, as sentence-transformers expects)."""
    fields = []
    for name, values in cols.items():
        if name == "docs":
            kind = pa.list_(pa.string())
        elif name == "labels" or (name == "label" and values and isinstance(values[0], list)):
            kind = pa.list_(pa.float32())
        elif name == "label":
            kind = pa.int64() if isinstance(values[0], int) else pa.float32()
        else:
            kind = pa.string()
        fields.append((name, kind))
    return pa.schema(fields)


def to_dataset(cols: dict[str, list]):
    """A ``datasets.Dataset`` of training columns with explicit types."""
    from datasets import Dataset, Features

    return Dataset.from_dict(cols, features=Features.from_arrow_schema(rows_schema(cols)))


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
    c = config
    return write_labels(
        data_dir, mined_dir, scores_path, out_dir, c,
        lambda groups, teacher, ds, num_negatives: build_rows(
            c.fmt, groups, teacher, ds.queries, ds.passage, ds.relevant("train"), num_negatives, c.label_scale
        ),
    )


def write_labels(
    data_dir, mined_dir, scores_path, out_dir, config: LabelConfig, rows: Callable, groups_per_batch: int = GROUPS_PER_BATCH
) -> dict:
    """The rows ``rows(groups, teacher, dataset, num_negatives) -> (columns, stats)`` makes from
    the mined groups (false negatives handled first), saved as a ``datasets`` folder with their
    statistics.

    ``rows`` sees a batch of groups at a time, with the dataset and the teacher's scores of
    that batch only; ``num_negatives`` is the configured count, or else the most negatives any
    group kept, so every batch's n-tuples have the same columns."""
    import time
    from pathlib import Path

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from datasets import Dataset

    from pipeline.artifacts import atomic_dir, write_json
    from pipeline.data import NormalizedTables
    from pipeline.scoring import read_scores

    t0 = time.perf_counter()
    texts = NormalizedTables(data_dir)
    scores = read_scores(scores_path)[0] if scores_path else None
    if scores is None and config.false_negatives != "keep":
        raise PipelineError(f"--false-negatives {config.false_negatives} needs teacher scores")

    def teacher_of(batch: pa.Table):
        return score_lookup(scores, batch["query_id"].combine_chunks()) if scores is not None else None

    batches, filter_stats = [], {}
    for batch in pq.read_table(Path(mined_dir) / "groups.parquet").to_batches(groups_per_batch):
        batch = pa.Table.from_batches([batch])
        if scores is not None:
            batch, found = false_negatives(batch, teacher_of(batch), config.false_negative_margin, config.false_negatives)
            _add_stats(filter_stats, found)
        batches.append(batch)
    lengths = [pc.max(pc.list_value_length(b["negative_ids"])).as_py() for b in batches if b.num_rows]
    num_negatives = config.num_negatives if config.num_negatives is not None else max((n or 0 for n in lengths), default=0)

    stats: dict = {}
    empty: NoRowsError | None = None
    schema: pa.Schema | None = None
    with atomic_dir(out_dir) as tmp:
        stream, writer = tmp / "rows.arrow", None
        for batch in batches:
            try:
                cols, built = rows(batch, teacher_of(batch), texts.of_groups(batch), num_negatives)
            except NoRowsError as e:
                empty = empty or e
                continue
            if writer is None:
                schema = rows_schema(cols)  # the first batch's; the rest must match it
                writer = pa.ipc.new_stream(str(stream), schema)
            table = pa.table(cols, schema=schema)
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
