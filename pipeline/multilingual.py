"""Multilingual distillation: the source language's teacher labels carried over to parallel
translations, and per-language evaluation on the test split.

Mining and teacher scoring run once, on the source language. A training view is a (query
language, passage language) pair: the source itself, each target language, and with
``cross_lingual`` each target mixed with the source both ways. Every view reuses the source
groups and teacher scores by id; a group keeps only what the view has a translation of, and ids
missing from a language are skipped and counted, never fatal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data import Dataset, NormalizedTables, Texts, join_title
from pipeline.errors import PipelineError
from pipeline.evaluation import EvalConfig, outcome
from pipeline.labels import (
    LabelConfig, NoRowsError, PairValues, build_rows, grouped_lists, label_summary, list_elements, rows_schema, write_labels,
)
from pipeline.plain_student import PlainStudentConfig, list_table, teach_plain_student


def parse_languages(languages: str | Sequence[str]) -> list[str]:
    langs = [x.strip() for x in languages.split(",")] if isinstance(languages, str) else list(languages)
    return [x for x in dict.fromkeys(langs) if x]


def texts_of(ds: Dataset, lang: str, source: str) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """(queries, corpus) of one language; the source language is the dataset's own files."""
    if lang == source:
        return ds.queries, ds.corpus
    if lang not in ds.languages:
        raise _no_language(lang, ds.languages)
    return ds.languages[lang]


def _no_language(lang: str, have) -> PipelineError:
    return PipelineError(
        f"language '{lang}' has no corpus.{lang}.jsonl / queries.{lang}.jsonl in the dataset "
        f"(parallel languages: {', '.join(sorted(have)) or 'none'})"
    )


def training_views(languages: Sequence[str], source: str, cross_lingual: bool) -> list[tuple[str, str]]:
    """(query language, passage language) of every set of training rows."""
    views = [(source, source)] + [(lang, lang) for lang in languages if lang != source]
    if cross_lingual:
        for lang in languages:
            if lang != source:
                views += [(lang, source), (source, lang)]
    return views


def view_name(query_lang: str, passage_lang: str) -> str:
    return query_lang if query_lang == passage_lang else f"{query_lang}-{passage_lang}"


def restrict_groups(groups: pa.Table, texts: Texts) -> tuple[pa.Table, dict]:
    """The groups a language view can express: its query and every positive translated;
    negatives without a translation are left out (in order), so later ones take their place."""
    has_query = texts.holds_queries(groups["query_id"])
    pos_group, _, pos_ids = list_elements(groups, "positive_ids")
    neg_group, _, neg_ids = list_elements(groups, "negative_ids")
    lacks_positive = np.bincount(pos_group[~texts.holds_passages(pos_ids)], minlength=groups.num_rows) > 0
    keep = has_query & ~lacks_positive
    has_negative = texts.holds_passages(neg_ids)
    skipped = {
        "missing_query": int((~has_query).sum()),
        "missing_positive": int((has_query & lacks_positive).sum()),
        "negatives_missing": int((keep[neg_group] & ~has_negative).sum()),
    }
    rows, kept_negs = np.flatnonzero(keep), np.flatnonzero(keep[neg_group] & has_negative)
    new_row = np.cumsum(keep) - 1  # a kept group's row among the kept ones
    schema = pa.schema([("query_id", pa.string()), ("positive_ids", pa.list_(pa.string())), ("negative_ids", pa.list_(pa.string()))])
    columns = [
        groups["query_id"].take(rows),
        groups["positive_ids"].take(rows),
        grouped_lists(new_row[neg_group[kept_negs]], neg_ids.take(kept_negs), len(rows)),
    ]
    return pa.table(columns, schema=schema), skipped


def language_texts(tables: NormalizedTables, lang: str, source: str) -> Texts:
    """One language's texts; the source language is the dataset's own files."""
    if lang == source:
        return tables.texts()
    if lang not in tables.tables:
        raise _no_language(lang, [x for x in tables.tables if x])
    return tables.texts(lang)


def multilingual_rows(
    fmt: str,
    groups: pa.Table,
    teacher: PairValues | None,
    texts: Mapping[str, Texts],
    languages: Sequence[str],
    source: str = "en",
    cross_lingual: bool = False,
    grades: PairValues | None = None,
    num_negatives: int | None = None,
    label_scale: float = 1.0,
) -> tuple[pa.Table, dict]:
    """Training rows of every view, each labelled with its source pair's teacher scores;
    ``texts`` holds each language's texts, the source's included."""
    tables = []
    views = {}
    for q_lang, p_lang in training_views(languages, source, cross_lingual):
        view = Texts(texts[q_lang].queries, texts[p_lang].corpus, texts[p_lang].folder)
        kept, skipped = restrict_groups(groups, view)
        stats = {"groups": kept.num_rows, **skipped, "rows": 0}
        if kept.num_rows:
            try:
                view_rows, built = build_rows(fmt, kept, teacher, view, grades, num_negatives, label_scale)
                tables.append(view_rows)
            except NoRowsError as e:
                built = {"rows": 0, **e.stats}
            stats["rows"] = built["rows"]
            stats["queries_short_of_negatives"] = built.get("queries_short_of_negatives", 0)
        views[view_name(q_lang, p_lang)] = stats
    if not tables:
        raise NoRowsError(f"no training rows in format '{fmt}' in any language ({', '.join(views)})")
    rows = pa.concat_tables(tables)
    return rows, {"format": fmt, "rows": rows.num_rows, "views": views, "num_negatives": num_negatives, **label_summary(fmt, rows)}


@dataclass(frozen=True)
class TrainingViews:
    """The languages a multilingual stage trains on (:func:`training_views`)."""

    languages: tuple[str, ...] = ()
    source: str = "en"
    cross_lingual: bool = False


@dataclass(frozen=True)
class MultilingualLabelConfig(LabelConfig, TrainingViews):
    """Settings of multilingual label building (``BuildMultilingualLabels``)."""


def build_multilingual_labels(data_dir, mined_dir, scores_path, out_dir, config: MultilingualLabelConfig) -> dict:
    """Stage entry: the rows of every language view saved as one ``datasets`` folder (atomically)."""
    c = config

    def rows(groups, teacher, tables, grades, num_negatives):
        # A missing language fails before any view is built.
        texts = {lang: language_texts(tables, lang, c.source) for lang in (c.source, *c.languages)}
        return multilingual_rows(
            c.fmt, groups, teacher, texts, list(c.languages), c.source, c.cross_lingual, grades, num_negatives, c.label_scale,
        )

    return write_labels(data_dir, mined_dir, scores_path, out_dir, c, rows)


def translated_lists(
    cand: pa.Table, targets: np.ndarray, texts: Mapping[str, Texts], languages: Sequence[str], source: str = "en", cross_lingual: bool = False
) -> tuple[pa.Table, dict]:
    """``list``-format rows of every view but the source's: each source candidate list (``cand``,
    its targets ``targets`` in order) in the view's languages, its untranslated passages left out
    (in order). A list counts when its query and at least two of its passages are translated: a
    list of one orders nothing. Returns the rows and ``{"views": {view: counts}}``, the source's
    view included."""
    group, sizes, doc_ids = list_elements(cand, "doc_ids")
    query_ids = cand["query_id"].combine_chunks()
    targets = np.asarray(targets, np.float32)
    views = {view_name(source, source): {"lists": cand.num_rows, "pairs": len(doc_ids)}}
    tables = []
    for q_lang, p_lang in training_views(languages, source, cross_lingual)[1:]:
        q_texts, p_texts = texts[q_lang], texts[p_lang]
        has_query = q_texts.holds_queries(query_ids)
        has_passage = p_texts.holds_passages(doc_ids)
        translated = np.bincount(group[has_passage], minlength=cand.num_rows)
        keep = has_query & (translated >= 2)
        element = keep[group] & has_passage
        views[view_name(q_lang, p_lang)] = {
            "lists": int(keep.sum()), "pairs": int(element.sum()), "missing_query": int((~has_query).sum()),
            "under_two_passages": int((has_query & ~keep).sum()),
        }
        tables.append(list_table(
            q_texts.query(query_ids.filter(keep)).to_pylist(), translated[keep],
            p_texts.passage(doc_ids.filter(element)).to_pylist(), targets[element],
        ))
    return pa.concat_tables(tables) if tables else rows_schema("list").empty_table(), {"views": views}


@dataclass(frozen=True)
class MultilingualPlainConfig(PlainStudentConfig, TrainingViews):
    """Settings of the multilingual plain student (``MultilingualPlainStudent``)."""


def multilingual_plain_student(data_dir, mined_dir, student_dir, out_dir, config: MultilingualPlainConfig) -> dict:
    """Stage entry: the plain student (:func:`pipeline.plain_student.plain_student`) of the
    multilingual student, taught the teacher's order of the source candidate lists and of the
    same lists in every view's languages, each translated pair with its source pair's target."""
    c = config
    tables = NormalizedTables(data_dir)
    # A missing language fails here, before any model loads.
    texts = {lang: language_texts(tables, lang, c.source) for lang in (c.source, *c.languages)}
    return teach_plain_student(
        data_dir, mined_dir, student_dir, out_dir, c,
        more_lists=lambda cand, targets: translated_lists(cand, targets, texts, c.languages, c.source, c.cross_lingual),
    )


def language_candidates(
    candidates: pa.Table, ds: Dataset, lang: str, source: str, max_queries: int = 0, split: str = "test"
) -> tuple[list[str], list[str], list[float], dict]:
    """The source retriever's candidates of ``split`` restricted to what ``lang`` has translated.

    A query counts when it and at least one of its judged passages are translated; its candidate
    list keeps the translated passages in the retriever's order.
    """
    queries, corpus = texts_of(ds, lang, source)
    qrels = ds.relevant(split)
    c = candidates.to_pydict()
    qids, dids, scores = [], [], []
    skipped = {"missing_query": 0, "no_judged_passage": 0, "candidates_missing": 0}
    kept = 0
    for q, docs, ss in zip(c["query_id"], c["doc_ids"], c["scores"]):
        if max_queries and kept >= max_queries:
            break
        if q not in queries:
            skipped["missing_query"] += 1
            continue
        if not any(d in corpus for d in qrels.get(q, {})):
            skipped["no_judged_passage"] += 1
            continue
        pairs = [(d, s) for d, s in zip(docs, ss) if d in corpus]
        skipped["candidates_missing"] += len(docs) - len(pairs)
        kept += 1
        qids += [q] * len(pairs)
        dids += [d for d, _ in pairs]
        scores += [s for _, s in pairs]
    return qids, dids, scores, skipped


@dataclass(frozen=True)
class MultilingualEvalConfig(EvalConfig):
    """Settings of the per-language test evaluation (``EvaluateMultilingualStudent``)."""

    languages: tuple[str, ...] = ()
    source: str = "en"


def evaluate_languages(
    data_dir, mined_dir, student_dir, source_only_dir, out_dir, config: MultilingualEvalConfig, run: dict, cosine_dir=None
) -> dict:
    """Stage entry: per language, the retriever's order, the teacher on the source texts, and the
    untrained, source-only and multilingual students on that language's texts (and the
    cosine-head student a plain one started from, ``cosine_dir``, when ``student_dir`` is one),
    each trained student also fused with the retriever (its weight chosen on that language's dev candidates,
    as :func:`pipeline.evaluation.evaluate_student` chooses it); metrics.json, report.md and a
    plot in ``out_dir``. ``run`` is what the report shows beside the metrics (``params``,
    ``stages``, ``timings``), as in :func:`pipeline.evaluation.evaluate_student`."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.artifacts import atomic_dir, write_json
    from pipeline.data import NormalizedTables, judgments
    from pipeline.models import cut_student, load_cross_encoder, resolve_precision
    from pipeline.report import plot_languages, write_report
    from pipeline.scoring import CrossEncoderScorer, TeacherSpec, load_teacher

    c = config
    qrels = judgments(data_dir, "test")
    cand = pq.read_table(Path(mined_dir) / "candidates-test.parquet")
    dev_path = Path(mined_dir) / "candidates-dev.parquet"
    dev_cand = pq.read_table(dev_path) if c.fusion_dev_queries > 0 and dev_path.exists() else None
    # Only the texts, in every language, of the test (and fusion's dev) queries, their candidates
    # and judged passages.
    dev_qrels = judgments(data_dir, "dev") if dev_cand is not None else {}
    shown = [(cand.to_pydict(), qrels)] + ([(dev_cand.to_pydict(), dev_qrels)] if dev_cand is not None else [])
    query_ids = [q for t, _ in shown for q in t["query_id"]]
    docs = dict.fromkeys(d for t, judged in shown for q, listed in zip(t["query_id"], t["doc_ids"]) for d in (*listed, *judged.get(q, {})))
    ds = NormalizedTables(data_dir).subset(query_ids, list(docs))
    source = c.source
    dtype = resolve_precision(c.precision, c.device)
    langs = [source] + [lang for lang in c.languages if lang != source]
    sets = {lang: language_candidates(cand, ds, lang, source, c.max_eval_queries) for lang in langs}
    dev_sets = {} if dev_cand is None else {
        lang: (*language_candidates(dev_cand, ds, lang, source, c.fusion_dev_queries, split="dev")[:3], dev_qrels) for lang in langs
    }

    # The teacher reads the source texts of every language's pairs: score each pair once.
    needed = list(dict.fromkeys((q, d) for qids, dids, _, _ in sets.values() for q, d in zip(qids, dids)))
    # Every ranker stays loaded: each language's rankers are timed taking turns.
    t = load_teacher(TeacherSpec.parse(c.teacher, c.teacher_weights), c.device, c.teacher_precision, c.teacher_max_length)
    teacher_of = dict(zip(needed, t.score([(ds.queries[q], ds.passage(d)) for q, d in needed], [q for q, _ in needed])))

    torch.manual_seed(c.seed)
    models = {
        "student_untrained": cut_student(c.student, c.student_layers, c.device, c.max_length, head=c.student_head),
        "student_source_only": load_cross_encoder(str(source_only_dir), c.device, c.max_length),
        "student": load_cross_encoder(str(student_dir), c.device, c.max_length),
        **({"student_cosine": load_cross_encoder(str(cosine_dir), c.device, c.max_length)} if cosine_dir else {}),
    }
    scorers = {name: CrossEncoderScorer(m, c.device, dtype) for name, m in models.items()}

    per_lang = {
        lang: _language_metrics(ds, lang, source, candidates, qrels, teacher_of, t, scorers, c.timing_queries, dev_sets.get(lang))
        for lang, candidates in sets.items()
    }

    lines = language_verdict(per_lang, source)
    metrics = {
        "test": per_lang[source]["rankers"],
        "significance": per_lang[source]["significance"],
        "fusion": per_lang[source].get("fusion", {}),
        "test_queries": per_lang[source]["queries"],
        "test_queries_with_positive_in_top_k": per_lang[source].get("queries_with_positive_in_top_k", 0),
        "test_pairs": per_lang[source]["pairs"],
        "speed": {**per_lang[source].get("speed", {}), "device": c.device},
        "languages": per_lang,
        "source_language": source,
        "verdict": lines,
        "params": run["params"],
        "stages": run["stages"],
        "timings": run["timings"],
    }
    plots = {"languages": "languages.png"}
    with atomic_dir(out_dir) as tmp:
        plot_languages(per_lang, tmp / plots["languages"])
        write_json(tmp / "metrics.json", metrics)
        write_report(tmp / "report.md", metrics, lines, plots)
    return metrics


def _language_metrics(ds, lang, source, candidates, qrels, teacher_of, teacher, scorers, timing_queries: int, dev=None) -> dict:
    """One language's rankers on its test candidates, with their metrics, paired tests and speed;
    with ``dev`` (that language's dev candidates and the dev judgments), each trained student fused
    with the retriever."""
    from pipeline.evaluation import add_fused_rows, after_timing, evaluate_rankers, fusion_weights, queries_with_positive, ranker_speed

    qids, dids, retrieval, skipped = candidates
    queries, corpus = texts_of(ds, lang, source)

    def texts(qids, dids):
        return [(queries[q], join_title(*corpus[d])) for q, d in zip(qids, dids)]

    pairs = texts(qids, dids)
    if not pairs:
        return {"queries": 0, "pairs": 0, "skipped": skipped, "rankers": {}, "significance": {}}
    # The retriever's order comes from mining and is not timed here; the teacher reads the source
    # texts of the same pairs, scored once for every language and timed again on this one's.
    source_pairs = [(ds.queries[q], ds.passage(d)) for q, d in zip(qids, dids)]
    rankers = {"retriever": np.asarray(retrieval, np.float32), "teacher": np.asarray([teacher_of[(q, d)] for q, d in zip(qids, dids)], np.float32)}
    timed = {
        "teacher": lambda part: teacher.score(source_pairs[part], qids[part], show_progress=False),
        **{name: (lambda part, s=scorer: s.score(pairs[part], show_progress=False)) for name, scorer in scorers.items()},
    }
    speed, timing, timing_scores = ranker_speed(timed, qids, timing_queries)
    # The timing scored the first pairs already; the students score the rest.
    rest = pairs[timing["pairs"]:]
    for name, scorer in scorers.items():
        rankers[name] = after_timing(timing_scores[name], lambda s=scorer, n=name: s.score(rest, desc=f"{n} [{lang}]"), len(pairs))
    dev_qids, dev_dids, dev_retrieval, dev_qrels = dev or ([], [], [], {})
    fusion = fusion_weights(
        dev_qids, dev_dids, dev_qrels, lambda: texts(dev_qids, dev_dids), dev_retrieval, {n: scorers[n] for n in TRAINED}, f" [{lang}]"
    )
    add_fused_rows(qids, rankers, speed, fusion)
    results, tests, _ = evaluate_rankers(qids, dids, qrels, rankers, MULTILINGUAL_COMPARISONS, speed)
    return {
        "queries": len(set(qids)), "queries_with_positive_in_top_k": queries_with_positive(qids, dids, qrels), "pairs": len(pairs),
        "skipped": skipped, "rankers": results, "significance": tests, "speed": timing, "fusion": fusion,
    }


# The students a language's dev split fuses with the retriever.
TRAINED = ("student_source_only", "student")
MULTILINGUAL_COMPARISONS = (
    ("student", "retriever"), ("student", "student_source_only"), ("student", "student_untrained"), ("student", "student_cosine"),
    ("teacher", "retriever"),
    ("student_fused", "retriever"), ("student_fused", "student"), ("student_fused", "student_source_only_fused"),
)


def language_verdict(per_lang: dict, source: str) -> list[str]:
    """One sentence per language: does the multilingual student beat the students it must beat,
    and the retriever's own order? A difference counts only with p < 0.05 (paired t-test)."""
    said = {"yes": "beats", "NO": "is below", "not shown": "is not shown to differ from"}
    lines = []
    for lang, entry in per_lang.items():
        r, tests = entry["rankers"], entry.get("significance", {})
        if not r:
            lines.append(f"{lang}: no test query has a translated judged passage; not evaluated.")
            continue
        m, so, un, ret = (r[k]["ndcg@10"] for k in ("student", "student_source_only", "student_untrained", "retriever"))

        def against(other: str, what: str, name: str = "student", score: float | None = None) -> str:
            t = tests.get(f"{name} vs {other}")
            bracket = "; ".join(
                ([f"{score:.4f}"] if score is not None else []) + ([f"p = {t['p_value']:.3g}"] if t else [])
            )
            return f"{said.get(outcome(t), 'is not tested against')} {what}" + (f" ({bracket})" if bracket else "")

        order = against("retriever", "the retriever's order")
        students = "" if lang == source else (
            f" It {against('student_source_only', 'the source-only student')} and {against('student_untrained', 'the untrained one')}."
        )
        if "student_cosine" in r:
            cosine = r["student_cosine"]["ndcg@10"]
            students += f" It {against('student_cosine', 'the cosine-head student it started from', score=cosine)}."
        fusion = entry.get("fusion", {}).get("student")
        fused = "" if not fusion else (
            f" Fused with the retriever's score (w = {fusion['weight']:g}, chosen on {fusion['dev_queries']} dev queries) it "
            f"scores {r['student_fused']['ndcg@10']:.4f} and {against('retriever', 'the retriever', 'student_fused')}."
        )
        lines.append(
            f"{lang}{' (source)' if lang == source else ''}: the multilingual student scores {m:.4f} nDCG@10 against "
            f"{so:.4f} for the source-only student, {un:.4f} untrained and {ret:.4f} for the retriever's order "
            f"({m - ret:+.4f}).{students} It {order}"
            + ("" if outcome(tests.get("student vs retriever")) == "yes" else ": it does NOT beat the retriever") + "."
            + fused
        )
    return lines
