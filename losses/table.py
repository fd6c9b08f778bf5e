"""The Cross Encoder loss table (sentence-transformers' Loss Overview) as data.

Each training-data format says which columns a row has and what its label is; each loss names
the format it trains from, the number of model outputs, and what the run must have to build it.
``BuildLabels`` turns teacher-scored groups into any of these formats.
"""

from __future__ import annotations

from dataclasses import dataclass

# format -> (input columns, label description)
FORMATS: dict[str, tuple[str, str]] = {
    "pair-score": ("(query, passage) pairs", "teacher score (float)"),
    "pair-soft": ("(query, passage) pairs", "teacher score mapped into [0, 1] by a sigmoid"),
    "pair-binary": ("(query, passage) pairs", "1 if judged positive, 0 if mined negative"),
    "pair-class": ("(query, passage) pairs", "class id (the qrels relevance grade, 0 for mined negatives)"),
    "ntuple": ("(query, positive, negative_1, ..., negative_n)", "none"),
    "ntuple-margin": (
        "(query, positive, negative_1, ..., negative_n)",
        "[teacher(query, positive) - teacher(query, negative_i) for i in 1..n]",
    ),
    "list": ("(query, [doc_1, ..., doc_n])", "[teacher score of each doc]"),
    "list-gains": ("(query, [doc_1, ..., doc_n])", "[teacher scores min-max scaled per query into [0, 1]]"),
}


# Formats whose 0/1 or [0, 1] labels a one-output model fits through a sigmoid (binary
# cross-entropy): its logits are log-odds, and a sigmoid reads them as probabilities. Every other
# format trains scores that only rank (in the teacher's units, or none); a sigmoid would crowd the
# highest near 1, where float32 has few values left: of 100 scores from 12 to 13 in steps of 0.01,
# 34 stay apart, and from 14 to 15, 5.
LOG_ODDS_FORMATS = ("pair-binary", "pair-soft")


@dataclass(frozen=True)
class LossSpec:
    name: str
    format: str
    num_labels: int | None  # None: number of classes, known only from the data
    kind: str  # pointwise, pairwise, listwise, in-batch, distillation
    needs_teacher: bool
    module: str = "sentence_transformers.cross_encoder.losses"

    @property
    def columns(self) -> str:
        return FORMATS[self.format][0]

    @property
    def label(self) -> str:
        return FORMATS[self.format][1]

    @property
    def activation(self) -> str:
        """What ``CrossEncoder.predict`` applies to the logits of a model trained with this loss
        (saved in its folder): a sigmoid for log-odds, nothing for scores that rank."""
        return "torch.nn.Sigmoid" if self.format in LOG_ODDS_FORMATS else "torch.nn.Identity"


_ST = "sentence_transformers.cross_encoder.losses"
LOSS_TABLE: dict[str, LossSpec] = {
    spec.name: spec
    for spec in [
        LossSpec("CrossEntropyLoss", "pair-class", None, "pointwise", False),
        LossSpec("BinaryCrossEntropyLoss", "pair-binary", 1, "pointwise", False),
        LossSpec("MultipleNegativesRankingLoss", "ntuple", 1, "in-batch", False),
        LossSpec("CachedMultipleNegativesRankingLoss", "ntuple", 1, "in-batch", False),
        LossSpec("LambdaLoss", "list-gains", 1, "listwise", True),
        LossSpec("PListMLELoss", "list", 1, "listwise", True),
        LossSpec("ListNetLoss", "list", 1, "listwise", True),
        LossSpec("RankNetLoss", "list", 1, "pairwise", True),
        LossSpec("ListMLELoss", "list", 1, "listwise", True),
        LossSpec("ADRMSELoss", "list", 1, "listwise", True),
        LossSpec("MSELoss", "pair-score", 1, "distillation", True),
        LossSpec("MarginMSELoss", "ntuple-margin", 1, "distillation", True),
        # Beyond sentence-transformers, one loss per file of this package:
        LossSpec("ListwiseKLDivLoss", "list", 1, "distillation", True, "losses.listwise_kl_div"),
        LossSpec("PearsonCorrelationLoss", "list", 1, "distillation", True, "losses.pearson_correlation"),
        # MarginMSELoss's math with the batch's pairs packed by length
        LossSpec("PackedMarginMSELoss", "ntuple-margin", 1, "distillation", True, "losses.packed_margin_mse"),
    ]
}


def markdown_table() -> str:
    """The table as Markdown (for the docs and the report)."""
    lines = ["| loss | inputs | labels | outputs | kind |", "|---|---|---|---|---|"]
    for s in LOSS_TABLE.values():
        outputs = "num_classes" if s.num_labels is None else str(s.num_labels)
        lines.append(f"| {s.name} | {s.columns} | {s.label} | {outputs} | {s.kind} |")
    return "\n".join(lines)
