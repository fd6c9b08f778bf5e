"""Student scoring heads that sentence-transformers lacks.

``SegmentCosine`` scores a jointly encoded (query, passage) pair by the cosine between the mean
of its query tokens and the mean of its passage tokens. On a student cut from a sentence-embedding
model this starts training where the embedder's own similarity is, instead of from a random
linear head; every layer still attends across the two texts, so it is a cross-encoder.

This file depends on torch and sentence-transformers only: ``self_contained`` copies it into a
saved model, so ``CrossEncoder(path, trust_remote_code=True)`` loads the model without this
package installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from sentence_transformers.base.modules import Module
from torch import nn


class SegmentCosine(Module):
    """``scale * cos(mean(query tokens), mean(passage tokens)) + bias`` as the pair's score.

    The passage segment starts after the first ``separator_id`` token, which holds for BERT
    ([CLS] q [SEP] p [SEP]) and RoBERTa/XLM-R (<s> q </s></s> p </s>) alike, so no
    ``token_type_ids`` are needed.
    """

    config_keys = ["separator_id", "initial_scale"]

    def __init__(self, separator_id: int, initial_scale: float = 1.0):
        super().__init__()
        self.separator_id = int(separator_id)
        self.initial_scale = float(initial_scale)
        self.scale = nn.Parameter(torch.tensor(self.initial_scale))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def forward(self, features: dict, **kwargs) -> dict:
        # Pooled in fp32 whatever the encoder ran in: bf16 sums over hundreds of tokens lose digits.
        tokens = features["token_embeddings"].float()
        mask = features["attention_mask"].float()
        is_sep = (features["input_ids"] == self.separator_id).int()
        # Tokens after the first separator are the passage; that separator closes the query.
        passage = ((is_sep.cumsum(dim=1) - is_sep) > 0).float()
        q_mask = (mask * (1 - passage)).unsqueeze(-1)
        p_mask = (mask * passage).unsqueeze(-1)
        q = (tokens * q_mask).sum(1) / q_mask.sum(1).clamp(min=1)
        p = (tokens * p_mask).sum(1) / p_mask.sum(1).clamp(min=1)
        cosine = nn.functional.cosine_similarity(q, p, dim=-1)
        features["scores"] = (self.scale * cosine + self.bias).unsqueeze(-1)
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs):
        hub = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        config = cls.load_config(model_name_or_path=model_name_or_path, subfolder=subfolder, **hub)
        model = cls(**config)
        return cls.load_torch_weights(model_name_or_path=model_name_or_path, subfolder=subfolder, model=model, **hub)


# The name the head's code has inside a saved model folder, and its reference in modules.json.
CODE_FILE = "segment_cosine.py"
CLASS_REF = "segment_cosine.SegmentCosine"
# Every reference a saved model may use for this class: the folder's copy, or this module (the
# trainer's checkpoints, which are not made self-contained).
CLASS_REFS = (CLASS_REF, f"{__name__}.SegmentCosine")


def self_contained(folder: str | Path) -> bool:
    """Copy this file into a saved model that has a ``SegmentCosine`` head and point its
    modules.json at the copy; True if the model has one."""
    modules_file = Path(folder) / "modules.json"
    if not modules_file.is_file():
        return False
    modules = json.loads(modules_file.read_text())
    ours = [m for m in modules if m.get("type") in CLASS_REFS]
    if not ours:
        return False
    for m in ours:
        m["type"] = CLASS_REF
    shutil.copyfile(__file__, Path(folder) / CODE_FILE)
    modules_file.write_text(json.dumps(modules, indent=2))
    return True
