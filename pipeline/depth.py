"""The student's depth: the most layers whose pairs/s stays a given multiple of the teacher's.

A deeper student ranks better and costs more; what a layer costs against the teacher depends on
the hardware (bf16 matrix units, memory bandwidth) and on the data's lengths, so the depth is
measured, not assumed. The teacher and every candidate cut of the student rerank the same pairs
taking turns, as the evaluation times them (``pipeline.evaluation.ranker_speed``); the deepest
cut at least ``speedup`` times the teacher's pairs/s is the depth every student of the run gets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import model
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DepthConfig:
    """Settings of the depth measurement (``ChooseStudentDepth``)."""

    teacher: str = model()
    teacher_weights: str = ""
    student: str = model()
    max_layers: int = 3  # the deepest cut measured
    speedup: float = 3.0  # the student's pairs/s over the teacher's, at least
    student_head: str = "auto"  # the task passes it resolved
    precision: str = "fp32"  # resolved, as the evaluation times the students
    teacher_precision: str = "fp32"  # resolved, as the evaluation times the teacher
    max_length: int = 256
    teacher_max_length: int = 512
    queries: int = 100  # the first dev queries, each with its candidates (training groups without a dev split)
    turns: int = 8
    seed: int = 12
    device: str = "cpu"  # what a layer costs against the teacher is the device's: a GPU's choice is not a CPU's


def deepest_within(pairs_per_second: dict[int, float], teacher_pairs_per_second: float, speedup: float) -> int:
    """The most layers whose pairs/s is at least ``speedup`` times the teacher's; the fewest
    measured when none is (a warning says so)."""
    fast = [layers for layers, pps in pairs_per_second.items() if pps >= speedup * teacher_pairs_per_second]
    if fast:
        return max(fast)
    fewest = min(pairs_per_second)
    log.warning(
        "no student depth up to %d layers reaches %.1f times the teacher's pairs/s (%d layer(s): %.2f times); taking %d",
        max(pairs_per_second), speedup, fewest, pairs_per_second[fewest] / teacher_pairs_per_second, fewest,
    )
    return fewest


def timing_pairs(data_dir: str | Path, mined_dir: str | Path, max_queries: int) -> tuple[str, list[str], list[tuple[str, str]]]:
    """What the depth is timed on: the first ``max_queries`` dev queries' true top-k candidates,
    the pairs a reranker serves; without a dev split, the training groups' pairs."""
    import pyarrow.parquet as pq

    from pipeline.data import pair_texts
    from pipeline.evaluation import candidate_pairs

    dev = Path(mined_dir) / "candidates-dev.parquet"
    if dev.exists():
        qids, dids, _ = candidate_pairs(pq.read_table(dev), max_queries)
        source = "dev candidates"
    else:
        groups = pq.read_table(Path(mined_dir) / "groups.parquet").slice(0, max_queries).to_pydict()
        qids, dids = [], []
        for q, pos, neg in zip(groups["query_id"], groups["positive_ids"], groups["negative_ids"]):
            qids += [q] * (len(pos) + len(neg))
            dids += pos + neg
        source = "training groups"
    if not qids:
        raise PipelineError(f"{mined_dir}: no dev candidates and no training groups to time the student's depth on")
    return source, qids, pair_texts(data_dir, qids, dids)


def choose_depth(data_dir: str | Path, mined_dir: str | Path, out_dir: str | Path, config: DepthConfig) -> dict:
    """Stage entry: time the teacher and the student cut to 1 … ``max_layers`` layers on the same
    pairs, in turns; ``stats.json`` in ``out_dir`` holds the chosen ``layers`` and every figure."""
    import time

    import torch

    from pipeline.artifacts import atomic_dir, write_json
    from pipeline.evaluation import ranker_speed
    from pipeline.models import cut_student, resolve_precision
    from pipeline.scoring import CrossEncoderScorer, TeacherSpec, load_teacher

    c = config
    t0 = time.perf_counter()
    if c.max_layers < 1 or c.speedup <= 0:
        raise PipelineError(f"student depth: max_layers {c.max_layers} and speedup {c.speedup} must both be positive")
    source, qids, pairs = timing_pairs(data_dir, mined_dir, c.queries)
    dtype = resolve_precision(c.precision, c.device)
    teacher = load_teacher(TeacherSpec.parse(c.teacher, c.teacher_weights), c.device, c.teacher_precision, c.teacher_max_length)
    torch.manual_seed(c.seed)
    rankers = {"teacher": lambda part: teacher.score(pairs[part], qids[part], show_progress=False)}
    for layers in range(1, c.max_layers + 1):
        student = CrossEncoderScorer(cut_student(c.student, layers, c.device, c.max_length, head=c.student_head), c.device, dtype)
        if student.ce.model.config.num_hidden_layers < layers:
            break  # the backbone has no more layers to keep
        rankers[layers] = lambda part, s=student: s.score(pairs[part], show_progress=False)
    log.info("timing the teacher and the student at 1-%d layers on %d %s pairs, taking turns", len(rankers) - 1, len(pairs), source)
    speed, timing, _ = ranker_speed(rankers, qids, 0, c.turns)
    teacher_pps = speed["teacher"]["pairs_per_second"]
    students = {layers: s["pairs_per_second"] for layers, s in speed.items() if layers != "teacher"}
    layers = deepest_within(students, teacher_pps, c.speedup)
    record = {
        "layers": layers,
        "speedup": c.speedup,
        "teacher_pairs_per_second": teacher_pps,
        "students": {str(n): {"pairs_per_second": pps, "times_teacher": round(pps / teacher_pps, 2)} for n, pps in students.items()},
        "timed_on": {"source": source, **timing, "device": c.device},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("student depth: %d layer(s), %.2f times the teacher's pairs/s", layers, students[layers] / teacher_pps)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "stats.json", record)
    return record


def chosen_layers(depth_dir: str | Path) -> int:
    """The depth a ``choose_depth`` folder holds."""
    from pipeline.artifacts import read_json

    return int(read_json(Path(depth_dir) / "stats.json")["layers"])


def check_cut_to(layers: int, students: dict[str, str | Path]) -> None:
    """Stop an evaluation whose trained students were cut to another depth than the record says:
    students trained before the depth was measured anew (its folder deleted) keep their own."""
    from pipeline.training import layer_count

    for name, folder in students.items():
        found = layer_count(folder)
        if found is not None and found != layers:
            raise PipelineError(
                f"{folder}: the {name} has {found} layers, but the depth stage now says {layers}; "
                "delete that student's folder to train it again at the measured depth"
            )
