"""PearsonCorrelationLoss: 1 − the Pearson correlation of student and teacher scores per query."""

from __future__ import annotations

from torch import Tensor

from losses.listwise import ListwiseDistillationLoss


class PearsonCorrelationLoss(ListwiseDistillationLoss):
    def __init__(self, model, eps: float = 1e-8, mini_batch_size: int | None = None) -> None:
        """
        1 − Pearson correlation between the student's and the teacher's scores within each
        query's list, averaged over queries. The correlation ignores the teacher's scale and
        offset, so teachers on any scale (logits, cosines, z-normalised ensembles) can be used
        unchanged, and the student keeps its own score range.

        Args:
            model: the student CrossEncoder (one output label).
            eps: guards the division for lists whose scores are all equal.
            mini_batch_size: pairs per forward pass (None: every pair of the batch at once).

        References:
            - Huang et al. Knowledge Distillation from A Stronger Teacher (NeurIPS 2022):
              https://arxiv.org/abs/2205.10536

        Requirements:
            1. A model with ``num_labels = 1``.
            2. At least two documents per query (a correlation needs two points).

        Inputs:
            +----------------------------------+--------------------------------------+-------------------------------+
            | Texts                            | Labels                               | Number of Model Output Labels |
            +==================================+======================================+===============================+
            | (query, [doc1, doc2, ..., docN]) | [score1, score2, ..., scoreN]        | 1                             |
            |                                  | (teacher scores, any scale)          |                               |
            +----------------------------------+--------------------------------------+-------------------------------+

        Relations:
            - :class:`~losses.listwise_kl_div.ListwiseKLDivLoss` matches the teacher's
              distribution, and so its scale; this loss matches only the order and spacing.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer

                from losses.pearson_correlation import PearsonCorrelationLoss

                student = CrossEncoder("microsoft/MiniLM-L12-H384-uncased", num_labels=1)
                train_dataset = Dataset.from_dict({
                    "query": ["what is the capital of France?"],
                    "docs": [["Paris is the capital of France.", "Berlin is in Germany.", "France is in Europe."]],
                    "labels": [[0.93, 0.12, 0.55]],
                })
                loss = PearsonCorrelationLoss(student)
                CrossEncoderTrainer(model=student, train_dataset=train_dataset, loss=loss).train()
        """
        super().__init__(model, mini_batch_size)
        self.eps = eps

    def forward(self, inputs: list, labels: list[Tensor], prompt: str | None = None, task: str | None = None) -> Tensor:
        student, teacher, mask = self.score_lists(inputs, labels, prompt, task)
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
