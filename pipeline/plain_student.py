"""The student in sentence-transformers' own modules, which plain ``CrossEncoder(path)`` loads.

The cosine head (``pipeline.heads``) is this package's code, so a student that has it loads only
with ``trust_remote_code``. This stage puts a mean Pooling and a Dense, sentence-transformers'
own modules, on the trained student's encoder, and teaches the result to order each training
query's true top-k candidates (10 drawn from each by default, and more draws of the same
candidates where the queries are too few for the steps it takes) as the teacher orders them
(ListNetLoss over each list). The lists hold more pairs than the teacher labelled for the
cosine-head student (on the demo two and a half times): a linear read-out of the tokens' mean
needs them. Taught on the teacher's four pairs per query instead, such a head ranked below the
retriever; taught on the lists by the cosine-head student, it ranked 0.012 below the
teacher-taught one on the demo's test (p = 0.0085, docs/student.md).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.config import model, run_only
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

RIDGE = 1e-6  # the Dense's start: ridge weight, relative to the fitted pooled vectors' summed square norms (mean_head_student)
LOSS = "ListNetLoss"  # softmax cross-entropy between the two orders of a list (ListwiseKLDivLoss's gradients at temperature 1)


@dataclass(frozen=True)
class PlainStudentConfig:
    """Settings of the plain student (``PlainStudent``)."""

    # 1: lists drawn past one a query are new draws of its candidates (ListDraws), not repeats.
    REVISION: ClassVar[int] = 1

    # Passes over the training queries; with lists drawn from longer ones (``list_size``), each
    # pass past the first draws new lists of the same queries and the training makes one pass.
    epochs: float = 1.0
    # Lists are added until the training takes this many steps (as draws where lists are drawn,
    # else as a fraction of an epoch more): a Dense read-out learnt from a few hundred lists is
    # undertrained in 441 steps. The multilingual demo's 1,322 lists ranked English dev at nDCG@10
    # 0.783 in one epoch, 0.858 in three, against 0.862 for the cosine-head student they started
    # from; the English demo's 2,544 lists train 848 steps in their one epoch (docs/student.md).
    min_steps: int = 800
    # Candidates per list (0: all), drawn at random from each query's true top-k and kept in the
    # retriever's order, so that ranks 11 to 20 are seen too. 10 of the top 20 halve the time;
    # on the demo they ranked dev as well as all 20 and test lower (docs/student.md).
    list_size: int = 10
    batch_size: int = 3  # candidate lists per step
    learning_rate: float = 2e-4
    # Dropout on the attention probabilities while training (None: the backbone's own). On CPU
    # any such dropout moves PyTorch's attention off its fused kernel onto one that builds the
    # whole attention matrix and its mask: the demo's steps took twice as long at 0.1.
    attention_dropout: float | None = 0.0
    max_length: int = 256
    precision: str = "fp32"  # resolved: for the student's scores and for training
    fit_queries: int = 512  # lists whose pooled vectors fit the Dense's start (a ridge fit)
    seed: int = 12
    teacher: str = model()  # comma-separated members, as ScoreConfig's
    teacher_weights: str = ""
    teacher_precision: str = "fp32"  # resolved, as ScoreConfig's
    teacher_max_length: int = 512
    cache_dir: str = run_only("", "the teacher score cache; the scores are the same")
    trust_remote_code: bool = run_only(False, "permits a model's own code to load; the model is the same or does not load")
    device: str = run_only("cpu", "the trainer's results agree across devices up to float rounding")
    max_dev_queries: int = run_only(200, "sizes the dev check of both students; the model is the same")


def candidate_lists(
    data_dir: str | Path, mined_dir: str | Path, list_size: int = 0, seed: int = 12
) -> tuple[pa.Table, list[str], list[tuple[str, str]]]:
    """Every training query's true top-k with two or more passages, each cut to ``list_size``
    drawn at random (0: all), and in order each pair's query id and its (query, passage) texts."""
    every = top_k_lists(mined_dir)
    cand = ListDraws(every, list_size, seed).take(every.num_rows)
    return (cand, *list_pairs(data_dir, cand))


def top_k_lists(mined_dir: str | Path) -> pa.Table:
    """Every training query's true top-k (``candidates-train.parquet``) with two or more passages."""
    path = Path(mined_dir) / "candidates-train.parquet"
    if not path.exists():
        raise PipelineError(f"{mined_dir}: no candidates-train.parquet (mined before training candidates were kept); mine again")
    cand = pq.read_table(path)
    cand = cand.filter(pc.greater_equal(pc.list_value_length(cand["doc_ids"]), 2))
    if not cand.num_rows:
        raise PipelineError(f"{path}: no training query has two candidates to order")
    return cand


def list_pairs(data_dir: str | Path, cand: pa.Table) -> tuple[list[str], list[tuple[str, str]]]:
    """Each pair's query id and its (query, passage) texts, list after list."""
    from pipeline.data import pair_texts

    sizes = pc.list_value_length(cand["doc_ids"]).to_numpy()
    qids = np.repeat(np.asarray(cand["query_id"].to_pylist(), object), sizes).tolist()
    return qids, pair_texts(data_dir, qids, pc.list_flatten(cand["doc_ids"]).to_pylist())


class ListDraws:
    """Lists of ``size`` of each query's candidates (0 or a shorter list: all of them), drawn at
    random and kept in their order, in rounds over the queries.

    A query's next list takes first the candidates its earlier lists have not: with 20 candidates
    and lists of 10, its second list is the other 10, its third a new draw. A student trained past
    one pass over the queries then learns the teacher's order of new candidates, where repeating
    the lists would show it the same ones again: on the debian dev split, 600 queries' lists of 10
    of 20 over 800 steps ranked 0.864 nDCG@10 drawn anew against 0.840 repeated, over three seeds
    (p = 0.001, docs/student.md).
    The first round's lists are the same for the same seed however many follow.
    """

    def __init__(self, cand: pa.Table, size: int, seed: int):
        self.cand, self.size = cand, size
        self.rng = np.random.default_rng(seed)
        self.lists = cand["doc_ids"].to_pylist()
        self.unused = [np.arange(len(docs)) for docs in self.lists]  # positions no list took yet in this cycle

    @property
    def renewable(self) -> bool:
        """Whether a later round can hold candidates the first did not."""
        return bool(self.size) and any(len(docs) > self.size for docs in self.lists)

    def take(self, count: int) -> pa.Table:
        """The next ``count`` lists: whole rounds over the queries in order, then a random part of one."""
        rows: list[int] = []
        kept: list[list[str]] = []
        while len(rows) < count:
            n, left = len(self.lists), count - len(rows)
            part = range(n) if left >= n else np.sort(self.rng.choice(n, left, replace=False)).tolist()
            rows += part
            kept += [self._draw(i) for i in part]
        out = self.cand.take(pa.array(rows, pa.int64()))
        field = out.schema.field("doc_ids")
        return out.set_column(out.schema.get_field_index("doc_ids"), field, pa.array(kept, field.type))

    def _draw(self, i: int) -> list[str]:
        docs = self.lists[i]
        if not self.size or len(docs) <= self.size:
            return docs
        free = self.unused[i]
        if len(free) >= self.size:
            pick = free[self.rng.choice(len(free), self.size, replace=False)]
            self.unused[i] = np.setdiff1d(free, pick)
        else:  # the rest of this cycle, then the start of the next
            others = np.setdiff1d(np.arange(len(docs)), free)
            more = others[self.rng.choice(len(others), self.size - len(free), replace=False)]
            pick = np.concatenate([free, more])
            self.unused[i] = np.setdiff1d(np.arange(len(docs)), more)
        return [docs[j] for j in np.sort(pick)]


def list_rows(cand: pa.Table, pairs: list[tuple[str, str]], scores: np.ndarray) -> pa.Table:
    """``list``-format rows (query, [passages], [scores]) of the candidate lists."""
    sizes = pc.list_value_length(cand["doc_ids"]).to_numpy()
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    return list_table([pairs[i][0] for i in starts], sizes, [p for _, p in pairs], scores)


def list_table(queries: list[str], sizes: np.ndarray, passages: list[str], scores: np.ndarray) -> pa.Table:
    """``list``-format rows of lists of ``sizes`` consecutive passages and scores, one query each."""
    from pipeline.labels import rows_schema

    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]), pa.int32())
    columns = [
        pa.array(queries, pa.string()),
        pa.ListArray.from_arrays(offsets, pa.array(passages, pa.string())),
        pa.ListArray.from_arrays(offsets, pa.array(np.asarray(scores, np.float32), pa.float32())),
    ]
    return pa.Table.from_arrays(columns, schema=rows_schema("list"))


def training_rows(
    cand: pa.Table, pairs: list[tuple[str, str]], scores: np.ndarray, more_lists: Callable[[pa.Table, np.ndarray], tuple[pa.Table, dict]] | None
) -> tuple[pa.Table, dict]:
    """``list``-format rows of the candidate lists, with ``more_lists``'s rows and counts."""
    rows = list_rows(cand, pairs, scores)
    if more_lists is None:
        return rows, {}
    more, counts = more_lists(cand, scores)
    return pa.concat_tables([rows, more]), counts


def training_epochs(lists: int, batch_size: int, epochs: float, min_steps: int) -> float:
    """``epochs``, or more when ``lists`` in batches of ``batch_size`` take fewer than ``min_steps``
    steps in them."""
    steps_per_epoch = -(-lists // batch_size)
    return max(epochs, min_steps / steps_per_epoch) if steps_per_epoch else epochs


def list_spread(scores: np.ndarray, sizes: np.ndarray) -> float:
    """The mean over lists of the scores' standard deviation within a list (lists of ``sizes``
    consecutive scores)."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return float(np.mean([np.std(scores[a:b]) for a, b in zip(starts[:-1], starts[1:])]))


def teacher_targets(teacher_scores: np.ndarray, student_scores: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, float]:
    """The teacher's scores put on the within-list spread of the cosine-head student's, and the
    factor; ``student_scores`` cover the first lists, of ``sizes``. ListNet's softmax reads a
    target's scale as its sharpness, and a raw-logit teacher may spread far wider than the
    student that starts the training can follow. On the demo the factor was 0.96."""
    n = len(student_scores)
    scale = list_spread(student_scores, sizes) / max(list_spread(np.asarray(teacher_scores)[:n], sizes), 1e-12)
    return np.asarray(teacher_scores, np.float32) * np.float32(scale), scale


def mean_head_student(student, pairs: list[tuple[str, str]], scores: np.ndarray, device: str, max_length: int):
    """A CrossEncoder of ``student``'s own encoder (a copy), a mean Pooling and a Dense whose
    weights are the ridge fit of ``scores`` on the pooled vectors of ``pairs``: the training
    starts from the best linear read-out of the encoder as it is."""
    import copy

    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.models import mean_head

    encoder = copy.deepcopy(student[0])
    pooling, dense = mean_head(encoder)
    plain = CrossEncoder(modules=[encoder, pooling, dense], device=device)
    plain.max_seq_length = max_length
    encoder.model.config.num_labels = 1
    pooled = []
    with torch.no_grad():
        for i in range(0, len(pairs), 64):
            features = plain.preprocess(pairs[i : i + 64])
            features = {k: v.to(plain.device) if torch.is_tensor(v) else v for k, v in features.items()}
            pooled.append(pooling(encoder(features))["sentence_embedding"].float().cpu())
    x = torch.cat([torch.cat(pooled), torch.ones(len(pairs), 1)], 1).double()
    # The pooled vectors are nearly collinear (on the demo the smallest singular value is 3,000
    # times below the largest): exact least squares gave weights of norm 7e5 that cancel to the
    # scores in fp64 and to noise in bf16. A ridge of 1e-6 of their summed square norms (the
    # bias free) keeps the fit (within-list Spearman on held-out lists 0.513, exact 0.509) at norm 25.
    ridge = RIDGE * x[:, :-1].pow(2).sum() * torch.ones(x.shape[1], dtype=x.dtype)
    ridge[-1] = 0.0
    w = torch.linalg.solve(x.T @ x + torch.diag(ridge), x.T @ torch.as_tensor(scores, dtype=torch.float64))
    with torch.no_grad():
        dense.linear.weight.copy_(w[:-1].unsqueeze(0).float())
        dense.linear.bias.copy_(w[-1:].float())
    return plain


def plain_student(data_dir: str | Path, mined_dir: str | Path, student_dir: str | Path, out_dir: str | Path, config: PlainStudentConfig) -> dict:
    """Stage entry: score the training queries' candidate lists with the teacher, fit a mean-head
    student of the trained student's encoder to them, and save it to ``out_dir`` with
    ``stats.json`` (the training's statistics and both students' nDCG@10 on dev candidates)."""
    return teach_plain_student(data_dir, mined_dir, student_dir, out_dir, config)


def teach_plain_student(
    data_dir: str | Path,
    mined_dir: str | Path,
    student_dir: str | Path,
    out_dir: str | Path,
    config: PlainStudentConfig,
    more_lists: Callable[[pa.Table, np.ndarray], tuple[pa.Table, dict]] | None = None,
) -> dict:
    """:func:`plain_student`, with ``more_lists`` making further ``list``-format rows from the
    candidate lists and their targets (the multilingual student's translations of them), and
    their counts for ``stats.json``."""
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    from pipeline.heads import SegmentCosine
    from pipeline.labels import to_dataset
    from pipeline.models import load_cross_encoder, resolve_precision, set_attention_dropout
    from pipeline.scoring import CrossEncoderScorer, TeacherSpec, load_teacher, score_pairs, scoring_stats
    from pipeline.training import dev_check_samples, train_student

    c = config
    student = load_cross_encoder(str(student_dir), c.device, c.max_length)
    if not isinstance(student[-1], SegmentCosine):
        raise PipelineError(f"{student_dir}: its head is sentence-transformers' own already; CrossEncoder(path) loads it as it is")
    if not c.teacher:
        raise PipelineError("PlainStudentConfig.teacher is empty: the plain student is taught by the teacher's scores")
    if c.attention_dropout is not None:
        # The plain student's start copies this encoder, config included, and the training
        # builds its model from that saved start; the scoring below runs without dropout.
        set_attention_dropout(student[0].model.config, c.attention_dropout)
    every = top_k_lists(mined_dir)
    draws = ListDraws(every, c.list_size, c.seed)
    cand = draws.take(every.num_rows)
    qids, pairs = list_pairs(data_dir, cand)
    sizes = pc.list_value_length(cand["doc_ids"]).to_numpy()
    # Read before any scoring, so that a bad dev file fails before the models' time is spent.
    dev = None
    dev_path = Path(mined_dir) / "candidates-dev.parquet"
    if dev_path.exists() and c.max_dev_queries:
        dev = dev_check_samples(data_dir, dev_path, c.max_dev_queries)

    fit_pairs = int(sizes[: c.fit_queries].sum())
    log.info("scoring the first %d of %d candidates with the trained student, for the scale of the targets", fit_pairs, len(pairs))
    own = CrossEncoderScorer(student, c.device, resolve_precision(c.precision, c.device)).score(pairs[:fit_pairs], desc="student")
    log.info("scoring %d candidates of %d training queries with the teacher", len(pairs), cand.num_rows)
    teacher = load_teacher(
        TeacherSpec.parse(c.teacher, c.teacher_weights), c.device, c.teacher_precision, c.teacher_max_length,
        trust_remote_code=c.trust_remote_code,
    )
    taught, scoring = score_pairs(teacher, pairs, qids, cache_dir=c.cache_dir or None)
    scores, scale = teacher_targets(taught, own, sizes[: c.fit_queries])
    rows, counts = training_rows(cand, pairs, scores, more_lists)
    # Past one pass over the queries, new draws of their candidates rather than the same lists again.
    wanted = max(c.epochs * rows.num_rows, c.min_steps * c.batch_size)
    epochs = c.epochs
    if draws.renewable and wanted > rows.num_rows:
        new = draws.take(math.ceil((wanted - rows.num_rows) * cand.num_rows / rows.num_rows))
        _, new_pairs = list_pairs(data_dir, new)
        log.info("scoring %d candidates of %d more lists with the teacher", len(new_pairs), new.num_rows)
        # Each list is normalised on its own, as the first round's (one a query) are.
        lists = np.repeat(np.arange(new.num_rows), pc.list_value_length(new["doc_ids"]).to_numpy()).astype(str).tolist()
        new_taught, more_scoring = score_pairs(teacher, new_pairs, lists, cache_dir=c.cache_dir or None)
        cand, pairs = pa.concat_tables([cand, new]), pairs + new_pairs
        scores = np.concatenate([scores, np.asarray(new_taught, np.float32) * np.float32(scale)])
        scoring = scoring_stats(scoring, more_scoring)
        rows, counts = training_rows(cand, pairs, scores, more_lists)
        epochs = 1.0
    del teacher
    epochs = training_epochs(rows.num_rows, c.batch_size, epochs, c.min_steps)
    extra = {
        "lists": cand.num_rows, "pairs": len(pairs), "queries": every.num_rows, "taught_by": c.teacher, "started_from": str(student_dir),
        "target_scale": round(scale, 4), "attention_dropout": c.attention_dropout, "teacher_scoring": scoring, **counts,
    }
    plain = mean_head_student(student, pairs[:fit_pairs], scores[:fit_pairs], c.device, c.max_length)

    if dev:
        evaluator = CrossEncoderRerankingEvaluator(dev, at_k=10, name="dev", batch_size=64, write_csv=False, always_rerank_positives=False)
        # Its raw scores, whatever activation an older folder saved (pipeline.training._activation).
        student.activation_fn = torch.nn.Identity()
        extra["dev_cosine_student"] = {k: float(v) for k, v in evaluator(student).items()}
    init = Path(f"{out_dir}.init")
    shutil.rmtree(init, ignore_errors=True)
    plain.save_pretrained(str(init))
    try:
        return train_student(
            to_dataset(rows).shuffle(seed=c.seed, keep_in_memory=True), LOSS, out_dir, student=str(student_dir),
            # One forward pass a step: ListNetLoss's default runs one per `batch_size` pairs, 1.1 to
            # 1.4 times slower here.
            loss_kwargs={"mini_batch_size": c.batch_size * int(sizes.max())},
            epochs=epochs, batch_size=c.batch_size, learning_rate=c.learning_rate, max_length=c.max_length,
            device=c.device, precision=c.precision, dev_samples=dev, seed=c.seed, warm_start=str(init), extra_stats=extra,
            card={"model_name": "reranker in sentence-transformers' own modules, taught the teacher's order of candidate lists", "dataset": str(data_dir)},
        )
    finally:
        shutil.rmtree(init, ignore_errors=True)
