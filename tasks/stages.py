"""The pipeline's luigi tasks: parameters, requires(), output(), and one call into pipeline/."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import luigi
import torch

from losses.factory import resolve_loss
from pipeline import data, evaluation, labels, mining, multilingual, scoring, teacher, training
from pipeline.artifacts import fingerprint, point_link, read_json, write_json
from pipeline.errors import PipelineError
from pipeline.models import PRECISIONS, model_identity, resolve_device, resolve_precision, student_head
from tasks.params import DataParams, EvalParams, LabelParams, MineParams, MultilingualParams, TeacherParams, TrainParams

FINE_TUNED = "fine-tuned"


class Stage(luigi.Task):
    """Shared plumbing: fingerprinted artifact folders under --output-dir and stage statistics."""

    stage_dir: str = ""

    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    def artifact(self) -> Path:
        return self.root / self.stage_dir / self.fp

    def stats(self) -> dict:
        path = self.artifact() / "stats.json"
        return read_json(path) if path.exists() else {}

    @property
    def run_device(self) -> str:
        return resolve_device(self.device)

    @property
    def resources(self):
        return {"gpu": 1} if self.run_device.startswith("cuda") else {}

    def on_failure(self, exception):
        # What the scheduler shows and stores: the one line of an expected error, else the traceback.
        return str(exception) if isinstance(exception, PipelineError) else super().on_failure(exception)

    def progress(self, done: int, total: int) -> None:
        self.set_progress_percentage(round(100 * done / max(total, 1), 1))
        self.set_status_message(f"{done}/{total} pairs")


class PrepareData(DataParams, Stage):
    """Validate the dataset and normalize it to Parquet."""

    stage_dir = "data"

    @functools.cached_property
    def fp(self) -> str:
        # A missing file fingerprints by its name; run() then stops on it with a one-line error.
        extra = self.unlabeled_queries and (
            data.dataset_hash(self.unlabeled_queries) if Path(self.unlabeled_queries).is_file() else self.unlabeled_queries
        )
        return fingerprint("data", data.dataset_hash(self.dataset), *([extra] if extra else []))

    def output(self):
        return luigi.LocalTarget(str(self.artifact()))

    def run(self):
        data.prepare_data(self.dataset, self.artifact(), self.unlabeled_queries)


class MineHardNegatives(MineParams, Stage):
    """Negatives for training queries and rerank candidates for dev/test, from a bi-encoder + FAISS."""

    stage_dir = "mined"

    def requires(self):
        return self.clone(PrepareData)

    @functools.cached_property
    def fp(self) -> str:
        return fingerprint(
            self.requires().fp, model_identity(self.embedder), self.mined_negatives, self.range_min, self.range_max,
            self.sampling, self.max_train_queries, self.rerank_top_k, self.faiss_index, self.max_length, self.seed,
            self.filters, self.random_negatives, self.faiss_nprobe, self.faiss_ef_search, self.query_prompt_name,
            self.document_prompt_name, self.max_unjudged_queries,
        )

    @property
    def mined_negatives(self) -> int:
        return max(self.num_negatives, self.negative_pool)

    @property
    def filters(self) -> mining.NegativeFilter:
        return mining.NegativeFilter(self.absolute_margin, self.relative_margin, self.max_score, self.min_score)

    def output(self):
        return luigi.LocalTarget(str(self.artifact()))

    def run(self):
        mining.mine_hard_negatives(
            self.input().path, self.artifact(), self.embedder, self.cache_dir or self.root / "cache",
            self.mined_negatives, self.range_min, self.range_max, self.sampling, self.max_train_queries,
            self.rerank_top_k, self.faiss_index, self.run_device, self.max_length, self.seed,
            self.filters, self.random_negatives, self.faiss_nprobe, self.faiss_ef_search, self.query_prompt_name,
            self.document_prompt_name, self.max_unjudged_queries,
        )


class FineTuneTeacher(TeacherParams, Stage):
    """A cross-encoder teacher fine-tuned on the judged train pairs (when --teacher names none)."""

    stage_dir = "teacher"

    def requires(self):
        return {"data": self.clone(PrepareData), "mined": self.clone(MineHardNegatives)}

    @functools.cached_property
    def fp(self) -> str:
        return fingerprint(
            self.requires()["mined"].fp, self.teacher_kind, model_identity(self.teacher_backbone or self.embedder),
            self.teacher_epochs,
            self.teacher_learning_rate, self.teacher_batch_size, self.teacher_negatives, self.teacher_max_length,
        )

    def output(self):
        return luigi.LocalTarget(str(self.artifact()))

    def run(self):
        if self.teacher_kind == "bi-encoder":
            teacher.fine_tune_bi_encoder(
                self.input()["data"].path, self.input()["mined"].path, self.artifact(),
                self.teacher_backbone or self.embedder, self.teacher_epochs, self.teacher_batch_size,
                self.teacher_learning_rate, self.max_length, self.run_device,
                _train_precision(self.run_device, "auto"), self.seed, self.trust_remote_code,
            )
            return
        teacher.fine_tune_teacher(
            self.input()["data"].path, self.input()["mined"].path, self.artifact(),
            self.teacher_backbone or self.embedder, self.teacher_epochs, self.teacher_batch_size,
            self.teacher_learning_rate, self.teacher_max_length, self.teacher_negatives,
            device=self.run_device, precision=_train_precision(self.run_device, "auto"), seed=self.seed,
            trust_remote_code=self.trust_remote_code,
        )


def _needs_fine_tuned(teacher_param: str) -> bool:
    refs = [t.strip() for t in teacher_param.split(",") if t.strip()]
    return not refs or FINE_TUNED in refs


def resolved_teacher(task: TeacherParams) -> str:
    """--teacher with the fine-tuned teacher's folder in place of 'fine-tuned' (or of nothing)."""
    refs = [t.strip() for t in task.teacher.split(",") if t.strip()] or [FINE_TUNED]
    if FINE_TUNED in refs:
        path = str(task.clone(FineTuneTeacher).artifact())
        refs = [path if r == FINE_TUNED else r for r in refs]
    return ",".join(refs)


def _teacher_identity(task: TeacherParams) -> list:
    ids = []
    for r in [t.strip() for t in task.teacher.split(",") if t.strip()] or [FINE_TUNED]:
        ids.append(task.clone(FineTuneTeacher).fp if r == FINE_TUNED else model_identity(r.split(":", 1)[-1]))
    return ids


def _precision_name(dtype: torch.dtype) -> str:
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def _train_precision(device: str, choice: str) -> str:
    """The trainer's precision name; 'auto' follows resolve_precision's rule (fp32 on every CPU)."""
    return choice if choice != "auto" else _precision_name(resolve_precision("auto", device))


def _score_precision(task: TeacherParams) -> str:
    """The scoring precision's name with 'auto' resolved, so that fingerprints tell a bf16 run
    (CUDA, or a CPU with bf16 instructions) from an fp32 one."""
    if task.score_precision == "int8":
        return "int8"
    return _precision_name(resolve_precision(task.score_precision, task.run_device, cpu_bf16=True))


def _scores_fp(task: TeacherParams) -> str:
    return fingerprint(
        task.clone(MineHardNegatives).fp, _teacher_identity(task), task.teacher_weights, _score_precision(task),
        task.teacher_max_length, task.score_shards,
    )


def _scoring_inputs(task: TeacherParams) -> dict:
    req = {"data": task.clone(PrepareData), "mined": task.clone(MineHardNegatives)}
    if _needs_fine_tuned(task.teacher):
        req["teacher"] = task.clone(FineTuneTeacher)
    return req


class ScoreShard(TeacherParams, Stage):
    """Teacher scores of one shard of the mined pairs; any worker can take any shard."""

    stage_dir = "scores"
    shard = luigi.IntParameter()

    def requires(self):
        return _scoring_inputs(self)

    @functools.cached_property
    def fp(self) -> str:
        return _scores_fp(self)

    def output(self):
        return luigi.LocalTarget(str(self.artifact() / "shards" / f"shard-{self.shard:05d}-of-{self.score_shards:05d}.arrow"))

    def run(self):
        scoring.score_shard(
            self.input()["data"].path, self.input()["mined"].path, self.output().path, resolved_teacher(self),
            self.teacher_weights, self.shard, self.score_shards, self.run_device, self.score_precision,
            self.teacher_max_length, self.score_batch_tokens, Path(self.cache_dir or self.root / "cache") / "teacher-scores",
            self.trust_remote_code, self.progress,
        )


class ScoreWithTeacher(TeacherParams, Stage):
    """Checks the shards and joins them into one Arrow file of teacher scores."""

    stage_dir = "scores"

    def requires(self):
        return {
            "mined": self.clone(MineHardNegatives),
            "shards": [self.clone(ScoreShard, shard=i) for i in range(self.score_shards)],
        }

    @functools.cached_property
    def fp(self) -> str:
        return _scores_fp(self)

    def output(self):
        return luigi.LocalTarget(str(self.artifact() / "scores.arrow"))

    def run(self):
        paths = [t.path for t in self.input()["shards"]]
        shard_stats = [read_json(Path(p).with_suffix(".json")) for p in paths]
        stats = {key: round(sum(s.get(key, 0) for s in shard_stats), 3)
                 for key in ("pairs_scored", "pairs_from_cache", "seconds", "truncated_pairs")}
        stats["pairs_per_second"] = round(stats["pairs_scored"] / stats["seconds"], 2) if stats["seconds"] else None
        stats["precision"] = shard_stats[0].get("precision") if shard_stats else None
        # Written before the joined scores (which mark the stage done), then completed after.
        write_json(self.artifact() / "stats.json", stats)
        stats = {**scoring.join_shards(self.input()["mined"].path, paths, self.output().path), **stats}
        write_json(self.artifact() / "stats.json", stats)


class BuildLabels(LabelParams, Stage):
    """Training rows in the data format of the chosen loss."""

    stage_dir = "labels"

    @property
    def loss_spec(self):
        return resolve_loss(self.loss)[0]

    def requires(self):
        req = {"data": self.clone(PrepareData), "mined": self.clone(MineHardNegatives)}
        # Unjudged queries have no label but the teacher's (except in label-only formats, which skip them).
        unjudged = self.max_unjudged_queries != 0 and self.loss_spec.format not in ("pair-binary", "pair-class")
        if self.loss_spec.needs_teacher or self.false_negatives != "keep" or unjudged:
            req["scores"] = self.clone(ScoreWithTeacher)
        return req

    @functools.cached_property
    def fp(self) -> str:
        up = self.requires()
        upstream = up["scores"].fp if "scores" in up else up["mined"].fp
        return fingerprint(
            upstream, self.loss_spec.format, self.num_negatives, self.label_scale, self.false_negatives,
            self.false_negative_margin,
        )

    def output(self):
        return luigi.LocalTarget(str(self.artifact()))

    def run(self):
        scores = self.input().get("scores")
        labels.build_labels(
            self.input()["data"].path, self.input()["mined"].path, scores.path if scores else None,
            self.artifact(), self.loss_spec.format, self.num_negatives, self.label_scale,
            self.false_negatives, self.false_negative_margin,
        )


class FitStudent(TrainParams, Stage):
    """The student cut from --student and trained with --loss on the labels."""

    stage_dir = "students"

    def requires(self):
        return {"data": self.clone(PrepareData), "mined": self.clone(MineHardNegatives), "labels": self.clone(BuildLabels)}

    @functools.cached_property
    def fp(self) -> str:
        return fingerprint(
            self.requires()["labels"].fp, self.loss, model_identity(self.student), self.student_layers,
            student_head(self.student, self.student_head), self.loss_kwargs, self.epochs, self.batch_size,
            self.learning_rate, self.max_length, self.train_precision,
        )

    def output(self):
        return luigi.LocalTarget(str(self.artifact()))

    def run(self):
        kwargs = dict(
            data_dir=self.input()["data"].path, mined_dir=self.input()["mined"].path,
            labels_dir=self.input()["labels"].path, out_dir=str(self.artifact()), loss=self.loss, student=self.student,
            student_layers=self.student_layers, student_head=self.student_head, loss_kwargs=self.loss_kwargs,
            teacher=resolved_teacher(self),
            max_dev_queries=self.max_dev_queries, seed=self.seed, epochs=self.epochs, batch_size=self.batch_size,
            learning_rate=self.learning_rate, max_length=self.max_length, device=self.run_device,
            precision=_train_precision(self.run_device, self.train_precision), trust_remote_code=self.trust_remote_code,
        )
        training.fit_student_once(self.nproc_per_node, **kwargs)


class EvaluateStudent(EvalParams, Stage):
    """Test metrics of retriever, teacher, untrained and trained student; report and plots."""

    stage_dir = "eval"

    def requires(self):
        req = {
            "data": self.clone(PrepareData),
            "mined": self.clone(MineHardNegatives),
            "student": self.clone(FitStudent),
        }
        if _needs_fine_tuned(self.teacher):
            # The student's loss may not need teacher scores, but the evaluation compares against the teacher.
            req["teacher"] = self.clone(FineTuneTeacher)
        return req

    @functools.cached_property
    def fp(self) -> str:
        return fingerprint(self.requires()["student"].fp, _teacher_identity(self), self.teacher_weights, self.max_eval_queries)

    def output(self):
        return luigi.LocalTarget(str(self.artifact() / "metrics.json"))

    def run(self):
        stages = _upstream_stats(self, BuildLabels, {"FitStudent": FitStudent})
        params = dict(self.param_kwargs, teacher_resolved=resolved_teacher(self), fingerprint=self.fp)
        evaluation.evaluate_student(
            self.input()["data"].path, self.input()["mined"].path, self.input()["student"].path,
            self.artifact(), resolved_teacher(self), self.teacher_weights, self.student, self.student_layers,
            self.student_head, self.embedder, params, stages, {k: v.get("seconds", 0.0) for k, v in stages.items()},
            self.run_device, self.score_precision, self.max_length, self.teacher_max_length,
            self.max_eval_queries, self.seed, str(self.baseline_cache()),
        )

    def baseline_cache(self) -> Path:
        """Scores that do not depend on the student's training, shared by every student of a run."""
        key = fingerprint(
            self.requires()["mined"].fp, _teacher_identity(self), self.teacher_weights, self.max_eval_queries,
            model_identity(self.student), self.student_layers, student_head(self.student, self.student_head), self.seed,
            _score_precision(self), self.max_length, self.teacher_max_length,
        )
        return self.root / "cache" / "eval" / f"{key}.npz"


def _upstream_stats(task: Stage, labels_task: type, students: dict[str, type]) -> dict:
    """stats.json of every stage an evaluation depends on, by stage name (in pipeline order)."""
    tasks = {"PrepareData": task.clone(PrepareData), "MineHardNegatives": task.clone(MineHardNegatives)}
    if _needs_fine_tuned(task.teacher):
        tasks["FineTuneTeacher"] = task.clone(FineTuneTeacher)
    if "scores" in task.clone(labels_task).requires():
        tasks["ScoreWithTeacher"] = task.clone(ScoreWithTeacher)
    tasks[labels_task.__name__] = task.clone(labels_task)
    tasks.update({name: task.clone(cls) for name, cls in students.items()})
    return {name: t.stats() for name, t in tasks.items()}


class TrainStudent(EvalParams, luigi.Task):
    """Entry point: runs the whole DAG and publishes <output-dir>/student, metrics.json and report.md."""

    evaluation_task = EvaluateStudent
    student_task = FitStudent
    published = ("teacher_vs_student.png", "quality_vs_speed.png", "mined_negatives.png", "report.md", "metrics.json")

    def requires(self):
        return self.clone(self.evaluation_task)

    def output(self):
        return {
            "metrics": luigi.LocalTarget(os.path.join(self.output_dir, "metrics.json")),
            "report": luigi.LocalTarget(os.path.join(self.output_dir, "report.md")),
            "student": luigi.LocalTarget(os.path.join(self.output_dir, "student")),
        }

    def complete(self):
        # The published files are shared by every run in --output-dir; they count as this run's
        # output only when they come from this run's fingerprint.
        path = Path(self.output_dir) / "metrics.json"
        if not path.exists() or not Path(self.output_dir, "student").exists():
            return False
        try:
            return json.loads(path.read_text())["params"]["fingerprint"] == self.requires().fp
        except (ValueError, KeyError):
            return False

    def run(self):
        ev = self.requires()
        src = ev.artifact()
        root = Path(self.output_dir)
        point_link(root / "student", ev.clone(self.student_task).artifact())
        for name in self.published:
            if (src / name).exists():
                point_link(root / name, src / name)  # metrics.json last: it marks this run complete
        print(f"\nStudent: {root / 'student'}\nMetrics: {root / 'metrics.json'}\nReport:  {root / 'report.md'}\n")


# ---- multilingual distillation ------------------------------------------------------------


class BuildMultilingualLabels(MultilingualParams, BuildLabels):
    """Training rows for the source language and each target language (and mixed pairs with
    --cross-lingual), all labelled with the source pairs' teacher scores."""

    @functools.cached_property
    def fp(self) -> str:
        return fingerprint(
            BuildLabels.fp.func(self), "multilingual", multilingual.parse_languages(self.languages), self.source_language, self.cross_lingual
        )

    def run(self):
        scores = self.input().get("scores")
        multilingual.build_multilingual_labels(
            self.input()["data"].path, self.input()["mined"].path, scores.path if scores else None, self.artifact(),
            self.loss_spec.format, multilingual.parse_languages(self.languages), self.source_language,
            self.cross_lingual, self.num_negatives, self.label_scale, self.false_negatives, self.false_negative_margin,
        )


class FitMultilingualStudent(MultilingualParams, FitStudent):
    """The student trained on every language's rows."""

    def requires(self):
        return {**super().requires(), "labels": self.clone(BuildMultilingualLabels)}


class EvaluateMultilingualStudent(MultilingualParams, Stage):
    """Per-language test metrics: retriever, teacher (source texts), untrained, source-only and
    multilingual students."""

    stage_dir = "eval"

    def requires(self):
        req = {
            "data": self.clone(PrepareData),
            "mined": self.clone(MineHardNegatives),
            "student": self.clone(FitMultilingualStudent),
            "source_only": self.clone(FitStudent),
        }
        if _needs_fine_tuned(self.teacher):
            req["teacher"] = self.clone(FineTuneTeacher)
        return req

    @functools.cached_property
    def fp(self) -> str:
        req = self.requires()
        return fingerprint(
            "multilingual", req["student"].fp, req["source_only"].fp, _teacher_identity(self), self.teacher_weights,
            self.max_eval_queries, multilingual.parse_languages(self.languages), self.source_language,
        )

    def output(self):
        return luigi.LocalTarget(str(self.artifact() / "metrics.json"))

    def run(self):
        stages = _upstream_stats(
            self, BuildMultilingualLabels, {"FitStudent": FitMultilingualStudent, "FitStudentSourceOnly": FitStudent}
        )
        params = dict(self.param_kwargs, teacher_resolved=resolved_teacher(self), fingerprint=self.fp)
        multilingual.evaluate_languages(
            self.input()["data"].path, self.input()["mined"].path, self.input()["student"].path,
            self.input()["source_only"].path, self.artifact(), multilingual.parse_languages(self.languages),
            self.source_language, resolved_teacher(self), self.teacher_weights, self.student, self.student_layers,
            self.student_head, params, stages, {k: v.get("seconds", 0.0) for k, v in stages.items()}, self.run_device,
            self.score_precision, self.max_length, self.teacher_max_length, self.max_eval_queries, self.seed,
        )


class TrainMultilingualStudent(MultilingualParams, TrainStudent):
    """Entry point of multilingual distillation: publishes the multilingual student, metrics.json
    (with a ``languages`` section) and report.md."""

    evaluation_task = EvaluateMultilingualStudent
    student_task = FitMultilingualStudent
    published = ("languages.png", "report.md", "metrics.json")
