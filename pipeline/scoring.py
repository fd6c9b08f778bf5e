"""Teacher scoring: score (query, passage) pairs with a cross-encoder, a bi-encoder or an ensemble.

Scores are raw logits for cross-encoders (no sigmoid: margins between logits are what
MarginMSE distils) and cosine similarities for bi-encoders. An ensemble z-normalises each
member's scores per query before the weighted sum, so members on different scales mix fairly.

The cross-encoder path sorts pairs by token length and fills each batch up to a token budget,
so little compute goes to padding; tokenization of the next chunk runs on a thread while the
model works on the current one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from pipeline.artifacts import atomic_file, write_json
from pipeline.batching import token_batches
from pipeline.config import model, run_only
from pipeline.errors import PipelineError
from pipeline.mining import encode_texts, side_prompt_name
from pipeline.models import (
    load_bi_encoder,
    load_cross_encoder,
    model_kind,
    resolve_precision,
    strip_kind,
    weights_hash,
)
from pipeline.score_cache import ScoreCache, pair_keys

log = logging.getLogger(__name__)

SCORES_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float32())])
Progress = Callable[[int, int], None]


# A folder holding an ensemble: its members' subfolders and this file, which names them.
ENSEMBLE_FILE = "ensemble.json"


@dataclass
class TeacherSpec:
    """One or more teacher models and their ensemble weights."""

    refs: list[str]
    weights: list[float] = field(default_factory=list)

    @classmethod
    def parse(cls, teacher: str, weights: str = "") -> "TeacherSpec":
        """``--teacher`` and ``--teacher-weights``; an ensemble folder (one with ``ensemble.json``)
        stands for its members, each weighted by its own weight times the folder's."""
        refs = teacher_refs(teacher)
        if not refs:
            raise PipelineError("--teacher is empty")
        ws = [float(w) for w in weights.split(",") if w.strip()] if weights else [1.0] * len(refs)
        if len(ws) != len(refs):
            raise PipelineError(f"--teacher-weights has {len(ws)} values for {len(refs)} teachers")
        members = [m for ref, w in zip(refs, ws) for m in ensemble_members(ref, w)]
        return cls([r for r, _ in members], [w for _, w in members])


def teacher_refs(teacher: str) -> list[str]:
    """The models a comma-separated ``--teacher`` names, in order; [] for none."""
    return [t.strip() for t in teacher.split(",") if t.strip()]


def ensemble_members(ref: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """[(member ref with its kind prefix, weight)] of an ensemble folder; [(ref, weight)] otherwise."""
    folder = Path(strip_kind(ref))
    manifest = folder / ENSEMBLE_FILE
    if not manifest.is_file():
        return [(ref, weight)]
    prefix = {"cross-encoder": "ce", "bi-encoder": "bi"}
    try:
        members = json.loads(manifest.read_text())["members"]
        return [(f"{prefix[m['kind']]}:{folder / m['path']}", weight * float(m["weight"])) for m in members]
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{manifest}: not an ensemble manifest ({e!r}); expected members with path, kind and weight") from None


def default_batch_tokens(device: str) -> int:
    """Padded tokens per batch: 2048 on a CPU, where larger batches fall out of cache (on an AMX
    Xeon, bf16 scoring ran 2.4-3.3x predict at 2048 tokens, 1.3-2.0x at 16384), 16384 on a GPU."""
    return 16384 if str(device).startswith("cuda") else 2048


class CrossEncoderScorer:
    """Length-bucketed, token-budgeted inference for a sentence-transformers CrossEncoder."""

    activation = "identity (logits)"

    def __init__(
        self, model, device: str, dtype: torch.dtype, batch_tokens: int = 0, chunk: int = 8192, quantize: bool = False
    ):
        self.ce = model
        self.device, self.dtype = device, dtype
        self.batch_tokens, self.chunk = batch_tokens or default_batch_tokens(device), chunk
        # The CrossEncoder's own modules run the forward pass, so a sequence-classification model
        # and a Transformer + Pooling + Dense one score alike ("scores" is their common output).
        self.net = model.to(device=device, dtype=dtype).eval()
        if quantize:
            self.net = quantize_int8(self.net)
        self.tokenizer = model.tokenizer
        self.max_length = model.max_seq_length
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.truncated = 0
        # Where the time goes: the tokenizer (on its thread), the forward passes, and the main
        # thread waiting for the tokenizer; the rest of a stage is the pipeline's own cost.
        self.seconds = {"tokenize": 0.0, "model": 0.0, "tokenizer_wait": 0.0}

    def _tokenize(self, pairs: Sequence[tuple[str, str]]) -> dict:
        # On a GPU the model outpaces one tokenizer thread (on an H200 the scorer ran at 10-12%
        # MFU waiting for it), so there the tokenizer encodes each chunk on every core, whatever
        # TOKENIZERS_PARALLELISM says. On a CPU the model needs the cores, and the tokenizer
        # thread already keeps ahead of it (it waited 0.1-0.2 s of 9-25 s on 2 cores).
        with tokenizer_parallelism(self.device.startswith("cuda")):
            enc = self.tokenizer(
                [p[0] for p in pairs],
                [p[1] for p in pairs],
                truncation="longest_first",
                max_length=self.max_length,
                padding=False,
                return_overflowing_tokens=False,
                return_length=True,
            )
        if enc.encodings:  # fast tokenizers keep what truncation cut off
            self.truncated += sum(1 for e in enc.encodings if e.overflowing)
        else:
            self.truncated += sum(1 for n in enc["length"] if n >= self.max_length)
        return enc

    def _batches(self, enc: dict) -> list[np.ndarray]:
        return token_batches(enc["length"], self.batch_tokens)

    def _collate(self, enc: dict, idx: np.ndarray) -> dict[str, torch.Tensor]:
        longest = max(enc["length"][i] for i in idx)
        out = {}
        for key, pad in (("input_ids", self.pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
            if key not in enc:
                continue
            arr = np.full((len(idx), longest), pad, dtype=np.int64)
            for row, i in enumerate(idx):
                seq = enc[key][i]
                arr[row, : len(seq)] = seq
            out[key] = torch.from_numpy(arr)
        return out

    def score(
        self, pairs: Sequence[tuple[str, str]], progress: Progress | None = None, desc: str = "teacher", show_progress: bool = True
    ) -> np.ndarray:
        out = np.empty(len(pairs), np.float32)
        bar = tqdm(total=len(pairs), unit="pair", desc=desc, dynamic_ncols=True, mininterval=2.0, disable=not show_progress)
        # A short first chunk lets the model start while the tokenizer prepares the next one.
        first = min(self.chunk, 1024)
        starts = [0, *range(first, len(pairs), self.chunk)] if pairs else []
        chunks = [(s, pairs[s : s + (first if s == 0 else self.chunk)]) for s in starts]
        done = 0
        with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode():
            pending = pool.submit(self.prepare, chunks[0][1]) if chunks else None
            for ci, (start, _) in enumerate(chunks):
                t0 = time.perf_counter()
                enc, batches, collated = pending.result()
                t1 = time.perf_counter()
                self.seconds["tokenizer_wait"] += t1 - t0
                if ci + 1 < len(chunks):
                    pending = pool.submit(self.prepare, chunks[ci + 1][1])
                # Scores stay on the device until the chunk ends: one sync per chunk, not per batch,
                # so the host queues the next batch while the GPU runs this one.
                scores = []
                for idx, feats in zip(batches, collated):
                    feats = {k: v.to(self.device, non_blocking=True) for k, v in feats.items()}
                    scores.append(relevance(self.net(feats)["scores"].float()))
                    done += len(idx)
                    bar.update(len(idx))
                    if progress:
                        progress(done, len(pairs))
                if scores:
                    out[start + np.concatenate(batches)] = torch.cat(scores).cpu().numpy()
                self.seconds["model"] += time.perf_counter() - t1
        bar.close()
        return out

    def prepare(self, pairs: Sequence[tuple[str, str]]) -> tuple[dict, list[np.ndarray], list[dict[str, torch.Tensor]]]:
        """The pairs tokenized, cut into token-budgeted batches and collated into tensors."""
        t0 = time.perf_counter()
        enc = self._tokenize(pairs)
        self.seconds["tokenize"] += time.perf_counter() - t0
        batches = self._batches(enc)
        return enc, batches, [self._collate(enc, b) for b in batches]


class BiEncoderScorer:
    """Cosine similarity of a SentenceTransformer's embeddings; each unique text is embedded once."""

    activation = "cosine"

    def __init__(self, model, device: str, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype)
        self.max_length = model.max_seq_length
        self.truncated = 0

    def score(
        self, pairs: Sequence[tuple[str, str]], progress: Progress | None = None, desc: str = "teacher", show_progress: bool = True
    ) -> np.ndarray:
        q = self._side([p[0] for p in pairs], "query", show_progress)
        d = self._side([p[1] for p in pairs], "document", show_progress)
        if progress:
            progress(len(pairs), len(pairs))
        return np.einsum("ij,ij->i", q, d).astype(np.float32)

    def _side(self, texts: list[str], side: str, show_progress: bool = True) -> np.ndarray:
        """Each distinct text embedded once, with the model's prompt for its side."""
        unique = list(dict.fromkeys(texts))
        vecs = encode_texts(self.model, unique, show_progress=show_progress, prompt_name=side_prompt_name(self.model, side))
        pos = {t: i for i, t in enumerate(unique)}
        return vecs[[pos[t] for t in texts]]


@dataclass
class Teacher:
    """Loaded teacher members and their identity for artifact metadata."""

    spec: TeacherSpec
    scorers: list
    identity: list[dict]

    # Pairs, not member scores: a pair is scored when any member had to score it, from the cache
    # when every member read it there.
    cache_hits: int = 0
    cache_misses: int = 0
    cache_seconds: float = 0.0  # looking pairs up in the score cache and adding the new ones

    def score(
        self,
        pairs: list[tuple[str, str]],
        query_ids: list[str],
        progress: Progress | None = None,
        cache_dir: str | Path | None = None,
        show_progress: bool = True,
    ) -> np.ndarray:
        """Scores of ``pairs``; with ``cache_dir``, each member's raw scores are read from and added
        to a cache shared across runs, so no pair reaches the same model twice."""
        raws = self.member_scores(pairs, progress, cache_dir, show_progress)
        if len(raws) == 1:
            return raws[0]
        total = np.zeros(len(pairs), np.float64)
        for raw, w in zip(raws, self.spec.weights):
            total += w * zscore_per_query(raw, query_ids)
        return total.astype(np.float32)

    def member_scores(
        self,
        pairs: list[tuple[str, str]],
        progress: Progress | None = None,
        cache_dir: str | Path | None = None,
        show_progress: bool = True,
    ) -> list[np.ndarray]:
        """Each member's raw scores of ``pairs``, unmixed, through the cache as in :meth:`score`."""
        scored = np.zeros(len(pairs), bool)
        raws = []
        for scorer, ident in zip(self.scorers, self.identity):
            raw, missing = self._member_scores(scorer, ident, pairs, progress, cache_dir, show_progress)
            scored[missing] = True
            raws.append(raw)
        self.cache_misses += int(scored.sum())
        self.cache_hits += len(pairs) - int(scored.sum())
        return raws

    def _member_scores(self, scorer, ident: dict, pairs, progress, cache_dir, show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One member's raw scores of ``pairs`` and the positions it had to score."""
        desc = Path(ident["model"]).name
        if cache_dir is None:
            return scorer.score(pairs, progress, desc=desc, show_progress=show_progress), np.arange(len(pairs))
        t0 = time.perf_counter()
        cache = ScoreCache(Path(cache_dir) / member_fingerprint(ident))
        keys = pair_keys(pairs)
        known, out = cache.lookup(keys)
        missing = np.flatnonzero(~known)
        self.cache_seconds += time.perf_counter() - t0
        if len(missing):
            fresh = scorer.score([pairs[i] for i in missing], progress, desc=desc, show_progress=show_progress)
            out[missing] = fresh
            t0 = time.perf_counter()
            cache.add(keys[missing], fresh)
            self.cache_seconds += time.perf_counter() - t0
        log.info("%s: %d pairs from the cache, %d scored", desc, len(pairs) - len(missing), len(missing))
        return out, missing

    @property
    def normalization(self) -> str:
        return "none" if len(self.scorers) == 1 else "per-query z-score, weighted sum"


def member_fingerprint(ident: dict) -> str:
    """What makes one model's raw scores reusable: its weights, max_length, activation and precision."""
    from pipeline.artifacts import fingerprint

    return fingerprint(ident["kind"], ident["weights_sha256"], ident["max_length"], ident["activation"], ident["precision"])


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every Linear layer (weights int8, activations quantized per batch)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


def load_teacher(
    spec: TeacherSpec,
    device: str,
    precision: str = "auto",
    max_length: int = 512,
    batch_tokens: int = 0,
    trust_remote_code: bool = False,
) -> Teacher:
    quantize = precision == "int8"
    if quantize and not device.startswith("cpu"):
        raise PipelineError("--score-precision int8 (dynamic quantization) runs on CPU only; use bf16 or fp16 on CUDA")
    dtype = resolve_precision("fp32" if quantize else precision, device)
    scorers, identity = [], []
    for ref in spec.refs:
        kind = model_kind(ref)
        if kind == "bi-encoder":
            model = load_bi_encoder(ref, device, max_length, trust_remote_code)
            whash = weights_hash(model)
            scorer = BiEncoderScorer(model, device, dtype)
            if quantize:
                scorer.model = quantize_int8(scorer.model)
        else:
            model = load_cross_encoder(ref, device, max_length, trust_remote_code=trust_remote_code)
            if model.num_labels != 1:
                raise PipelineError(f"teacher {ref} has {model.num_labels} outputs; a reranker teacher needs one")
            whash = weights_hash(model.model)
            scorer = CrossEncoderScorer(model, device, dtype, batch_tokens, quantize=quantize)
        identity.append(
            {
                "model": strip_kind(ref),
                "kind": kind,
                "weights_sha256": whash,
                "max_length": scorer.max_length,
                "activation": scorer.activation,
                "precision": "int8-dynamic" if quantize else str(dtype).replace("torch.", ""),
            }
        )
        scorers.append(scorer)
    return Teacher(spec, scorers, identity)


@contextlib.contextmanager
def tokenizer_parallelism(enabled: bool):
    """Within the block, fast tokenizers encode a batch on all cores when ``enabled`` (they read
    TOKENIZERS_PARALLELISM at every call); outside it, the variable is as it was."""
    if not enabled:
        yield
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def relevance(logits: torch.Tensor) -> torch.Tensor:
    """One score per pair: the logit of a one-output model, the expected class of a classifier."""
    if logits.shape[-1] == 1:
        return logits[:, 0]
    grades = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    return (logits.softmax(-1) * grades).sum(-1)


def zscore_per_query(scores: np.ndarray, query_ids: Sequence[str]) -> np.ndarray:
    """(score - mean) / std within each query's scores (std 1 when a query has one score)."""
    scores = np.asarray(scores, np.float64)
    out = np.empty_like(scores)
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(query_ids):
        groups.setdefault(q, []).append(i)
    for idx in groups.values():
        s = scores[idx]
        std = s.std()
        out[idx] = (s - s.mean()) / (std if std > 1e-12 else 1.0)
    return out


def write_scores(path: str | Path, query_ids, doc_ids, scores, metadata: dict) -> None:
    """Arrow IPC file with query_id, doc_id, score and the teacher's identity in the schema metadata."""
    scores = np.asarray(scores, np.float32)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        i = int(bad[0])
        raise PipelineError(
            f"teacher produced a non-finite score ({scores[i]}) for query '{query_ids[i]}', doc '{doc_ids[i]}'"
            f" ({len(bad)} such pairs); not writing {path}"
        )
    schema = SCORES_SCHEMA.with_metadata({k: json.dumps(v) for k, v in metadata.items()})
    table = pa.table(
        {"query_id": list(query_ids), "doc_id": list(doc_ids), "score": pa.array(scores, pa.float32())}, schema=schema
    )
    with atomic_file(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)


def read_scores(path: str | Path) -> tuple[pa.Table, dict]:
    with pa.memory_map(str(path), "r") as source:
        table = pa.ipc.open_file(source).read_all()
    meta = {k.decode(): json.loads(v) for k, v in (table.schema.metadata or {}).items()}
    return table, meta


def score_pairs(
    teacher: Teacher,
    pairs: list[tuple[str, str]],
    query_ids: list[str],
    progress: Progress | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, dict]:
    """Score unique (query, passage) pairs (``query_ids``: each pair's query, for an ensemble's
    per-query normalisation); returns scores and the counts and timings of this call alone."""
    before = _teacher_counters(teacher)
    t0 = time.perf_counter()
    scores = teacher.score(pairs, list(query_ids), progress, cache_dir)
    seconds = time.perf_counter() - t0
    after = _teacher_counters(teacher)
    counts = {name: round(after[name] - before[name], 3) for name in after}
    return scores, scoring_stats({"pairs": len(pairs), "seconds": round(seconds, 3), **counts})


def scoring_stats(*calls: dict) -> dict:
    """The statistics of :func:`score_pairs` calls taken together: their counts and seconds
    summed, and the pairs per second of the sum."""
    total = {k: round(sum(c[k] for c in calls), 3) for k in calls[0] if k != "pairs_per_second"}
    seconds = total["seconds"]
    return {**total, "pairs_per_second": round(total["pairs"] / seconds, 2) if seconds > 0 else math.inf}


def _teacher_counters(teacher: Teacher) -> dict[str, float]:
    """What the teacher's members have counted so far (they count across calls)."""
    out = {
        "pairs_scored": teacher.cache_misses,
        "pairs_from_cache": teacher.cache_hits,
        "truncated_pairs": sum(s.truncated for s in teacher.scorers),
        "cache_seconds": teacher.cache_seconds,
    }
    for part in ("tokenize", "model", "tokenizer_wait"):
        out[f"{part}_seconds"] = sum(getattr(s, "seconds", {}).get(part, 0.0) for s in teacher.scorers)
    return out


def shard_of(query_id: str, num_shards: int) -> int:
    """Stable shard of a query: all of a query's pairs land in one shard (ensembles normalise per query)."""
    import hashlib

    return int(hashlib.sha1(query_id.encode()).hexdigest()[:8], 16) % num_shards


def group_pairs(mined_dir: str | Path) -> tuple[list[str], list[str], int]:
    """Unique (query_id, doc_id) pairs of the mined groups in the groups' order (each group's
    positives, then its negatives; a repeated pair keeps its first place), and how many pairs the
    groups list. Built with Arrow and numpy, not a Python loop over millions of pairs."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(Path(mined_dir) / "groups.parquet", columns=["query_id", "positive_ids", "negative_ids"])
    if not t.num_rows:
        return [], [], 0
    t = t.combine_chunks()
    lists = [t["positive_ids"].chunk(0), t["negative_ids"].chunk(0)]
    flat = [pc.list_flatten(c) for c in lists]
    group = np.concatenate([pc.list_parent_indices(c).to_numpy() for c in lists])
    side = np.concatenate([np.full(len(f), k) for k, f in enumerate(flat)])
    order = np.lexsort((np.arange(len(group)), side, group))
    docs = pa.concat_arrays(flat).take(pa.array(order))
    queries = t["query_id"].chunk(0).take(pa.array(group[order]))
    q_codes = pc.dictionary_encode(queries).indices.to_numpy().astype(np.int64)
    d_dict = pc.dictionary_encode(docs)
    pair = q_codes * len(d_dict.dictionary) + d_dict.indices.to_numpy()
    first = np.sort(np.unique(pair, return_index=True)[1])
    return queries.take(pa.array(first)).to_pylist(), docs.take(pa.array(first)).to_pylist(), len(order)


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of teacher scoring (``ScoreShard``, ``ScoreWithTeacher``)."""

    teacher: str = model()  # comma-separated members, each optionally bi:/ce:-prefixed
    teacher_weights: str = ""
    precision: str = "fp32"  # resolved: fp32, bf16, fp16 or int8
    max_length: int = 512
    num_shards: int = 1
    device: str = run_only("cpu", "the same precision scores alike on every device, up to float rounding")
    batch_tokens: int = run_only(0, "how pairs are batched; padding never reaches a score")
    cache_dir: str = run_only("", "where scores are kept between runs, keyed by teacher, setting and pair")
    trust_remote_code: bool = run_only(False, "permits a model's own code to load; the model is the same or does not load")
    max_dev_queries: int = run_only(200, "sizes the teacher's dev check in the first shard's statistics; the scores are the same")


def score_shard(
    data_dir: str | Path, mined_dir: str | Path, out_path: str | Path, config: ScoreConfig, shard: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Stage entry: teacher scores for one shard of the mined groups' unique pairs."""
    from pipeline.data import pair_texts

    t_stage = time.perf_counter()
    qids, dids, _ = group_pairs(mined_dir)
    c = config
    # One hash per query, not per pair.
    shard_by_query = {q: shard_of(q, c.num_shards) for q in set(qids)}
    keep = [i for i, q in enumerate(qids) if shard_by_query[q] == shard]
    qids, dids = [qids[i] for i in keep], [dids[i] for i in keep]
    teacher = load_teacher(
        TeacherSpec.parse(c.teacher, c.teacher_weights), c.device, c.precision, c.max_length, c.batch_tokens, c.trust_remote_code
    )
    dev_check, check_seconds = None, 0.0
    if shard == 0 and c.max_dev_queries:
        # First, so that a teacher no better than the retriever is reported before the bulk of the scoring.
        t_check = time.perf_counter()
        dev_check = teacher_dev_check(teacher, data_dir, mined_dir, c.max_dev_queries, c.cache_dir or None)
        check_seconds = time.perf_counter() - t_check
        dev_check = {**dev_check, "seconds": round(check_seconds, 3)} if dev_check else {}
    scores, stats = score_pairs(teacher, pair_texts(data_dir, qids, dids), qids, progress, c.cache_dir or None)
    # From reading the data to here (the model's loading included): the shard's own pairs, not the
    # dev check, whose model time score_pairs' timings leave out.
    stats["stage_seconds"] = round(time.perf_counter() - t_stage - check_seconds, 3)
    if dev_check is not None:
        stats["dev_check"] = dev_check
    meta = {
        "teacher": teacher.identity,
        "weights": teacher.spec.weights,
        "normalization": teacher.normalization,
        "max_length": c.max_length,
        "precision": teacher.identity[0]["precision"],
        "shard": [shard, c.num_shards],
    }
    # Which worker scored the shard: with several workers on a shared output root, the logs of
    # that host and process are the ones to read.
    stats = {
        **stats, "precision": meta["precision"], "device": c.device, "shard": shard,
        "batch_tokens": c.batch_tokens or default_batch_tokens(c.device), "host": socket.gethostname(), "pid": os.getpid(),
    }
    # Statistics first, scores last: the scores file marks the shard done, so a shard that
    # counts as done always has its statistics.
    write_json(Path(out_path).with_suffix(".json"), stats)
    write_scores(out_path, qids, dids, scores, meta)
    return stats


def teacher_dev_check(teacher: Teacher, data_dir: str | Path, mined_dir: str | Path, max_queries: int, cache_dir=None) -> dict:
    """nDCG@10 of the teacher and of the retriever's own order on the true top-k candidates of the
    first ``max_queries`` dev queries, with a paired test; a warning when the teacher is not ahead.

    Run by shard 0 before its own pairs: ahead of the bulk of the scoring and of every stage
    after it. A teacher that does not rank the retriever's
    candidates better than the retriever will not teach a student to (the evaluation would say
    so at the end, on test)."""
    from pipeline.data import pair_texts
    from pipeline.evaluation import judged_candidates, outcome, paired_test, per_query_metrics, to_run

    qrels, qids, dids, retrieval = judged_candidates(data_dir, mined_dir, "dev", max_queries) or ({}, [], [], [])
    judged = [q for q in dict.fromkeys(qids) if q in qrels]
    if not judged:
        return {}
    scores = teacher.score(pair_texts(data_dir, qids, dids), qids, cache_dir=cache_dir, show_progress=False)
    ndcg = {name: per_query_metrics(to_run(qids, dids, s), qrels, judged)["ndcg@10"] for name, s in (("teacher", scores), ("retriever", retrieval))}
    test = paired_test(ndcg["teacher"], ndcg["retriever"])
    out = {"queries": len(judged), "teacher_ndcg@10": float(ndcg["teacher"].mean()), "retriever_ndcg@10": float(ndcg["retriever"].mean()),
           "diff": test["diff"], "ci95": test["ci95"], "p_value": test["p_value"]}
    if outcome(test) != "yes":
        log.warning(
            "the teacher ranks %d dev queries' candidates at nDCG@10 %.4f against the retriever's own order %.4f "
            "(p = %.3g): a student distilled from it is unlikely to beat the retriever; a stronger --teacher, "
            "or more judged queries to fine-tune it on, may", len(judged), out["teacher_ndcg@10"], out["retriever_ndcg@10"], test["p_value"],
        )
    return out


def join_shards(mined_dir: str | Path, shard_paths: Sequence[str | Path], out_path: str | Path) -> dict:
    """Stage entry: check that the shards hold every unique pair exactly once, from one teacher,
    and write them as one Arrow file in the groups' pair order."""
    qids, dids, total = group_pairs(mined_dir)
    found: dict[tuple[str, str], float] = {}
    meta = None
    for path in shard_paths:
        table, m = read_scores(path)
        m.pop("shard", None)
        if meta is None:
            meta = m
        elif m != meta:
            raise PipelineError(f"{path}: scored by a different teacher or setting than the other shards")
        d = table.to_pydict()
        for q, doc, sc in zip(d["query_id"], d["doc_id"], d["score"]):
            if (q, doc) in found:
                raise PipelineError(f"{path}: pair ({q}, {doc}) is also in another shard")
            found[(q, doc)] = sc
    missing = [(q, d) for q, d in zip(qids, dids) if (q, d) not in found]
    if missing or len(found) != len(qids):
        raise PipelineError(f"shards hold {len(found)} pairs, the groups {len(qids)}; first missing: {missing[:1]}")
    write_scores(out_path, qids, dids, [found[(q, d)] for q, d in zip(qids, dids)], meta or {})
    return {"pairs": len(qids), "pairs_in_groups": total, "duplicate_pairs": total - len(qids), "shards": len(shard_paths)}
