"""PackedMarginMSELoss: MarginMSELoss with the batch's pairs packed by length: same loss, less padding."""

from __future__ import annotations

import torch
from sentence_transformers.cross_encoder.losses import MarginMSELoss
from torch import Tensor, nn


class PackedMarginMSELoss(MarginMSELoss):
    data_format = "ntuple-margin"

    def __init__(self, model, activation_fn: nn.Module = nn.Identity(), pairs_per_forward: int | None = None, **kwargs):
        """
        :class:`~sentence_transformers.cross_encoder.losses.MarginMSELoss` computed from
        length-sorted sub-batches of all the batch's (query, passage) pairs. MarginMSELoss runs one
        forward pass per column (positive, negative_1, ..., negative_n), each padded to that
        column's longest pair; here every pair of the batch is sorted by length and cut into
        sub-batches that pad only to pairs of about their own length. The loss and its gradients
        are MarginMSELoss's (a test checks both).

        Args:
            model: the CrossEncoder to train (one output label).
            activation_fn: applied to the logits, as in MarginMSELoss.
            pairs_per_forward: pairs per forward pass; default the batch size (as many passes as
                MarginMSELoss makes, each with pairs of similar length).
            **kwargs: passed to ``torch.nn.MSELoss``, as in MarginMSELoss.

        References:
            - Hofstätter et al. Improving Efficient Neural Ranking Models with Cross-Architecture
              Knowledge Distillation (2020): https://arxiv.org/abs/2010.02666

        Requirements:
            1. A model with ``num_labels = 1``.
            2. Teacher margins (or scores) for each positive and negative, as MarginMSELoss.

        Inputs:
            +---------------------------------------------+--------------------------------------------------+-------------------------------+
            | Texts                                       | Labels                                           | Number of Model Output Labels |
            +=============================================+==================================================+===============================+
            | (query, positive, negative_1, ..., neg_n)   | [pos - neg_1, ..., pos - neg_n] (teacher margins)| 1                             |
            +---------------------------------------------+--------------------------------------------------+-------------------------------+
            | (query, positive, negative_1, ..., neg_n)   | [pos, neg_1, ..., neg_n] (teacher scores)        | 1                             |
            +---------------------------------------------+--------------------------------------------------+-------------------------------+

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer

                from losses.packed_margin_mse import PackedMarginMSELoss

                student = CrossEncoder("microsoft/MiniLM-L12-H384-uncased", num_labels=1)
                train_dataset = Dataset.from_dict({
                    "query": ["what is the capital of France?"],
                    "positive": ["Paris is the capital of France."],
                    "negative_1": ["Berlin is the capital of Germany."],
                    "label": [[7.3]],
                })
                loss = PackedMarginMSELoss(student)
                CrossEncoderTrainer(model=student, train_dataset=train_dataset, loss=loss).train()
        """
        super().__init__(model, activation_fn=activation_fn, **kwargs)
        self.pairs_per_forward = pairs_per_forward

    def packed_logits(self, pairs: list[tuple[str, str]], chunk: int, prompt=None, task=None) -> Tensor:
        """Activated logits of ``pairs`` in their order, computed in length-sorted chunks of ``chunk`` pairs."""
        # Characters are a good enough proxy for token length to sort by, and cost no tokenization.
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        parts = [
            self.logits_from_pairs([pairs[i] for i in order[s : s + chunk]], prompt=prompt, task=task)
            for s in range(0, len(order), chunk)
        ]
        flat = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return flat[inverse.to(flat.device)]

    @staticmethod
    def margin_targets(labels: Tensor | list[Tensor], batch_size: int, num_negatives: int) -> Tensor:
        """The labels as a (batch, negatives) matrix of margins, read as MarginMSELoss reads them:
        margins already, one score per column (positive first), or one margin per row."""
        if isinstance(labels, list):
            labels = torch.stack(labels)
        if labels.shape == (batch_size, num_negatives + 1):
            labels = labels[:, :1] - labels[:, 1:]
        if labels.shape == (batch_size,):
            labels = labels.unsqueeze(1)
        if labels.shape != (batch_size, num_negatives):
            raise ValueError(
                f"Labels shape {tuple(labels.shape)} does not match the expected {(batch_size, num_negatives)}: "
                "give each row its teacher margins (positive minus each negative) or its teacher scores"
            )
        return labels

    def forward(self, inputs: list[list[str]], labels, prompt: str | None = None, task: str | None = None) -> Tensor:
        anchors, columns = inputs[0], inputs[1:]
        pairs = [(a, d) for column in columns for a, d in zip(anchors, column)]
        logits = self.packed_logits(pairs, self.pairs_per_forward or len(anchors), prompt, task).view(len(columns), len(anchors))
        margins = (logits[0].unsqueeze(0) - logits[1:]).T  # (batch, negatives)
        return self.loss_fct(margins, self.margin_targets(labels, len(anchors), len(columns) - 1).to(margins.device).detach().float())

    def get_config_dict(self):
        return {**super().get_config_dict(), "pairs_per_forward": self.pairs_per_forward}
