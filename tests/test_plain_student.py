"""PlainStudent: the teacher's ranking taught to a student of sentence-transformers' own modules
on the cosine-head student's encoder, which plain CrossEncoder(path) loads with no flag."""

from __future__ import annotations

import json

import luigi
import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

import tasks
from pipeline.errors import PipelineError
from tests.conftest import dag_params


def test_the_plain_student_loads_without_flags_and_orders_the_training_lists_as_the_teacher(small_beir, tiny_models, tmp_path):
    from sentence_transformers.cross_encoder import CrossEncoder

    # 40 queries' lists of 4 drawn from their top 10, 14 steps a pass: a minimum of 90 steps
    # draws 230 lists more; a query's second list takes candidates its first had not, later ones
    # are new draws.
    params = dag_params(small_beir, tiny_models, tmp_path, tasks.PlainStudent, student=tiny_models["embedder"], student_head="cosine",
                        teacher=f"bi:{tiny_models['embedder']}", plain_min_steps=90, plain_list_size=4)
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
    assert stats["loss"] == "ListNetLoss" and stats["queries"] == len(groups) == 40
    assert stats["lists"] == 90 * task.config.batch_size and stats["pairs"] == stats["lists"] * 4
    assert stats["steps"] == task.config.min_steps == 90 and stats["epochs"] == 1.0
    assert "dev_ndcg@10" in stats["dev"] and "dev_ndcg@10" in stats["dev_cosine_student"]

    assert stats["taught_by"] == task.config.teacher and stats["target_scale"] > 0
    # Both scoring calls (the first round's lists, the new ones) counted together. Part of the
    # pairs come from the run's score cache: the teacher scored the mined groups before, and a
    # query's later lists repeat candidates of its first (about 7 lists of 4 from 10).
    scoring = stats["teacher_scoring"]
    assert scoring["pairs"] == scoring["pairs_scored"] + scoring["pairs_from_cache"] == stats["pairs"]
    assert scoring["pairs_from_cache"] > 0
    assert scoring["pairs_per_second"] == pytest.approx(scoring["pairs"] / scoring["seconds"], abs=0.006)
    # Trained, and saved, without dropout on the attention probabilities; the student it started
    # from keeps its backbone's.
    started = json.loads((task.clone(tasks.FitStudent).artifact() / "config.json").read_text())
    assert started["attention_probs_dropout_prob"] == 0.1
    assert json.loads((folder / "config.json").read_text())["attention_probs_dropout_prob"] == task.config.attention_dropout == 0.0
    assert stats["attention_dropout"] == 0.0

    # It ranks the training queries' candidates as the teacher does: above chance over all lists
    # (0 ± 0.05 for 40 lists of 10). The teacher is the tiny bi-encoder, whose mean-pooled random
    # token vectors rank by what a query and a passage share (0.22 to 0.32 over twelve of Python's
    # hash seeds; after 30 steps, 0.10 to 0.24); a tiny random cross-encoder scores every pair alike
    # (within 3e-5 in fp32), so its order, and this figure, were set by how the pairs were batched
    # (0.001 to 0.48).
    from pipeline.data import pair_texts
    from pipeline.scoring import TeacherSpec, load_teacher

    data = task.clone(tasks.PrepareData).artifact()
    teacher = load_teacher(TeacherSpec.parse(task.config.teacher), "cpu", "fp32", task.config.teacher_max_length)
    agree = []
    for q, docs in zip(cand["query_id"], cand["doc_ids"]):
        pairs = pair_texts(data, [q] * len(docs), docs)
        agree.append(spearmanr(plain.predict(pairs), teacher.score(pairs, [q] * len(docs), show_progress=False)).statistic)
    assert np.mean(agree) > 0.12


def test_the_teachers_scores_are_put_on_the_students_spread_within_lists():
    from pipeline.plain_student import list_spread, teacher_targets

    rng = np.random.default_rng(0)
    sizes = np.array([10, 10, 5, 8])
    student = rng.normal(0, 0.5, sizes[:2].sum())  # the student scored the first two lists
    teacher = rng.normal(3, 7, sizes.sum())
    targets, scale = teacher_targets(teacher, student, sizes[:2])
    assert list_spread(targets[:20], sizes[:2]) == pytest.approx(list_spread(student, sizes[:2]), rel=1e-5)
    assert targets == pytest.approx(teacher * scale, rel=1e-5)  # one factor: every list keeps its order and relative spread
    assert list_spread(np.array([1.0, 3.0, 0.0, 0.0, 4.0]), np.array([2, 3])) == pytest.approx(np.mean([1.0, np.std([0, 0, 4.0])]))


def test_a_student_with_sentence_transformers_own_head_is_not_converted(small_beir, tiny_models, tmp_path):
    from pipeline.plain_student import PlainStudentConfig, plain_student

    task = tasks.PlainStudent(**dag_params(small_beir, tiny_models, tmp_path, tasks.PlainStudent))
    fit = task.clone(tasks.FitStudent)
    assert luigi.build([fit], local_scheduler=True, workers=1, log_level="WARNING")
    with pytest.raises(PipelineError, match="loads it as it is"):
        plain_student(fit.input()["data"].path, fit.input()["mined"].path, fit.artifact(), tmp_path / "plain", PlainStudentConfig(max_length=64))


def test_few_lists_train_more_epochs_up_to_the_minimum_steps():
    from pipeline.plain_student import training_epochs

    assert training_epochs(2544, 3, 1.0, 800) == 1.0  # 848 steps in one epoch
    assert training_epochs(1322, 3, 1.0, 800) == pytest.approx(800 / 441)
    assert training_epochs(1322, 3, 2.0, 800) == 2.0
    assert training_epochs(1322, 3, 1.0, 0) == 1.0
    assert training_epochs(0, 3, 1.0, 800) == 1.0


def test_drawn_lists_keep_a_random_part_of_each_list_in_its_order():
    import pyarrow as pa

    from pipeline.plain_student import ListDraws

    lists = [[f"d{i}" for i in range(20)], ["a", "b", "c"]]
    cand = pa.table({"query_id": ["q1", "q2"], "doc_ids": lists})
    drawn = ListDraws(cand, 10, seed=1).take(2)["doc_ids"].to_pylist()
    assert len(drawn[0]) == 10 and drawn[0] == [d for d in lists[0] if d in drawn[0]]  # a subsequence
    assert drawn[1] == lists[1]  # a list no longer than the size stays whole
    assert ListDraws(cand, 10, seed=2).take(2)["doc_ids"].to_pylist()[0] != drawn[0]
    assert ListDraws(cand, 0, seed=1).take(2)["doc_ids"].to_pylist() == lists and not ListDraws(cand, 0, seed=1).renewable


def test_later_draws_take_the_candidates_earlier_lists_left_out():
    import pyarrow as pa

    from pipeline.plain_student import ListDraws

    lists = [[f"a{i}" for i in range(20)], [f"b{i}" for i in range(15)], ["c0", "c1"]]
    cand = pa.table({"query_id": ["qa", "qb", "qc"], "doc_ids": lists, "scores": [[0.5] * len(d) for d in lists]})
    draws = ListDraws(cand, 10, seed=3)
    assert draws.renewable
    first = draws.take(3)
    # The first round is the same however many rounds follow it.
    assert first.to_pylist() == ListDraws(cand, 10, seed=3).take(10).slice(0, 3).to_pylist()
    later = draws.take(7)  # two whole rounds, then one list of a query drawn at random
    assert later["query_id"].to_pylist()[:6] == ["qa", "qb", "qc"] * 2 and later["scores"].to_pylist()[0] == [0.5] * 20
    a = [first["doc_ids"][0].as_py()] + [d for q, d in zip(later["query_id"].to_pylist(), later["doc_ids"].to_pylist()) if q == "qa"]
    assert sorted(a[0] + a[1]) == sorted(lists[0])  # a query's second list is the 10 its first left out
    assert len(set(a[2])) == 10 and a[2] == [d for d in lists[0] if d in a[2]]  # then a new draw, in order
    b = [first["doc_ids"][1].as_py()] + [d for q, d in zip(later["query_id"].to_pylist(), later["doc_ids"].to_pylist()) if q == "qb"]
    assert set(lists[1]) - set(b[0]) <= set(b[1])  # the 5 left out come first, then 5 of the others
    assert set(b[1]) | set(b[2]) == set(lists[1])  # and the third list the 10 those 5 left
    assert all(d == lists[2] for q, d in zip(later["query_id"].to_pylist(), later["doc_ids"].to_pylist()) if q == "qc")


def test_train_student_publishes_the_plain_student_and_keeps_the_cosine_head_row(small_beir, tiny_models, tmp_path):
    from sentence_transformers.cross_encoder import CrossEncoder

    params = dag_params(small_beir, tiny_models, tmp_path, tasks.TrainStudent, student=tiny_models["embedder"], student_head="cosine",
                        plain_min_steps=0)
    task = tasks.TrainStudent(**params)
    assert luigi.build([task], local_scheduler=True, workers=1, log_level="WARNING")
    published = (tmp_path / "student").resolve()
    assert published == task.clone(tasks.PlainStudent).artifact().resolve()
    assert CrossEncoder(str(tmp_path / "student")).predict([("q", "d")]).shape == (1,)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"student", "student_cosine"} <= set(metrics["test"]) and "student vs student_cosine" in metrics["significance"]
    assert metrics["stages"]["PlainStudent"]["loss"] == "ListNetLoss"
    report = (tmp_path / "report.md").read_text()
    assert "against the cosine-head student whose encoder it started from" in report
    # The trade-off of the published format, on the dev queries the stage checked.
    dev = metrics["stages"]["PlainStudent"]["dev"]["dev_ndcg@10"]
    assert "## The published student's modules" in report and f"| published student | {dev:.4f} (" in report

    # Asked not to, the run publishes the cosine-head student itself, as trained.
    cosine = tasks.TrainStudent(**{**params, "plain_student": False})
    assert luigi.build([cosine], local_scheduler=True, workers=1, log_level="WARNING")
    assert (tmp_path / "student").resolve() == task.clone(tasks.FitStudent).artifact().resolve()
    assert "student_cosine" not in json.loads((tmp_path / "metrics.json").read_text())["test"]


def test_attention_dropout_is_set_under_either_name_a_config_gives_it():
    from transformers import BertConfig, BertModel, DistilBertConfig, T5Config

    from pipeline.models import set_attention_dropout

    bert = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    assert set_attention_dropout(bert, 0.0) == "attention_probs_dropout_prob"
    model = BertModel(bert).train()
    assert model.encoder.layer[0].attention.self.dropout.p == 0.0
    assert model.encoder.layer[0].attention.output.dropout.p == bert.hidden_dropout_prob == 0.1  # the rest is kept

    distil = DistilBertConfig()
    assert set_attention_dropout(distil, 0.05) == "attention_dropout" and distil.attention_dropout == 0.05
    with pytest.raises(PipelineError, match="T5Config has no attention dropout setting"):
        set_attention_dropout(T5Config(), 0.0)
