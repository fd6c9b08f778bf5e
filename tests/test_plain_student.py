"""PlainStudent: the cosine-head student's ranking taught to a student of sentence-transformers'
own modules, which plain CrossEncoder(path) loads with no flag."""

from __future__ import annotations

import json

import luigi
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import spearmanr

import tasks
from pipeline.errors import PipelineError
from tests.conftest import dag_params


def test_the_plain_student_loads_without_flags_and_orders_the_training_lists_as_its_teacher(small_beir, tiny_models, tmp_path):
    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.models import load_cross_encoder

    params = dag_params(small_beir, tiny_models, tmp_path, tasks.PlainStudent, student=tiny_models["embedder"], student_head="cosine")
    task = tasks.PlainStudent(**params)
    assert luigi.build([task], local_scheduler=True, workers=1, log_level="WARNING")
    folder = task.artifact()
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense"]
    assert all(m["type"].startswith("sentence_transformers.") for m in modules) and not list(folder.glob("*.py"))
    plain = CrossEncoder(str(folder))  # no trust_remote_code

    # Every training query's true top-k, as mined, and the lists the student learnt to order.
    mined = task.clone(tasks.MineHardNegatives).artifact()
    cand = pq.read_table(mined / "candidates-train.parquet").to_pydict()
    groups = pq.read_table(mined / "groups.parquet").column("query_id").to_pylist()
    assert sorted(cand["query_id"]) == sorted(groups)
    assert all(len(d) == params["rerank_top_k"] for d in cand["doc_ids"])
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["loss"] == "ListNetLoss" and stats["lists"] == len(groups) and stats["pairs"] == len(groups) * params["rerank_top_k"]
    assert "dev_ndcg@10" in stats["dev"] and "dev_ndcg@10" in stats["dev_cosine_student"]

    # It ranks the training queries' candidates as the cosine-head student does (its raw scores):
    # far above chance over all lists (about 0 ± 0.05 for 40 lists of 10), on tiny random models.
    from pipeline.data import pair_texts

    data = task.clone(tasks.PrepareData).artifact()
    taught = load_cross_encoder(str(task.clone(tasks.FitStudent).artifact()), "cpu", 64)
    agree = []
    for q, docs in zip(cand["query_id"], cand["doc_ids"]):
        pairs = pair_texts(data, [q] * len(docs), docs)
        want = taught.predict(pairs, activation_fn=torch.nn.Identity())
        agree.append(spearmanr(plain.predict(pairs), want).statistic)
    assert np.mean(agree) > 0.25


def test_a_student_with_sentence_transformers_own_head_is_not_converted(small_beir, tiny_models, tmp_path):
    from pipeline.plain_student import PlainStudentConfig, plain_student

    task = tasks.PlainStudent(**dag_params(small_beir, tiny_models, tmp_path, tasks.PlainStudent))
    fit = task.clone(tasks.FitStudent)
    assert luigi.build([fit], local_scheduler=True, workers=1, log_level="WARNING")
    with pytest.raises(PipelineError, match="loads it as it is"):
        plain_student(fit.input()["data"].path, fit.input()["mined"].path, fit.artifact(), tmp_path / "plain", PlainStudentConfig(max_length=64))
