"""Faults and untrusted input: a full disk, labels that do not fit the loss, model folders that
carry code or pickles, and two runs at once on one output folder."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess

import numpy as np
import pytest

from conftest import REPO, dag_params, luigi_command, make_cross_encoder
from pipeline.artifacts import atomic_dir, hash_files
from pipeline.data import prepare_data
from pipeline.errors import PipelineError



def test_disk_full_fails_with_one_line_and_keeps_earlier_outputs(small_beir, tiny_models, tmp_path, monkeypatch):
    from pipeline import mining

    data = tmp_path / "data"
    prepare_data(small_beir, data)
    before = hash_files(list(data.iterdir()))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mining.pq, "write_table", full)
    out = tmp_path / "mined" / "abc"
    with pytest.raises(PipelineError, match="no space left on the device") as e:
        config = mining.MineConfig(embedder=tiny_models["embedder"], cache_dir=str(tmp_path / "cache"), num_negatives=2, max_length=64)
        mining.mine_hard_negatives(data, out, config)
    assert "\n" not in str(e.value) and str(out) in str(e.value)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert hash_files(list(data.iterdir())) == before


def test_labels_that_do_not_fit_the_loss_stop_before_training(tmp_path):
    from pipeline.training import FitConfig, fit_student

    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "stats.json").write_text(json.dumps({"format": "pair-score", "rows": 10}))
    with pytest.raises(PipelineError, match="labels are in format 'pair-score' but MarginMSELoss needs 'ntuple-margin'"):
        fit_student(tmp_path / "no-data", tmp_path / "no-mined", labels, tmp_path / "out", FitConfig("MarginMSELoss", "no-model"))


def test_model_code_is_not_run_without_trust_remote_code(tmp_path):
    from pipeline.models import load_cross_encoder

    folder = make_cross_encoder(tmp_path / "ce")
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import BertForSequenceClassification\n"
        "class EvilModel(BertForSequenceClassification):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    # Without the flag the folder's code never runs: transformers either refuses (our one-line
    # error) or loads the standard class named by model_type.
    try:
        model = load_cross_encoder(str(folder), num_labels=1)
        assert type(model.model).__name__ == "BertForSequenceClassification"
    except PipelineError as e:
        assert "--trust-remote-code" in str(e)
    assert not marker.exists()
    # With it, the same folder's code does run: the check above is not vacuous.
    load_cross_encoder(str(folder), num_labels=1, trust_remote_code=True)
    assert marker.exists()


def test_a_hub_model_that_cannot_be_had_is_one_line_naming_it(tmp_path, monkeypatch):
    """Offline, a hub id with no copy in the cache stops with one line naming the model and what
    to do, from each loader, not with the hub client's chained tracebacks."""
    from huggingface_hub import constants

    from pipeline.models import cut_student, load_bi_encoder, load_cross_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for load in (load_bi_encoder, load_cross_encoder, lambda ref: cut_student(ref, 2)):
        with pytest.raises(PipelineError, match="HF_HUB_OFFLINE") as e:
            load("nobody/no-such-reranker")
        assert "\n" not in str(e.value) and str(e.value).startswith("nobody/no-such-reranker: ")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_safetensors_win_over_a_pickle_in_the_same_folder(tmp_path):
    from pipeline.models import load_cross_encoder

    folder = make_cross_encoder(tmp_path / "ce")
    assert (folder / "model.safetensors").exists()
    marker = tmp_path / "pickle-ran"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    model = load_cross_encoder(str(folder), num_labels=1)
    assert np.isfinite(model.predict([("q", "p")])).all()
    assert not marker.exists()


def test_two_runs_at_once_on_one_output_dir(small_beir, tiny_models, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "luigi.cfg"
    # no_lock: luigi's own lock would turn the second, identical command away; both must run.
    cfg.write_text("[core]\nlocal_scheduler = true\nno_lock = true\nlog_level = INFO\n[retcode]\ntask_failed = 30\nunhandled_exception = 40\nmissing_data = 20\n")
    params = dag_params(small_beir, tiny_models, out)
    args = luigi_command("TrainStudent", params, "--local-scheduler")
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(cfg), "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [r.communicate(timeout=600)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert all("running   " in log and "already running" not in log for log in logs)

    from pipeline.scoring import read_scores
    from sentence_transformers.cross_encoder import CrossEncoder

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["params"]["fingerprint"]
    assert np.isfinite(CrossEncoder(str(out / "student")).predict([("q", "p")])).all()
    scores = read_scores(next(out.glob("scores/*/scores.arrow")))[0]
    assert scores.num_rows > 0 and np.isfinite(scores["score"].to_numpy()).all()
    # Nothing half-written is left under a final name, and no temporary is left behind.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    for stats in out.glob("*/*/stats.json"):
        json.loads(stats.read_text())


WRITER = """
import os, sys, time
from pathlib import Path
from pipeline.artifacts import atomic_dir
path, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
for i in range(int(sys.argv[3])):
    with atomic_dir(path) as tmp:
        (tmp / "part").write_text(f"{os.getpid()} {i}")
        (tmp / "done").write_text("whole")
"""


def test_two_processes_finishing_the_same_output_at_once(tmp_path):
    """Two writers replace one output folder hundreds of times at once, as two runs of the same
    stage would: neither fails, a reader never finds the path missing, and what it reads there is
    whole. (A reader already inside a replaced folder may see it emptied: it is removed.)"""
    import sys
    import time

    out = tmp_path / "stage" / "fp"
    with atomic_dir(out) as tmp:  # a finished output is already there
        (tmp / "part").write_text("first")
        (tmp / "done").write_text("whole")
    start = time.time() + 1.0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(start), "400"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    missing = partial = checks = 0
    while any(w.poll() is None for w in writers):
        try:
            os.lstat(out)
        except FileNotFoundError:
            missing += 1
            continue
        try:
            partial += (out / "done").read_text() != "whole"
            checks += 1
        except FileNotFoundError:
            pass
    logs = [w.communicate()[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], logs
    assert checks > 100
    assert (missing, partial) == (0, 0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["fp"]  # no temporaries or old folders left


FIT = """
import json, logging, sys
from pipeline.training import FitConfig, fit_student_once
logging.basicConfig(level=logging.INFO)
dirs, config = json.loads(sys.argv[1])
print("STATS " + json.dumps(fit_student_once(*dirs, FitConfig(**config))))
"""

TEACH = """
import json, logging, sys
from pipeline.teacher import TeacherConfig, fine_tune_teacher
logging.basicConfig(level=logging.INFO)
dirs, config = json.loads(sys.argv[1])
print("STATS " + json.dumps(fine_tune_teacher(*dirs, TeacherConfig(**config))))
"""


@pytest.mark.parametrize("stage", ["student", "ensemble teacher"])
def test_two_runs_of_one_training_stage_train_once(stage, small_beir, tiny_models, tmp_path):
    """Two processes start the same training stage at once: they share its output folder and its
    scratch folders (checkpoints, finished ensemble members), so the second waits and takes the
    first's model instead of training beside it."""
    import sys

    import luigi

    import tasks

    labels = tasks.BuildLabels(**dag_params(small_beir, tiny_models, tmp_path / "run", tasks.BuildLabels))
    assert luigi.build([labels], local_scheduler=True, log_level="WARNING")
    data, mined = labels.clone(tasks.PrepareData).output().path, labels.clone(tasks.MineHardNegatives).output().path
    out = tmp_path / "run" / "models" / "same"
    if stage == "student":
        script, dirs = FIT, [data, mined, labels.output().path, str(out)]
        config = dict(loss="PackedMarginMSELoss", student=tiny_models["student"], student_layers=2, max_dev_queries=0,
                      epochs=2.0, batch_size=8, max_length=64, device="cpu", precision="fp32")
        scratch = [out.with_name("same.work")]
    else:
        script, dirs = TEACH, [data, mined, str(out)]
        config = dict(backbone=tiny_models["embedder"], kind="ensemble", epochs=1.0, batch_size=8, bi_encoder_batch_size=8,
                      max_length=64, device="cpu")
        scratch = [out.with_name("same.parts"), out.with_name("same.parts") / "cross-encoder.work"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen([sys.executable, "-c", script, json.dumps([dirs, config])], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [r.communicate(timeout=600)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    stats = [json.loads(next(x for x in log.splitlines() if x.startswith("STATS "))[6:]) for log in logs]
    assert stats[0] == stats[1]  # one training; the other run returned its statistics
    assert sum("finished by another run meanwhile" in log for log in logs) == 1
    assert (out / "stats.json").is_file()
    assert not any(p.exists() for p in scratch)


def test_concurrent_promotions_are_gated_one_after_the_other(tmp_path, monkeypatch):
    """Two runs finishing at once each compare themselves with the champion: the second must see
    the first as champion, not the one before both."""
    import threading
    import time

    from pipeline import registry

    def slow_gate(models, *args, **kwargs):
        time.sleep(0.5)
        return {"retriever": 0.1, "challenger": 0.9, **({"champion": 0.8} if "champion" in models else {})}

    monkeypatch.setattr(registry, "gate_ndcg", slow_gate)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"test": {}}))
    students = {}
    for run in ("a", "b"):
        students[run] = tmp_path / f"student-{run}"
        students[run].mkdir()
        (students[run] / "config.json").write_text("{}")
    threads = [threading.Thread(target=registry.promote_or_keep, args=(tmp_path / "reg", run, students[run], metrics, None, None, 0.0, {}))
               for run in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    history = registry.Registry(tmp_path / "reg").history()
    first, second = history
    assert first["gate"]["champion_run"] is None and second["gate"]["champion_run"] == first["run"]
    assert registry.Registry(tmp_path / "reg").current().name == second["run"]


def test_a_checkpoint_killed_while_saving_is_not_resumed(tmp_path):
    from pipeline.training import last_complete_checkpoint

    work = tmp_path / "student.work"
    assert last_complete_checkpoint(work) is None
    for step, state in [(50, '{"global_step": 50}'), (100, '{"global_st'), (150, None)]:
        folder = work / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(work) == work / "checkpoint-50"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-50"]
