"""SIGKILL in every stage: a run killed at a random point inside any stage, then rerun, ends
with the outputs of an uninterrupted run, and nothing half-written ever sits under a final name."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import dag_params, fault_env, luigi_command
from pipeline.scoring import read_scores

# Stage -> what must not exist yet when the kill landed inside that stage.
STAGES = {
    "PrepareData": "data/*",
    "MineHardNegatives": "mined/*",
    "FineTuneTeacher": "teacher/[!.]*[!k]",
    "ScoreShard": "scores/*/shards/shard-*.arrow",
    "BuildLabels": "labels/*",
    "FitStudent": "students/[!.]*[!k]",  # not the .work checkpoint folder
    "EvaluateStudent": "eval/*/metrics.json",
}


def _run(params: dict, cwd: Path, slow: bool = False) -> subprocess.Popen:
    args = luigi_command("TrainStudent", params, "--local-scheduler")
    cfg = cwd / "luigi.cfg"
    if not cfg.exists():
        cfg.write_text("[core]\nlog_level = INFO\n[retcode]\ntask_failed = 30\nunhandled_exception = 40\nmissing_data = 20\n")
    # Slow: every finished temporary waits 1 s before its rename; scoring batches are slowed too.
    env = fault_env({**os.environ, "LUIGI_CONFIG_PATH": str(cfg)}, *((1.0, 0.05) if slow else (0.0, 0.0)))
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _outputs(out: Path) -> dict:
    """What a finished run produced, in comparable form."""
    t = read_scores(next(out.glob("scores/*/scores.arrow")))[0].to_pydict()
    from datasets import load_from_disk

    labels = load_from_disk(str(next(out.glob("labels/*/dataset"))))
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "groups": pq.read_table(next(out.glob("mined/*/groups.parquet"))).to_pydict(),
        "scores": sorted(zip(t["query_id"], t["doc_id"], t["score"])),
        "labels": labels.to_dict(),
        "test": metrics["test"],
    }


def _no_partial_final_files(out: Path) -> None:
    """Every file under a final name (no dot-prefixed part, no training work folder) is whole."""
    for p in out.rglob("*"):
        rel = p.relative_to(out).parts
        if not p.is_file() or any(x.startswith(".") or x.endswith(".work") for x in rel) or rel[0] == "cache":
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".parquet":
            pq.read_table(p)
        elif p.suffix == ".arrow" and "dataset" not in rel:
            read_scores(p)


def _finished(params: dict, root: Path) -> dict:
    proc = _run(params, root)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    return _outputs(Path(params["output_dir"]))


def _tiny(small_beir, tiny_models, out: Path, fine_tuned: bool) -> dict:
    # With no --teacher the DAG fine-tunes one first, which is a stage of its own.
    over = dict(teacher="", teacher_backbone=tiny_models["teacher"], teacher_epochs=0.5) if fine_tuned else {}
    return dag_params(small_beir, tiny_models, out, score_batch_tokens=256, **over)


@pytest.fixture(scope="module")
def references(small_beir, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    return {
        ft: _finished(_tiny(small_beir, tiny_models, root / f"run-{ft}", ft), root) for ft in (False, True)
    }


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_inside_a_stage_then_rerun(stage, references, small_beir, tiny_models, tmp_path):
    fine_tuned = stage == "FineTuneTeacher"
    params = _tiny(small_beir, tiny_models, tmp_path / "run", fine_tuned)
    delay = random.Random(stage).uniform(0.05, 0.9)  # a reproducible random point in the stage
    victim = _run(params, tmp_path, slow=True)
    for line in victim.stdout:
        if f"running   {stage}(" in line:
            break
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not [p.name for p in (tmp_path / "run").glob(STAGES[stage]) if not p.name.startswith(".")], "killed after the stage"
    _no_partial_final_files(tmp_path / "run")

    got = _finished(params, tmp_path)
    _no_partial_final_files(tmp_path / "run")
    reference = references[fine_tuned]
    assert got["groups"] == reference["groups"]
    assert got["scores"] == reference["scores"]
    assert got["labels"] == reference["labels"]
    for name, m in reference["test"].items():
        for key in ("ndcg@10", "mrr@10", "map"):
            assert got["test"][name][key] == pytest.approx(m[key], abs=1e-6), (name, key)
