"""A custom loss for the --loss package.module:Class test: MarginMSE on scaled margins."""

from __future__ import annotations

import torch
from torch import nn


class ScaledMarginMSELoss(nn.Module):
    data_format = "ntuple-margin"

    def __init__(self, model, scale: float = 0.5) -> None:
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(self, inputs, labels):
        query, positive, *negatives = inputs
        labels = torch.stack(labels) if isinstance(labels, list) else labels

        def score(docs):
            feats = self.model.preprocess(list(zip(query, docs)))
            feats = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in feats.items()}
            return self.model(feats)["scores"].view(-1)

        pos = score(positive)
        margins = torch.stack([pos - score(n) for n in negatives], dim=1)
        return nn.functional.mse_loss(margins, self.scale * labels.float().to(margins.device))

    def get_config_dict(self):
        return {"scale": self.scale, "custom_marker": "scaled-margin-test"}

    @property
    def citation(self) -> str:
        return "@misc{scaledmargin2026, title={A scaled margin loss for a test}}"
