"""Teacher scoring at scale: shards survive a SIGKILL, and no pair reaches the teacher twice."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import luigi
import pytest

import tasks
from pipeline.artifacts import read_json
from pipeline.data import read_dataset
from pipeline.scoring import read_scores
from tests.conftest import REPO, dag_params, fault_env, luigi_command, write_beir


def _score_params(dataset, tiny_models, out, **over):
    return dag_params(dataset, tiny_models, out, tasks.ScoreWithTeacher, **{"score_shards": 4, **over})


def _cli(params: dict) -> list[str]:
    return luigi_command("ScoreWithTeacher", params, "--local-scheduler")


def _rows(path):
    t, meta = read_scores(path)
    d = t.to_pydict()
    return list(zip(d["query_id"], d["doc_id"], d["score"])), meta


def test_sigkill_mid_shard_then_rerun_gives_the_uninterrupted_scores(small_beir, tiny_models, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Small token batches make many batches, so the kill lands inside a shard; both runs batch
    # alike, since padding a pair differently moves its score in the last bits.
    reference = _score_params(small_beir, tiny_models, tmp_path / "reference", score_batch_tokens=256)
    subprocess.run(_cli(reference), cwd=REPO, env=env, check=True, capture_output=True)

    killed = _score_params(small_beir, tiny_models, tmp_path / "killed", score_batch_tokens=256)
    slow = fault_env(env, batch_delay=0.25)
    proc = subprocess.Popen(_cli(killed), cwd=REPO, env=slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / "scores"
    deadline = time.time() + 90
    while time.time() < deadline and not list(shards.glob("*/shards/shard-*.arrow")):
        time.sleep(0.05)
    time.sleep(0.6)  # into the next shard
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in shards.glob("*/shards/shard-*.arrow"))
    assert 1 <= len(done_before) < 4, done_before
    for p in shards.glob("*/shards/shard-*.arrow"):  # whatever is under a final name is complete
        read_scores(p)
    stamps = {p.name: p.stat().st_mtime_ns for p in shards.glob("*/shards/shard-*.arrow")}

    subprocess.run(_cli(killed), cwd=REPO, env=env, check=True, capture_output=True)
    for p in shards.glob("*/shards/shard-*.arrow"):
        if p.name in stamps:
            assert p.stat().st_mtime_ns == stamps[p.name], f"{p.name} was scored again"
    [ref_path] = (tmp_path / "reference" / "scores").glob("*/scores.arrow")
    [got_path] = shards.glob("*/scores.arrow")
    ref_rows, ref_meta = _rows(ref_path)
    got_rows, got_meta = _rows(got_path)
    assert got_rows == ref_rows
    assert got_meta == ref_meta
    assert not [p for p in shards.rglob("*") if p.name.startswith(".")], "temporary files left behind"
    # The insignificant settings reached the task: the small batches this test is built on ran.
    for stats in shards.glob("*/shards/shard-*.json"):
        s = read_json(stats)
        assert (s["batch_tokens"], s["device"]) == (256, "cpu"), stats.name


def test_the_fault_injector_slows_only_what_the_kill_tests_need(tmp_path):
    """tests/faults/sitecustomize.py: renames of finished temporaries wait, others do not, and
    the scorer's per-batch function is wrapped; without its variables nothing changes."""
    probe = (
        "import os, time, pathlib\n"
        "import pipeline.scoring as s\n"
        "d = pathlib.Path(os.environ['PROBE'])\n"
        "(d / '.x.1.tmp').write_text('a'); (d / 'y').write_text('b')\n"
        "t0 = time.perf_counter(); os.replace(d / '.x.1.tmp', d / 'x'); tmp = time.perf_counter() - t0\n"
        "t0 = time.perf_counter(); os.replace(d / 'y', d / 'z'); plain = time.perf_counter() - t0\n"
        "print(s.relevance.__name__, tmp > 0.3, plain < 0.3)\n"
    )
    import sys

    base = {**os.environ, "PROBE": str(tmp_path)}
    slow = subprocess.run([sys.executable, "-c", probe], env=fault_env(base, write_delay=0.5, batch_delay=0.1),
                          cwd=REPO, check=True, capture_output=True, text=True).stdout.split()
    assert slow == ["slow_relevance", "True", "True"]
    for name in ("x", "z"):
        (tmp_path / name).unlink()
    plain = subprocess.run([sys.executable, "-c", probe], env=fault_env(base), cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    assert plain == ["relevance", "False", "True"]


def test_dag_params_keeps_insignificant_parameters(small_beir, tiny_models, tmp_path):
    p = dag_params(small_beir, tiny_models, tmp_path, tasks.ScoreWithTeacher, score_batch_tokens=256)
    assert p["score_batch_tokens"] == 256 and p["device"] == "cpu"


def test_new_queries_only_send_new_pairs_to_the_teacher(small_beir, tiny_models, tmp_path):
    ds = read_dataset(small_beir)
    train = [(q, d, s) for q, d, s, sp in ds.qrels if sp == "train"]
    other = {sp: [(q, d, s) for q, d, s, x in ds.qrels if x == sp] for sp in ("dev", "test")}
    base_train, new_train = train[:36], train[36:40]  # 4 new queries: 10% more
    first = write_beir(tmp_path / "day1", ds.queries, ds.corpus, {"train": base_train, **other})
    second = write_beir(tmp_path / "day2", ds.queries, ds.corpus, {"train": base_train + new_train, **other})
    out = tmp_path / "out"

    def score(dataset):
        task = tasks.ScoreWithTeacher(**_score_params(dataset, tiny_models, out))
        assert luigi.build([task], local_scheduler=True, log_level="WARNING")
        return task, read_json(task.artifact() / "stats.json")

    task1, day1 = score(first)
    assert day1["pairs_from_cache"] == 0 and day1["pairs_scored"] == day1["pairs"]
    task2, day2 = score(second)
    new_pairs = {(q, d) for q, d, _ in _rows(task2.output().path)[0] if q in {x[0] for x in new_train}}
    assert day2["pairs_scored"] == len(new_pairs) > 0
    assert day2["pairs_from_cache"] == day1["pairs"]
    # Cached scores are the scores: the old queries' rows are identical across days.
    old1 = {(q, d): s for q, d, s in _rows(task1.output().path)[0]}
    for q, d, s in _rows(task2.output().path)[0]:
        if (q, d) in old1:
            assert s == old1[(q, d)]


def test_join_refuses_a_pair_in_two_shards(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.mining import GROUPS_SCHEMA, write_table
    from pipeline.scoring import join_shards, write_scores
    import pyarrow as pa

    mined = tmp_path / "mined"
    write_table(pa.table({"query_id": ["q"], "positive_ids": [["p"]], "positive_scores": [[1.0]],
                          "negative_ids": [["n"]], "negative_scores": [[0.5]], "negative_ranks": [[0]]},
                         schema=GROUPS_SCHEMA), mined / "groups.parquet")
    write_scores(tmp_path / "a.arrow", ["q", "q"], ["p", "n"], [1.0, 0.0], {"teacher": "t"})
    write_scores(tmp_path / "b.arrow", ["q"], ["n"], [0.0], {"teacher": "t"})
    with pytest.raises(PipelineError, match="also in another shard"):
        join_shards(mined, [tmp_path / "a.arrow", tmp_path / "b.arrow"], tmp_path / "out.arrow")
    write_scores(tmp_path / "c.arrow", ["q"], ["p"], [1.0], {"teacher": "t"})
    with pytest.raises(PipelineError, match="first missing"):
        join_shards(mined, [tmp_path / "c.arrow"], tmp_path / "out.arrow")
    assert join_shards(mined, [tmp_path / "a.arrow"], tmp_path / "out.arrow")["pairs"] == 2


def test_fidelity_compare_on_known_values():
    import numpy as np

    from pipeline.fidelity import compare

    ref = np.array([3.0, 1.0, 0.0, 2.0, 1.5])
    other = ref + np.array([0.0, 0.1, 0.0, 0.0, -0.2])  # [3, 1.1, 0, 2, 1.3]: same order
    r = compare(ref, other, ["a", "a", "a", "b", "b"])
    # margins: a: 3-1=2, 3-0=3; b: 2-1.5=0.5  ->  other: 1.9, 3.0; 0.7
    assert r["margins"]["max_abs_diff"] == pytest.approx(0.2)
    assert r["scores"]["max_abs_diff"] == pytest.approx(0.2)
    assert r["scores"]["spearman"] == pytest.approx(1.0)


def test_int8_scoring_quantizes_linear_layers_and_is_cpu_only(tiny_models):
    import numpy as np
    import torch

    from pipeline.errors import PipelineError
    from pipeline.scoring import TeacherSpec, load_teacher

    spec = TeacherSpec.parse(tiny_models["teacher"])
    pairs = [("query words", f"passage number {i} " * (i % 5 + 1)) for i in range(24)]
    qids = ["q"] * 24
    int8 = load_teacher(spec, "cpu", "int8", 64)
    assert int8.identity[0]["precision"] == "int8-dynamic"
    linears = [type(m) for m in int8.scorers[0].net.modules() if type(m).__name__ == "Linear"]
    assert linears and torch.nn.Linear not in linears
    assert all(t.__module__.startswith("torch.ao.nn.quantized") for t in linears)
    scores = int8.score(pairs, qids)
    assert scores.shape == (24,) and np.isfinite(scores).all()
    with pytest.raises(PipelineError, match="CPU only"):
        load_teacher(spec, "cuda", "int8", 64)


def test_token_batches_cover_every_input_once_within_the_budget():
    import numpy as np

    from pipeline.batching import token_batches

    lengths = np.random.default_rng(0).integers(1, 600, 500)
    batches = token_batches(lengths, 2048)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    assert (np.diff(lengths[flat]) <= 0).all()  # longest first, so each batch pads to its first
    padded = [len(b) * lengths[b[0]] for b in batches]
    assert all(p <= 2048 or len(b) == 1 for p, b in zip(padded, batches))
    # Padded sizes grow only where a new power-of-two band of lengths starts (allocator reuse).
    bands = [int(lengths[b[0]] - 1).bit_length() for b in batches]
    rises = sum(padded[i] > padded[i - 1] for i in range(1, len(batches)))
    assert rises <= len(set(bands)) - 1
    assert len(batches) < 0.5 * len(lengths)  # short inputs share batches


def test_auto_scoring_precision_follows_the_cpu(monkeypatch, tiny_models):
    """auto scores in bf16 on a CPU with bf16 matrix instructions, fp32 on one without; every
    caller of 'auto' (the retraining gate too) reads it the same way."""
    import torch

    import pipeline.models
    from pipeline.models import resolve_precision
    from pipeline.scoring import TeacherSpec, load_teacher

    spec = TeacherSpec.parse(tiny_models["teacher"])
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(pipeline.models, "native_bf16_cpu", lambda native=native: native)
        teacher = load_teacher(spec, "cpu", "auto", 64)
        assert teacher.identity[0]["precision"] == str(dtype).replace("torch.", "")
        assert next(teacher.scorers[0].net.parameters()).dtype == dtype
        assert teacher.scorers[0].batch_tokens == 2048
        assert resolve_precision("auto", "cpu") == dtype


def test_auto_precision_on_a_gpu_leaves_this_process_without_cuda(monkeypatch):
    """luigi's --workers N fork the process that resolved 'auto' for every stage's fingerprint;
    torch's own bf16 check would initialise CUDA in it, and its forked children could not use the
    GPU. A child process answers while this one holds no CUDA state; once it holds some, torch."""
    import subprocess
    import sys

    import torch

    import pipeline.models
    from pipeline.models import resolve_precision

    def initialises_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda.is_bf16_supported() ran in the process that forks the workers")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", initialises_cuda)
    pipeline.models._cuda_bf16_in_child.cache_clear()
    probe = "import torch; print(torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
    gpu_bf16 = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "True"
    assert resolve_precision("auto", "cuda") == (torch.bfloat16 if gpu_bf16 else torch.float32)
    assert not torch.cuda.is_initialized()

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert resolve_precision("auto", "cuda") == dtype


def test_scores_fingerprint_holds_the_resolved_precision(monkeypatch, small_beir, tiny_models, tmp_path):
    """'auto' scored in bf16 on one CPU and fp32 on another must not share score artifacts."""
    import pipeline.models

    def fp(precision, native):
        monkeypatch.setattr(pipeline.models, "native_bf16_cpu", lambda: native)
        from pipeline.config import config_fingerprint
        from tasks.stages import _score_config  # uncached: luigi reuses the task instance, and with it .fp

        task = tasks.ScoreWithTeacher(**_score_params(small_beir, tiny_models, tmp_path, score_precision=precision))
        return config_fingerprint(_score_config(task), task.identity)

    assert fp("auto", True) == fp("bf16", False) != fp("auto", False) == fp("fp32", True)


@pytest.mark.parametrize("groups", [
    [("q1", ["a", "b"], ["c", "a", "d"]), ("q2", ["c"], ["a", "c", "e"]), ("q1", ["d"], ["f", "b"]), ("q3", [], ["a"])],
    [],
])
def test_group_pairs_lists_each_pair_once_in_group_order(tmp_path, groups):
    """Each group's positives then its negatives, groups in file order, a repeated pair at its
    first place: the order the scores file and the labels rely on."""
    import pyarrow as pa

    from pipeline.mining import GROUPS_SCHEMA, write_table
    from pipeline.scoring import group_pairs

    rows = {"query_id": [q for q, _, _ in groups], "positive_ids": [p for _, p, _ in groups],
            "positive_scores": [[1.0] * len(p) for _, p, _ in groups], "negative_ids": [n for _, _, n in groups],
            "negative_scores": [[0.0] * len(n) for _, _, n in groups], "negative_ranks": [list(range(len(n))) for _, _, n in groups]}
    write_table(pa.table(rows, schema=GROUPS_SCHEMA), tmp_path / "groups.parquet")
    listed = [(q, d) for q, pos, neg in groups for d in pos + neg]
    expected = list(dict.fromkeys(listed))
    qids, dids, total = group_pairs(tmp_path)
    assert list(zip(qids, dids)) == expected
    assert total == len(listed)


def test_tokenizer_parallelism_holds_for_the_block_only(monkeypatch):
    """The GPU scorer's tokenizer uses every core inside the block; the variable is as it was after."""
    import os

    from pipeline.scoring import tokenizer_parallelism

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with tokenizer_parallelism(True):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with tokenizer_parallelism(True):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    with tokenizer_parallelism(False):  # a CPU scorer leaves the setting to the user
        assert "TOKENIZERS_PARALLELISM" not in os.environ
