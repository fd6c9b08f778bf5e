"""Scheduled retraining: one dated run of the whole DAG, gated into a model registry.

    luigi --module tasks RetrainStudent --date 2026-11-26 --dataset 'snapshots/{date}' --registry runs/registry
    luigi --module tasks RangeDaily --of RetrainStudent --start 2026-11-01 --stop 2026-11-27
"""

from __future__ import annotations

import functools
from pathlib import Path

import luigi

from pipeline import registry, teacher
from pipeline.models import resolve_device
from tasks.params import EvalParams, SnapshotDate
from tasks.stages import FineTuneTeacher, MineHardNegatives, PrepareData, TrainStudent, fitted_max_length


# Settings that make a student what it is: a champion made otherwise is not trained further.
STUDENT_RECIPE = ("student", "student_layers", "student_speedup", "student_head", "loss", "loss_kwargs", "max_length")
# Recipe settings that came after registries were first written, at the value that every champion
# recorded without them was made with (the depth was not measured: --student-layers as given).
RECIPE_BEFORE_RECORDED = {"student_speedup": luigi.FloatParameter().serialize(0.0)}


class RetrainStudent(SnapshotDate, EvalParams, luigi.Task):
    """Retrain on one date's snapshot; promote the student to <registry>/current if it passes the gate."""

    registry = luigi.Parameter(default="runs/registry", description="registry folder: history.jsonl, current, students/")
    promotion_tolerance = luigi.FloatParameter(
        default=0.0, description="promote unless nDCG@10 is worse than the champion's by more than this"
    )
    gate_dataset = luigi.Parameter(
        default="", description="fixed dataset whose dev split gates promotion; default: the snapshot itself"
    )
    gate_on_retriever = luigi.BoolParameter(
        default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="promote only a student that beats the retriever's own order on the gate's dev split; turn off "
        "only when production's first stage is not --embedder",
    )
    teacher_max_age_days = luigi.IntParameter(
        default=30, description="with a fine-tuned teacher (no --teacher): keep an earlier date's teacher made the same way "
        "for this many days, so the score cache serves every pair it scored; 0: fine-tune a teacher on every date",
    )
    refresh_teacher = luigi.BoolParameter(default=False, description="fine-tune a new teacher on this date's snapshot")
    continue_champion = luigi.BoolParameter(
        default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="train the champion further on this date's new queries (with --replay-ratio as many rows of the queries it "
        "has seen) when an earlier date made it with the same student recipe; false: train a new student on the whole snapshot",
    )
    rollback = luigi.BoolParameter(default=False, description="point current back to the previous champion and stop")
    rollback_from = luigi.Parameter(
        default="", description="with --rollback: the champion run to retire; nothing happens when it is no longer the "
        "champion, so a repeated rollback is harmless (empty: whichever is current)",
    )

    @property
    def run_name(self) -> str:
        return self.date.isoformat()

    def snapshot(self) -> str:
        """The dataset of this date: --dataset with {date} filled in (a plain path is used as is)."""
        return self.dataset.format(date=self.run_name) if "{date}" in self.dataset else self.dataset

    @functools.cached_property
    def shared(self) -> dict:
        """Parameters of this date's DAG: its own artifact folder, the caches shared across dates
        (so only new texts are embedded and only new pairs reach the teacher)."""
        return dict(
            output_dir=str(Path(self.output_dir) / self.run_name),
            cache_dir=self.cache_dir or str(Path(self.output_dir) / "cache"),
            registry=self.registry,
            run_id=self.run_name,
        )

    @functools.cached_property
    def run_teacher(self) -> str:
        """--teacher, else an earlier date's fine-tuned teacher that this date keeps ('' when it
        fine-tunes its own). Decided once: luigi asks for requires() several times."""
        if self.teacher or self.refresh_teacher or self.teacher_max_age_days <= 0:
            return self.teacher
        recipe = self.clone(FineTuneTeacher, dataset=self.snapshot(), **self.shared).config
        found = teacher.kept_teacher(self.output_dir, self.date, self.teacher_max_age_days, recipe)
        return str(found or "")

    @functools.cached_property
    def warm_start_from(self) -> dict:
        """The champion to train further and the prepared snapshot it was trained on, when an
        earlier date made it with this student recipe ({}: a new student). Decided once."""
        if not self.continue_champion or self.warm_start:
            return {}
        champion = registry.Registry(self.registry).champion()
        if not champion or champion.get("run", "") >= self.run_name:
            return {}
        mine, theirs = self.to_str_params(only_significant=True), champion.get("params", {})
        if any(theirs.get(k, RECIPE_BEFORE_RECORDED.get(k)) != mine.get(k) for k in STUDENT_RECIPE):
            return {}
        seen = Path(self.output_dir) / champion["run"] / PrepareData.stage_dir / champion.get("data_fingerprint", "")
        student = Path(champion.get("registry_student", ""))
        if not (seen / "queries.parquet").is_file() or not student.is_dir():
            return {}
        return {"warm_start": str(student), "seen_data": str(seen)}

    def requires(self):
        if self.rollback:
            return {}
        gate = self.gate_dataset or self.snapshot()
        return {
            "run": self.clone(TrainStudent, dataset=self.snapshot(), teacher=self.run_teacher, **self.shared, **self.warm_start_from),
            "data": self.clone(PrepareData, dataset=self.snapshot(), **self.shared),
            "gate_data": self.clone(PrepareData, dataset=gate, **self.shared),
            "gate_mined": self.clone(MineHardNegatives, dataset=gate, **self.shared),
        }

    def output(self):
        return luigi.LocalTarget(str(registry.Registry(self.registry).run_record(self.run_name)))

    def complete(self):
        return False if self.rollback else super().complete()

    def run(self):
        reg = registry.Registry(self.registry)
        if self.rollback:
            reg.rollback(self.rollback_from)
            return
        run = self.input()["run"]
        record = {
            "date": self.run_name,
            "dataset": self.snapshot(),
            "data_fingerprint": self.requires()["data"].fp,
            "teacher": self.run_teacher or "fine-tuned on this date",
            "student_started_from": self.warm_start_from.get("warm_start") or self.warm_start or self.student,
            "params": {k: v for k, v in self.to_str_params(only_significant=True).items()},
        }
        registry.promote_or_keep(
            self.registry, self.run_name, run["student"].path, run["metrics"].path, self.input()["gate_data"].path,
            self.input()["gate_mined"].path, self.promotion_tolerance, record, resolve_device(self.device),
            self.score_precision, fitted_max_length(self.requires()["run"], self.student), self.max_eval_queries, self.gate_on_retriever,
        )


@luigi.Task.event_handler(luigi.Event.FAILURE)
def record_failed_stage(task, exception):
    """A stage of a retrain that fails is written to the registry's history, with where it failed."""
    run = getattr(task, "run_id", "") or (task.run_name if isinstance(task, RetrainStudent) else "")
    if getattr(task, "registry", "") and run:
        registry.Registry(task.registry).record_failure(run, task.get_task_family(), f"{type(exception).__name__}: {exception}")
