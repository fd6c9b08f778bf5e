"""Teacher fine-tuning: train a teacher from a backbone on the judged training queries.

Used when ``--teacher`` names no trained reranker. Three kinds:

- ``cross-encoder``: a reranker trained with ``--teacher-loss`` (MultipleNegativesRankingLoss by
  default: each query against its positive, its mined negatives and the batch's other passages).
- ``bi-encoder``: MultipleNegativesRankingLoss on (query, positive, hardest negative) triplets.
- ``ensemble``: the bi-encoder first, then a cross-encoder started from the bi-encoder's weights;
  the teacher is their per-query z-normalised mix (``ensemble.json``), whose heavier member, the
  cross-encoder, is a CrossEncoder folder of its own (``cross-encoder/``). The cross-encoder's
  share is the one whose mix ranks the dev split's candidates best, unless a share is given.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from losses.factory import resolve_loss
from pipeline.artifacts import atomic_dir, one_writer, read_json, write_json
from pipeline.config import model, run_only
from pipeline.data import NormalizedTables, has_training_judgments
from pipeline.errors import PipelineError
from pipeline.labels import build_rows, to_dataset
from pipeline.scoring import ENSEMBLE_FILE
from pipeline.training import train_student, warmup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherConfig:
    """Settings of teacher fine-tuning (``FineTuneTeacher``)."""

    # 1: the cross-encoder's predict applies the activation its loss trained its logits for (LossSpec.activation).
    REVISION: ClassVar[int] = 1

    backbone: str = model()
    kind: str = "cross-encoder"  # or "bi-encoder", "ensemble"
    loss: str = "MultipleNegativesRankingLoss"  # the cross-encoder's
    head: str = "auto"  # the cross-encoder's, as for a student (cosine from a sentence-embedding start)
    # The cross-encoder's share of an ensemble (the bi-encoder has the rest); None: the share of
    # pipeline.fusion.WEIGHTS whose mix ranks the first ``dev_queries`` dev queries' candidates best.
    ensemble_weight: float | None = None
    dev_queries: int = 1000
    epochs: float = 1.0
    batch_size: int = 16  # the cross-encoder's
    learning_rate: float = 1e-4  # the cross-encoder's
    bi_encoder_batch_size: int = 32
    bi_encoder_learning_rate: float = 5e-5
    max_length: int = 256
    negatives: int = 3  # mined negatives per query (cross-encoder rows)
    max_queries: int = 0  # 0: every judged training query
    precision: str = "fp32"
    seed: int = 12
    device: str = run_only("cpu", "the trainer's results agree across devices up to float rounding")
    trust_remote_code: bool = run_only(False, "permits a model's own code to load; the model is the same or does not load")
    # The teacher score cache the scoring stage reads: the members' dev scores that chose the
    # share go there, so the scoring stage's dev check does not score those pairs again.
    cache_dir: str = run_only("", "keeps the members' dev scores for the scoring stage; the teacher is the same")

    def for_kind(self) -> "TeacherConfig":
        """This configuration with the settings its kind does not use at their defaults, so that
        they do not enter its fingerprint (a bi-encoder teacher ignores the cross-encoder's loss)."""
        unused = {
            "bi-encoder": ("loss", "head", "ensemble_weight", "dev_queries", "batch_size", "learning_rate", "negatives", "max_queries"),
            "cross-encoder": ("ensemble_weight", "dev_queries", "bi_encoder_batch_size", "bi_encoder_learning_rate"),
        }.get(self.kind, ())
        if self.kind == "ensemble" and self.ensemble_weight is not None:
            unused = ("dev_queries",)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{name: defaults[name] for name in unused})


KINDS = ("cross-encoder", "bi-encoder", "ensemble")


def share_setting(value) -> float | None:
    """``--teacher-ensemble-weight``: a share, or None for ``dev`` (chosen on the dev split)."""
    if str(value).strip().lower() == "dev":
        return None
    try:
        share = float(value)
    except ValueError:
        share = None
    return _checked_share(share, value)


def _checked_share(share: float | None, given=None) -> float:
    if share is None or not 0 < share <= 1:
        raise PipelineError(f"--teacher-ensemble-weight {given if given is not None else share}: expected a share in (0, 1], or 'dev'")
    return share


def fine_tune_teacher(data_dir: str | Path, mined_dir: str | Path, out_dir: str | Path, config: TeacherConfig) -> dict:
    """Stage entry: fine-tune a teacher of ``config.kind`` from ``config.backbone`` on the judged
    training queries; unjudged queries are what it labels afterwards."""
    if config.kind not in KINDS:
        raise PipelineError(f"teacher kind '{config.kind}': expected one of {', '.join(KINDS)}")
    # An unknown or teacher-scored loss fails before any member trains.
    if config.kind != "bi-encoder" and resolve_loss(config.loss)[0].needs_teacher:
        raise PipelineError(f"--teacher-loss {config.loss}: the teacher learns from judgments; choose a loss that needs no teacher scores")
    if config.kind == "ensemble" and config.ensemble_weight is not None:
        _checked_share(config.ensemble_weight)
    groups = _judged_groups(mined_dir)  # what every member learns from, read once
    if not groups.num_rows:
        from pipeline.mining import ds_source

        raise _nothing_to_fine_tune_on(ds_source(data_dir))
    # Which recipe made it, for a later date deciding whether to keep it (kept_teacher): in the
    # statistics, written inside the folder before its rename like every stage's.
    recipe = {"settings": teacher_settings(config)}
    with one_writer(out_dir) as finished:
        if finished is not None:
            return finished
        if config.kind == "bi-encoder":
            return _bi_encoder_teacher(data_dir, groups, out_dir, config, recipe)
        if config.kind == "cross-encoder":
            return _cross_encoder_teacher(data_dir, groups, out_dir, config, config.backbone, recipe)
        return _ensemble_teacher(data_dir, mined_dir, groups, out_dir, config, recipe)


def check_fine_tunable(source: str | Path) -> None:
    """Stop a run that would fine-tune a teacher on a dataset whose files hold no training
    judgments, before mining embeds its corpus; ``fine_tune_teacher`` checks the mined groups too."""
    if not has_training_judgments(source):
        raise _nothing_to_fine_tune_on(source)


def _nothing_to_fine_tune_on(source) -> PipelineError:
    return PipelineError(
        f"{source}: no judged training queries to fine-tune a teacher on (qrels/train.tsv); "
        "pass a trained one with --teacher (a hub id or a folder) to label the unjudged queries alone"
    )


LEGACY_SETTINGS_FILE = "teacher-settings.json"  # where teachers of earlier versions hold their recipe


def teacher_settings(config: TeacherConfig) -> str:
    """The fingerprint of a teacher's recipe alone (backbone by content, every setting), without
    the data it was trained on: equal for two dates' teachers made the same way."""
    from pipeline.config import config_fingerprint
    from pipeline.models import model_identity

    return config_fingerprint(config, model_identity)


def kept_teacher(runs_root: str | Path, date: datetime.date, max_age_days: int, config: TeacherConfig) -> Path | None:
    """The newest teacher fine-tuned by an earlier dated run under ``runs_root`` (folders named
    by ISO date) with ``config``'s recipe and at most ``max_age_days`` old, or None.

    Keeping it across dates keeps the teacher's scores the same, so the score cache serves every
    pair an earlier date scored; a teacher past the age, or made another way, is not kept."""
    found: list[tuple[datetime.date, float, Path]] = []
    want = teacher_settings(config)
    for run in Path(runs_root).iterdir() if Path(runs_root).is_dir() else []:
        try:
            day = datetime.date.fromisoformat(run.name)
        except ValueError:
            continue
        if not date - datetime.timedelta(days=max_age_days) <= day < date:
            continue
        for settings in [*run.glob("teacher/*/stats.json"), *run.glob(f"teacher/*/{LEGACY_SETTINGS_FILE}")]:
            if read_json(settings).get("settings") == want:
                found.append((day, settings.stat().st_mtime, settings.parent))
    return max(found)[2] if found else None


def _ensemble_teacher(
    data_dir: str | Path, mined_dir: str | Path, groups: pa.Table, out_dir: str | Path, config: TeacherConfig, recipe: dict
) -> dict:
    # Each member is a finished folder of its own under <out>.parts, so a rerun after a crash
    # keeps the finished members and resumes the cross-encoder from its last checkpoint.
    parts = Path(f"{out_dir}.parts")
    bi, ce = parts / "bi-encoder", parts / "cross-encoder"
    bi_stats = read_json(bi / "stats.json") if (bi / "stats.json").is_file() else _bi_encoder_teacher(data_dir, groups, bi, config)
    ce_stats = read_json(ce / "stats.json") if (ce / "stats.json").is_file() else _cross_encoder_teacher(data_dir, groups, ce, config, str(bi))
    t0 = time.perf_counter()
    choice = {"weight": config.ensemble_weight} if config.ensemble_weight is not None else ensemble_share(data_dir, mined_dir, bi, ce, config)
    share = choice["weight"]
    members = [
        {"path": "cross-encoder", "kind": "cross-encoder", "weight": share},
        {"path": "bi-encoder", "kind": "bi-encoder", "weight": round(1 - share, 6)},
    ]
    members = [m for m in members if m["weight"] > 0]
    stats = {**recipe, "kind": "ensemble", "members": members, "bi-encoder": bi_stats, "cross-encoder": ce_stats,
             "seconds": round(bi_stats["seconds"] + ce_stats["seconds"] + time.perf_counter() - t0, 2)}
    if config.ensemble_weight is None:
        stats["share_chosen_on_dev"] = choice
    with atomic_dir(out_dir) as tmp:
        # Both members, a share of 0 included: the folder is what was trained, ensemble.json what scores.
        for member in (bi, ce):
            shutil.move(str(member), str(tmp / member.name))
        write_json(tmp / ENSEMBLE_FILE, {"normalisation": "z-score per query", "members": members})
        write_json(tmp / "stats.json", stats)
    shutil.rmtree(parts, ignore_errors=True)
    return stats


def ensemble_share(data_dir: str | Path, mined_dir: str | Path, bi_encoder: Path, cross_encoder: Path, c: TeacherConfig) -> dict:
    """The cross-encoder's share of the ensemble: of ``pipeline.fusion.WEIGHTS``, the one whose
    per-query z-score mix ranks the retriever's true top-k of the first ``c.dev_queries`` dev
    queries best (nDCG@10), as ``pipeline.fusion.choose_weight`` chooses a student's fusion with
    the retriever; every share's figure comes with it (at 0 the bi-encoder alone, at 1 the
    cross-encoder alone).

    The demo's dev split chose half and half, but on data where a few hundred judgments leave the
    cross-encoder behind its own start, the bi-encoder, a fixed half would let the weaker member
    pull the teacher down; the student learns whatever the teacher says.
    """
    from pipeline.data import pair_texts
    from pipeline.evaluation import judged_candidates
    from pipeline.fusion import choose_weight
    from pipeline.scoring import TeacherSpec, load_teacher

    qrels, qids, dids, _ = judged_candidates(data_dir, mined_dir, "dev", c.dev_queries) or ({}, [], [], [])
    if not any(q in qrels for q in qids):
        log.warning("no judged dev query to choose the ensemble teacher's shares on: half and half")
        return {"weight": 0.5, "dev_queries": 0}
    pairs = pair_texts(data_dir, qids, dids)
    # Each member alone, loaded as the teacher's scoring loads it; the mixes are taken below.
    members = load_teacher(TeacherSpec([f"ce:{cross_encoder}", f"bi:{bi_encoder}"], [1.0, 1.0]), c.device, c.precision, c.max_length,
                           trust_remote_code=c.trust_remote_code)
    ce, bi = members.member_scores(pairs, cache_dir=c.cache_dir or None)
    choice = choose_weight(qids, dids, qrels, ce, bi)
    log.info("ensemble teacher: cross-encoder share %g, chosen on %d dev queries (nDCG@10 %.4f; bi-encoder alone %.4f, cross-encoder alone %.4f)",
             choice["weight"], choice["dev_queries"], choice["dev_ndcg@10"][f"{choice['weight']:g}"], choice["dev_ndcg@10"]["0"], choice["dev_ndcg@10"]["1"])
    return choice


def _cross_encoder_teacher(
    data_dir: str | Path, groups: pa.Table, out_dir: str | Path, c: TeacherConfig, start: str, recipe: dict | None = None
) -> dict:
    """A cross-encoder trained from ``start`` with ``c.loss`` on the judged queries' groups."""
    if c.max_queries and groups.num_rows > c.max_queries:
        keep = sorted(range(groups.num_rows), key=lambda i: hashlib.sha1(f"t{c.seed}:{i}".encode()).hexdigest())[: c.max_queries]
        groups = groups.take(sorted(keep))
    rows, stats = build_rows(resolve_loss(c.loss)[0].format, groups, None, NormalizedTables(data_dir).texts(), num_negatives=c.negatives)
    return train_student(
        to_dataset(rows).shuffle(seed=c.seed),
        c.loss,
        out_dir,
        student=start,
        student_layers=0,
        student_head=c.head,
        epochs=c.epochs,
        batch_size=c.batch_size,
        learning_rate=c.learning_rate,
        max_length=c.max_length,
        device=c.device,
        precision=c.precision,
        card={"model_name": f"Teacher reranker fine-tuned from {c.backbone}", "dataset": str(data_dir)},
        seed=c.seed,
        trust_remote_code=c.trust_remote_code,
        extra_stats={**(recipe or {}), **stats, "kind": "cross-encoder"},
    )


def _judged_groups(mined_dir: str | Path) -> pa.Table:
    """The mined groups of judged training queries: what a teacher learns from."""
    groups = pq.read_table(Path(mined_dir) / "groups.parquet")
    return groups.filter(pc.greater(pc.list_value_length(groups["positive_ids"]), 0))


def _bi_encoder_teacher(data_dir: str | Path, groups: pa.Table, out_dir: str | Path, c: TeacherConfig, recipe: dict | None = None) -> dict:
    """A bi-encoder teacher fine-tuned with MultipleNegativesRankingLoss on (query, positive,
    hardest mined negative) triplets; other rows of a batch are in-batch negatives.

    Much cheaper than a cross-encoder on a CPU (each text is encoded once, not once per pair),
    and it starts from the retriever's own quality instead of from a random head.
    """
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import set_seed

    from pipeline.models import load_bi_encoder

    set_seed(c.seed)
    # A (query, positive, first mined negative) row per judged positive, under sentence-transformers' names.
    rows = build_rows("ntuple", groups, None, NormalizedTables(data_dir).texts(), num_negatives=1)[0]
    rows = rows.rename_columns(["anchor", "positive", "negative"])
    model = load_bi_encoder(c.backbone, c.device, c.max_length, c.trust_remote_code)
    work = Path(f"{out_dir}.work")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work),
        num_train_epochs=c.epochs,
        per_device_train_batch_size=c.bi_encoder_batch_size,
        learning_rate=c.bi_encoder_learning_rate,
        **warmup(0.1),
        bf16=c.precision == "bf16",
        use_cpu=not c.device.startswith("cuda"),
        save_strategy="no",
        logging_steps=10,
        seed=c.seed,
        report_to="none",
        batch_sampler="no_duplicates",
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=to_dataset(rows).shuffle(seed=c.seed),
        loss=MultipleNegativesRankingLoss(model),
    )
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    stats = {**(recipe or {}), "kind": "bi-encoder", "rows": rows.num_rows, "steps": result.global_step,
             "seconds": round(seconds, 2), "train_loss": result.training_loss}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        write_json(tmp / "stats.json", stats)  # inside the rename, like every stage's statistics
    shutil.rmtree(work, ignore_errors=True)  # the trainer's output folder (it saves no checkpoints here)
    return stats
