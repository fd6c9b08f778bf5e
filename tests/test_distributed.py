"""luigi's central scheduler: two worker processes share the tiny DAG with four scoring shards,
each shard is scored exactly once, and a worker killed mid-shard is recovered by a rerun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import luigi
import numpy as np
import pytest

import tasks
from conftest import REPO, dag_params, fault_env, luigi_command
from pipeline.scoring import read_scores

SHARDS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """luigid on 127.0.0.1 with quick dead-worker handling, and the config workers use to reach it."""
    root = tmp_path_factory.mktemp("luigid")
    port = _free_port()
    cfg = root / "central.cfg"
    cfg.write_text(
        f"[core]\nlocal_scheduler = false\nno_lock = true\ndefault_scheduler_host = 127.0.0.1\ndefault_scheduler_port = {port}\n"
        "[worker]\nkeep_alive = true\nwait_interval = 0.2\n"
        "[retcode]\ntask_failed = 30\nscheduling_error = 35\nunhandled_exception = 40\nmissing_data = 20\n"
        f"[scheduler]\nstate_path = {root / 'state.pickle'}\nworker_disconnect_delay = 1\nretry_delay = 1\nprune_on_get_work = true\n"
    )
    (root / "logs").mkdir()
    env = {**os.environ, "LUIGI_CONFIG_PATH": str(cfg), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from luigi.cmdline import luigid; luigid(sys.argv[1:])",
         "--address", "127.0.0.1", "--port", str(port), "--logdir", str(root / "logs"), "--state-path", str(root / "state.pickle")],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("luigid did not start")
    yield env, root
    proc.kill()
    proc.wait()


def _worker(env, params: dict, cwd: Path, batch_delay: float = 0.0, shard_barrier: Path | None = None) -> subprocess.Popen:
    args = luigi_command("TrainStudent", params, "--workers", "1")
    env = fault_env(env, batch_delay=batch_delay, shard_barrier=shard_barrier)
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _scores(out: Path):
    path = next(out.glob("scores/*/scores.arrow"))
    t = read_scores(path)[0].to_pydict()
    order = np.lexsort((t["doc_id"], t["query_id"]))
    return [(t["query_id"][i], t["doc_id"][i]) for i in order], np.asarray(t["score"])[order]


def _shard_stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("scores/*/shards/shard-*.json"))]


@pytest.fixture(scope="module")
def reference(small_beir, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    params = dag_params(small_beir, tiny_models, out, score_shards=SHARDS)
    assert luigi.build([tasks.TrainStudent(**params)], local_scheduler=True, workers=1, log_level="WARNING")
    return _scores(out) + (out, params)


def test_two_workers_score_every_shard_once(scheduler, reference, small_beir, tiny_models, tmp_path):
    env, _ = scheduler
    out = tmp_path / "run"
    params = dag_params(small_beir, tiny_models, out, score_shards=SHARDS, score_batch_tokens=256)
    # Each worker's first shard waits until the other has started one, so they really share the
    # shards however slowly the second one starts.
    workers = [_worker(env, params, tmp_path, shard_barrier=tmp_path / "barrier") for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), logs

    stats = _shard_stats(out)
    assert sorted(s["shard"] for s in stats) == list(range(SHARDS))
    pairs, scores = _scores(out)
    # Each pair reached the teacher once: no shard found its pairs already in the score cache.
    assert all(s["pairs_from_cache"] == 0 for s in stats)
    assert sum(s["pairs_scored"] for s in stats) == len(pairs)
    ran = [sum("running   ScoreShard" in line for line in log.splitlines()) for log in logs]
    assert sum(ran) == SHARDS and min(ran) > 0, ran  # both workers took shards
    assert pairs == reference[0]
    np.testing.assert_allclose(scores, reference[1], rtol=0, atol=1e-6)


def test_worker_killed_mid_shard_is_recovered_by_a_rerun(scheduler, reference, small_beir, tiny_models, tmp_path):
    env, _ = scheduler
    out = tmp_path / "run"
    params = dag_params(small_beir, tiny_models, out, score_shards=SHARDS, score_batch_tokens=256)
    victim = _worker(env, params, tmp_path, batch_delay=1.0)
    for line in victim.stdout:
        if "running   ScoreShard" in line:
            break
    time.sleep(1.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "metrics.json").exists()
    done_before = len(_shard_stats(out))
    assert done_before < SHARDS

    rerun = _worker(env, params, tmp_path)
    log = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, log
    assert sorted(s["shard"] for s in _shard_stats(out)) == list(range(SHARDS))
    pairs, scores = _scores(out)
    assert pairs == reference[0]
    np.testing.assert_allclose(scores, reference[1], rtol=0, atol=1e-6)


def test_training_under_torchrun_with_two_processes(reference, tiny_models, tmp_path):
    """The --nproc-per-node path on CPU (gloo): two ranks, rank 0 saves a loadable student."""
    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.training import FitConfig, fit_student_distributed

    _, _, out, params = reference
    labels = next(out.glob("labels/*/dataset")).parent
    single = json.loads(next(out.glob("students/*/stats.json")).read_text())
    config = FitConfig(
        loss="PackedMarginMSELoss", student=tiny_models["student"], student_layers=2, max_dev_queries=0, seed=12, epochs=1.0,
        batch_size=params["batch_size"], max_length=64, device="cpu", precision="fp32", world_size=2,
    )
    stats = fit_student_distributed(
        str(next(out.glob("data/*"))), str(next(out.glob("mined/*"))), str(labels), str(tmp_path / "student"), config
    )
    assert stats["processes"] == 2
    assert stats["rows"] == single["rows"]
    # The ranks share each epoch's batches, so each takes fewer optimizer steps than one process.
    assert 0 < stats["steps"] < single["steps"]
    scores = CrossEncoder(str(tmp_path / "student")).predict([("a query", "a passage")])
    assert np.isfinite(scores).all()
