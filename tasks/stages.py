"""The pipeline's luigi tasks: parameters, requires(), output(), and one call into pipeline/."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import luigi
import torch

from losses.factory import resolve_loss
from pipeline import data, depth, evaluation, export, labels, mining, multilingual, plain_student, scoring, teacher, training
from pipeline.artifacts import fingerprint, point_link, read_json, write_json
from pipeline.config import config_fingerprint
from pipeline.errors import PipelineError
from pipeline.models import PRECISIONS, fitting_max_length, model_identity, resolve_device, resolve_precision, strip_kind, student_head, uses_own_head
from tasks.params import DataParams, EvalParams, LabelParams, MineParams, MultilingualParams, StudentParams, TeacherParams, TrainParams

FINE_TUNED = "fine-tuned"


class Stage(luigi.Task):
    """Shared plumbing: fingerprinted artifact folders under --output-dir and stage statistics."""

    stage_dir: str = ""

    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    def artifact(self) -> Path:
        return self.root / self.stage_dir / self.fp

    def output(self):
        # The fingerprinted folder, renamed into place once complete; stages that finish with a
        # file inside it (scores, metrics) say so.
        return luigi.LocalTarget(str(self.artifact()))

    def stats(self) -> dict:
        path = self.artifact() / "stats.json"
        return read_json(path) if path.exists() else {}

    def identity(self, ref: str) -> str:
        """A model's identity in fingerprints. A teacher this run fine-tunes goes by its artifact's
        fingerprint (the folder's name), since the folder may not exist yet when it is hashed."""
        path = Path(strip_kind(ref))
        if path.parent == self.root / FineTuneTeacher.stage_dir:
            return f"{FINE_TUNED}:{path.name}"
        return model_identity(ref)

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
        # A missing file or folder fingerprints by its name: run() then stops on it with a one-line
        # error, where a failing complete() would print luigi's traceback.
        def content_or_name(path: str) -> str:
            return data.dataset_hash(path) if Path(path).exists() else path

        extra = [content_or_name(self.unlabeled_queries)] if self.unlabeled_queries else []
        # Such a folder was once prepared with no dev split; its outputs from then must not be reused.
        extra += ["dev held out of train"] if data.holds_out_dev(self.dataset) else []
        # Such a folder was once prepared with a query training on the split it is tested on.
        extra += ["one split per query"] if data.splits_overlap(self.dataset) else []
        return fingerprint("data", content_or_name(self.dataset), *extra)

    def run(self):
        data.prepare_data(self.dataset, self.artifact(), self.unlabeled_queries)


class MineHardNegatives(MineParams, Stage):
    """Negatives for training queries and rerank candidates for dev/test, from a bi-encoder + FAISS."""

    stage_dir = "mined"

    def requires(self):
        return self.clone(PrepareData)

    @functools.cached_property
    def config(self) -> mining.MineConfig:
        return mining.MineConfig(
            embedder=self.embedder, num_negatives=max(self.num_negatives, self.negative_pool), range_min=self.range_min,
            range_max=self.range_max, sampling=self.sampling, max_train_queries=self.max_train_queries,
            max_unjudged_queries=self.max_unjudged_queries, rerank_top_k=self.rerank_top_k, faiss_index=self.faiss_index,
            nprobe=self.faiss_nprobe, ef_search=self.faiss_ef_search, max_length=fitted_max_length(self, self.embedder), seed=self.seed,
            filters=mining.NegativeFilter(self.absolute_margin, self.relative_margin, self.max_score, self.min_score),
            random_share=self.random_negatives, query_prompt_name=self.query_prompt_name,
            document_prompt_name=self.document_prompt_name, ignore_identical_ids=self.ignore_identical_ids,
            exclude_text_twins=self.exclude_text_twins, max_positives=self.max_positives,
            device=self.run_device, cache_dir=str(self.cache_dir or self.root / "cache"),
        )

    @functools.cached_property
    def fp(self) -> str:
        return config_fingerprint(self.config, self.identity, self.requires().fp)

    def run(self):
        mining.mine_hard_negatives(self.input().path, self.artifact(), self.config)


class FineTuneTeacher(TeacherParams, Stage):
    """A teacher fine-tuned on the judged train pairs (when --teacher names none): --teacher-kind."""

    stage_dir = "teacher"

    def requires(self):
        teacher.check_fine_tunable(self.dataset)  # at scheduling: before mining, not after it
        return {"data": self.clone(PrepareData), "mined": self.clone(MineHardNegatives)}

    @functools.cached_property
    def config(self) -> teacher.TeacherConfig:
        return teacher.TeacherConfig(
            backbone=self.teacher_backbone or self.embedder, kind=self.teacher_kind, loss=self.teacher_loss, head=self.teacher_head,
            ensemble_weight=teacher.share_setting(self.teacher_ensemble_weight), epochs=self.teacher_epochs, batch_size=self.teacher_batch_size,
            learning_rate=self.teacher_learning_rate, bi_encoder_batch_size=self.teacher_bi_encoder_batch_size,
            bi_encoder_learning_rate=self.teacher_bi_encoder_learning_rate,
            # A bi-encoder teacher embeds each text alone, at the embedder's length.
            max_length=fitted_max_length(self, self.embedder) if self.teacher_kind == "bi-encoder" else fitted_teacher_max_length(self),
            negatives=self.teacher_negatives, precision=_train_precision(self.run_device, "auto"), seed=self.seed,
            device=self.run_device, trust_remote_code=self.trust_remote_code, cache_dir=teacher_score_cache(self),
        ).for_kind()

    @functools.cached_property
    def fp(self) -> str:
        return config_fingerprint(self.config, self.identity, self.requires()["mined"].fp)

    def run(self):
        teacher.fine_tune_teacher(self.input()["data"].path, self.input()["mined"].path, self.artifact(), self.config)


def _needs_fine_tuned(teacher_param: str) -> bool:
    refs = scoring.teacher_refs(teacher_param)
    return not refs or FINE_TUNED in refs


def resolved_teacher(task: TeacherParams) -> str:
    """--teacher with the fine-tuned teacher's folder in place of 'fine-tuned' (or of nothing)."""
    refs = scoring.teacher_refs(task.teacher) or [FINE_TUNED]
    if FINE_TUNED in refs:
        path = str(task.clone(FineTuneTeacher).artifact())
        refs = [path if r == FINE_TUNED else r for r in refs]
    return ",".join(refs)


def _precision_name(dtype: torch.dtype) -> str:
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def _train_precision(device: str, choice: str) -> str:
    """The trainer's precision name; 'auto' is bf16 on CUDA and on CPUs that multiply bf16 natively
    (the demo's student trained 1.45x as fast in bf16 on 2 such cores, to the same loss), else fp32."""
    return choice if choice != "auto" else _precision_name(resolve_precision("auto", device))


def _score_precision(task: TeacherParams) -> str:
    """The teacher's scoring precision with 'auto' resolved, so that fingerprints tell a bf16 run
    (CUDA, or a CPU with bf16 instructions) from an fp32 one."""
    if task.score_precision == "int8":
        return "int8"
    return _precision_name(resolve_precision(task.score_precision, task.run_device))


def _student_precision(task: TeacherParams) -> str:
    """The precision students and the retriever are scored in: the teacher's, so that speed is
    compared on one footing (int8 quantizes the teacher alone; the others then run in fp32)."""
    choice = "fp32" if task.score_precision == "int8" else task.score_precision
    return _precision_name(resolve_precision(choice, task.run_device))


def fitted_max_length(task: MineParams, model: str) -> int:
    """--max-length for ``model``: as given, or (0) fitted to the dataset's pairs in its tokens."""
    return fitting_max_length(task.max_length, model, task.dataset)


def fitted_teacher_max_length(task: TeacherParams) -> int:
    """--teacher-max-length, or (0) fitted in the tokens of the teacher (its first member, or the
    backbone it is fine-tuned from)."""
    given = [t for t in scoring.teacher_refs(task.teacher) if t != FINE_TUNED]
    return fitting_max_length(task.teacher_max_length, given[0] if given else task.teacher_backbone or task.embedder, task.dataset)


def teacher_score_cache(task: TeacherParams) -> str:
    """The teacher score cache: scoring reads and fills it, teacher fine-tuning adds its dev scores."""
    return str(Path(task.cache_dir or task.root / "cache") / "teacher-scores")


def _score_config(task: TeacherParams) -> scoring.ScoreConfig:
    return scoring.ScoreConfig(
        teacher=resolved_teacher(task), teacher_weights=task.teacher_weights, precision=_score_precision(task),
        max_length=fitted_teacher_max_length(task), num_shards=task.score_shards, device=task.run_device,
        batch_tokens=task.score_batch_tokens, cache_dir=teacher_score_cache(task),
        trust_remote_code=task.trust_remote_code, max_dev_queries=task.max_dev_queries,
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
    def config(self) -> scoring.ScoreConfig:
        return _score_config(self)

    @functools.cached_property
    def fp(self) -> str:
        return config_fingerprint(self.config, self.identity, self.clone(MineHardNegatives).fp)

    def output(self):
        return luigi.LocalTarget(str(self.artifact() / "shards" / f"shard-{self.shard:05d}-of-{self.score_shards:05d}.arrow"))

    def run(self):
        scoring.score_shard(
            self.input()["data"].path, self.input()["mined"].path, self.output().path, self.config, self.shard, self.progress
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
        return self.clone(ScoreShard, shard=0).fp  # the shards' folder

    def output(self):
        return luigi.LocalTarget(str(self.artifact() / "scores.arrow"))

    def run(self):
        paths = [t.path for t in self.input()["shards"]]
        shard_stats = [read_json(Path(p).with_suffix(".json")) for p in paths]
        stats = {key: round(sum(s.get(key, 0) for s in shard_stats), 3)
                 for key in ("pairs_scored", "pairs_from_cache", "seconds", "truncated_pairs", "stage_seconds", "cache_seconds",
                             "tokenize_seconds", "model_seconds", "tokenizer_wait_seconds")}
        stats["pairs_per_second"] = round(stats["pairs_scored"] / stats["seconds"], 2) if stats["seconds"] else None
        stats["precision"] = shard_stats[0].get("precision") if shard_stats else None
        stats["dev_check"] = shard_stats[0].get("dev_check", {}) if shard_stats else {}
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
    def config(self) -> labels.LabelConfig:
        return labels.LabelConfig(
            fmt=self.loss_spec.format, num_negatives=self.num_negatives, label_scale=self.label_scale,
            false_negatives=self.false_negatives, false_negative_margin=self.false_negative_margin,
        )

    @functools.cached_property
    def fp(self) -> str:
        up = self.requires()
        return config_fingerprint(self.config, self.identity, up["scores"].fp if "scores" in up else up["mined"].fp)

    def run(self):
        scores = self.input().get("scores")
        labels.build_labels(
            self.input()["data"].path, self.input()["mined"].path, scores.path if scores else None, self.artifact(), self.config
        )


class ChooseStudentDepth(StudentParams, Stage):
    """The student's depth with --student-speedup: the deepest cut up to --student-layers that
    reranks at least that many times the teacher's pairs/s, timed here (pipeline.depth).

    It takes no training setting, so the distilled and the label-only students require the same
    task; and it waits for the teacher's scores, so that with several workers the timing does not
    share the machine with the scoring shards.
    """

    stage_dir = "depth"

    def requires(self):
        req = {"data": self.clone(PrepareData), "mined": self.clone(MineHardNegatives), "scores": self.clone(ScoreWithTeacher)}
        if _needs_fine_tuned(self.teacher):
            req["teacher"] = self.clone(FineTuneTeacher)
        return req

    @functools.cached_property
    def config(self) -> depth.DepthConfig:
        return depth.DepthConfig(
            teacher=resolved_teacher(self), teacher_weights=self.teacher_weights, student=self.student,
            max_layers=self.student_layers, speedup=self.student_speedup, student_head=student_head(self.student, self.student_head),
            precision=_student_precision(self), teacher_precision=_score_precision(self), max_length=fitted_max_length(self, self.student),
            teacher_max_length=fitted_teacher_max_length(self), queries=self.timing_queries, seed=self.seed, device=self.run_device,
        )

    @functools.cached_property
    def fp(self) -> str:
        return config_fingerprint(self.config, self.identity, self.requires()["mined"].fp)

    def run(self):
        depth.choose_depth(self.input()["data"].path, self.input()["mined"].path, self.artifact(), self.config)


def _measured_depth(task: StudentParams, req: dict) -> dict:
    """``req`` with the depth stage when --student-speedup asks for one."""
    return {**req, "depth": task.clone(ChooseStudentDepth)} if task.student_speedup > 0 else req


def _at_depth(config, inputs: dict):
    """``config`` at the depth the depth stage chose, if one ran: its fingerprint holds
    --student-layers as the most, and the depth stage's fingerprint stands for the choice."""
    if "depth" not in inputs:
        return config
    return dataclasses.replace(config, student_layers=depth.chosen_layers(inputs["depth"].path))


class FitStudent(TrainParams, Stage):
    """The student cut from --student and trained with --loss on the labels."""

    stage_dir = "students"

    def requires(self):
        req = {"data": self.clone(PrepareData), "mined": self.clone(MineHardNegatives), "labels": self.clone(BuildLabels)}
        # A warm start continues a trained student, whose depth is its own.
        return req if self.warm_start else _measured_depth(self, req)

    @functools.cached_property
    def config(self) -> training.FitConfig:
        labels_task = self.requires()["labels"]
        return training.FitConfig(
            loss=self.loss, student=self.student, student_layers=self.student_layers,
            student_head=student_head(self.student, self.student_head), loss_kwargs=self.loss_kwargs, epochs=self.epochs,
            batch_size=self.batch_size, learning_rate=self.learning_rate, max_length=fitted_max_length(self, self.student),
            precision=_train_precision(self.run_device, self.train_precision),
            world_size=training.world_size(self.nproc_per_node, self.run_device), seed=self.seed,
            teacher_name=resolved_teacher(self) if "scores" in labels_task.requires() else "",
            warm_start=self.warm_start, seen_data=self.seen_data if self.warm_start else "",
            replay_ratio=self.replay_ratio if self.warm_start else 1.0,
            device=self.run_device, max_dev_queries=self.max_dev_queries, trust_remote_code=self.trust_remote_code,
        )

    @functools.cached_property
    def fp(self) -> str:
        req = self.requires()
        return config_fingerprint(self.config, self.identity, *(req[k].fp for k in ("labels", "depth") if k in req))

    def run(self):
        i = self.input()
        training.fit_student_once(i["data"].path, i["mined"].path, i["labels"].path, str(self.artifact()), _at_depth(self.config, i))


class ExportOnnx(TrainParams, Stage):
    """The published student as one ONNX graph, head included, checked against PyTorch (pipeline.export)."""

    stage_dir = "onnx"

    def requires(self):
        return published_student(self)

    @functools.cached_property
    def fp(self) -> str:
        return self.requires().fp  # the export of that student, nothing else to set

    def run(self):
        export.export_onnx(self.input().path, self.output().path, trust_remote_code=self.trust_remote_code)


class PlainStudent(TrainParams, Stage):
    """The student in sentence-transformers' own modules (mean Pooling, Dense) on the trained
    student's encoder, taught by the teacher on the training queries' candidate lists: plain
    CrossEncoder(path) loads it."""

    stage_dir = "plain"

    def requires(self):
        req = {"data": self.clone(PrepareData), "mined": self.clone(MineHardNegatives), "student": self.clone(FitStudent)}
        if _needs_fine_tuned(self.teacher):
            req["teacher"] = self.clone(FineTuneTeacher)
        return req

    @functools.cached_property
    def config(self) -> plain_student.PlainStudentConfig:
        return plain_student.PlainStudentConfig(
            list_size=self.plain_list_size, min_steps=self.plain_min_steps, max_length=fitted_max_length(self, self.student),
            precision=_train_precision(self.run_device, self.train_precision), max_dev_queries=self.max_dev_queries, seed=self.seed,
            teacher=resolved_teacher(self), teacher_weights=self.teacher_weights, teacher_precision=_score_precision(self),
            teacher_max_length=fitted_teacher_max_length(self), cache_dir=teacher_score_cache(self),
            trust_remote_code=self.trust_remote_code, device=self.run_device,
        )

    @functools.cached_property
    def fp(self) -> str:
        req = self.requires()
        return config_fingerprint(self.config, self.identity, req["mined"].fp, req["student"].fp)

    def run(self):
        i = self.input()
        plain_student.plain_student(i["data"].path, i["mined"].path, i["student"].path, str(self.artifact()), self.config)


def publishes_plain(task: TrainParams) -> bool:
    """Whether the student a run publishes is PlainStudent's: --plain-student, and a trained student
    with the cosine head to start it from (a warm-started student keeps its champion's head)."""
    if not task.plain_student:
        return False
    if task.warm_start:
        return uses_own_head(task.warm_start)
    return student_head(task.student, task.student_head) == "cosine"


def published_student(task: TrainParams, plain: type = PlainStudent, fit: type = FitStudent) -> Stage:
    """The stage whose folder a run publishes as <output-dir>/student: ``plain`` or ``fit``, as
    :func:`publishes_plain` says."""
    return task.clone(plain) if publishes_plain(task) else task.clone(fit)


def published_and_cosine(inputs: dict) -> tuple[str, str | None]:
    """An evaluation's published student (its "student" row) and, when that is the plain student,
    the cosine-head student it started from (its own row)."""
    return (inputs["plain"].path, inputs["student"].path) if "plain" in inputs else (inputs["student"].path, None)


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
        if self.label_only_loss:
            req["label_only"] = self.label_only_student()
        if publishes_plain(self):
            req["plain"] = self.clone(PlainStudent)
        return _measured_depth(self, req)  # the untrained student's row is cut to the students' depth

    def label_only_student(self) -> FitStudent:
        """The same student trained on the judgments alone (--label-only-loss), the baseline distillation must beat."""
        if resolve_loss(self.label_only_loss)[0].needs_teacher:
            raise PipelineError(f"--label-only-loss {self.label_only_loss}: this loss needs teacher scores; choose a label-only one")
        training.check_label_only(self.dataset, self.label_only_loss)
        return self.clone(
            FitStudent, loss=self.label_only_loss, learning_rate=self.label_only_learning_rate, epochs=self.label_only_epochs, loss_kwargs="",
            warm_start="", seen_data="",
        )

    @functools.cached_property
    def config(self) -> evaluation.EvalConfig:
        return _eval_config(self, evaluation.EvalConfig, fusion_dev_queries=self.fusion_dev_queries)

    def with_baseline_cache(self, config: evaluation.EvalConfig) -> evaluation.EvalConfig:
        # Scores that do not depend on the student's training are shared by every student that
        # reranks the same test pairs (the file inside is named by them), across dates too.
        key = evaluation.baseline_key(config, self.identity)
        return dataclasses.replace(config, baseline_cache=str(Path(self.cache_dir or self.root / "cache") / "eval" / key))

    @functools.cached_property
    def fp(self) -> str:
        req = self.requires()
        return config_fingerprint(self.config, self.identity, *(req[k].fp for k in ("student", "label_only", "plain", "depth") if k in req))

    def output(self):
        return luigi.LocalTarget(str(self.artifact() / "metrics.json"))

    def run(self):
        i = self.input()
        stages = _upstream_stats(self, BuildLabels, {"FitStudent": FitStudent, **({"PlainStudent": PlainStudent} if "plain" in i else {})})
        if self.label_only_loss:
            stages["FitStudent (label-only)"] = self.label_only_student().stats()
        # The untrained student's cached scores are keyed by the depth it is cut to, known only now.
        config = self.with_baseline_cache(_at_depth(self.config, i))
        published, cosine = published_and_cosine(i)
        if "depth" in i:
            students = {"student": published, **({"cosine-head student": cosine} if cosine else {}),
                        **({"label-only student": i["label_only"].path} if self.label_only_loss else {})}
            depth.check_cut_to(config.student_layers, students)
        evaluation.evaluate_student(
            i["data"].path, i["mined"].path, published, self.artifact(), config, _run_info(self, stages),
            label_only_dir=i["label_only"].path if self.label_only_loss else None, cosine_dir=cosine,
        )


def _eval_config(task: EvalParams, cls: type, **extra):
    return cls(
        teacher=resolved_teacher(task), teacher_weights=task.teacher_weights, embedder=task.embedder, student=task.student,
        student_layers=task.student_layers, student_head=student_head(task.student, task.student_head),
        precision=_student_precision(task), teacher_precision=_score_precision(task), max_length=fitted_max_length(task, task.student),
        teacher_max_length=fitted_teacher_max_length(task), max_eval_queries=task.max_eval_queries, timing_queries=task.timing_queries,
        seed=task.seed, device=task.run_device, **extra,
    )


def _run_info(task: Stage, stages: dict) -> dict:
    """What a report shows beside its metrics: the run's settings, each stage's statistics, timings."""
    params = dict(task.param_kwargs, teacher_resolved=resolved_teacher(task), fingerprint=task.fp)
    return {"params": params, "stages": stages, "timings": {k: v.get("seconds", 0.0) for k, v in stages.items()}}


def _upstream_stats(task: Stage, labels_task: type, students: dict[str, type]) -> dict:
    """stats.json of every stage an evaluation depends on, by stage name (in pipeline order)."""
    tasks = {"PrepareData": task.clone(PrepareData), "MineHardNegatives": task.clone(MineHardNegatives)}
    if _needs_fine_tuned(task.teacher):
        tasks["FineTuneTeacher"] = task.clone(FineTuneTeacher)
    if "scores" in task.clone(labels_task).requires():
        tasks["ScoreWithTeacher"] = task.clone(ScoreWithTeacher)
    tasks[labels_task.__name__] = task.clone(labels_task)
    if "depth" in (req := task.requires()):
        tasks["ChooseStudentDepth"] = req["depth"]
    tasks.update({name: task.clone(cls) for name, cls in students.items()})
    return {name: t.stats() for name, t in tasks.items()}


class TrainStudent(EvalParams, luigi.Task):
    """Entry point: runs the whole DAG and publishes <output-dir>/student, metrics.json and report.md
    (and fusion.json, the student's fusion weight with the retriever, when dev chose one)."""

    evaluation_task = EvaluateStudent
    published = ("teacher_vs_student.png", "quality_vs_speed.png", "mined_negatives.png", "fusion.json", "report.md", "metrics.json")

    def requires(self):
        return self.clone(self.evaluation_task)

    def student_stage(self) -> Stage:
        """The stage whose folder is published as <output-dir>/student."""
        return published_student(self)

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
        point_link(root / "student", self.student_stage().artifact())
        for name in self.published:
            if (src / name).exists():
                point_link(root / name, src / name)  # metrics.json last: it marks this run complete
        print(f"\nStudent: {root / 'student'}\nMetrics: {root / 'metrics.json'}\nReport:  {root / 'report.md'}\n")


# ---- multilingual distillation ------------------------------------------------------------


def _training_views(task: MultilingualParams) -> dict:
    """The languages a multilingual stage trains on, as its configuration takes them
    (``pipeline.multilingual.TrainingViews``)."""
    return {"languages": tuple(multilingual.parse_languages(task.languages)), "source": task.source_language, "cross_lingual": task.cross_lingual}


class BuildMultilingualLabels(MultilingualParams, BuildLabels):
    """Training rows for the source language and each target language (and mixed pairs with
    --cross-lingual), all labelled with the source pairs' teacher scores."""

    @functools.cached_property
    def config(self) -> multilingual.MultilingualLabelConfig:
        return multilingual.MultilingualLabelConfig(**dataclasses.asdict(BuildLabels.config.func(self)), **_training_views(self))

    def run(self):
        scores = self.input().get("scores")
        multilingual.build_multilingual_labels(
            self.input()["data"].path, self.input()["mined"].path, scores.path if scores else None, self.artifact(), self.config
        )


class FitMultilingualStudent(MultilingualParams, FitStudent):
    """The student trained on every language's rows."""

    def requires(self):
        return {**super().requires(), "labels": self.clone(BuildMultilingualLabels)}


class MultilingualPlainStudent(MultilingualParams, PlainStudent):
    """The multilingual student in sentence-transformers' own modules, taught the teacher's order
    of the training queries' candidate lists in every language view."""

    def requires(self):
        return {**super().requires(), "student": self.clone(FitMultilingualStudent)}

    @functools.cached_property
    def config(self) -> multilingual.MultilingualPlainConfig:
        return multilingual.MultilingualPlainConfig(**dataclasses.asdict(PlainStudent.config.func(self)), **_training_views(self))

    def run(self):
        i = self.input()
        multilingual.multilingual_plain_student(i["data"].path, i["mined"].path, i["student"].path, str(self.artifact()), self.config)


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
        if publishes_plain(self):
            req["plain"] = self.clone(MultilingualPlainStudent)
        return _measured_depth(self, req)

    @functools.cached_property
    def config(self) -> multilingual.MultilingualEvalConfig:
        return _eval_config(
            self, multilingual.MultilingualEvalConfig, languages=tuple(multilingual.parse_languages(self.languages)),
            source=self.source_language, fusion_dev_queries=self.fusion_dev_queries,
        )

    @functools.cached_property
    def fp(self) -> str:
        req = self.requires()
        return config_fingerprint(self.config, self.identity, *(req[k].fp for k in ("student", "source_only", "plain", "depth") if k in req))

    def output(self):
        return luigi.LocalTarget(str(self.artifact() / "metrics.json"))

    def run(self):
        i = self.input()
        students = {"FitStudent": FitMultilingualStudent, "FitStudentSourceOnly": FitStudent}
        stages = _upstream_stats(self, BuildMultilingualLabels, {**students, **({"PlainStudent": MultilingualPlainStudent} if "plain" in i else {})})
        published, cosine = published_and_cosine(i)
        multilingual.evaluate_languages(
            i["data"].path, i["mined"].path, published, i["source_only"].path, self.artifact(), _at_depth(self.config, i),
            _run_info(self, stages), cosine_dir=cosine,
        )


class TrainMultilingualStudent(MultilingualParams, TrainStudent):
    """Entry point of multilingual distillation: publishes the multilingual student, metrics.json
    (with a ``languages`` section) and report.md."""

    evaluation_task = EvaluateMultilingualStudent
    published = ("languages.png", "report.md", "metrics.json")

    def student_stage(self) -> Stage:
        return published_student(self, MultilingualPlainStudent, FitMultilingualStudent)
