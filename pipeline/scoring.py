"""Teacher scoring: score (query, passage) pairs with a cross-encoder, a bi-encoder or an ensemble.

Scores are raw logits for cross-encoders (no sigmoid: margins between logits are what
MarginMSE distils) and cosine similarities for bi-encoders. An ensemble z-normalises each
member's scores per query before the weighted sum, so members on different scales mix fairly.

The cross-encoder path sorts pairs by token length and fills each batch up to a token budget,
so little compute goes to padding; tokenization of the next chunk runs on a thread while the
model works on the current one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from pipeline.artifacts import atomic_file
from pipeline.errors import PipelineError
from pipeline.models import (
    load_bi_encoder,
    load_cross_encoder,
    model_kind,
    resolve_precision,
    strip_kind,
    weights_hash,
)

log = logging.getLogger(__name__)

SCORES_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float32())])
Progress = Callable[[int, int], None]


@dataclass
class TeacherSpec:
    """One or more teacher models and their ensemble weights."""

    refs: list[str]
    weights: list[float] = field(default_factory=list)

    @classmethod
    def parse(cls, teacher: str, weights: str = "") -> "TeacherSpec":
        refs = [t.strip() for t in teacher.split(",") if t.strip()]
        if not refs:
            raise PipelineError("--teacher is empty")
        ws = [float(w) for w in weights.split(",") if w.strip()] if weights else [1.0] * len(refs)
        if len(ws) != len(refs):
            raise PipelineError(f"--teacher-weights has {len(ws)} values for {len(refs)} teachers")
        return cls(refs, ws)


class CrossEncoderScorer:
    """Length-bucketed, token-budgeted inference for a sentence-transformers CrossEncoder."""

    activation = "identity (logits)"

    def __init__(self, model, device: str, dtype: torch.dtype, batch_tokens: int = 16384, chunk: int = 8192):
        self.ce = model
        self.device, self.dtype = device, dtype
        self.batch_tokens, self.chunk = batch_tokens, chunk
        self.hf = model.model.to(device=device, dtype=dtype).eval()
        self.tokenizer = model.tokenizer
        self.max_length = model.max_seq_length
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.truncated = 0

    def _tokenize(self, pairs: Sequence[tuple[str, str]]) -> dict:
        enc = self.tokenizer(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            truncation="longest_first",
            max_length=self.max_length,
            padding=False,
            return_overflowing_tokens=False,
            return_length=True,
        )
        self.truncated += sum(1 for n in enc["length"] if n >= self.max_length)
        return enc

    def _batches(self, enc: dict) -> list[np.ndarray]:
        lengths = np.asarray(enc["length"])
        order = np.argsort(-lengths, kind="stable")
        batches, start = [], 0
        while start < len(order):
            longest = int(lengths[order[start]])
            size = max(1, self.batch_tokens // max(longest, 1))
            batches.append(order[start : start + size])
            start += size
        return batches

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

    def score(self, pairs: Sequence[tuple[str, str]], progress: Progress | None = None, desc: str = "teacher") -> np.ndarray:
        out = np.empty(len(pairs), np.float32)
        bar = tqdm(total=len(pairs), unit="pair", desc=desc, dynamic_ncols=True, mininterval=2.0)
        chunks = [(s, pairs[s : s + self.chunk]) for s in range(0, len(pairs), self.chunk)]
        done = 0
        with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode():
            pending = pool.submit(self._prepare, chunks[0][1]) if chunks else None
            for ci, (start, _) in enumerate(chunks):
                enc, batches, collated = pending.result()
                if ci + 1 < len(chunks):
                    pending = pool.submit(self._prepare, chunks[ci + 1][1])
                for idx, feats in zip(batches, collated):
                    feats = {k: v.to(self.device, non_blocking=True) for k, v in feats.items()}
                    logits = self.hf(**feats).logits.float()
                    out[start + idx] = relevance(logits).cpu().numpy()
                    done += len(idx)
                    bar.update(len(idx))
                    if progress:
                        progress(done, len(pairs))
        bar.close()
        return out

    def _prepare(self, pairs):
        enc = self._tokenize(pairs)
        batches = self._batches(enc)
        return enc, batches, [self._collate(enc, b) for b in batches]


class BiEncoderScorer:
    """Cosine similarity of a SentenceTransformer's embeddings; each unique text is embedded once."""

    activation = "cosine"

    def __init__(self, model, device: str, dtype: torch.dtype, batch_size: int = 64):
        self.model = model.to(device=device, dtype=dtype)
        self.max_length = model.max_seq_length
        self.batch_size = batch_size
        self.truncated = 0

    def score(self, pairs: Sequence[tuple[str, str]], progress: Progress | None = None, desc: str = "teacher") -> np.ndarray:
        texts = list(dict.fromkeys(t for p in pairs for t in p))
        vecs = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=True
        ).astype(np.float32)
        pos = {t: i for i, t in enumerate(texts)}
        q = vecs[[pos[p[0]] for p in pairs]]
        d = vecs[[pos[p[1]] for p in pairs]]
        if progress:
            progress(len(pairs), len(pairs))
        return np.einsum("ij,ij->i", q, d).astype(np.float32)


@dataclass
class Teacher:
    """Loaded teacher members and their identity for artifact metadata."""

    spec: TeacherSpec
    scorers: list
    identity: list[dict]

    def score(self, pairs: list[tuple[str, str]], query_ids: list[str], progress: Progress | None = None) -> np.ndarray:
        if len(self.scorers) == 1:
            return self.scorers[0].score(pairs, progress)
        total = np.zeros(len(pairs), np.float64)
        for scorer, w, ident in zip(self.scorers, self.spec.weights, self.identity):
            raw = scorer.score(pairs, progress, desc=Path(ident["model"]).name)
            total += w * zscore_per_query(raw, query_ids)
        return total.astype(np.float32)

    @property
    def normalization(self) -> str:
        return "none" if len(self.scorers) == 1 else "per-query z-score, weighted sum"


def load_teacher(
    spec: TeacherSpec,
    device: str,
    precision: str = "auto",
    max_length: int = 512,
    batch_tokens: int = 16384,
    trust_remote_code: bool = False,
) -> Teacher:
    dtype = resolve_precision(precision, device)
    scorers, identity = [], []
    for ref in spec.refs:
        kind = model_kind(ref)
        if kind == "bi-encoder":
            model = load_bi_encoder(ref, device, max_length, trust_remote_code)
            whash = weights_hash(model)
            scorer = BiEncoderScorer(model, device, dtype)
        else:
            model = load_cross_encoder(ref, device, max_length, trust_remote_code=trust_remote_code)
            if model.num_labels != 1:
                raise PipelineError(f"teacher {ref} has {model.num_labels} outputs; a reranker teacher needs one")
            whash = weights_hash(model.model)
            scorer = CrossEncoderScorer(model, device, dtype, batch_tokens)
        identity.append(
            {
                "model": strip_kind(ref),
                "kind": kind,
                "weights_sha256": whash,
                "max_length": scorer.max_length,
                "activation": scorer.activation,
                "precision": str(dtype).replace("torch.", ""),
            }
        )
        scorers.append(scorer)
    return Teacher(spec, scorers, identity)


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


def unique_pairs(query_ids: Sequence[str], doc_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Deduplicated (query_id, doc_id) pairs in first-seen order."""
    seen = dict.fromkeys(zip(query_ids, doc_ids))
    return [q for q, _ in seen], [d for _, d in seen]


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
    query_ids: list[str],
    doc_ids: list[str],
    queries: dict[str, str],
    passage: Callable[[str], str],
    progress: Progress | None = None,
) -> tuple[np.ndarray, dict]:
    """Score unique (query_id, doc_id) pairs; returns scores and timing stats."""
    pairs = [(queries[q], passage(d)) for q, d in zip(query_ids, doc_ids)]
    t0 = time.perf_counter()
    scores = teacher.score(pairs, list(query_ids), progress)
    seconds = time.perf_counter() - t0
    stats = {
        "pairs_scored": len(pairs),
        "seconds": round(seconds, 3),
        "pairs_per_second": round(len(pairs) / seconds, 2) if seconds > 0 else math.inf,
        "truncated_pairs": sum(s.truncated for s in teacher.scorers),
    }
    return scores, stats


def score_with_teacher(
    data_dir: str | Path,
    mined_dir: str | Path,
    out_path: str | Path,
    teacher: str,
    teacher_weights: str = "",
    device: str = "cpu",
    precision: str = "auto",
    max_length: int = 512,
    batch_tokens: int = 16384,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Stage entry: teacher scores for every (query, passage) of every mined group."""
    import pyarrow.parquet as pq

    from pipeline.data import load_normalized

    ds = load_normalized(data_dir)
    g = pq.read_table(Path(mined_dir) / "groups.parquet").to_pydict()
    qids, dids = [], []
    for q, pos, neg in zip(g["query_id"], g["positive_ids"], g["negative_ids"]):
        for d in list(pos) + list(neg):
            qids.append(q)
            dids.append(d)
    total = len(qids)
    qids, dids = unique_pairs(qids, dids)
    model = load_teacher(TeacherSpec.parse(teacher, teacher_weights), device, precision, max_length, batch_tokens, trust_remote_code)
    scores, stats = score_pairs(model, qids, dids, ds.queries, ds.passage, progress)
    meta = {
        "teacher": model.identity,
        "weights": model.spec.weights,
        "normalization": model.normalization,
        "max_length": max_length,
        "precision": model.identity[0]["precision"],
    }
    write_scores(out_path, qids, dids, scores, meta)
    return {**stats, "pairs_in_groups": total, "duplicate_pairs": total - len(qids), "precision": meta["precision"]}
