"""Report: metrics.json's numbers as a Markdown page with tables and PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.artifacts import atomic_file
from pipeline.evaluation import outcome

ROW_ORDER = [
    "retriever", "teacher", "student_untrained", "student_label_only", "student_source_only", "student_cosine", "student", "student_label_only_fused",
    "student_source_only_fused", "student_fused",
]


def metrics_table(test: dict[str, dict[str, float]]) -> str:
    lines = ["| model | nDCG@10 | MRR@10 | MAP | pairs/s | ms/query |", "|---|---:|---:|---:|---:|---:|"]
    for name in [n for n in ROW_ORDER if n in test] + [n for n in test if n not in ROW_ORDER]:
        m = test[name]
        pps = f"{m['pairs_per_second']:.1f}" if "pairs_per_second" in m else "n/a"
        ms = f"{m['ms_per_query']:.0f}" if "ms_per_query" in m else "n/a"
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['map']:.4f} | {pps} | {ms} |")
    return "\n".join(lines)


def significance_table(tests: dict[str, dict]) -> str:
    lines = ["| comparison | nDCG@10 difference | 95% confidence interval | p-value (paired t-test) | queries |", "|---|---:|---:|---:|---:|"]
    for k, t in tests.items():
        ci = f"[{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]" if t.get("ci95") else "n/a"
        lines.append(f"| {k} | {t['diff']:+.4f} | {ci} | {t['p_value']:.3g} | {t['queries']} |")
    return "\n".join(lines)


def languages_table(languages: dict[str, dict], metric: str = "ndcg@10") -> str:
    """One row per model, one column per language."""
    langs = list(languages)
    names = [n for n in ROW_ORDER if any(n in e["rankers"] for e in languages.values())]
    lines = ["| model | " + " | ".join(langs) + " |", "|---|" + "---:|" * len(langs)]
    for name in names:
        cells = [f"{e['rankers'][name][metric]:.4f}" if name in e["rankers"] else "n/a" for e in languages.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    def beats(e: dict, name: str = "student") -> str:
        t = e.get("significance", {}).get(f"{name} vs retriever")
        if not t:
            return "n/a"
        ci = f" [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}]" if t.get("ci95") else ""
        return f"{outcome(t)} ({t['diff']:+.4f}{ci}, p = {t['p_value']:.2g})"

    lines.append("| student beats the retriever? | " + " | ".join(beats(e) for e in languages.values()) + " |")
    if any(e.get("fusion") for e in languages.values()):
        lines.append("| student_fused beats the retriever? | " + " | ".join(beats(e, "student_fused") for e in languages.values()) + " |")
        weights = [
            f"{f['weight']:g} ({f['dev_queries']} dev queries)" if (f := e.get("fusion", {}).get("student")) else "n/a"
            for e in languages.values()
        ]
        lines.append("| student_fused: w on the student | " + " | ".join(weights) + " |")
    lines.append("| test queries / pairs | " + " | ".join(f"{e['queries']} / {e['pairs']}" for e in languages.values()) + " |")
    return "\n".join(lines) + "\n\nIn brackets: the 95% interval of the difference from the retriever."


def fusion_section(fusion: dict[str, dict], language: str = "") -> list[str]:
    """How each ``*_fused`` row was made, and its weight's dev figures beside both ends of the grid
    (of the source ``language``'s dev candidates, in a multilingual report)."""
    where = f" ({language} texts; every language's weight is in the languages table)" if language else ""
    lines = [
        "## Fused with the retriever",
        "",
        "A `*_fused` row ranks by w × the student's score + (1 − w) × the retriever's, each z-normalised within its "
        f"query; w was chosen on dev{where} (weight 0 is the retriever's order, 1 the student alone). The retriever's score "
        "comes with every candidate, so a fused row costs what its student costs.",
        "",
        "| student | w | dev queries | dev nDCG@10 at w | at 0 (retriever) | at 1 (student alone) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, f in fusion.items():
        dev, w = f["dev_ndcg@10"], f"{f['weight']:g}"
        lines.append(f"| {name} | {w} | {f['dev_queries']} | {dev[w]:.4f} | {dev['0']:.4f} | {dev['1']:.4f} |")
    if "student" in fusion and not language:
        lines += ["", "To serve the student fused: its w is in `fusion.json` beside this report (`pipeline.fusion.fusion_weight`)."]
    return lines + [""]


def speed_method(speed: dict | None) -> str:
    """How pairs/s and ms/query were measured, in a sentence."""
    if not speed or not speed.get("pairs"):
        return "Speed was not measured."
    return (
        f"Speed: every model reranks the same {speed['pairs']} pairs of the first {speed['queries']} test queries, text encoding "
        f"included, on {speed.get('device', '?')} in this run's process, the models taking turns over {speed['turns']} blocks."
    )


def timings_table(timings: dict[str, float]) -> str:
    lines = ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_scores(teacher: np.ndarray, student: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(teacher, student, s=4, alpha=0.35)
    r = float(np.corrcoef(teacher, student)[0, 1]) if len(teacher) > 1 else float("nan")
    ax.set_xlabel("teacher score")
    ax.set_ylabel("student score")
    ax.set_title(f"Test candidates: student vs teacher (Pearson {r:.3f})")
    _save(fig, path)
    plt.close(fig)


def plot_quality_speed(test: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, m in test.items():
        if "pairs_per_second" not in m:
            continue
        ax.scatter(m["pairs_per_second"], m["ndcg@10"], s=40)
        ax.annotate(name, (m["pairs_per_second"], m["ndcg@10"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("pairs per second (log)")
    ax.set_ylabel("nDCG@10 (test)")
    ax.set_title("Quality against speed")
    _save(fig, path)
    plt.close(fig)


def plot_languages(languages: dict[str, dict], path: Path) -> None:
    """Grouped bars: nDCG@10 of each model in each language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(languages)
    names = [n for n in ROW_ORDER if any(n in e["rankers"] for e in languages.values())]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(langs), 4))
    for i, name in enumerate(names):
        values = [languages[lang]["rankers"].get(name, {}).get("ndcg@10", 0.0) for lang in langs]
        ax.bar(np.arange(len(langs)) + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(np.arange(len(langs)), langs)
    ax.set_ylabel("nDCG@10 (test)")
    ax.set_title("Per language: teacher on source texts, students on each language")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)
    plt.close(fig)


def plot_mining(groups, path: Path) -> None:
    """Two histograms of the chosen negatives: their retrieval ranks, and their scores against the positives'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [r for rr in groups.column("negative_ranks").to_pylist() for r in rr if r >= 0]
    neg = [x for xx in groups.column("negative_scores").to_pylist() for x in xx]
    pos = [x for xx in groups.column("positive_scores").to_pylist() for x in xx]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.hist(ranks, bins=min(50, max(ranks, default=0) + 1))
    a.set_xlabel("rank among non-positives (0 = hardest)")
    a.set_ylabel("negatives")
    a.set_title("Ranks of the mined negatives")
    b.hist([pos, neg], bins=40, label=["positives", "negatives"], histtype="step")
    b.set_xlabel("retriever score")
    b.legend()
    b.set_title("Retriever scores")
    _save(fig, path)
    plt.close(fig)


def _quantiles(q: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in q.items()) or "n/a"


def write_report(path: str | Path, metrics: dict, verdict: list[str], plots: dict[str, str]) -> None:
    """report.md: the test tables and verdict first, then one section per stage that ran."""
    p, stages = metrics["params"], metrics.get("stages", {})
    parts = _test_section(metrics, verdict, plots)
    sections = [
        ("PrepareData", _data_section), ("FineTuneTeacher", _teacher_section), ("ScoreWithTeacher", _scoring_section),
        ("MineHardNegatives", _mining_section), ("BuildMultilingualLabels", _views_section), ("BuildLabels", _labels_section), ("ChooseStudentDepth", _depth_section),
        ("FitStudent", _training_section), ("PlainStudent", _plain_section),
    ]
    for stage, section in sections:
        if stages.get(stage):
            parts += section(stages[stage], p, plots)
    if metrics.get("timings"):
        parts += ["## Time per stage", "", timings_table(metrics["timings"]), ""]
    parts += ["## Parameters", "", "```", *[f"{k} = {v}" for k, v in p.items()], "```", ""]
    with atomic_file(Path(path)) as tmp:
        tmp.write_text("\n".join(parts))


def _test_section(metrics: dict, verdict: list[str], plots: dict[str, str]) -> list[str]:
    p = metrics["params"]
    missed = metrics.get("test_queries", 0) - metrics.get("test_queries_with_positive_in_top_k", 0)
    fine_tuned = metrics.get("stages", {}).get("FineTuneTeacher", {})
    members, chosen = fine_tuned.get("members"), fine_tuned.get("share_chosen_on_dev", {}).get("dev_queries")
    ensemble = (
        " (fine-tuned ensemble: " + ", ".join(f"{m['kind']} {m['weight']:g}" for m in members)
        + (f", the shares chosen on {chosen} dev queries" if chosen else "") + ")"
    ) if members else ""
    depth = metrics.get("stages", {}).get("ChooseStudentDepth", {})
    layers = f"first {depth['layers']} layers, measured" if depth else f"first {p['student_layers']} layers"
    parts = [
        "# Distillation report",
        "",
        f"Dataset `{p['dataset']}`; teacher `{p.get('teacher_resolved') or p['teacher']}`{ensemble}; student `{p['student']}` "
        f"({layers}); loss `{p['loss']}`.",
        "",
        "## Test split: reranking the retriever's top candidates",
        "",
        f"{metrics.get('test_queries', '?')} test queries, each reranked over the retriever's top "
        f"{p.get('rerank_top_k', '?')} and nothing else: the {missed} "
        "queries whose judged positives the retriever missed score 0 for every model. " + speed_method(metrics.get("speed")),
        "",
        metrics_table(metrics["test"]),
        "",
        *[f"- {line}" for line in verdict],
        "",
    ]
    if metrics.get("significance"):
        parts += [significance_table(metrics["significance"]), ""]
    if metrics.get("fusion"):
        parts += fusion_section(metrics["fusion"], metrics.get("source_language", ""))
    if metrics.get("languages"):
        parts += [
            "## Languages: nDCG@10 on each language's test queries",
            "",
            f"The teacher reads the source texts ({metrics.get('source_language')}); the students read each "
            "language's translations. Candidates are the source retriever's, restricted to translated passages, "
            "so lists are shorter where fewer passages are translated. A `*_fused` row fuses a student with the "
            "retriever's score, its weight chosen on that language's dev candidates.",
            "",
            languages_table(metrics["languages"]),
            "",
        ]
        if "languages" in plots:
            parts += [f"![per language]({plots['languages']})", ""]
    if "quality_speed" in plots:
        parts += [f"![quality against speed]({plots['quality_speed']})", ""]
    if "scatter" in plots:
        parts += ["## Teacher against student scores", "", f"![teacher vs student]({plots['scatter']})", ""]
    return parts


def _data_section(s: dict, p: dict, plots: dict) -> list[str]:
    n = s.get("split_queries", {})
    parts = ["## Data", "", f"{s.get('queries', '?')} queries ({s.get('unjudged_queries', 0)} without judgments) over "
             f"{s.get('documents', '?')} passages; judged queries: {n.get('train', '?')} train, {n.get('dev', '?')} dev, "
             f"{n.get('test', '?')} test.", ""]
    if s.get("documents_without_text"):
        parts += [f"{s['documents_without_text']} passages have neither title nor text; they stay in the corpus as empty "
                  "passages, so a judgment that points to one counts as a miss.", ""]
    for name, n_rows in s.get("repeated_rows", {}).items():
        parts += [f"{name}: {n_rows} rows repeat an earlier row's id and text; each was read once.", ""]
    for name, n_rows in s.get("judgments_of_unknown_ids", {}).items():
        parts += [f"{name}: {n_rows} judgments name a query or passage the dataset lacks; they count for nothing "
                  "(no system could retrieve with or for them), and the run's log names the first.", ""]
    if s.get("queries_in_several_splits"):
        parts += [f"{s['queries_in_several_splits']} queries were judged in more than one split; each kept the judgments "
                  "of its test (else dev) split only, so that no query trains on what it is evaluated on.", ""]
    if s.get("dev_from_train"):
        parts += [f"The dataset has no dev split: {s['dev_from_train']} of its judged training queries (a tenth, chosen by "
                  "a hash of the query id) were held out as dev and never trained on.", ""]
    return parts


def _teacher_section(s: dict, p: dict, plots: dict) -> list[str]:
    choice = s.get("share_chosen_on_dev") or {}
    if not choice.get("dev_queries"):
        return []
    dev, share = choice["dev_ndcg@10"], f"{choice['weight']:g}"
    return [
        "## Teacher fine-tuning",
        "",
        f"The ensemble's members were mixed at the cross-encoder's share that ranks {choice['dev_queries']} dev queries' "
        "true top-k candidates best (shares 0 to 1 in steps of 0.05):",
        "",
        "| teacher | dev nDCG@10 |",
        "|---|---:|",
        f"| bi-encoder alone | {dev['0']:.4f} |",
        f"| cross-encoder alone | {dev['1']:.4f} |",
        f"| **mixed, cross-encoder share {share}** | **{dev[share]:.4f}** |",
        "",
    ]


def _scoring_section(s: dict, p: dict, plots: dict) -> list[str]:
    lines = [
        "## Teacher scoring",
        "",
        f"{s.get('pairs', 0)} unique pairs in {s.get('shards', 1)} shards: {s.get('pairs_scored', 0)} scored by the "
        f"teacher at {s.get('pairs_per_second') or 0:.1f} pairs/s ({s.get('precision', '?')}), "
        f"{s.get('pairs_from_cache', 0)} served from the score cache, {s.get('duplicate_pairs', 0)} duplicates "
        f"scored once; {s.get('truncated_pairs', 0)} pairs were truncated to max_length.",
        "",
    ]
    dev = s.get("dev_check") or {}
    if dev:
        ahead = outcome(dev) == "yes"
        lines += [
            f"Checked by the first shard on {dev['queries']} dev queries' true top-k candidates, the teacher scored "
            f"{dev['teacher_ndcg@10']:.4f} nDCG@10 against the retriever's own order {dev['retriever_ndcg@10']:.4f} "
            f"({dev['diff']:+.4f}, p = {dev['p_value']:.3g}): "
            + ("ahead, so there is something to distil." if ahead else "**not significantly ahead**, so a student distilled from it is unlikely to beat the retriever."),
            "",
        ]
    return lines


def _mining_section(s: dict, p: dict, plots: dict) -> list[str]:
    filtered = ", ".join(f"{k} {v}" for k, v in s.get("filtered", {}).items()) or "none"
    left_out = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in s.get("training_queries_left_out", {}).items()) or "none"
    parts = [
        "## Mining",
        "",
        f"{s.get('train_queries', 0)} training queries over {s.get('corpus', '?')} passages "
        f"(FAISS `{s.get('faiss_index', '?')}`); {s.get('texts_embedded', 0)} texts embedded, the rest from the cache.",
        "",
        "| | value |",
        "|---|---|",
        f"| negatives chosen | {s.get('negatives', 0)} ({s.get('random_negatives', 0)} random) |",
        f"| queries short of {p.get('num_negatives')} negatives | {s.get('queries_short_of_negatives', 0)} |",
        f"| queries without any negative | {s.get('queries_without_negatives', 0)} |",
        f"| candidates removed by filters | {filtered} |",
        f"| training queries left out for their text | {left_out} |",
        f"| negative rank quantiles | {_quantiles(s.get('negative_rank_quantiles', {}))} |",
        f"| negative score quantiles | {_quantiles(s.get('negative_score_quantiles', {}))} |",
        f"| positive score quantiles | {_quantiles(s.get('positive_score_quantiles', {}))} |",
        "",
    ]
    if "mining" in plots:
        parts += [f"![mined negatives]({plots['mining']})", ""]
    return parts


def _views_section(s: dict, p: dict, plots: dict) -> list[str]:
    return [
        "## Training rows per language view",
        "",
        "| view (query-passage) | groups | rows | skipped: query missing | skipped: positive missing | negatives missing |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {name} | {v['groups']} | {v['rows']} | {v['missing_query']} | {v['missing_positive']} | {v['negatives_missing']} |"
            for name, v in s.get("views", {}).items()
        ],
        "",
    ]


def _labels_section(s: dict, p: dict, plots: dict) -> list[str]:
    parts = ["## Labels", "", f"{s.get('rows')} rows in format `{s.get('format')}` from "
             f"{s.get('judged_queries', '?')} judged and {s.get('unjudged_queries', 0)} unjudged queries (labelled by the teacher alone)"
             + (f"; label mean {s['label_mean']:.3f}, std {s['label_std']:.3f}." if "label_mean" in s else "."), ""]
    fn = s.get("false_negatives")
    if fn:
        parts += [
            f"Suspected false negatives (teacher score within {fn['margin']} of the positive): {fn['suspected']} "
            f"in {fn['queries_with_suspects']} queries; action: {fn['action']}.",
            "",
        ]
    return parts


def _depth_section(s: dict, p: dict, plots: dict) -> list[str]:
    t = s.get("timed_on", {})
    confidence = s.get("confidence")
    # A record from before the lower bound has no "at least" figure: its column is left out.
    columns = ["layers", "pairs/s", "times the teacher"] + (["at least"] if confidence else [])
    rows = [
        "| " + " | ".join([str(n), f"{v['pairs_per_second']:.1f}", f"{v['times_teacher']:.2f}"]
                          + ([f"{v['times_teacher_at_least']:.2f}"] if confidence else [])) + " |"
        for n, v in s.get("students", {}).items()
    ]
    return [
        "## The student's depth",
        "",
        f"The deepest cut of `{p['student']}` (up to {p['student_layers']} layers) whose pairs/s is at least {s.get('speedup')} times "
        f"the teacher's ({s.get('teacher_pairs_per_second')} pairs/s): **{s.get('layers')} layers**. Timed on {t.get('pairs')} "
        f"{t.get('source', 'pairs')} of {t.get('queries')} queries, the models taking turns over {t.get('turns')} blocks on {t.get('device')}"
        + (f"; \"at least\" is the one-sided {confidence:.0%} lower bound over the turns." if confidence else "; decided on the mean over the turns."),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---:|" * len(columns),
        *rows,
        "",
    ]


def _training_section(s: dict, p: dict, plots: dict) -> list[str]:
    parts = ["## Training", "", f"{s.get('steps')} steps in {s.get('seconds')} s "
             f"({s.get('samples_per_second')} rows/s); final train loss {s.get('train_loss', float('nan')):.4f}.", ""]
    if s.get("dev"):
        n = s.get("dev_queries")
        parts += [
            f"Dev split{f', {n} queries' if n else ''} (sentence-transformers' CrossEncoderRerankingEvaluator; "
            "a check that training went somewhere, not a verdict: the test tables are):",
            "",
        ]
        parts += [f"- {k}: {v:.4f}" for k, v in s["dev"].items()]
        parts.append("")
    return parts


def _plain_section(s: dict, p: dict, plots: dict) -> list[str]:
    """The published student in sentence-transformers' own modules against the cosine-head student
    it started from, on the dev queries the stage checked: the trade-off its format costs or gains."""
    dev, cosine = s.get("dev", {}), s.get("dev_cosine_student", {})
    parts = [
        "## The published student's modules",
        "",
        f"The published student is the cosine-head student's encoder with sentence-transformers' own mean Pooling and "
        f"Dense, which plain `CrossEncoder(path)` loads: taught the teacher's order of {s['lists']} candidate lists of "
        f"{s['queries']} training queries "
        + (f"and {sum(v['lists'] for v in s['views'].values()) - s['lists']} translations of them " if s.get("views") else "")
        + f"in {s['steps']} steps ({s['epochs']:.2f} epochs, {s['seconds']} s).",
        "",
    ]
    if "dev_ndcg@10" in dev and "dev_ndcg@10" in cosine:
        parts += [
            f"| on {s.get('dev_queries', '?')} dev queries | nDCG@10 |",
            "|---|---:|",
            f"| retriever | {dev.get('dev_base_ndcg@10', float('nan')):.4f} |",
            f"| cosine-head student (loads with `trust_remote_code`) | {cosine['dev_ndcg@10']:.4f} |",
            f"| published student | {dev['dev_ndcg@10']:.4f} ({dev['dev_ndcg@10'] - cosine['dev_ndcg@10']:+.4f}) |",
            "",
        ]
    return parts
