"""The student's depth measured against the teacher (--student-speedup): the rule, and every
student and row of a run cut to the depth the timing chose."""

from __future__ import annotations

import json
import logging

import luigi
import numpy as np
import pytest

import tasks
from pipeline.depth import deepest_within, speedup_bound
from pipeline.errors import PipelineError
from pipeline.models import load_cross_encoder
from tests.conftest import dag_params


def test_the_deepest_cut_that_keeps_the_speedup_wins_and_the_shallowest_stands_in_when_none_does(caplog):
    at_least = {1: 8.0, 2: 4.1, 3: 2.9, 4: 2.2}
    assert deepest_within(at_least, speedup=4.0) == 2
    assert deepest_within(at_least, speedup=2.9) == 3
    assert deepest_within(at_least, speedup=2.0) == 4
    with caplog.at_level(logging.WARNING, logger="pipeline.depth"):
        assert deepest_within(at_least, speedup=10.0) == 1
    assert "no student depth up to 4 layers is surely 10.0 times" in caplog.text


def test_a_cut_whose_mean_speedup_clears_the_threshold_by_less_than_its_turns_vary_is_not_taken():
    teacher = [3.0, 3.3, 2.7, 3.0, 3.6, 2.4, 3.0, 3.0]
    steady = [1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 1.0]  # 3 times as fast in every turn
    assert speedup_bound(teacher, steady, 0.95) == pytest.approx(3.0)
    # 3.1 times on average, but between 2.5 and 3.8 times turn by turn.
    noisy = [t / r for t, r in zip(teacher, [2.5, 3.8, 2.6, 3.6, 2.9, 3.3, 2.7, 3.4])]
    mean_ratio = float(np.exp(np.mean(np.log(np.divide(teacher, noisy)))))
    assert mean_ratio > 3.0 > speedup_bound(teacher, noisy, 0.95)
    # More confidence asks for more; half confidence is the mean itself.
    assert speedup_bound(teacher, noisy, 0.99) < speedup_bound(teacher, noisy, 0.95) < speedup_bound(teacher, noisy, 0.5)
    assert speedup_bound(teacher, noisy, 0.5) == pytest.approx(mean_ratio)
    assert speedup_bound([3.0], [1.0], 0.95) == pytest.approx(3.0)  # one turn: no spread to go on
    shallower = [t / 4.5 for t in teacher]
    bounds = {2: speedup_bound(teacher, shallower, 0.95), 3: speedup_bound(teacher, noisy, 0.95)}
    assert deepest_within(bounds, speedup=3.0) == 2


def _layers(folder) -> int:
    return load_cross_encoder(str(folder)).model.config.num_hidden_layers


def test_the_report_shows_a_lower_bound_column_only_for_records_that_have_one(tmp_path):
    from pipeline.report import write_report

    timed = {"pairs": 40, "source": "dev candidates", "queries": 3, "turns": 3, "device": "cpu"}
    cuts = {"1": {"pairs_per_second": 90.0, "times_teacher": 4.5}, "2": {"pairs_per_second": 50.0, "times_teacher": 2.5}}
    bounded = {"1": {**cuts["1"], "times_teacher_at_least": 4.1}, "2": {**cuts["2"], "times_teacher_at_least": 2.2}}
    records = {
        "before the bound": {"layers": 1, "speedup": 3.0, "teacher_pairs_per_second": 20.0, "students": cuts, "timed_on": timed},
        "bounded": {"layers": 1, "speedup": 3.0, "teacher_pairs_per_second": 20.0, "students": bounded, "timed_on": timed, "confidence": 0.95},
    }
    params = {"dataset": "d", "teacher": "t", "student": "s", "loss": "l", "student_layers": 2}
    text = {}
    for name, record in records.items():
        metrics = {"params": params, "test": {"retriever": {"ndcg@10": 0.5, "mrr@10": 0.4, "map": 0.4}}, "stages": {"ChooseStudentDepth": record}}
        write_report(tmp_path / "report.md", metrics, [], {})
        text[name] = (tmp_path / "report.md").read_text()
    assert "| layers | pairs/s | times the teacher | at least |" in text["bounded"] and "| 2 | 50.0 | 2.50 | 2.20 |" in text["bounded"]
    assert "at least |" not in text["before the bound"] and "| 2 | 50.0 | 2.50 |" in text["before the bound"]
    assert "nan" not in text["before the bound"] and "the mean over the turns" in text["before the bound"]


def test_every_student_of_a_run_and_its_untrained_row_get_the_measured_depth(small_beir, tiny_models, tmp_path, caplog):
    """A speedup every cut reaches keeps the most layers asked for; one none reaches keeps one.
    The distilled and label-only students, and the report, follow the depth stage's record."""
    out = tmp_path / "run"
    runs = {}
    for speedup, expected in ((1e-6, 3), (1e6, 1)):
        params = dag_params(
            small_beir, tiny_models, out, student_layers=3, student_speedup=speedup, label_only_loss="BinaryCrossEntropyLoss", timing_queries=3,
        )
        entry = tasks.TrainStudent(**params)
        assert luigi.build([entry], local_scheduler=True, workers=1, log_level="WARNING")
        depth = entry.clone(tasks.ChooseStudentDepth)
        record = json.loads((depth.artifact() / "stats.json").read_text())
        assert record["layers"] == expected and record["speedup"] == speedup
        # Every cut of the 3-layer backbone was timed against the teacher on the same dev pairs.
        assert sorted(record["students"]) == ["1", "2", "3"] and record["teacher_pairs_per_second"] > 0
        # The choice rests on each cut's lower bound over the turns, recorded with the turns' seconds.
        turns = record["timed_on"]["seconds_per_turn"]
        assert sorted(turns) == ["1", "2", "3", "teacher"] and all(len(t) == record["timed_on"]["turns"] for t in turns.values())
        for n, s in record["students"].items():
            assert s["times_teacher_at_least"] == pytest.approx(speedup_bound(turns["teacher"], turns[n], 0.95), abs=0.006)
        # As many dev queries as the evaluation times test queries, in as many turns: blocks of one size.
        assert record["timed_on"]["source"] == "dev candidates" and record["timed_on"]["queries"] == 3 and record["timed_on"]["pairs"] > 0
        assert record["timed_on"]["turns"] == 3
        evaluation = entry.clone(tasks.EvaluateStudent)
        # One timing for both students: the label-only one's other loss and rate do not make another.
        assert evaluation.label_only_student().requires()["depth"].task_id == evaluation.requires()["depth"].task_id == depth.task_id
        assert _layers(evaluation.clone(tasks.FitStudent).artifact()) == expected
        assert _layers(evaluation.label_only_student().artifact()) == expected
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["stages"]["ChooseStudentDepth"]["layers"] == expected
        assert {k: metrics["speed"][k] for k in ("queries", "turns")} == {k: record["timed_on"][k] for k in ("queries", "turns")}
        assert f"**{expected} layers**" in (out / "report.md").read_text()
        runs[speedup] = (depth.fp, evaluation.fp)
    # Two depths, two evaluations; the untrained rows' cached scores are kept apart by the depth
    # they were cut to (one cache folder each), not by the most layers asked for, which is the same.
    (d1, e1), (d2, e2) = runs.values()
    assert d1 != d2 and e1 != e2
    assert len(list((out / "cache" / "eval").iterdir())) == 2

    # Asked for more layers than the 3-layer backbone has, the stage times each cut it has, once.
    import dataclasses

    from pipeline.depth import choose_depth

    deeper = dataclasses.replace(depth.config, max_layers=5, speedup=1e-6)
    with caplog.at_level(logging.WARNING):
        record = choose_depth(depth.input()["data"].path, depth.input()["mined"].path, tmp_path / "deeper", deeper)
    assert sorted(record["students"]) == ["1", "2", "3"] and record["layers"] == 3
    assert "exceeds" not in caplog.text

    # Without a dev split, the depth is timed on the training groups' pairs.
    import shutil

    import pyarrow.parquet as pq

    from pipeline.depth import timing_pairs

    only_groups = tmp_path / "groups-only"
    only_groups.mkdir()
    shutil.copy(entry.clone(tasks.MineHardNegatives).artifact() / "groups.parquet", only_groups)
    source, qids, pairs = timing_pairs(entry.clone(tasks.PrepareData).artifact(), only_groups, 5)
    groups = pq.read_table(only_groups / "groups.parquet").slice(0, 5).to_pylist()
    assert source == "training groups"
    assert qids == [g["query_id"] for g in groups for _ in g["positive_ids"] + g["negative_ids"]] and len(pairs) == len(qids)


def _saved(folder, layers: int):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return folder


def test_an_evaluation_stops_on_students_cut_before_the_depth_was_measured_anew(tmp_path):
    from pipeline.depth import check_cut_to

    students = {"student": _saved(tmp_path / "a", 3), "label-only student": _saved(tmp_path / "b", 2)}
    check_cut_to(3, {"student": students["student"]})
    with pytest.raises(PipelineError, match=r"b: the label-only student has 2 layers, but the depth stage now says 3"):
        check_cut_to(3, students)


def test_a_checkpoint_of_another_depth_is_not_resumed(tiny_models, tmp_path, caplog):
    """A student cut anew to another depth trains from the start instead of failing to load the
    checkpoint an interrupted run at the earlier depth left."""
    from datasets import Dataset

    from pipeline.training import layer_count, train_student

    work = tmp_path / "student.work"
    stale = _saved(work / "checkpoint-4", 1)
    (stale / "trainer_state.json").write_text("{}")
    rows = Dataset.from_dict({"query": ["a b", "c d"] * 4, "passage": ["a b c", "x y"] * 4, "label": [1.0, 0.0] * 4})
    with caplog.at_level(logging.WARNING, logger="pipeline.training"):
        train_student(rows, "BinaryCrossEntropyLoss", tmp_path / "student", student=tiny_models["student"], student_layers=2,
                      epochs=1, batch_size=4, max_length=32, seed=12)
    assert "holds a 1-layer student, not 2 layers; training from the start" in caplog.text
    assert layer_count(tmp_path / "student") == 2
