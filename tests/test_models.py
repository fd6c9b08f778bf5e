"""Model loading: checkpoints saved in reduced precision still give fp32 master weights."""

from __future__ import annotations

import torch
from transformers import BertForSequenceClassification

from conftest import make_bi_encoder, make_cross_encoder
from pipeline.models import cut_student, load_bi_encoder, load_cross_encoder


def test_half_precision_checkpoints_load_as_fp32(tmp_path):
    ce_dir = make_cross_encoder(tmp_path / "ce")
    BertForSequenceClassification.from_pretrained(ce_dir).half().save_pretrained(ce_dir)
    bi_dir = make_bi_encoder(tmp_path / "bi")
    bi = load_bi_encoder(str(bi_dir))
    bi.half().save(str(bi_dir))
    assert next(BertForSequenceClassification.from_pretrained(ce_dir).parameters()).dtype == torch.float16

    for model in (load_cross_encoder(str(ce_dir), num_labels=1), cut_student(str(ce_dir), 1), load_bi_encoder(str(bi_dir))):
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_student_cut_from_a_sentence_embedding_model_scores_from_the_token_mean(tiny_models, tmp_path):
    import numpy as np
    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.scoring import CrossEncoderScorer

    student = cut_student(tiny_models["embedder"], 1, "cpu", 64)
    assert [type(m).__name__ for m in student] == ["Transformer", "Pooling", "Dense"]
    assert student.model.config.num_hidden_layers == 1 and student.num_labels == 1
    assert type(cut_student(tiny_models["embedder"], 1, "cpu", 64, head="cls").model).__name__ == "BertForSequenceClassification"
    assert [type(m).__name__ for m in cut_student(tiny_models["student"], 1, "cpu", 64)] == ["Transformer"]

    student.save_pretrained(str(tmp_path / "s"))
    loaded = CrossEncoder(str(tmp_path / "s"), device="cpu")
    pairs = [("a query", "a passage about it"), ("another query", "text"), ("q", "a much longer passage " * 5)]
    predicted = loaded.predict(pairs, activation_fn=torch.nn.Identity())
    ours = CrossEncoderScorer(loaded, "cpu", torch.float32).score(pairs)
    np.testing.assert_allclose(ours, predicted, atol=1e-5)
    assert np.ptp(ours) > 0
