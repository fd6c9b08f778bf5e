"""The shared part of the listwise distillation losses: a batch of (query, [docs]) rows scored by
the student in one pass, as (student, teacher, mask) matrices of shape (queries, longest list)."""

from __future__ import annotations

import torch
from sentence_transformers.util import batch_to_device
from torch import Tensor, nn


class ListwiseDistillationLoss(nn.Module):
    """Base of losses that compare each query's student scores with its teacher scores as a list.

    Subclasses implement ``forward`` with :meth:`score_lists`. Rows are in the ``list`` format:
    (query, [doc_1, ..., doc_n]) with the teacher's scores as labels; lists may differ in length.
    """

    data_format = "list"
    num_labels = 1
    needs_teacher = True

    def __init__(self, model, mini_batch_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.mini_batch_size = mini_batch_size
        if model.num_labels != 1:
            raise ValueError(f"{type(self).__name__} needs a model with 1 output label, got {model.num_labels}")

    def score_lists(self, inputs, labels, prompt=None, task=None) -> tuple[Tensor, Tensor, Tensor]:
        """(student scores, teacher scores, mask) as (queries, max_docs) matrices."""
        if isinstance(labels, Tensor):
            raise ValueError(f"{type(self).__name__} expects one list of teacher scores per query")
        queries, docs_list = inputs
        sizes = [len(d) for d in docs_list]
        if sizes != [len(lab) for lab in labels]:
            raise ValueError(f"documents per query {sizes} do not match labels per query {[len(lab) for lab in labels]}")
        pairs = [(q, d) for q, docs in zip(queries, docs_list) for d in docs]
        step = self.mini_batch_size or len(pairs)
        logits = []
        for i in range(0, len(pairs), step):
            feats = batch_to_device(self.model.preprocess(pairs[i : i + step], prompt=prompt, task=task), self.model.device)
            logits.append(self.model(feats)["scores"].view(-1))
        flat = torch.cat(logits).float()
        device = flat.device
        rows = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
        cols = torch.cat([torch.arange(n, device=device) for n in sizes])
        student = torch.zeros(len(sizes), max(sizes), device=device)
        teacher = torch.zeros_like(student)
        mask = torch.zeros_like(student, dtype=torch.bool)
        student[rows, cols] = flat
        teacher[rows, cols] = torch.cat([torch.as_tensor(lab, dtype=torch.float32) for lab in labels]).to(device)
        mask[rows, cols] = True
        return student, teacher, mask

    def get_config_dict(self) -> dict:
        return {"mini_batch_size": self.mini_batch_size}
