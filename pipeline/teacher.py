"""Teacher fine-tuning: train a teacher from a backbone on the judged training queries.

Used when ``--teacher`` names no trained reranker. A cross-encoder teacher learns with
BinaryCrossEntropyLoss on (query, positive, 1) and (query, mined negative, 0) rows, the standard
recipe for training a reranker from judged pairs; a bi-encoder teacher with
MultipleNegativesRankingLoss on (query, positive, hardest negative) triplets.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import model, run_only
from pipeline.data import load_normalized
from pipeline.errors import PipelineError
from pipeline.labels import build_rows, to_dataset
from pipeline.training import train_student


@dataclass(frozen=True)
class TeacherConfig:
    """Settings of teacher fine-tuning (``FineTuneTeacher``)."""

    backbone: str = model()
    kind: str = "cross-encoder"  # or "bi-encoder"
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_length: int = 256
    negatives: int = 3  # mined negatives per query (cross-encoder rows)
    max_queries: int = 0  # 0: every judged training query
    precision: str = "fp32"
    seed: int = 12
    device: str = run_only("cpu", "the trainer's results agree across devices up to float rounding")
    trust_remote_code: bool = run_only(False, "permits a model's own code to load; the model is the same or does not load")


def fine_tune_teacher(data_dir: str | Path, mined_dir: str | Path, out_dir: str | Path, config: TeacherConfig) -> dict:
    """Stage entry: fine-tune a teacher of ``config.kind`` from ``config.backbone`` on the judged
    training queries; unjudged queries are what it labels afterwards."""
    if config.kind == "bi-encoder":
        return _bi_encoder_teacher(data_dir, mined_dir, out_dir, config)
    if config.kind != "cross-encoder":
        raise PipelineError(f"teacher kind '{config.kind}': expected cross-encoder or bi-encoder")
    c = config
    ds = load_normalized(data_dir)
    groups = pq.read_table(Path(mined_dir) / "groups.parquet")
    groups = groups.filter(pc.greater(pc.list_value_length(groups["positive_ids"]), 0))
    if c.max_queries and groups.num_rows > c.max_queries:
        keep = sorted(range(groups.num_rows), key=lambda i: hashlib.sha1(f"t{c.seed}:{i}".encode()).hexdigest())[: c.max_queries]
        groups = groups.take(sorted(keep))
    cols, stats = build_rows("pair-binary", groups, None, ds.queries, ds.passage, num_negatives=c.negatives)
    return train_student(
        to_dataset(cols).shuffle(seed=c.seed),
        "BinaryCrossEntropyLoss",
        out_dir,
        student=c.backbone,
        student_layers=0,
        epochs=c.epochs,
        batch_size=c.batch_size,
        learning_rate=c.learning_rate,
        max_length=c.max_length,
        device=c.device,
        precision=c.precision,
        card={"model_name": f"Teacher reranker fine-tuned from {c.backbone}", "dataset": str(data_dir)},
        seed=c.seed,
        trust_remote_code=c.trust_remote_code,
        extra_stats=stats,
    )


def _bi_encoder_teacher(data_dir: str | Path, mined_dir: str | Path, out_dir: str | Path, c: TeacherConfig) -> dict:
    """A bi-encoder teacher fine-tuned with MultipleNegativesRankingLoss on (query, positive,
    hardest mined negative) triplets; other rows of a batch are in-batch negatives.

    Much cheaper than a cross-encoder on a CPU (each text is encoded once, not once per pair),
    and it starts from the retriever's own quality instead of from a random head.
    """
    import time

    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import set_seed

    from pipeline.artifacts import atomic_dir, write_json
    from pipeline.models import load_bi_encoder

    set_seed(c.seed)
    ds = load_normalized(data_dir)
    g = pq.read_table(Path(mined_dir) / "groups.parquet").to_pydict()
    rows = {"anchor": [], "positive": [], "negative": []}
    for q, pos, neg in zip(g["query_id"], g["positive_ids"], g["negative_ids"]):
        for p in pos:
            if neg:
                rows["anchor"].append(ds.queries[q])
                rows["positive"].append(ds.passage(p))
                rows["negative"].append(ds.passage(neg[0]))
    model = load_bi_encoder(c.backbone, c.device, c.max_length, c.trust_remote_code)
    work = Path(f"{out_dir}.work")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work),
        num_train_epochs=c.epochs,
        per_device_train_batch_size=c.batch_size,
        learning_rate=c.learning_rate,
        warmup_ratio=0.1,
        bf16=c.precision == "bf16",
        use_cpu=not c.device.startswith("cuda"),
        save_strategy="no",
        logging_steps=10,
        seed=c.seed,
        report_to="none",
        batch_sampler="no_duplicates",
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(rows).shuffle(seed=c.seed),
        loss=MultipleNegativesRankingLoss(model),
    )
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    stats = {"kind": "bi-encoder", "rows": len(rows["anchor"]), "steps": result.global_step,
             "seconds": round(seconds, 2), "train_loss": result.training_loss}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        write_json(tmp / "stats.json", stats)  # inside the rename, like every stage's statistics
    shutil.rmtree(work, ignore_errors=True)  # the trainer's output folder (it saves no checkpoints here)
    return stats
