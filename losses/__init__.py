"""The Cross Encoder loss table as data, the loss factory, and losses beyond sentence-transformers."""

from losses.factory import build_loss, resolve_loss
from losses.listwise_kl_div import ListwiseKLDivLoss
from losses.packed_margin_mse import PackedMarginMSELoss
from losses.pearson_correlation import PearsonCorrelationLoss
from losses.table import FORMATS, LOSS_TABLE, LossSpec

__all__ = [
    "FORMATS", "LOSS_TABLE", "LossSpec", "build_loss", "resolve_loss",
    "ListwiseKLDivLoss", "PackedMarginMSELoss", "PearsonCorrelationLoss",
]
