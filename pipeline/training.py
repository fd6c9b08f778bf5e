"""Training: fit a student CrossEncoder with CrossEncoderTrainer and a loss from the loss table.

The student is cut from a pretrained backbone (its first ``student_layers`` layers), or, in
scheduled retraining, continues from the champion on the queries it has not seen plus a replayed
sample of those it has (``continued_rows``). Training
checkpoints go to a work folder, so a killed run resumes from its last checkpoint; the finished
model is saved atomically in the standard CrossEncoder format with a model card that names the
teacher, the loss and the data. ``fit_student_distributed`` runs the same training under
torchrun (DDP through the trainer), one process per GPU; only rank 0 evaluates and saves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler

from losses.factory import build_loss, loss_options, resolve_loss
from pipeline.artifacts import atomic_dir, one_writer, write_json
from pipeline.config import model, run_only
from pipeline.data import has_training_judgments
from pipeline.errors import PipelineError
from pipeline.heads import self_contained
from pipeline.models import cuda_bf16_supported, cut_student, load_cross_encoder

log = logging.getLogger(__name__)


def reranking_samples(candidates: dict[str, list[str]], relevant: dict[str, dict[str, int]], queries, passage):
    """Samples for CrossEncoderRerankingEvaluator: every judged query, its positives and the
    retriever's candidates; evaluated with ``always_rerank_positives=False``, a positive the
    retriever missed is a miss."""
    samples = []
    for qid, docs in candidates.items():
        if not relevant.get(qid):
            continue
        samples.append({"query": queries[qid], "positive": [passage(d) for d in relevant[qid]], "documents": [passage(d) for d in docs]})
    return samples


def dev_check_samples(data_dir: str | Path, candidates_path: str | Path, limit: int) -> list[dict]:
    """:func:`reranking_samples` of the first ``limit`` judged dev queries, with only their own
    texts read from the prepared data."""
    import pyarrow.parquet as pq

    from pipeline.data import NormalizedTables, judgments

    relevant = judgments(data_dir, "dev")
    cand = pq.read_table(candidates_path).to_pydict()
    candidates = {q: docs for q, docs in zip(cand["query_id"], cand["doc_ids"]) if relevant.get(q)}
    candidates = dict(list(candidates.items())[:limit])
    docs = dict.fromkeys(d for q, shown in candidates.items() for d in (*shown, *relevant[q]))
    texts = NormalizedTables(data_dir).subset(list(candidates), list(docs))
    return reranking_samples(candidates, relevant, texts.queries, texts.passage)


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """A sentence-transformers batch sampler that puts rows of similar text length together.

    CrossEncoder losses pad each column of a batch to its longest pair, so a batch that mixes a
    20-token passage with a 128-token one pays for 128 twice. Rows are shuffled, cut into pools
    of 50 batches, sorted by length within a pool, and the batches shuffled again: randomness
    stays (as in transformers' LengthGroupedSampler), padding mostly goes. A module-level class:
    the trainer pickles its arguments into every checkpoint.
    """

    pool_batches = 50

    def __init__(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        super().__init__(dataset, batch_size, drop_last, valid_label_columns, generator, seed)
        texts = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) == "string" or c == "docs"]
        lengths = np.zeros(len(dataset), np.int64)
        for c in texts:
            lengths += np.asarray([sum(map(len, v)) if isinstance(v, list) else len(v) for v in dataset[c]], np.int64)
        self.lengths = lengths

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.lengths))
        pool = self.batch_size * self.pool_batches
        batches = []
        for s in range(0, len(order), pool):
            chunk = order[s : s + pool]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        for i in rng.permutation(len(batches)):
            yield batches[i]

    def __len__(self):
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


# sentence-transformers' scale for cosine similarities used as logits (MNRL, CoSENT).
COSINE_LOGIT_SCALE = 20.0


def fit_head_scale(model, dataset, fmt: str, rows: int = 64) -> float | None:
    """Set a ``SegmentCosine`` head's scale to the labels' units and return it (None: no such head).

    Labels that carry teacher scores or margins get the least-squares fit of the labels on the
    untrained student's cosines over ``rows`` rows (centred per query where scores are absolute):
    a cosine spans [-1, 1] while a cross-encoder teacher's margins span tens of units, and a scalar
    trained at the student's learning rate would take thousands of steps to get there. Labels
    without teacher scores get ``COSINE_LOGIT_SCALE``.
    """
    from pipeline.heads import SegmentCosine

    head = model[-1]
    if not isinstance(head, SegmentCosine):
        return None
    sample = dataset.select(range(min(rows, len(dataset))))
    # Each entry: the pairs of one query and the labels to fit on their cosines.
    groups: list[tuple[list[tuple[str, str]], list[float]]] = []
    if fmt == "ntuple-margin":
        negatives = sorted((c for c in sample.column_names if c.startswith("negative_")), key=lambda c: int(c.split("_")[1]))
        groups = [([(r["query"], r["positive"])] + [(r["query"], r[c]) for c in negatives], r["label"]) for r in sample]
    elif fmt == "list":
        groups = [([(r["query"], d) for d in r["docs"]], r["labels"]) for r in sample]
    elif fmt in ("pair-score", "pair-soft"):
        labels = np.asarray(sample["label"], np.float64)
        if fmt == "pair-soft":  # back to the teacher's logits
            p = np.clip(labels, 1e-6, 1 - 1e-6)
            labels = np.log(p / (1 - p))
        groups = [(list(zip(sample["query"], sample["passage"])), labels)]
    scale = COSINE_LOGIT_SCALE
    xs, ys = [], []
    if groups:
        cos = _cosines(model, [p for pairs, _ in groups for p in pairs])
        offset = 0
        for pairs, labels in groups:
            c, offset = cos[offset : offset + len(pairs)], offset + len(pairs)
            labels = np.asarray(labels, np.float64)
            if fmt == "ntuple-margin":  # margins: positive minus each negative
                xs += list(c[0] - c[1:])
                ys += list(labels)
            else:  # absolute scores: the head's bias takes the shift
                xs += list(c - c.mean())
                ys += list(labels - labels.mean())
    if xs:
        x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        fit = float(x @ y / (x @ x)) if x @ x > 0 else 0.0
        # A student whose cosines run against the teacher's (or do not vary) gets the spread ratio.
        scale = fit if fit > 0 else float(y.std() / max(x.std(), 1e-6))
    with torch.no_grad():
        head.scale.fill_(scale)
    head.initial_scale = scale
    how = f"fitted to the {fmt} labels of {len(sample)} rows" if xs else f"{fmt} labels carry no teacher scores"
    log.info("student head: cosine scale %.3f (%s)", scale, how)
    return scale


# Losses that pass the model's score through their own activation (a Sigmoid) and multiply it by
# their own scale: made for a linear head's logits. The cosine head's score is already a cosine
# times a logit scale (COSINE_LOGIT_SCALE for label-free formats), which a Sigmoid saturates
# (every score near 1, no gradient), so it reaches these losses as it is.
SQUASHING_LOSSES = ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss")


def student_loss_kwargs(model, loss: str, loss_kwargs: dict | str | None) -> dict:
    """The loss options ``train_student`` builds ``loss`` with for ``model``: the user's, plus an
    identity activation and scale 1 for a squashing loss on the cosine head, unless given."""
    from pipeline.heads import SegmentCosine

    options = loss_options(loss_kwargs)
    if loss in SQUASHING_LOSSES and isinstance(model[-1], SegmentCosine) and "activation_fn" not in options:
        options.update(activation_fn="torch.nn.Identity", scale=options.get("scale", 1.0))
    return options


def _cosines(model, pairs) -> np.ndarray:
    """The head's raw cosines for ``pairs`` (its scores with the scale and bias taken out)."""
    head = model[-1]
    scores = model.predict(pairs, batch_size=32, activation_fn=torch.nn.Identity(), show_progress_bar=False)
    return (np.asarray(scores, np.float64) - head.bias.item()) / head.scale.item()


def train_student(
    train_dataset,
    loss: str,
    out_dir: str | Path,
    student: str,
    student_layers: int = 2,
    student_head: str = "auto",
    loss_kwargs: dict | str | None = None,
    epochs: float = 1.0,
    batch_size: int = 16,
    learning_rate: float = 3e-4,
    warmup_ratio: float = 0.1,
    max_length: int = 256,
    device: str = "cpu",
    precision: str = "fp32",
    dev_samples: list[dict] | None = None,
    num_labels: int = 1,
    card: dict | None = None,
    seed: int = 12,
    trust_remote_code: bool = False,
    work_dir: str | Path | None = None,
    group_by_length: bool = True,
    extra_stats: dict | None = None,
    warm_start: str = "",
) -> dict:
    """Train and save the student to ``out_dir`` with its ``stats.json`` (``extra_stats`` and the
    training statistics, written inside the same atomic rename); returns the statistics.

    ``warm_start``: a trained student folder to continue from instead of cutting a new one
    (its head keeps its trained scale); with no rows to train on it is saved unchanged."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainer
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator
    from transformers import set_seed

    set_seed(seed)
    spec, _ = resolve_loss(loss)
    # A classification loss resizes the sequence-classification head, so it keeps that head.
    head = "cls" if num_labels != 1 else student_head
    if warm_start:
        model = load_cross_encoder(warm_start, device, max_length, trust_remote_code=trust_remote_code)
        head_scale = None
    else:
        model = cut_student(student, student_layers, device, max_length, trust_remote_code, head=head)
        if num_labels != 1:
            model = _with_num_labels(model, num_labels)
        head_scale = fit_head_scale(model, train_dataset, spec.format)
    model.activation_fn = _activation(spec)
    if warm_start and not len(train_dataset):
        return _save_student(model, out_dir, {**(extra_stats or {}), "loss": spec.name, "rows": 0, "epochs": 0, "steps": 0, "seconds": 0.0})
    if card:
        _describe(model, card, spec.name)
    loss_module = build_loss(model, loss, student_loss_kwargs(model, loss, loss_kwargs))

    work = Path(work_dir or f"{out_dir}.work")
    if precision == "bf16" and device.startswith("cuda") and not cuda_bf16_supported():
        raise PipelineError("--train-precision bf16: this GPU does not support bf16")
    evaluator = None
    if dev_samples and num_labels != 1:
        log.warning("no dev reranking evaluation during training: the evaluator needs a one-output model")
    elif dev_samples:
        evaluator = CrossEncoderRerankingEvaluator(
            dev_samples, at_k=10, name="dev", batch_size=64, write_csv=False, always_rerank_positives=False
        )
    # Mixed precision runs the trainer's evaluations under autocast; the dev check scores the
    # weights as saved, so in bf16/fp16 it runs once after training, on the model without autocast.
    evaluate_in_trainer = evaluator is not None and precision == "fp32"
    args = _training_arguments(
        work, len(train_dataset), epochs, batch_size, learning_rate, warmup_ratio, precision, device, seed,
        evaluate=evaluate_in_trainer, group_by_length=group_by_length,
    )
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss_module, evaluator=evaluator)
    checkpoint = last_complete_checkpoint(work)
    layers = model.model.config.num_hidden_layers
    if checkpoint and (found := layer_count(checkpoint)) != layers:
        # Left by a run cut to another depth (a depth measured anew, pipeline.depth): not resumable.
        log.warning("%s holds a %d-layer student, not %d layers; training from the start", checkpoint, found, layers)
        shutil.rmtree(work)
        checkpoint = None
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - t0
    if not trainer.is_world_process_zero():
        return {}
    dev_metrics = _final_dev_metrics(trainer.state.log_history, result.global_step) if evaluate_in_trainer else {}
    if evaluator and not dev_metrics:
        dev_metrics = evaluator(trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False))
    samples = len(train_dataset) * epochs
    stats = {
        **(extra_stats or {}),
        "loss": spec.name,
        "rows": len(train_dataset),
        "epochs": epochs,
        "steps": result.global_step,
        "seconds": round(seconds, 2),
        "samples_per_second": round(samples / seconds, 2) if seconds else None,
        "train_loss": result.training_loss,
        "resumed_from_checkpoint": checkpoint is not None,
        "dev": {k: float(v) for k, v in dev_metrics.items()},
        "dev_queries": len(dev_samples or []),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        **({"head_initial_scale": round(head_scale, 4)} if head_scale is not None else {}),
    }
    _save_student(model, out_dir, stats)
    shutil.rmtree(work, ignore_errors=True)
    return stats


def _activation(spec):
    """The activation the trained model's ``predict`` applies, saved with it. sentence-transformers'
    default for one output is a sigmoid, which ties the top of a ranking for a model whose scores
    are not log-odds: a cosine head's reach 10 to 20 (``LOG_ODDS_FORMATS``)."""
    from sentence_transformers.util import import_from_string

    return import_from_string(spec.activation)()


def _final_dev_metrics(log_history: list[dict], final_step: int) -> dict:
    """The dev evaluator's metrics the trainer logged at the last step, if it evaluated there
    (training ends on an epoch boundary): the finished model needs no second pass over dev."""
    for entry in reversed(log_history):
        if any(k.startswith("eval_dev_") for k in entry):
            if entry.get("step") != final_step:
                return {}
            return {k.removeprefix("eval_"): v for k, v in entry.items() if k.startswith("eval_dev_")}
    return {}


def _save_student(model, out_dir, stats: dict) -> dict:
    # The statistics go inside the folder before its rename: written afterwards, they could land
    # in a folder that a concurrent run of the same stage has just replaced.
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        self_contained(tmp)
        write_json(tmp / "stats.json", stats)
    return stats


def continued_rows(train, seen_data_dir: str | Path, replay_ratio: float, seed: int):
    """The rows a warm-started student trains on, and what they hold: every row whose query the
    snapshot in ``seen_data_dir`` (a prepared data folder) did not have, and ``replay_ratio``
    times as many of the other rows, drawn at random (seeded), so that what the champion learnt
    from them is rehearsed rather than forgotten."""
    import pyarrow.parquet as pq

    if replay_ratio < 0:
        raise PipelineError(f"--replay-ratio must be at least 0, got {replay_ratio}")
    seen = set(pq.read_table(Path(seen_data_dir) / "queries.parquet", columns=["text"]).column("text").to_pylist())
    is_new = np.fromiter((q not in seen for q in train["query"]), bool, len(train))
    new, old = np.flatnonzero(is_new), np.flatnonzero(~is_new)
    replay = np.random.default_rng(seed).choice(old, min(len(old), round(replay_ratio * len(new))), replace=False)
    rows = np.sort(np.concatenate([new, replay]))
    return train.select(rows), {"new_rows": int(len(new)), "replayed_rows": int(len(replay)), "rows_available": len(train)}


def _describe(model, card: dict, loss_name: str) -> None:
    """Fill the model card: its name, training data and tags (written offline)."""
    data = model.model_card_data
    data.local_files_only = True
    data.model_name = card.get("model_name")
    data.train_datasets = [{"name": card.get("dataset", "")}]
    data.task_name = "reranking (knowledge distillation from a cross-encoder teacher)"
    data.tags = list(dict.fromkeys([*data.tags, "distillation", loss_name]))


def warmup(ratio: float) -> dict:
    """The training arguments that warm the learning rate up over ``ratio`` of the steps:
    transformers 5 takes a fraction as ``warmup_steps`` and deprecates ``warmup_ratio``, which
    earlier versions need."""
    import transformers

    return {"warmup_steps": ratio} if int(transformers.__version__.split(".")[0]) >= 5 else {"warmup_ratio": ratio}


def _training_arguments(
    work: Path, rows: int, epochs: float, batch_size: int, learning_rate: float, warmup_ratio: float, precision: str,
    device: str, seed: int, evaluate: bool, group_by_length: bool,
):
    """CrossEncoderTrainingArguments: checkpoints into ``work`` about four times an epoch (at
    least 50 steps apart), one kept, for a killed run to resume from."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments

    steps_per_epoch = max(1, -(-rows // batch_size))
    return CrossEncoderTrainingArguments(
        output_dir=str(work),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        **warmup(warmup_ratio),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not device.startswith("cuda"),
        eval_strategy="epoch" if evaluate else "no",
        save_strategy="steps",
        save_steps=max(50, steps_per_epoch // 4),
        save_total_limit=1,
        logging_steps=max(1, steps_per_epoch // 10),
        seed=seed,
        report_to="none",
        dataloader_drop_last=False,
        disable_tqdm=False,
        **({"batch_sampler": LengthGroupedBatchSampler} if group_by_length else {}),
        # Under DDP: MarginMSE-style losses run one forward pass per column before one backward,
        # the same number every step, which DDP accepts only with a static graph.
        **({"ddp_static_graph": True} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}),
    )


def layer_count(model_dir: str | Path) -> int | None:
    """The transformer layers of a saved student (its ``config.json``), None if it has none."""
    config = Path(model_dir) / "config.json"
    return json.loads(config.read_text()).get("num_hidden_layers") if config.is_file() else None


def last_complete_checkpoint(work: Path) -> Path | None:
    """The newest checkpoint in ``work`` that the trainer finished writing, or None.

    The trainer writes ``checkpoint-N`` in place and its ``trainer_state.json`` last, so a run
    killed while saving leaves a folder without a readable state, which transformers' own
    ``get_last_checkpoint`` would pick and fail to resume from. Such folders are removed: the
    previous complete checkpoint (kept until the new one is written) is resumed instead.
    """
    if not work.is_dir():
        return None
    steps = sorted(
        (int(p.name.split("-", 1)[1]), p)
        for p in work.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-", 1)[1].isdigit()
    )
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path
        except (OSError, ValueError):
            log.warning("%s was not finished before the run stopped; removing it", path)
            shutil.rmtree(path, ignore_errors=True)
    return None


def _with_num_labels(model, num_labels: int):
    """Replace the one-output head with a ``num_labels`` head (CrossEntropyLoss classes)."""
    hf = model.model
    head = getattr(hf, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        raise PipelineError(f"cannot resize the head of {type(hf).__name__} to {num_labels} classes")
    hf.classifier = torch.nn.Linear(head.in_features, num_labels).to(head.weight.device)
    hf.config.num_labels = num_labels
    hf.num_labels = num_labels
    return model


def check_label_only(source: str | Path, loss: str) -> None:
    """Stop a run whose label-only student (``--label-only-loss``) would have no judged training
    queries, told from the dataset's files, before the distilled side's stages spend their time."""
    if not has_training_judgments(source):
        raise PipelineError(
            f"{source}: no judged training queries (qrels/train.tsv) for the label-only student of --label-only-loss {loss}; "
            "pass --label-only-loss '' to train the distilled student alone"
        )


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Settings of student training (``FitStudent``)."""

    # 1: the saved model's predict applies the activation its loss trained its logits for (LossSpec.activation).
    REVISION: ClassVar[int] = 1

    loss: str = "PackedMarginMSELoss"
    student: str = model()
    student_layers: int = 3
    student_head: str = "auto"  # the task passes it resolved: cosine, mean or cls
    loss_kwargs: str = ""
    epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 3e-4
    max_length: int = 256
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16
    world_size: int = 1  # training processes (one per GPU); more processes, fewer optimizer steps
    seed: int = 12
    teacher_name: str = ""  # what the model card says the student was distilled from
    device: str = run_only("cpu", "the trainer's results agree across devices up to float rounding")
    warm_start: str = model()  # a trained student to continue from ("" : cut a new one from student)
    seen_data: str = ""  # with warm_start: the prepared snapshot it trained on; its queries are replayed, not retrained
    replay_ratio: float = 1.0  # with warm_start: replayed rows of seen queries per row of a new query
    max_dev_queries: int = run_only(200, "sizes the dev check logged during training; the model is the same")
    trust_remote_code: bool = run_only(False, "permits a model's own code to load; the model is the same or does not load")


def fit_student(data_dir: str | Path, mined_dir: str | Path, labels_dir: str | Path, out_dir: str | Path, config: FitConfig) -> dict:
    """Train the student on the labels folder in this process, judged on dev candidates."""
    from datasets import load_from_disk

    from pipeline.artifacts import read_json

    c = config
    label_stats = read_json(Path(labels_dir) / "stats.json")
    spec, _ = resolve_loss(c.loss)
    if label_stats.get("format") != spec.format:
        raise PipelineError(
            f"{labels_dir}: labels are in format '{label_stats.get('format')}' but {spec.name} needs '{spec.format}'; "
            "rebuild them with BuildLabels for this loss"
        )
    # In memory: a cache file written into the labels folder would change a finished artifact.
    train = load_from_disk(str(Path(labels_dir) / "dataset")).shuffle(seed=c.seed, keep_in_memory=True)
    continued = {}
    if c.warm_start:
        if not c.seen_data:
            raise PipelineError("a warm start needs the snapshot it was trained on (seen_data) to tell new queries from seen ones")
        train, continued = continued_rows(train, c.seen_data, c.replay_ratio, c.seed)
        continued["warm_start"] = c.warm_start
    dev_samples = None
    dev_path = Path(mined_dir) / "candidates-dev.parquet"
    if dev_path.exists() and c.max_dev_queries:
        dev_samples = dev_check_samples(data_dir, dev_path, c.max_dev_queries)
    return train_student(
        train, c.loss, out_dir, student=c.student, student_layers=c.student_layers, student_head=c.student_head,
        loss_kwargs=c.loss_kwargs, epochs=c.epochs, batch_size=c.batch_size, learning_rate=c.learning_rate,
        max_length=c.max_length, device=c.device, precision=c.precision, dev_samples=dev_samples,
        num_labels=label_stats.get("num_classes", 1), seed=c.seed, trust_remote_code=c.trust_remote_code,
        card={
            "model_name": f"{c.student_layers}-layer reranker distilled from {c.teacher_name or 'judged labels'} with {c.loss}",
            "dataset": str(data_dir),
        },
        warm_start=c.warm_start, extra_stats=continued,
    )


def fit_student_once(data_dir: str | Path, mined_dir: str | Path, labels_dir: str | Path, out_dir: str | Path, config: FitConfig) -> dict:
    """Stage entry: :func:`fit_student`, under torchrun when ``config.world_size`` > 1, by one
    process at a time per output.

    Two runs of the same stage share its output folder and its checkpoint folder
    (``<out_dir>.work``, which a killed run resumes from); the second waits for the first and
    then takes its finished student instead of training into a folder the first deletes.
    """
    with one_writer(out_dir) as finished:
        if finished is not None:
            return finished
        if config.world_size > 1:
            return fit_student_distributed(data_dir, mined_dir, labels_dir, out_dir, config)
        return fit_student(data_dir, mined_dir, labels_dir, out_dir, config)


def world_size(nproc_per_node: int, device: str) -> int:
    """Training processes for ``--nproc-per-node`` on ``device``: one per GPU asked for and present."""
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    size = min(nproc_per_node, gpus) if gpus > 1 else 1
    if size < nproc_per_node:
        log.warning("--nproc-per-node %d: %d GPU(s) here, training in %d process(es)", nproc_per_node, gpus, size)
    return size


def fit_student_distributed(data_dir, mined_dir, labels_dir, out_dir, config: FitConfig) -> dict:
    """:func:`fit_student` under ``torchrun --nproc-per-node config.world_size`` in a child process.

    The parent never touches CUDA, so it can fork luigi workers safely; the children each take
    one device (DDP, through the trainer) and rank 0 writes the model and its statistics.
    """
    with tempfile.TemporaryDirectory(prefix="fit-student-") as tmp:
        spec, stats_path = Path(tmp) / "spec.json", Path(tmp) / "stats.json"
        dirs = {"data_dir": str(data_dir), "mined_dir": str(mined_dir), "labels_dir": str(labels_dir), "out_dir": str(out_dir)}
        spec.write_text(json.dumps({**dirs, "config": dataclasses.asdict(config), "stats_path": str(stats_path)}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={config.world_size}",
               "-m", "pipeline.training", str(spec)]
        log.info("training under torchrun: %s", " ".join(cmd))
        proc = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            raise PipelineError(f"distributed training failed (torchrun exit code {proc.returncode}); see the log above")
        return json.loads(stats_path.read_text())


def _distributed_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    config = FitConfig(**spec["config"])
    if config.device.startswith("cuda"):
        config = dataclasses.replace(config, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    stats = fit_student(spec["data_dir"], spec["mined_dir"], spec["labels_dir"], spec["out_dir"], config)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["stats_path"]).write_text(json.dumps(stats))
    # The trainer starts the process group and leaves it open; torn down by interpreter exit
    # instead, a rank once aborted ("terminate called without an active exception") after its
    # training had finished, failing the whole run.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    _distributed_main(sys.argv[1])
