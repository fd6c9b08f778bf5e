"""Stage settings: every setting a stage's entry point receives is in its artifact's fingerprint.

Each stage's entry point takes its input folders and one configuration object; the fingerprint
hashes every field of that object but the run-only ones. So a setting left out of the
fingerprint is either a run-only field (listed below, each with its reason) or an argument beside
the configuration object, and both fail here."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import tasks
from conftest import dag_params
from pipeline import evaluation, labels, mining, multilingual, plain_student, scoring, teacher, training
from pipeline.config import config_fingerprint
from pipeline.errors import PipelineError

# entry point -> (its parameters, the configuration class it takes)
ENTRY_POINTS = {
    mining.mine_hard_negatives: (["data_dir", "out_dir", "config"], mining.MineConfig),
    teacher.fine_tune_teacher: (["data_dir", "mined_dir", "out_dir", "config"], teacher.TeacherConfig),
    scoring.score_shard: (["data_dir", "mined_dir", "out_path", "config", "shard", "progress"], scoring.ScoreConfig),
    labels.build_labels: (["data_dir", "mined_dir", "scores_path", "out_dir", "config"], labels.LabelConfig),
    multilingual.build_multilingual_labels: (
        ["data_dir", "mined_dir", "scores_path", "out_dir", "config"], multilingual.MultilingualLabelConfig
    ),
    training.fit_student_once: (["data_dir", "mined_dir", "labels_dir", "out_dir", "config"], training.FitConfig),
    evaluation.evaluate_student: (
        ["data_dir", "mined_dir", "student_dir", "out_dir", "config", "run", "label_only_dir", "cosine_dir"], evaluation.EvalConfig
    ),
    multilingual.evaluate_languages: (
        ["data_dir", "mined_dir", "student_dir", "source_only_dir", "out_dir", "config", "run", "cosine_dir"],
        multilingual.MultilingualEvalConfig,
    ),
    plain_student.plain_student: (["data_dir", "mined_dir", "student_dir", "out_dir", "config"], plain_student.PlainStudentConfig),
    multilingual.multilingual_plain_student: (
        ["data_dir", "mined_dir", "student_dir", "out_dir", "config"], multilingual.MultilingualPlainConfig
    ),
}

# The only settings that may stay out of a fingerprint: where and in what batches the work runs.
RUN_ONLY = {"device", "cache_dir", "batch_tokens", "trust_remote_code", "max_dev_queries", "baseline_cache"}


def _other(value):
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (*value, "x")
    if value is None:
        return 3
    if dataclasses.is_dataclass(value):
        first = dataclasses.fields(value)[0].name
        return dataclasses.replace(value, **{first: 0.5})
    raise TypeError(type(value))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=lambda f: f.__name__)
def test_entry_points_take_their_settings_as_one_object(entry):
    names, config_class = ENTRY_POINTS[entry]
    params = inspect.signature(entry).parameters
    assert list(params) == names
    assert params["config"].annotation in (config_class.__name__, config_class)
    assert config_class.__dataclass_params__.frozen


@pytest.mark.parametrize("config_class", sorted({c for _, c in ENTRY_POINTS.values()}, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_field_but_the_run_only_ones_changes_the_fingerprint(config_class):
    base = config_class()
    fp = config_fingerprint(base, identity=lambda ref: f"id:{ref}")
    for f in dataclasses.fields(config_class):
        changed = dataclasses.replace(base, **{f.name: _other(getattr(base, f.name))})
        other_fp = config_fingerprint(changed, identity=lambda ref: f"id:{ref}")
        if "run_only" in f.metadata:
            assert f.name in RUN_ONLY, f"{config_class.__name__}.{f.name} is run-only but may change the artifact"
            assert f.metadata["run_only"], "a run-only field says why"
            assert other_fp == fp
        else:
            assert other_fp != fp, f"{config_class.__name__}.{f.name} does not reach the fingerprint"


def test_the_baseline_cache_is_keyed_by_what_the_baseline_scores_depend_on():
    """Every fingerprinted evaluation setting but the timing and fusion ones names a different
    folder of retriever, teacher and untrained-student scores."""
    identity = lambda ref: f"id:{ref}"  # noqa: E731
    base = evaluation.EvalConfig()
    key = evaluation.baseline_key(base, identity)
    for f in dataclasses.fields(base):
        changed = evaluation.baseline_key(dataclasses.replace(base, **{f.name: _other(getattr(base, f.name))}), identity)
        if f.name in ("timing_queries", "fusion_dev_queries") or "run_only" in f.metadata:
            assert changed == key, f.name
        else:
            assert changed != key, f.name


def test_a_model_is_fingerprinted_by_its_identity_not_its_path():
    config = mining.MineConfig(embedder="models/a")
    same = config_fingerprint(config, identity=lambda ref: "weights-1")
    assert config_fingerprint(dataclasses.replace(config, embedder="copied/a"), identity=lambda ref: "weights-1") == same
    assert config_fingerprint(config, identity=lambda ref: "weights-2") != same


def test_a_revised_stage_gets_new_fingerprints_and_no_other_stage_does(monkeypatch):
    """Raising a configuration class's REVISION (its code now writes something else for the same
    settings) renews that stage's artifacts, its subclasses' and its baseline cache, and leaves
    every other stage's fingerprint as it was."""
    identity = lambda ref: f"id:{ref}"  # noqa: E731
    classes = sorted({c for _, c in ENTRY_POINTS.values()}, key=lambda c: c.__name__)
    before = {c.__name__: config_fingerprint(c(), identity) for c in classes}
    baseline_before = evaluation.baseline_key(evaluation.EvalConfig(), identity)
    for revised in (labels.LabelConfig, evaluation.EvalConfig):
        monkeypatch.setattr(revised, "REVISION", getattr(revised, "REVISION", 0) + 1, raising=False)
    after = {c.__name__: config_fingerprint(c(), identity) for c in classes}
    assert {n for n in before if before[n] != after[n]} == {
        "LabelConfig", "MultilingualLabelConfig", "EvalConfig", "MultilingualEvalConfig"
    }
    assert evaluation.baseline_key(evaluation.EvalConfig(), identity) != baseline_before


@pytest.mark.parametrize("native_bf16", [True, False])
def test_tasks_resolve_auto_settings_before_fingerprinting(monkeypatch, small_beir, tiny_models, tmp_path, native_bf16):
    """The configuration holds what runs (a resolved head, precision and process count), not 'auto';
    training's auto precision is bf16 on a CPU with bf16 matrix instructions, fp32 on one without."""
    import pipeline.models

    monkeypatch.setattr(pipeline.models, "native_bf16_cpu", lambda: native_bf16)
    params = dag_params(small_beir, tiny_models, tmp_path, tasks.FitStudent, train_precision="auto", student_head="auto", nproc_per_node=4)
    fit = tasks.FitStudent(**params)
    assert fit.config.precision == ("bf16" if native_bf16 else "fp32") and fit.config.student_head in ("cosine", "mean", "cls")
    assert fit.clone(tasks.FineTuneTeacher).config.precision == fit.config.precision
    assert fit.config.world_size == 1  # no GPUs here: one process, whatever was asked
    score = fit.clone(tasks.ScoreShard, shard=0).config
    assert score.precision in ("fp32", "bf16") and score.num_shards == params.get("score_shards", 4)
    # Every shard writes into one folder, whose fingerprint the joined scores share.
    shards = {fit.clone(tasks.ScoreShard, shard=i).fp for i in range(2)}
    assert shards == {fit.clone(tasks.ScoreWithTeacher).fp}


def test_every_stage_of_a_run_reads_one_input_length_fitted_to_its_dataset(tiny_models, tmp_path):
    """With no length given, mining, the teacher's fine-tuning and scoring, training and evaluation
    each get the length that keeps 3 in 4 of this dataset's pairs whole (here 1 + 300 tokens and 3
    special ones: 320); a length given reaches them unchanged, and so does the teacher's own."""
    from conftest import write_beir

    long = " ".join(["apple"] * 300)
    ds = write_beir(tmp_path / "long", {"q0": "apple", "q1": "apple"}, {f"d{i}": ("", long) for i in range(5)},
                    {"train": [("q0", "d0", 1)], "test": [("q1", "d1", 1)]})

    def lengths(**given) -> dict:
        fit = tasks.FitStudent(**dag_params(ds, tiny_models, tmp_path / "out", tasks.FitStudent, teacher_kind="cross-encoder", **given))
        ev = fit.clone(tasks.EvaluateStudent).config
        return {
            "mine": fit.clone(tasks.MineHardNegatives).config.max_length, "fit": fit.config.max_length,
            "eval": ev.max_length, "score": fit.clone(tasks.ScoreShard, shard=0).config.max_length,
            "fine-tune": fit.clone(tasks.FineTuneTeacher, teacher="").config.max_length, "eval teacher": ev.teacher_max_length,
        }

    assert set(lengths(max_length=0, teacher_max_length=0).values()) == {320}
    assert lengths(max_length=64, teacher_max_length=0) == {"mine": 64, "fit": 64, "eval": 64, "score": 320, "fine-tune": 320, "eval teacher": 320}
    assert lengths(max_length=0, teacher_max_length=96) == {"mine": 320, "fit": 320, "eval": 320, "score": 96, "fine-tune": 96, "eval teacher": 96}


CHECK_CFG = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import luigi, tasks
    luigi.interface.core(), luigi.retcodes.retcode(), luigi.worker.worker(), luigi.scheduler.scheduler()
    entries = {c.__name__: c() for c in (tasks.TrainStudent, tasks.TrainMultilingualStudent, tasks.RetrainStudent)}
print(json.dumps({
    "warnings": [str(w.message) for w in caught if w.category.__name__ == "UnconsumedParameterWarning"],
    "entries": {n: [t.dataset, t.embedder, t.teacher_kind, t.student_layers, t.max_train_queries, t.max_unjudged_queries, t.output_dir]
                for n, t in entries.items()},
    "students": [t.task_id for t in (entries["TrainStudent"].clone(tasks.FitStudent), tasks.PlainStudent().requires()["student"])],
    "published": [t.task_id for t in (entries["TrainStudent"].student_stage(), tasks.ExportOnnx().requires(), tasks.PlainStudent())],
}))
"""


@pytest.mark.parametrize("central", [False, True], ids=["local", "central"])
def test_luigi_cfg_shares_the_demo_settings_without_warnings(central):
    """[DEFAULT] gives every entry task the demo's settings; no section warns about them."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if central:
        env["LUIGI_CONFIG_PATH"] = str(REPO / "luigi-central.cfg")
    out = subprocess.run([sys.executable, "-c", CHECK_CFG], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["warnings"] == []
    dirs = {name: entry.pop() for name, entry in got["entries"].items()}
    assert dirs == {"TrainStudent": "runs/demo", "TrainMultilingualStudent": "runs/demo-multilingual", "RetrainStudent": "runs/retrain"}
    # [DEFAULT]'s settings reach every entry task; a section overrides only what it names.
    shared = ["models/all-MiniLM-L6-v2", "ensemble"]
    # [TrainStudent] measures its depth up to 3 layers; the other demos fix 2. Every
    # demo trains on all its training queries, the teacher labelling those nobody judged.
    assert got["entries"]["TrainStudent"] == ["data/debian-partly-judged", *shared, 3, 0, -1]
    assert got["entries"]["RetrainStudent"] == ["data/debian-partly-judged", *shared, 2, 0, -1]
    assert got["entries"]["TrainMultilingualStudent"] == ["data/debian-multilingual", *shared, 2, 0, -1]
    # The tasks that take the demo's student, run alone, address the one TrainStudent trained.
    assert len(set(got["students"])) == 1 and len(set(got["published"])) == 1


def test_a_teacher_fingerprint_ignores_the_settings_its_kind_does_not_use():
    identity = lambda ref: ref  # noqa: E731
    fp = lambda **kw: config_fingerprint(teacher.TeacherConfig(backbone="m", **kw).for_kind(), identity, "up")  # noqa: E731
    # A bi-encoder teacher does not read the cross-encoder's loss or rate; a cross-encoder does.
    assert fp(kind="bi-encoder", loss="BinaryCrossEntropyLoss") == fp(kind="bi-encoder")
    assert fp(kind="bi-encoder", bi_encoder_learning_rate=1e-3) != fp(kind="bi-encoder")
    assert fp(kind="cross-encoder", loss="BinaryCrossEntropyLoss") != fp(kind="cross-encoder")
    assert fp(kind="cross-encoder", ensemble_weight=0.3) == fp(kind="cross-encoder")
    assert fp(kind="cross-encoder", dev_queries=50) == fp(kind="cross-encoder")
    # An ensemble uses every setting; the dev queries only while its share is chosen on them.
    assert fp(kind="ensemble", ensemble_weight=0.3) != fp(kind="ensemble")
    assert fp(kind="ensemble", bi_encoder_learning_rate=1e-3) != fp(kind="ensemble")
    assert fp(kind="ensemble", dev_queries=50) != fp(kind="ensemble")
    assert fp(kind="ensemble", ensemble_weight=0.3, dev_queries=50) == fp(kind="ensemble", ensemble_weight=0.3)


@pytest.mark.parametrize("given", ["1.5", "0", "half"])
def test_a_teacher_share_outside_zero_to_one_stops_at_scheduling(given, small_beir, tiny_models, tmp_path):
    p = dag_params(small_beir, tiny_models, tmp_path, tasks.FineTuneTeacher, teacher="", teacher_kind="ensemble", teacher_ensemble_weight=given)
    with pytest.raises(PipelineError, match=f"--teacher-ensemble-weight {given}: expected a share in \\(0, 1\\], or 'dev'"):
        tasks.FineTuneTeacher(**p).fp
    assert teacher.share_setting("dev") is None and teacher.share_setting(" DEV ") is None and teacher.share_setting("0.25") == 0.25
