"""ListwiseKLDivLoss: the teacher's softmax over each query's documents, distilled into the student's."""

from __future__ import annotations

import torch
from torch import Tensor

from losses.listwise import ListwiseDistillationLoss


class ListwiseKLDivLoss(ListwiseDistillationLoss):
    def __init__(self, model, temperature: float = 1.0, mini_batch_size: int | None = None) -> None:
        """
        KL divergence between the teacher's and the student's softmax distributions over each
        query's documents, at a temperature, multiplied by temperature² (Hinton et al., 2015) so
        that gradients keep their size as the temperature changes. The student learns the
        teacher's whole ranking of the list, not only which document is first.

        Args:
            model: the student CrossEncoder (one output label).
            temperature: softens both distributions; > 0. Higher values weigh the lower ranks more.
            mini_batch_size: pairs per forward pass (None: every pair of the batch at once).

        References:
            - Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network (2015):
              https://arxiv.org/abs/1503.02531

        Requirements:
            1. A model with ``num_labels = 1``.
            2. Teacher scores for every document of a query's list.

        Inputs:
            +----------------------------------+--------------------------------------+-------------------------------+
            | Texts                            | Labels                               | Number of Model Output Labels |
            +==================================+======================================+===============================+
            | (query, [doc1, doc2, ..., docN]) | [score1, score2, ..., scoreN]        | 1                             |
            |                                  | (teacher scores; lists may differ in |                               |
            |                                  | length)                              |                               |
            +----------------------------------+--------------------------------------+-------------------------------+

        Relations:
            - :class:`~sentence_transformers.cross_encoder.losses.ListNetLoss` is this loss at
              temperature 1 without the teacher's entropy term (the same gradients).

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer

                from losses.listwise_kl_div import ListwiseKLDivLoss

                student = CrossEncoder("microsoft/MiniLM-L12-H384-uncased", num_labels=1)
                train_dataset = Dataset.from_dict({
                    "query": ["what is the capital of France?"],
                    "docs": [["Paris is the capital of France.", "Berlin is in Germany.", "France is in Europe."]],
                    "labels": [[9.1, -4.0, 2.3]],
                })
                loss = ListwiseKLDivLoss(student, temperature=2.0)
                CrossEncoderTrainer(model=student, train_dataset=train_dataset, loss=loss).train()
        """
        super().__init__(model, mini_batch_size)
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = temperature

    def forward(self, inputs: list, labels: list[Tensor], prompt: str | None = None, task: str | None = None) -> Tensor:
        student, teacher, mask = self.score_lists(inputs, labels, prompt, task)
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
