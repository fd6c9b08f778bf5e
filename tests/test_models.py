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
