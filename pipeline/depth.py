"""The student's depth: the most layers whose pairs/s stays a given multiple of the teacher's.

A deeper student ranks better and costs more; what a layer costs against the teacher depends on
the hardware (bf16 matrix units, memory bandwidth) and on the data's lengths, so the depth is
measured, not assumed. The teacher and every candidate cut of the student rerank the same pairs
taking turns, as the evaluation times them (``pipeline.evaluation.ranker_speed``); the deepest
cut whose speed is at least ``speedup`` times the teacher's is the depth every student of the run
gets. "At least" is read off a lower confidence bound over the turns, not their mean: a shared
machine's speed drifts by tens of percent, and a cut chosen on a mean that sits on the threshold
serves below it about half the time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import model
from pipeline.errors import PipelineError
from pipeline.evaluation import TIMING_TURNS

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
    # The first dev queries, each with its candidates (training groups without a dev split; 0: all), in
    # as many turns as the evaluation's: a ranker's pairs/s depends on how many pairs it gets per
    # call (an ensemble teacher gained 8% over the student from 250 pairs a call to 500 on the demo),
    # so the depth is timed on blocks the size of the evaluation's.
    queries: int = 200
    turns: int = TIMING_TURNS
    confidence: float = 0.95  # the one-sided lower bound of the speedup over the turns that must reach it
    seed: int = 12
    device: str = "cpu"  # what a layer costs against the teacher is the device's: a GPU's choice is not a CPU's


def speedup_bound(teacher_seconds: list[float], student_seconds: list[float], confidence: float) -> float:
    """A one-sided lower confidence bound of how many times faster the student is than the teacher,
    from their seconds on the same pairs turn by turn: the mean of the per-turn log ratios less its
    Student-t margin, back on the ratio scale. With one turn there is no spread to go on; the
    ratio itself is returned."""
    from scipy import stats

    logs = np.log(np.asarray(teacher_seconds, float) / np.asarray(student_seconds, float))
    if len(logs) < 2:
        return float(np.exp(logs.mean()))
    margin = stats.t.ppf(confidence, len(logs) - 1) * logs.std(ddof=1) / np.sqrt(len(logs))
    return float(np.exp(logs.mean() - margin))


def deepest_within(times_teacher: dict[int, float], speedup: float) -> int:
    """The most layers whose speed is at least ``speedup`` times the teacher's (each cut's lower
    bound, :func:`speedup_bound`); the fewest measured when none is (a warning says so)."""
    fast = [layers for layers, times in times_teacher.items() if times >= speedup]
    if fast:
        return max(fast)
    fewest = min(times_teacher)
    log.warning(
        "no student depth up to %d layers is surely %.1f times as fast as the teacher (%d layer(s): at least %.2f times); taking %d",
        max(times_teacher), speedup, fewest, times_teacher[fewest], fewest,
    )
    return fewest


def timing_pairs(data_dir: str | Path, mined_dir: str | Path, max_queries: int) -> tuple[str, list[str], list[tuple[str, str]]]:
    """What the depth is timed on: the first ``max_queries`` dev queries' true top-k candidates
    (0: every one), the pairs a reranker serves; without a dev split, the training groups' pairs."""
    import pyarrow.parquet as pq

    from pipeline.data import pair_texts
    from pipeline.evaluation import candidate_pairs

    dev = Path(mined_dir) / "candidates-dev.parquet"
    if dev.exists():
        qids, dids, _ = candidate_pairs(pq.read_table(dev), max_queries)
        source = "dev candidates"
    else:
        groups = pq.read_table(Path(mined_dir) / "groups.parquet")
        groups = (groups.slice(0, max_queries) if max_queries else groups).to_pydict()
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
    from transformers import AutoConfig

    from pipeline.artifacts import atomic_dir, write_json
    from pipeline.evaluation import ranker_speed
    from pipeline.models import cut_student, resolve_precision
    from pipeline.scoring import CrossEncoderScorer, TeacherSpec, load_teacher

    c = config
    t0 = time.perf_counter()
    if c.max_layers < 1 or c.speedup <= 0 or not 0 < c.confidence < 1:
        raise PipelineError(
            f"student depth: max_layers {c.max_layers} and speedup {c.speedup} must both be positive, "
            f"and confidence {c.confidence} between 0 and 1"
        )
    source, qids, pairs = timing_pairs(data_dir, mined_dir, c.queries)
    dtype = resolve_precision(c.precision, c.device)
    teacher = load_teacher(TeacherSpec.parse(c.teacher, c.teacher_weights), c.device, c.teacher_precision, c.teacher_max_length)
    torch.manual_seed(c.seed)
    rankers = {"teacher": lambda part: teacher.score(pairs[part], qids[part], show_progress=False)}
    # A cut deeper than the backbone would be the backbone again, timed twice.
    deepest = min(c.max_layers, AutoConfig.from_pretrained(c.student).num_hidden_layers)
    for layers in range(1, deepest + 1):
        student = CrossEncoderScorer(cut_student(c.student, layers, c.device, c.max_length, head=c.student_head), c.device, dtype)
        rankers[layers] = lambda part, s=student: s.score(pairs[part], show_progress=False)
    log.info("timing the teacher and the student at 1-%d layers on %d %s pairs, taking turns", len(rankers) - 1, len(pairs), source)
    speed, timing, _ = ranker_speed(rankers, qids, 0, c.turns)
    teacher_pps = speed["teacher"]["pairs_per_second"]
    turns = timing["seconds_per_turn"]
    students = {
        n: {
            "pairs_per_second": s["pairs_per_second"],
            "times_teacher": round(s["pairs_per_second"] / teacher_pps, 2),
            "times_teacher_at_least": round(speedup_bound(turns["teacher"], turns[n], c.confidence), 2),
        }
        for n, s in speed.items()
        if n != "teacher"
    }
    layers = deepest_within({n: s["times_teacher_at_least"] for n, s in students.items()}, c.speedup)
    record = {
        "layers": layers,
        "speedup": c.speedup,
        "confidence": c.confidence,
        "teacher_pairs_per_second": teacher_pps,
        "students": {str(n): s for n, s in students.items()},
        "timed_on": {"source": source, **timing, "device": c.device},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info(
        "student depth: %d layer(s), %.2f times the teacher's pairs/s (at least %.2f at %g confidence)",
        layers, students[layers]["times_teacher"], students[layers]["times_teacher_at_least"], c.confidence,
    )
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
