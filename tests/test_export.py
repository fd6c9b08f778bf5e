"""ONNX export: the whole student (the cosine head included) as one graph whose scores match the
PyTorch model's on pairs and batch shapes other than the ones it was traced with."""

from __future__ import annotations

import json

import luigi
import numpy as np
import pytest
import torch

import tasks
from conftest import dag_params
from pipeline.data import read_dataset
from pipeline.errors import PipelineError
from pipeline.export import OnnxCrossEncoder, export_onnx
from pipeline.models import load_cross_encoder


def _pairs(dataset, n: int = 24) -> list[tuple[str, str]]:
    ds = read_dataset(dataset)
    queries, passages = list(ds.queries.values()), [f"{t} {x}" for t, x in ds.corpus.values()]
    return [(queries[i % len(queries)], passages[(7 * i) % len(passages)]) for i in range(n)]


def _torch_scores(folder: str, pairs, max_length: int) -> np.ndarray:
    model = load_cross_encoder(folder, "cpu", max_length)
    return np.asarray(model.predict(pairs, batch_size=5, activation_fn=torch.nn.Identity(), show_progress_bar=False))


def test_a_standard_cross_encoder_exports_and_scores_as_in_pytorch(tiny_models, small_beir, tmp_path):
    out = tmp_path / "onnx"
    manifest = export_onnx(tiny_models["teacher"], out, max_length=64)
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    pairs = _pairs(small_beir)
    got = OnnxCrossEncoder(out).predict(pairs, batch_size=7)
    np.testing.assert_allclose(got, _torch_scores(tiny_models["teacher"], pairs, 64), rtol=0, atol=1e-4)


def test_export_onnx_task_exports_the_demo_style_student(small_beir, tiny_models, tmp_path):
    """The student cut from a sentence-embedding model (cosine head) is exported by luigi's
    ExportOnnx next to the FitStudent it requires."""
    # The cosine head as published with --plain-student false (by default PlainStudent's modules are).
    params = dag_params(small_beir, tiny_models, tmp_path / "run", tasks.ExportOnnx, student=tiny_models["embedder"], plain_student=False)
    task = tasks.ExportOnnx(**params)
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    student = task.requires().output().path
    assert json.loads((task.artifact() / "onnx.json").read_text())["source"] == student
    modules = json.loads((task.requires().artifact() / "modules.json").read_text())
    assert modules[-1]["type"].endswith("SegmentCosine")  # the head the exporter had to include
    pairs = _pairs(small_beir)
    got = OnnxCrossEncoder(task.output().path).predict(pairs, batch_size=3)
    expected = _torch_scores(student, pairs, 64)
    assert np.std(expected) > 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_a_folder_without_a_graph_is_named(tmp_path):
    with pytest.raises(PipelineError, match=str(tmp_path)):
        OnnxCrossEncoder(tmp_path)
