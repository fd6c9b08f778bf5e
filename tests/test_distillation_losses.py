"""The listwise distillation losses against values worked out by hand on small lists."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from losses.listwise_kl_div import ListwiseKLDivLoss
from losses.pearson_correlation import PearsonCorrelationLoss


class FakeStudent(nn.Module):
    """Scores a pair with the number written in its document, so expected losses are easy to derive."""

    num_labels = 1
    device = torch.device("cpu")

    def preprocess(self, pairs, prompt=None, task=None):
        return {"scores": torch.tensor([float(d) for _, d in pairs])}

    def forward(self, features):
        return {"scores": features["scores"].view(-1, 1)}


def batch(student_lists, teacher_lists):
    inputs = [[f"q{i}" for i in range(len(student_lists))], [[str(s) for s in lst] for lst in student_lists]]
    return inputs, [torch.tensor(t) for t in teacher_lists]


def kl_by_hand(student, teacher, t):
    zs = sum(math.exp(s / t) for s in student)
    zt = sum(math.exp(x / t) for x in teacher)
    return sum(
        (math.exp(x / t) / zt) * (math.log(math.exp(x / t) / zt) - math.log(math.exp(s / t) / zs))
        for s, x in zip(student, teacher)
    ) * t * t


def test_kl_uniform_teacher_two_docs():
    # p_teacher = [1/2, 1/2], log p_student = [1 - log(1+e), -log(1+e)]
    expected = 0.5 * (math.log(0.5) - (1 - math.log(1 + math.e))) + 0.5 * (math.log(0.5) + math.log(1 + math.e))
    loss = ListwiseKLDivLoss(FakeStudent())(*batch([[1.0, 0.0]], [[0.0, 0.0]]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.120114, abs=1e-6)


def test_kl_temperature_and_padding():
    student = [[1.0, 0.0, 2.0], [0.5, -1.0]]
    teacher = [[3.0, 1.0, 0.0], [2.0, 2.5]]
    loss = ListwiseKLDivLoss(FakeStudent(), temperature=2.0)(*batch(student, teacher))
    expected = (kl_by_hand(student[0], teacher[0], 2.0) + kl_by_hand(student[1], teacher[1], 2.0)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_kl_is_zero_when_student_matches_teacher_up_to_a_shift():
    loss = ListwiseKLDivLoss(FakeStudent())(*batch([[1.0, 2.0, 4.0]], [[11.0, 12.0, 14.0]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_pearson_perfect_inverse_and_by_hand():
    p = PearsonCorrelationLoss(FakeStudent())
    assert p(*batch([[1.0, 2.0, 3.0]], [[2.0, 4.0, 6.0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert p(*batch([[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]])).item() == pytest.approx(2.0, abs=1e-6)
    # student [1,2,4] (mean 7/3, deviations -4/3 -1/3 5/3), teacher [1,2,3] (deviations -1 0 1):
    # covariance sum 4/3 + 0 + 5/3 = 3, squares 42/9 and 2, so r = 3 / sqrt(14/3 * 2)
    r = 3 / math.sqrt(14 / 3 * 2)
    both = p(*batch([[1.0, 2.0, 4.0], [1.0, 2.0]], [[1.0, 2.0, 3.0], [2.0, 1.0]])).item()
    assert both == pytest.approx(((1 - r) + 2.0) / 2, abs=1e-6)


def test_configs_and_citations():
    kl = ListwiseKLDivLoss(FakeStudent(), temperature=3.0, mini_batch_size=8)
    assert kl.get_config_dict() == {"temperature": 3.0, "mini_batch_size": 8}
    assert "hinton2015distilling" in kl.citation
    assert "eps" in PearsonCorrelationLoss(FakeStudent()).get_config_dict()
    with pytest.raises(ValueError, match="temperature"):
        ListwiseKLDivLoss(FakeStudent(), temperature=0)


def test_packed_margin_mse_equals_margin_mse_in_value_and_gradients(tiny_models):
    """Same loss and gradients as sentence-transformers' MarginMSELoss, from length-sorted sub-batches."""
    from sentence_transformers.cross_encoder.losses import MarginMSELoss

    from losses.packed_margin_mse import PackedMarginMSELoss
    from pipeline.models import load_cross_encoder

    model = load_cross_encoder(tiny_models["student"], "cpu", 64)
    model.eval()  # no dropout: both losses must see the same network
    queries = ["short", "a longer query about xml parsing", "q"]
    inputs = [queries, ["a doc", "x " * 40, "mid length text here"], ["y " * 30, "z", "w w"], ["n", "m " * 5, "k " * 50]]
    margins = torch.tensor([[1.0, -0.5], [2.0, 0.3], [0.0, 1.5]])
    scores = torch.tensor([[3.0, 2.0, 3.5], [1.0, -1.0, 0.7], [0.2, 0.2, -1.3]])  # positive first, as MarginMSELoss reads them
    packed = PackedMarginMSELoss(model, pairs_per_forward=2)
    for labels in (margins, scores, list(scores)):
        results = []
        for loss in (MarginMSELoss(model), packed):
            model.zero_grad()
            value = loss(inputs, labels)
            value.backward()
            grad = model.model.classifier.weight.grad.clone()
            results.append((value.item(), grad))
        assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="does not match the expected"):
        packed(inputs, torch.zeros(3, 5))
    assert PackedMarginMSELoss(model, pairs_per_forward=4).get_config_dict()["pairs_per_forward"] == 4
    assert "logits_from_pairs" not in packed.__dict__  # the per-call override is gone after forward
