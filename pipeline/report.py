"""Report: metrics.json's numbers as a Markdown page with tables and PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.artifacts import atomic_file

ROW_ORDER = ["retriever", "teacher", "student_untrained", "student"]


def metrics_table(test: dict[str, dict[str, float]]) -> str:
    lines = ["| model | nDCG@10 | MRR@10 | MAP | pairs/s |", "|---|---:|---:|---:|---:|"]
    for name in [n for n in ROW_ORDER if n in test] + [n for n in test if n not in ROW_ORDER]:
        m = test[name]
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['map']:.4f} | {m['pairs_per_second']:.1f} |")
    return "\n".join(lines)


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
        ax.scatter(m["pairs_per_second"], m["ndcg@10"], s=40)
        ax.annotate(name, (m["pairs_per_second"], m["ndcg@10"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("pairs per second (log)")
    ax.set_ylabel("nDCG@10 (test)")
    ax.set_title("Quality against speed")
    _save(fig, path)
    plt.close(fig)


def write_report(path: str | Path, metrics: dict, verdict: list[str], plots: dict[str, str]) -> None:
    path = Path(path)
    p = metrics["params"]
    parts = [
        "# Distillation report",
        "",
        f"Dataset `{p['dataset']}`; teacher `{p.get('teacher_resolved') or p['teacher']}`; student `{p['student']}` "
        f"(first {p['student_layers']} layers); loss `{p['loss']}`.",
        "",
        "## Test split: reranking the retriever's top candidates",
        "",
        metrics_table(metrics["test"]),
        "",
        *[f"- {line}" for line in verdict],
        "",
    ]
    if "quality_speed" in plots:
        parts += [f"![quality against speed]({plots['quality_speed']})", ""]
    if "scatter" in plots:
        parts += ["## Teacher against student scores", "", f"![teacher vs student]({plots['scatter']})", ""]
    stages = metrics.get("stages", {})
    if stages.get("ScoreWithTeacher"):
        s = stages["ScoreWithTeacher"]
        parts += [
            "## Teacher scoring",
            "",
            f"{s.get('pairs', 0)} unique pairs in {s.get('shards', 1)} shards: {s.get('pairs_scored', 0)} scored by the "
            f"teacher at {s.get('pairs_per_second') or 0:.1f} pairs/s ({s.get('precision', '?')}), "
            f"{s.get('pairs_from_cache', 0)} served from the score cache, {s.get('duplicate_pairs', 0)} duplicates "
            f"scored once; {s.get('truncated_pairs', 0)} pairs were truncated to max_length.",
            "",
        ]
    if stages.get("MineHardNegatives"):
        s = stages["MineHardNegatives"]
        parts += [
            "## Mining",
            "",
            f"{s.get('train_queries', 0)} training queries; {s.get('queries_short_of_negatives', 0)} had fewer than "
            f"{p.get('num_negatives')} negatives in range; mean negative rank {s.get('mean_negative_rank', float('nan')):.1f}.",
            "",
        ]
    if stages.get("BuildLabels"):
        s = stages["BuildLabels"]
        parts += ["## Labels", "", f"{s.get('rows')} rows in format `{s.get('format')}`"
                  + (f"; label mean {s['label_mean']:.3f}, std {s['label_std']:.3f}." if "label_mean" in s else "."), ""]
    if stages.get("FitStudent"):
        s = stages["FitStudent"]
        parts += ["## Training", "", f"{s.get('steps')} steps in {s.get('seconds')} s "
                  f"({s.get('samples_per_second')} rows/s); final train loss {s.get('train_loss', float('nan')):.4f}.", ""]
        if s.get("dev"):
            parts += ["Dev split (sentence-transformers' CrossEncoderRerankingEvaluator):", ""]
            parts += [f"- {k}: {v:.4f}" for k, v in s["dev"].items()]
            parts.append("")
    if metrics.get("timings"):
        parts += ["## Time per stage", "", timings_table(metrics["timings"]), ""]
    parts += ["## Parameters", "", "```", *[f"{k} = {v}" for k, v in p.items()], "```", ""]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(parts))
