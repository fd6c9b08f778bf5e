"""MarginMSELoss with the pairs of a batch packed by length: same loss, less padding.

sentence-transformers' MarginMSELoss runs one forward pass per column (positive, negative_1,
..., negative_n), each padded to the longest pair of that column. Here every (query, passage)
pair of the batch is sorted by length and cut into sub-batches, so each sub-batch pads to pairs
of about its own length. The loss and its gradients are those of MarginMSELoss.
"""

from __future__ import annotations

import torch
from sentence_transformers.cross_encoder.losses import MarginMSELoss
from torch import Tensor, nn


class PackedMarginMSELoss(MarginMSELoss):
    """:class:`MarginMSELoss` computed from length-sorted sub-batches of all the batch's pairs.

    Args:
        model: the CrossEncoder to train.
        activation_fn: applied to the logits, as in MarginMSELoss.
        pairs_per_forward: pairs per forward pass; default the batch size (as many passes as
            MarginMSELoss makes, each with pairs of similar length).
    """

    data_format = "ntuple-margin"

    def __init__(self, model, activation_fn: nn.Module = nn.Identity(), pairs_per_forward: int | None = None, **kwargs):
        super().__init__(model, activation_fn=activation_fn, **kwargs)
        self.pairs_per_forward = pairs_per_forward

    def packed_logits(self, pairs: list[tuple[str, str]], chunk: int, prompt=None, task=None) -> Tensor:
        """Logits of ``pairs`` in their order, computed in length-sorted chunks of ``chunk`` pairs."""
        # Characters are a good enough proxy for token length to sort by, and cost no tokenization.
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        parts = [
            MarginMSELoss.logits_from_pairs(self, [pairs[i] for i in order[s : s + chunk]], prompt=prompt, task=task)
            for s in range(0, len(order), chunk)
        ]
        flat = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return flat[inverse.to(flat.device)]

    def forward(self, inputs: list[list[str]], labels, prompt: str | None = None, task: str | None = None) -> Tensor:
        anchors = inputs[0]
        pairs = [(a, d) for column in inputs[1:] for a, d in zip(anchors, column)]
        logits = self.packed_logits(pairs, self.pairs_per_forward or len(anchors), prompt, task)
        per_column = iter(logits.view(len(inputs) - 1, len(anchors)))
        # MarginMSELoss.forward asks for one column's logits at a time; serve them from the packed
        # pass, so its label handling and loss stay exactly sentence-transformers' own.
        self.logits_from_pairs = lambda *_args, **_kwargs: next(per_column)
        try:
            return super().forward(inputs, labels, prompt=prompt, task=task)
        finally:
            del self.logits_from_pairs

    def get_config_dict(self):
        return {**super().get_config_dict(), "pairs_per_forward": self.pairs_per_forward}
