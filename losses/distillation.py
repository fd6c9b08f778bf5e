"""Listwise distillation losses that sentence-transformers lacks, in its loss style.

Both take (query, [doc_1..doc_n]) rows with the teacher's scores as labels (the ``list`` format),
score every pair with the student in one pass, and compare each query's list as a whole:

- :class:`ListwiseKLDivLoss`: KL(teacher softmax || student softmax) at a temperature, scaled by
  T² (Hinton et al., 2015); the listwise distillation loss of RankDistiLLM/Lightning IR-style work.
- :class:`PearsonCorrelationLoss`: 1 − Pearson correlation between student and teacher scores
  per query. It ignores the teacher's scale and offset, so teachers on any scale (logits,
  cosines, ensembles) can be used unchanged.
"""

from __future__ import annotations

import torch
from sentence_transformers.util import batch_to_device
from torch import Tensor, nn


class _ListwiseDistillation(nn.Module):
    data_format = "list"
    num_labels = 1
    needs_teacher = True

    def __init__(self, model, mini_batch_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.mini_batch_size = mini_batch_size
        if model.num_labels != 1:
            raise ValueError(f"{type(self).__name__} needs a model with 1 output label, got {model.num_labels}")

    def student_and_teacher(self, inputs, labels, prompt=None, task=None) -> tuple[Tensor, Tensor, Tensor]:
        """(student scores, teacher scores, mask) as (queries, max_docs) matrices."""
        if isinstance(labels, Tensor):
            raise ValueError(f"{type(self).__name__} expects one list of teacher scores per query")
        queries, docs_list = inputs
        sizes = [len(d) for d in docs_list]
        if sizes != [len(l) for l in labels]:
            raise ValueError(f"documents per query {sizes} do not match labels per query {[len(l) for l in labels]}")
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
        teacher[rows, cols] = torch.cat([torch.as_tensor(l, dtype=torch.float32) for l in labels]).to(device)
        mask[rows, cols] = True
        return student, teacher, mask

    def get_config_dict(self) -> dict:
        return {"mini_batch_size": self.mini_batch_size}


class ListwiseKLDivLoss(_ListwiseDistillation):
    """KL divergence between the teacher's and the student's softmax over each query's documents.

    Args:
        model: the student CrossEncoder (one output).
        temperature: softens both distributions; the loss is multiplied by temperature² so
            gradients keep their size as the temperature changes.
        mini_batch_size: pairs per forward pass (None: all at once).
    """

    def __init__(self, model, temperature: float = 1.0, mini_batch_size: int | None = None) -> None:
        super().__init__(model, mini_batch_size)
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = temperature

    def forward(self, inputs: list, labels: list[Tensor], prompt: str | None = None, task: str | None = None) -> Tensor:
        student, teacher, mask = self.student_and_teacher(inputs, labels, prompt, task)
        t = self.temperature
        neg = torch.finfo(student.dtype).min
        log_p_student = torch.log_softmax(student.masked_fill(~mask, neg) / t, dim=1)
        log_p_teacher = torch.log_softmax(teacher.masked_fill(~mask, neg) / t, dim=1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).masked_fill(~mask, 0.0).sum(dim=1)
        return kl.mean() * t * t

    def get_config_dict(self) -> dict:
        return {"temperature": self.temperature, **super().get_config_dict()}

    @property
    def citation(self) -> str:
        return """
@misc{hinton2015distilling,
    title={Distilling the Knowledge in a Neural Network},
    author={Geoffrey Hinton and Oriol Vinyals and Jeff Dean},
    year={2015},
    eprint={1503.02531},
    archivePrefix={arXiv},
    primaryClass={stat.ML}
}
"""


class PearsonCorrelationLoss(_ListwiseDistillation):
    """1 − Pearson correlation of student and teacher scores within each query, averaged.

    Args:
        model: the student CrossEncoder (one output).
        eps: guards the division for lists whose scores are all equal.
        mini_batch_size: pairs per forward pass (None: all at once).
    """

    def __init__(self, model, eps: float = 1e-8, mini_batch_size: int | None = None) -> None:
        super().__init__(model, mini_batch_size)
        self.eps = eps

    def forward(self, inputs: list, labels: list[Tensor], prompt: str | None = None, task: str | None = None) -> Tensor:
        student, teacher, mask = self.student_and_teacher(inputs, labels, prompt, task)
        m = mask.float()
        n = m.sum(dim=1)
        s = student - (student * m).sum(1, keepdim=True) / n[:, None]
        t = teacher - (teacher * m).sum(1, keepdim=True) / n[:, None]
        s, t = s * m, t * m
        r = (s * t).sum(1) / (s.pow(2).sum(1).sqrt() * t.pow(2).sum(1).sqrt() + self.eps)
        return (1.0 - r).mean()

    def get_config_dict(self) -> dict:
        return {"eps": self.eps, **super().get_config_dict()}

    @property
    def citation(self) -> str:
        return """
@inproceedings{huang2022knowledge,
    title={Knowledge Distillation from A Stronger Teacher},
    author={Tao Huang and Shan You and Fei Wang and Chen Qian and Chang Xu},
    booktitle={Advances in Neural Information Processing Systems},
    year={2022}
}
"""
