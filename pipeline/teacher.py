"""Teacher fine-tuning: train a cross-encoder teacher from a backbone on the judged train pairs.

Used when ``--teacher`` names no trained reranker. The loss is BinaryCrossEntropyLoss on
(query, positive, 1) and (query, mined negative, 0) rows, the standard recipe for training a
reranker from judged pairs.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data import load_normalized
from pipeline.labels import build_rows, to_dataset
from pipeline.training import train_student


def fine_tune_teacher(
    data_dir: str | Path,
    mined_dir: str | Path,
    out_dir: str | Path,
    backbone: str,
    epochs: float = 1.0,
    batch_size: int = 32,
    learning_rate: float = 5e-5,
    max_length: int = 256,
    num_negatives: int = 3,
    max_queries: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 12,
    trust_remote_code: bool = False,
) -> dict:
    """Stage entry: fine-tune all layers of ``backbone`` as a one-output reranker."""
    ds = load_normalized(data_dir)
    groups = pq.read_table(Path(mined_dir) / "groups.parquet")
    # The teacher learns from judgments only; unjudged queries are what it labels afterwards.
    groups = groups.filter(pc.greater(pc.list_value_length(groups["positive_ids"]), 0))
    if max_queries and groups.num_rows > max_queries:
        keep = sorted(range(groups.num_rows), key=lambda i: hashlib.sha1(f"t{seed}:{i}".encode()).hexdigest())[:max_queries]
        groups = groups.take(sorted(keep))
    cols, stats = build_rows("pair-binary", groups, None, ds.queries, ds.passage, num_negatives=num_negatives)
    result = train_student(
        to_dataset(cols).shuffle(seed=seed),
        "BinaryCrossEntropyLoss",
        out_dir,
        student=backbone,
        student_layers=0,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_length=max_length,
        device=device,
        precision=precision,
        card={"model_name": f"Teacher reranker fine-tuned from {backbone}", "dataset": str(data_dir)},
        seed=seed,
        trust_remote_code=trust_remote_code,
        extra_stats=stats,
    )
    return result


def fine_tune_bi_encoder(
    data_dir: str | Path,
    mined_dir: str | Path,
    out_dir: str | Path,
    backbone: str,
    epochs: float = 1.0,
    batch_size: int = 32,
    learning_rate: float = 5e-5,
    max_length: int = 256,
    device: str = "cpu",
    precision: str = "fp32",
    seed: int = 12,
    trust_remote_code: bool = False,
) -> dict:
    """Stage entry: fine-tune a bi-encoder teacher with MultipleNegativesRankingLoss on
    (query, positive, hardest mined negative) triplets; other rows of a batch are in-batch negatives.

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

    set_seed(seed)
    ds = load_normalized(data_dir)
    g = pq.read_table(Path(mined_dir) / "groups.parquet").to_pydict()
    rows = {"anchor": [], "positive": [], "negative": []}
    for q, pos, neg in zip(g["query_id"], g["positive_ids"], g["negative_ids"]):
        for p in pos:
            if neg:
                rows["anchor"].append(ds.queries[q])
                rows["positive"].append(ds.passage(p))
                rows["negative"].append(ds.passage(neg[0]))
    model = load_bi_encoder(backbone, device, max_length, trust_remote_code)
    work = Path(f"{out_dir}.work")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_ratio=0.1,
        bf16=precision == "bf16",
        use_cpu=not device.startswith("cuda"),
        save_strategy="no",
        logging_steps=10,
        seed=seed,
        report_to="none",
        batch_sampler="no_duplicates",
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(rows).shuffle(seed=seed),
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
