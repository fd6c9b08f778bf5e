"""Hard-negative mining: embed queries and corpus with a bi-encoder, search with FAISS, pick negatives.

Produces two tables:
``groups`` (training queries): query_id, positive_ids, negative_ids, negative_scores, negative_ranks.
``candidates`` (evaluation queries): query_id, doc_ids, scores: the retriever's top-k in its own
order, exactly what a reranker in production sees. A judged positive the retriever missed is not
added: for every reranker it counts as a miss.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from pipeline.batching import token_batches
from pipeline.config import model, run_only
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

GROUPS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("positive_ids", pa.list_(pa.string())),
        ("positive_scores", pa.list_(pa.float32())),
        ("negative_ids", pa.list_(pa.string())),
        ("negative_scores", pa.list_(pa.float32())),
        ("negative_ranks", pa.list_(pa.int32())),
    ]
)
CANDIDATES_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("doc_ids", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))]
)


class EmbeddingCache:
    """Embeddings per (embedder, text), stored as a memory-mapped float32 matrix plus a key index.

    A rerun, or a run with added documents, embeds only texts it has not seen.
    """

    def __init__(self, folder: str | Path, dim: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index_path = self.folder / "keys.txt"
        self.matrix_path = self.folder / "vectors.f32"
        self.dim_path = self.folder / "dim.txt"
        self.keys: dict[str, int] = {}
        self._reload_keys()
        self.dim = dim
        if self.dim is None and self.dim_path.exists():
            self.dim = int(self.dim_path.read_text())
        elif self.dim is None and self.keys and self.matrix_path.exists():  # a cache from before dim.txt
            self.dim = self.matrix_path.stat().st_size // 4 // len(self.keys)

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def get(self, texts: list[str], encode) -> np.ndarray:
        """Embeddings for ``texts``; ``encode(list_of_texts) -> ndarray`` runs only on the missing ones."""
        return self.rows(self.add(texts, encode))

    def add(self, texts: list[str], encode) -> list[str]:
        """Embed the ``texts`` the cache lacks with ``encode``; the keys of all of them."""
        keys = [self.key(t) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.keys))
        if missing:
            first = {k: t for k, t in zip(keys, texts)}
            vectors = np.asarray(encode([first[k] for k in missing]), dtype=np.float32)
            self._append(missing, vectors)
        return keys

    def rows(self, keys: list[str]) -> np.ndarray:
        """The embeddings of these keys, all in the cache. When they sit in the cache in the same
        order (a rerun on the same corpus), a read-only memory map rather than a copy, so a large
        corpus never has to fit in memory twice."""
        matrix = self._matrix()
        rows = np.fromiter((self.keys[k] for k in keys), np.int64, len(keys))
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1)):
            return matrix[rows[0] : rows[-1] + 1]
        return np.asarray(matrix[rows])

    def _matrix(self) -> np.ndarray:
        n = len(self.keys)
        if n == 0:
            return np.zeros((0, self.dim or 0), np.float32)
        return np.memmap(self.matrix_path, dtype=np.float32, mode="r", shape=(n, self.dim))

    def _append(self, keys: list[str], vectors: np.ndarray) -> None:
        import fcntl

        if self.dim is None:
            self.dim = vectors.shape[1]
        # One writer at a time: two runs sharing a cache must not interleave their appends.
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._reload_keys()
            keys_new = [k for k in keys if k not in self.keys]
            if len(keys_new) != len(keys):
                keep = [i for i, k in enumerate(keys) if k not in self.keys]
                keys, vectors = keys_new, vectors[keep]
            if keys:
                self._append_locked(keys, vectors)

    def _reload_keys(self) -> None:
        # Only whole lines count: a run killed while appending keys leaves at most a partial last
        # line, which the next append cuts off (see _append_locked).
        if self.index_path.exists():
            text = self.index_path.read_text()
            self.keys = {k: i for i, k in enumerate(text[: text.rfind("\n") + 1].splitlines())}

    def _append_locked(self, keys: list[str], vectors: np.ndarray) -> None:
        # Vectors first, keys second: a crash in between leaves extra vectors that no key points to,
        # which the next append truncates away.
        n_before = len(self.keys)
        if not self.dim_path.exists():
            self.dim_path.write_text(str(self.dim))
        if self.index_path.exists():
            with open(self.index_path, "r+b") as f:
                f.truncate(f.read().rfind(b"\n") + 1)
        with open(self.matrix_path, "r+b" if self.matrix_path.exists() else "wb") as f:
            f.truncate(n_before * self.dim * 4)
            f.seek(0, 2)
            f.write(np.ascontiguousarray(vectors, np.float32).tobytes())
        with open(self.index_path, "a") as f:
            f.write("".join(k + "\n" for k in keys))
        for i, k in enumerate(keys):
            self.keys[k] = n_before + i


# The prompt names sentence-transformers models (e5, bge, ...) define for each side of a search.
SIDE_PROMPTS = {"query": ("query",), "document": ("document", "passage", "corpus")}


def side_prompt_name(model, side: str, name: str = "") -> str | None:
    """The prompt name to embed ``side`` ('query' or 'document') texts with: ``name`` when given;
    else the model's own prompt for that side; else its default prompt (None: no prompt)."""
    prompts = getattr(model, "prompts", None) or {}
    if name:
        if name not in prompts:
            raise PipelineError(f"prompt name '{name}' is not one of the embedder's prompts ({', '.join(prompts) or 'none'})")
        return name
    return next((n for n in SIDE_PROMPTS[side] if n in prompts), getattr(model, "default_prompt_name", None))


def encode_texts(
    model, texts: list[str], batch_tokens: int | None = None, show_progress: bool = True, prompt_name: str | None = None
) -> np.ndarray:
    """Unit-normalised float32 embeddings (inner product = cosine): ``model.encode(texts,
    prompt_name=prompt_name, normalize_embeddings=True)`` (None: the model's default prompt),
    batched by token budget.

    ``encode`` sorts by characters and takes 32 texts a batch; sorting by exact token length and
    batching up to ``batch_tokens`` padded tokens (default 4096 on a CPU, 32768 on a GPU) gives
    the same vectors; mining the demo on a 2-core CPU ran 1.1-1.5x faster (``make bench-mine``).
    """
    dim = (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()
    if not texts:
        return np.zeros((0, dim), np.float32)
    prompt_name = prompt_name or model.default_prompt_name
    prompt = model.prompts.get(prompt_name) if prompt_name else None
    lengths = _token_lengths(model, texts, prompt)
    if lengths is None:  # an input module without an attention mask (e.g. static embeddings)
        return model.encode(
            texts, prompt_name=prompt_name, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=show_progress
        )
    budget = batch_tokens or (32768 if model.device.type == "cuda" else 4096)
    out = np.empty((len(texts), dim), np.float32)
    model.eval()
    with torch.inference_mode(), tqdm(total=len(texts), unit="text", desc="embed", disable=not show_progress) as bar:
        for idx in token_batches(lengths, budget):
            feats = _preprocess(model, [texts[i] for i in idx], prompt)
            feats = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}
            vecs = torch.nn.functional.normalize(model(feats)["sentence_embedding"].float(), p=2, dim=1)
            out[idx] = vecs.cpu().numpy()
            bar.update(len(idx))
    return out


def _preprocess(model, texts: list[str], prompt: str | None) -> dict:
    if hasattr(model, "preprocess"):  # sentence-transformers 6
        return model.preprocess(texts, prompt=prompt)
    return model.tokenize([prompt + t for t in texts] if prompt else texts)


def _token_lengths(model, texts: list[str], prompt: str | None, chunk: int = 8192) -> np.ndarray | None:
    """Each text's token count after the model's own preprocessing (truncation, prompt, specials)."""
    lengths = []
    for s in range(0, len(texts), chunk):
        feats = _preprocess(model, texts[s : s + chunk], prompt)
        if "attention_mask" not in feats:
            return None
        lengths.append(feats["attention_mask"].sum(dim=1).numpy())
    return np.concatenate(lengths)


def build_index(
    vectors: np.ndarray,
    factory: str = "Flat",
    train_sample: int = 100_000,
    nprobe: int = 16,
    ef_search: int = 128,
    use_gpu: bool = False,
    add_batch: int = 65_536,
    seed: int = 0,
):
    """A FAISS inner-product index over ``vectors`` (``factory`` is any faiss.index_factory string).

    Indexes that need training (IVF, PQ) train on a random sample of at most ``train_sample``
    vectors; vectors are added in batches, so a memory-mapped matrix is never copied whole.
    ``use_gpu`` moves the index to every GPU when the installed faiss has GPU support.
    ``use_gpu`` with ``Flat`` and a faiss without GPU support (pip's faiss-cpu) searches on the GPU
    with torch instead: the same exact inner product, without faiss-gpu.
    """
    if use_gpu and factory == "Flat" and _faiss_gpus() == 0 and torch.cuda.is_available():
        return TorchFlatIndex(vectors, add_batch=add_batch)
    import faiss

    dim = vectors.shape[1]
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(vectors), min(train_sample, len(vectors)), replace=False))
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    if use_gpu and _faiss_gpus() > 0:
        try:
            index = faiss.index_cpu_to_all_gpus(index)
        except RuntimeError as e:  # e.g. HNSW, which faiss cannot move to a GPU
            log.warning("FAISS index %s stays on the CPU: %s", factory, e)
    for s in range(0, len(vectors), add_batch):
        index.add(np.ascontiguousarray(vectors[s : s + add_batch], dtype=np.float32))
    space = faiss.GpuParameterSpace() if "Gpu" in type(index).__name__ else faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("quantizer_efSearch", ef_search)):
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            pass  # this index type has no such parameter
    return index


def _faiss_gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return getattr(faiss, "get_num_gpus", lambda: 0)()


class TorchFlatIndex:
    """Exact inner-product search on one CUDA device, with faiss's ``ntotal``/``search`` interface."""

    max_scores = 1 << 28  # 1 GiB of fp32 scores at a time

    def __init__(self, vectors: np.ndarray, device: str = "cuda", add_batch: int = 65_536):
        self.vectors = torch.empty((len(vectors), vectors.shape[1]), dtype=torch.float32, device=device)
        for s in range(0, len(vectors), add_batch):
            self.vectors[s : s + add_batch] = torch.from_numpy(np.array(vectors[s : s + add_batch], dtype=np.float32))
        self.ntotal = len(vectors)

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.array(queries, dtype=np.float32)).to(self.vectors)
        step = max(1, self.max_scores // max(self.ntotal, 1))  # bounds the (queries x corpus) score block
        parts = [torch.topk(q[s : s + step] @ self.vectors.T, k, dim=1) for s in range(0, len(q), step)]
        return torch.cat([p.values for p in parts]).cpu().numpy(), torch.cat([p.indices for p in parts]).cpu().numpy()


def search(index, queries: np.ndarray, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) in bounded-memory batches."""
    if isinstance(index, SearchCache):  # looks every query up at once, searches the rest through here
        return index.search(queries, k)
    k = min(k, index.ntotal)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), batch):
        scores[s : s + batch], ids[s : s + batch] = index.search(queries[s : s + batch], k)
    return scores, ids


class SearchCache:
    """An index's top-k results kept between runs, keyed by the exact bytes of each query vector.

    A later date on the same corpus searches only the queries it has not searched before: the
    vector fixes the result, and ``identity`` (embedder, corpus in order, index settings) names
    the folder, so a changed corpus or index starts a new one. Flat search over a large corpus
    costs far more than embedding a query; this is what keeps a date with a few new queries cheap.
    """

    def __init__(self, index, folder: str | Path, identity: str):
        self.index, self.folder, self.identity = index, Path(folder), identity
        self.ntotal = index.ntotal
        self.hits = self.misses = 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from pipeline.artifacts import fingerprint
        from pipeline.keyed_store import KeyedStore, digest_keys

        k = min(k, self.ntotal)
        store = KeyedStore(
            self.folder / fingerprint(self.identity, k),
            pa.schema([("ids", pa.list_(pa.int64(), k)), ("scores", pa.list_(pa.float32(), k))]),
        )
        queries = np.ascontiguousarray(queries, np.float32)
        keys = digest_keys(q.tobytes() for q in queries)
        found, known = store.lookup(keys)
        scores, ids = known["scores"], known["ids"]
        todo = np.flatnonzero(~found)
        if len(todo):
            scores[todo], ids[todo] = search(self.index, queries[todo], k)
            store.add(keys[todo], {"ids": ids[todo], "scores": scores[todo]})
        self.hits += int(found.sum())
        self.misses += len(todo)
        return scores, ids


@dataclass(frozen=True)
class NegativeFilter:
    """sentence-transformers' mining filters; a candidate failing one is never a negative.

    ``absolute_margin``: drop if score + margin > the positive's score; ``relative_margin``: drop if
    score > positive - |positive| * margin; ``max_score`` / ``min_score``: drop above / below.
    With several positives the lowest-scored one is the reference, as in
    ``sentence_transformers.util.mine_hard_negatives``.
    """

    absolute_margin: float | None = None
    relative_margin: float | None = None
    max_score: float | None = None
    min_score: float | None = None

    def rejects(self, score: float, positive: float) -> str | None:
        if self.absolute_margin is not None and score + self.absolute_margin > positive:
            return "absolute_margin"
        if self.relative_margin is not None and score > positive - abs(positive) * self.relative_margin:
            return "relative_margin"
        if self.max_score is not None and score > self.max_score:
            return "max_score"
        if self.min_score is not None and score < self.min_score:
            return "min_score"
        return None


def select_negatives(
    ranked_ids: list[str],
    ranked_scores: list[float],
    positives: set[str],
    num_negatives: int,
    range_min: int = 0,
    range_max: int | None = None,
    sampling: str = "top",
    rng: random.Random | None = None,
    positive_score: float = float("inf"),
    filters: NegativeFilter = NegativeFilter(),
    skipped: Counter | None = None,
) -> tuple[list[str], list[float], list[int]]:
    """Pick negatives from one query's ranked list.

    Ranks count non-positive documents only (0 = the best-scored non-positive). Filtered
    candidates are removed first, then ``range_min`` / ``range_max`` cut the survivors, as
    sentence-transformers does; ``range_min`` skips the top of the list, where unjudged relevant
    documents (false negatives) crowd. ``skipped`` counts the filtered candidates by reason.
    """
    pool = []
    for rank, (d, s) in enumerate((d, s) for d, s in zip(ranked_ids, ranked_scores) if d not in positives):
        reason = filters.rejects(s, positive_score)
        if reason:
            if skipped is not None:
                skipped[reason] += 1
            continue
        pool.append((d, s, rank))
    pool = pool[:range_max][range_min:]
    if sampling == "top":
        chosen = pool[:num_negatives]
    elif sampling == "random":
        rng = rng or random.Random(0)
        chosen = sorted(rng.sample(pool, min(num_negatives, len(pool))), key=lambda x: x[2])
    else:
        raise PipelineError(f"unknown sampling '{sampling}' (choose top or random)")
    return [d for d, _, _ in chosen], [float(s) for _, s, _ in chosen], [r for _, _, r in chosen]


def mine(
    query_vecs: np.ndarray,
    query_ids: list[str],
    doc_vecs: np.ndarray,
    doc_ids: list[str],
    positives: dict[str, dict[str, int]],
    num_negatives: int,
    range_min: int = 0,
    range_max: int = 50,
    sampling: str = "top",
    index=None,
    seed: int = 12,
    filters: NegativeFilter = NegativeFilter(),
    random_share: float = 0.0,
    skipped: Counter | None = None,
    ignore_identical_ids: bool = False,
    max_positives: int = 0,
    twins: dict[str, list[str]] | None = None,
    candidates_k: int = 0,
) -> pa.Table | tuple[pa.Table, pa.Table]:
    """Groups of (query, positives, mined negatives with retrieval scores and ranks); with
    ``candidates_k``, also each query's true top-``candidates_k`` (as :func:`rerank_candidates`),
    read off the same search.

    ``twins`` (:func:`text_twins`): a passage with the exact text of one of the query's positives
    is never its negative, as in sentence-transformers' mining, which de-duplicates the corpus by
    text; it would label the positive's own text irrelevant. ``skipped`` counts them.

    ``max_positives`` (0: all) caps the positives a group lists (:func:`kept_positives`); every
    judged positive is still kept out of the negatives.

    ``random_share`` of each query's ``num_negatives`` are drawn uniformly from the corpus instead
    (easy negatives, rank -1); the rest are hard negatives from the ranked list. A query without
    judged positives (an empty entry in ``positives``) gets one more hard candidate: the teacher's
    best of them becomes its positive when labels are built.
    """
    if not 0.0 <= random_share <= 1.0:
        raise PipelineError(f"random_share must be within [0, 1], got {random_share}")
    n_random = round(num_negatives * random_share)
    n_hard = num_negatives - n_random
    index = index if index is not None else build_index(doc_vecs)
    max_pos = max((len(p) for p in positives.values()), default=0)
    k = min(max(range_max + max_pos, candidates_k), len(doc_ids))
    doc_pos = {d: i for i, d in enumerate(doc_ids)}
    own = own_id_columns(query_ids, doc_ids, positives) if ignore_identical_ids else {}
    if n_hard or candidates_k:
        scores, ids = without_own_ids(*search(index, query_vecs, min(k + bool(own), len(doc_ids))), own, k)
    else:
        scores, ids = np.zeros((len(query_ids), 0)), np.zeros((len(query_ids), 0), int)
    rng = random.Random(seed)
    rows = {name: [] for name in GROUPS_SCHEMA.names}
    for qi, qid in enumerate(query_ids):
        pos = positives[qid]
        pos_ids = kept_positives(qid, pos, max_positives, seed)
        pos_scores = [float(query_vecs[qi] @ doc_vecs[doc_pos[p]]) for p in pos_ids]
        ranked = [doc_ids[j] for j in ids[qi] if j >= 0]
        same_text = {t for p in pos for t in twins.get(p, ())} - set(pos) if twins else set()
        if same_text and skipped is not None:
            skipped["same_text_as_a_positive"] += sum(1 for d in ranked if d in same_text)
        neg_ids, neg_scores, neg_ranks = select_negatives(
            ranked, scores[qi][: len(ranked)].tolist(), set(pos) | same_text, n_hard + (0 if pos else 1), range_min, range_max,
            sampling, rng, min(pos_scores, default=float("inf")), filters, skipped,
        )
        if n_random:
            taken = set(pos) | same_text | set(neg_ids) | ({qid} if qi in own else set())
            for _ in range(min(n_random, len(doc_ids) - len(taken))):
                j = rng.randrange(len(doc_ids))
                while doc_ids[j] in taken:
                    j = rng.randrange(len(doc_ids))
                taken.add(doc_ids[j])
                neg_ids.append(doc_ids[j])
                neg_scores.append(float(query_vecs[qi] @ doc_vecs[j]))
                neg_ranks.append(-1)
        rows["query_id"].append(qid)
        rows["positive_ids"].append(pos_ids)
        rows["positive_scores"].append(pos_scores)
        rows["negative_ids"].append(neg_ids)
        rows["negative_scores"].append(neg_scores)
        rows["negative_ranks"].append(neg_ranks)
    groups = pa.table(rows, schema=GROUPS_SCHEMA)
    if not candidates_k:
        return groups
    return groups, candidates_table(query_ids, doc_ids, scores[:, :candidates_k], ids[:, :candidates_k])


def kept_positives(query_id: str, grades: dict[str, int], limit: int, seed: int) -> list[str]:
    """The positives a training group lists: all (``limit`` 0), else the ``limit`` best graded,
    ties drawn by a seeded hash. Each listed positive becomes a training row for the teacher and
    the student, so a query with forty judged passages (NFCorpus has such) would weigh forty
    times as much as one with a single answer, and cost forty rows of training on a CPU; trainers
    of the field draw one positive per query per epoch (FlagEmbedding, Tevatron)."""
    if not limit or len(grades) <= limit:
        return list(grades)

    def draw(doc_id: str) -> str:
        return hashlib.blake2b(f"{seed}:{query_id}:{doc_id}".encode(), digest_size=8).hexdigest()

    return sorted(grades, key=lambda d: (-grades[d], draw(d)))[:limit]


def own_id_columns(query_ids: list[str], doc_ids: list[str], relevant: dict[str, dict[str, int]]) -> dict[int, int]:
    """Query row -> corpus row of the passage that has the query's own id, where it is not
    judged relevant to the query.

    Some corpora hold their queries (BEIR's ArguAna and Quora): the passage with the query's id
    is the query's own text, the retriever's first hit and nobody's answer. BEIR's evaluation
    leaves it out (``ignore_identical_ids``); so do the candidates and negatives here, unless a
    judgment names it, as in a dataset that numbers queries and their passages alike."""
    import pyarrow.compute as pc

    # An Arrow hash of the ids, not a dictionary of a million Python strings.
    rows = pc.index_in(pa.array(query_ids, pa.string()), value_set=pa.array(doc_ids, pa.string()))
    return {
        i: j for i, j in enumerate(rows.to_pylist())
        if j is not None and query_ids[i] not in relevant.get(query_ids[i], {})
    }


def without_own_ids(scores: np.ndarray, ids: np.ndarray, own: dict[int, int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` results of each row once the ``own`` passage is taken out (searched with
    one result more when any row has one)."""
    if not own:
        return scores[:, :k], ids[:, :k]
    out_scores, out_ids = scores[:, :k].copy(), ids[:, :k].copy()
    for i, j in own.items():  # the other rows keep their first k
        keep = ids[i] != j
        row_ids, row_scores = ids[i][keep][:k], scores[i][keep][:k]
        out_ids[i], out_scores[i] = -1, 0
        out_ids[i, : len(row_ids)], out_scores[i, : len(row_ids)] = row_ids, row_scores
    return out_scores, out_ids


def rerank_candidates(
    query_vecs: np.ndarray,
    query_ids: list[str],
    doc_vecs: np.ndarray,
    top_k: int,
    doc_ids: list[str],
    index=None,
    relevant: dict[str, dict[str, int]] | None = None,
    ignore_identical_ids: bool = False,
) -> pa.Table:
    """The retriever's top-k per query in its own order, and nothing else; with
    ``ignore_identical_ids``, never a passage that is the query itself (:func:`own_id_columns`)."""
    index = index if index is not None else build_index(doc_vecs)
    own = own_id_columns(query_ids, doc_ids, relevant or {}) if ignore_identical_ids else {}
    scores, ids = without_own_ids(*search(index, query_vecs, min(top_k + bool(own), len(doc_ids))), own, top_k)
    return candidates_table(query_ids, doc_ids, scores, ids)


def candidates_table(query_ids: list[str], doc_ids: list[str], scores: np.ndarray, ids: np.ndarray) -> pa.Table:
    """Search results (rows of corpus positions, -1 for none) as each query's candidate ids and scores."""
    out_ids = [[doc_ids[j] for j in row if j >= 0] for row in ids]
    out_scores = [[float(s) for j, s in zip(row, srow) if j >= 0] for row, srow in zip(ids, scores)]
    return pa.table({"query_id": list(query_ids), "doc_ids": out_ids, "scores": out_scores}, schema=CANDIDATES_SCHEMA)


def write_table(table: pa.Table, path: str | Path) -> None:
    from pipeline.artifacts import atomic_file

    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def ds_source(data_dir) -> str:
    from pipeline.artifacts import read_json

    try:
        return read_json(Path(data_dir) / "stats.json")["source"]
    except (OSError, KeyError, ValueError):
        return str(data_dir)


def mining_stats(groups: pa.Table, num_negatives: int, skipped: Counter) -> dict:
    """What the report shows about the chosen negatives: counts, rank and score distributions."""
    negs = groups.column("negative_ids").to_pylist()
    ranks = np.asarray([r for rr in groups.column("negative_ranks").to_pylist() for r in rr], np.int64)
    neg_scores = np.asarray([x for xx in groups.column("negative_scores").to_pylist() for x in xx], np.float64)
    pos_scores = np.asarray([x for xx in groups.column("positive_scores").to_pylist() for x in xx], np.float64)
    hard = ranks[ranks >= 0]

    def quantiles(x: np.ndarray) -> dict:
        if not len(x):
            return {}
        return {f"p{q}": round(float(np.percentile(x, q)), 4) for q in (5, 25, 50, 75, 95)}

    unjudged = sum(1 for p in groups.column("positive_ids").to_pylist() if not p)
    return {
        "judged_queries": groups.num_rows - unjudged,
        "unjudged_queries": unjudged,
        "negatives": int(len(ranks)),
        "random_negatives": int((ranks < 0).sum()),
        "queries_short_of_negatives": sum(1 for n in negs if len(n) < num_negatives),
        "queries_without_negatives": sum(1 for n in negs if not n),
        "mean_negative_rank": float(hard.mean()) if len(hard) else float("nan"),
        "mean_negative_score": float(neg_scores.mean()) if len(neg_scores) else float("nan"),
        "negative_rank_quantiles": quantiles(hard),
        "negative_score_quantiles": quantiles(neg_scores),
        "positive_score_quantiles": quantiles(pos_scores),
        "filtered": dict(sorted(skipped.items())),
    }


@dataclass(frozen=True)
class MineConfig:
    """Settings of the mining stage (``MineHardNegatives``)."""

    # 1: candidates-train.parquet, the training queries' true top-k.
    REVISION: ClassVar[int] = 1

    embedder: str = model()
    num_negatives: int = 7
    range_min: int = 0
    range_max: int = 50
    sampling: str = "top"
    max_train_queries: int = 0
    max_unjudged_queries: int = 0
    rerank_top_k: int = 20
    faiss_index: str = "Flat"
    nprobe: int = 16
    ef_search: int = 128
    max_length: int = 256
    seed: int = 12
    filters: NegativeFilter = NegativeFilter()
    random_share: float = 0.0
    query_prompt_name: str = ""
    document_prompt_name: str = ""
    ignore_identical_ids: bool = True  # a passage with the query's own id is not its candidate (own_id_columns)
    exclude_text_twins: bool = True  # a passage with a positive's exact text is not its negative (text_twins)
    max_positives: int = 1  # positives listed per training query, the best graded (kept_positives); 0 = all
    device: str = run_only("cpu", "embeddings agree across devices to float rounding; the cache is keyed by model")
    cache_dir: str = run_only("", "where embeddings are kept between runs, keyed by model and text")


def mine_hard_negatives(data_dir: str | Path, out_dir: str | Path, config: MineConfig) -> dict:
    """Stage entry: groups for training queries, and every split's rerank candidates.

    Queries and passages are embedded with the embedder's prompt for their side
    (``side_prompt_name``), as sentence-transformers' ``mine_hard_negatives`` does with
    ``query_prompt_name`` / ``corpus_prompt_name``.

    ``max_unjudged_queries`` (-1: all) queries of the dataset that no split judges join the
    training groups with retrieved candidates only: the teacher labels them."""
    import time

    from pipeline.artifacts import atomic_dir, write_json
    from pipeline.data import NormalizedTables

    c = config
    t0 = time.perf_counter()
    tables = NormalizedTables(data_dir)
    ds = tables.subset(doc_ids=[])  # queries and judgments; the passages stay in Arrow
    _check_mining_input(ds, data_dir, c)
    left_out: Counter = Counter()
    train = training_queries(ds, c.max_train_queries, c.max_unjudged_queries, c.seed, left_out)
    if left_out:
        log.warning("%s: training queries left out for their text: %s", ds_source(data_dir), dict(left_out))
    if not train:
        raise PipelineError(f"{ds_source(data_dir)}: no training query is left: each has the text of a dev or test query ({dict(left_out)})")
    encoders = SideEncoders(c)
    twins: dict[str, list[str]] | None = {} if c.exclude_text_twins else None
    doc_ids, doc_vecs, corpus_digest = embed_corpus(tables.tables[""][1], encoders, twins=twins)
    t_index = time.perf_counter()
    index = build_index(doc_vecs, c.faiss_index, nprobe=c.nprobe, ef_search=c.ef_search, use_gpu=c.device.startswith("cuda"))
    index_seconds = time.perf_counter() - t_index
    if c.cache_dir:
        index = SearchCache(index, Path(c.cache_dir) / "searches", search_identity(c, corpus_digest))

    stats: dict = {"train_queries": len(train), "corpus": len(doc_ids), "faiss_index": c.faiss_index,
                   "training_queries_left_out": dict(sorted(left_out.items()))}
    with atomic_dir(out_dir) as tmp:
        if train:
            qv = encoders.embed("query", [ds.queries[q] for q in train])
            skipped: Counter = Counter()
            # Every training query's true top-k as well, from the same search: what a student
            # taught on whole candidate lists learns to order (pipeline.plain_student).
            groups, candidates = mine(
                qv, list(train), doc_vecs, doc_ids, train, c.num_negatives, c.range_min, c.range_max, c.sampling, index,
                c.seed, c.filters, c.random_share, skipped, c.ignore_identical_ids, c.max_positives,
                twins, candidates_k=c.rerank_top_k,
            )
            write_table(groups, tmp / "groups.parquet")
            write_table(candidates, tmp / "candidates-train.parquet")
            stats.update(mining_stats(groups, c.num_negatives, skipped))
            stats["positives_left_out"] = sum(len(p) for p in train.values()) - len(groups["positive_ids"].combine_chunks().flatten())
        for split in ("dev", "test"):
            rel = ds.relevant(split)
            if rel:
                qids = sorted(rel)
                cand = rerank_candidates(
                    encoders.embed("query", [ds.queries[q] for q in qids]), qids, doc_vecs, c.rerank_top_k, doc_ids, index,
                    rel, c.ignore_identical_ids,
                )
                write_table(cand, tmp / f"candidates-{split}.parquet")
                stats[f"{split}_queries"] = len(qids)
                # The ceiling of every reranker: queries whose judged positive the retriever missed score 0.
                found = sum(1 for q, docs in zip(qids, cand.column("doc_ids").to_pylist()) if set(docs) & set(rel[q]))
                stats[f"{split}_queries_with_positive_in_top_k"] = found
        stats.update(encoders.calls)
        if isinstance(index, SearchCache):
            stats.update(queries_searched=index.misses, searches_from_cache=index.hits)
        stats["index_seconds"] = round(index_seconds, 2)
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(tmp / "stats.json", stats)
    return stats


CORPUS_CHUNK = 100_000  # passages that are Python strings at once while the corpus is embedded


def embed_corpus(
    corpus: pa.Table, encoders: SideEncoders, chunk: int = CORPUS_CHUNK, twins: dict[str, list[str]] | None = None
) -> tuple[list[str], np.ndarray, str]:
    """The corpus's ids, their document vectors, and a digest of its ids and texts in index
    order, read from Arrow a chunk at a time: only one chunk's passages are ever Python strings.
    ``twins`` gets, for each document whose exact text another one has, the ids of the others."""
    from pipeline.data import passage_texts

    digest = hashlib.blake2b(digest_size=16)
    doc_ids: list[str] = []
    keys: list[str] = []
    for batch in corpus.to_batches(max_chunksize=chunk):
        ids = batch.column("doc_id").to_pylist()
        texts = passage_texts(batch.column("title"), batch.column("text")).to_pylist()
        keys += encoders.add("document", texts)
        for d, p in zip(ids, texts):
            digest.update(f"{d}\x1f{p}\x1e".encode())
        doc_ids += ids
    if twins is not None:
        twins.update(text_twins(doc_ids, keys))
    return doc_ids, encoders.caches["document"].rows(keys), digest.hexdigest()


def text_twins(doc_ids: list[str], text_keys: list[str]) -> dict[str, list[str]]:
    """For each document whose text key another document shares, the other documents' ids."""
    if not doc_ids:
        return {}
    _, group, sizes = np.unique(np.asarray(text_keys), return_inverse=True, return_counts=True)
    shared: dict[int, list[str]] = {}
    for i in np.flatnonzero(sizes[group] > 1):
        shared.setdefault(int(group[i]), []).append(doc_ids[i])
    return {d: [o for o in ids if o != d] for ids in shared.values() for d in ids}


def search_identity(c: MineConfig, corpus_digest: str) -> str:
    """What fixes a search's results besides the query vector: the embedder and its document
    side, the corpus's ids and texts in index order (``embed_corpus``'s digest), and the index's
    settings."""
    from pipeline.artifacts import fingerprint
    from pipeline.models import model_identity

    return fingerprint(
        model_identity(c.embedder), c.max_length, c.document_prompt_name, corpus_digest, c.faiss_index, c.nprobe, c.ef_search
    )


def _check_mining_input(ds, data_dir, c: MineConfig) -> None:
    """Stop before any embedding on settings or data mining cannot work with."""
    from pipeline.artifacts import read_json

    judged = {q for q, _, _, _ in ds.qrels}
    # Queries nobody judged train on the teacher's labels alone: enough without any judgment.
    if not ds.relevant("train") and not (c.max_unjudged_queries != 0 and any(q not in judged for q in ds.queries)):
        raise PipelineError(
            f"{ds_source(data_dir)}: no judged training pairs (qrels/train.tsv is missing or has no score > 0) and no "
            "unjudged queries to label with a trained teacher (--max-unjudged-queries -1, --unlabeled-queries FILE)"
        )
    from_file = read_json(Path(data_dir) / "stats.json").get("unlabeled_file_queries", 0)
    if from_file and c.max_unjudged_queries == 0:
        raise PipelineError(
            f"{ds_source(data_dir)}: {from_file} queries from --unlabeled-queries, but --max-unjudged-queries is 0; "
            "pass -1 to train on all unjudged queries, or a number"
        )
    if c.range_min < 0 or c.range_min >= c.range_max:
        raise PipelineError(f"range_min must be within [0, range_max); got range_min={c.range_min}, range_max={c.range_max}")


def training_queries(ds, max_judged: int, max_unjudged: int, seed: int, left_out: Counter | None = None) -> dict[str, dict[str, int]]:
    """Training queries and their positives, in a seeded order: up to ``max_judged`` judged ones
    (0: all), then up to ``max_unjudged`` (-1: all) that no split judges, with no positives.

    A query is compared by its text (case and spacing aside), not only by its id: search logs
    hold the evaluated queries too, under other ids. One with the text of a dev or test query
    never trains (it would rank that query's own candidates, and flatter every trained row of
    the evaluation); an unjudged one with the text of a judged training query, or of an earlier
    unjudged one (logs repeat searches), would only repeat it. ``left_out`` counts each reason."""
    order = lambda q: hashlib.sha1(f"{seed}:{q}".encode()).hexdigest()  # noqa: E731
    text = lambda q: " ".join(ds.queries[q].casefold().split())  # noqa: E731
    left_out = Counter() if left_out is None else left_out
    evaluated = {text(q) for q, _, _, split in ds.qrels if split in ("dev", "test")}
    train = ds.relevant("train")
    judged_ids = []
    for q in sorted(train, key=order):
        if text(q) in evaluated:
            left_out["text_of_an_evaluation_query"] += 1
        else:
            judged_ids.append(q)
    judged_ids = judged_ids[: max_judged or None]
    judged = {q for q, _, _, _ in ds.qrels}
    seen = {text(q) for q in judged_ids}
    unjudged = []
    for q in sorted((q for q in ds.queries if q not in judged), key=order):
        if max_unjudged >= 0 and len(unjudged) == max_unjudged:
            break
        t = text(q)
        if t in evaluated:
            left_out["text_of_an_evaluation_query"] += 1
        elif t in seen:
            left_out["text_of_another_training_query"] += 1
        else:
            seen.add(t)
            unjudged.append(q)
    return {**{q: train[q] for q in judged_ids}, **{q: {} for q in unjudged}}


class SideEncoders:
    """The embedder with each side's prompt, behind a per-side embedding cache.

    The model's identity covers its prompts, so one cache per side and prompt setting is exact;
    the model itself is loaded only when a text is missing."""

    def __init__(self, c: MineConfig):
        from pipeline.artifacts import fingerprint
        from pipeline.models import model_identity

        self.config, self.model = c, None
        self.calls = {"encode_calls": 0, "texts_embedded": 0}
        self.prompt_names = {"query": c.query_prompt_name, "document": c.document_prompt_name}
        self.caches = {
            side: EmbeddingCache(Path(c.cache_dir) / "embeddings" / fingerprint(model_identity(c.embedder), c.max_length, side, name))
            for side, name in self.prompt_names.items()
        }

    def embed(self, side: str, texts: list[str]) -> np.ndarray:
        """The embeddings of ``texts`` on ``side``."""
        return self.caches[side].get(texts, lambda missing: self._encode(side, missing))

    def add(self, side: str, texts: list[str]) -> list[str]:
        """Embed what the side's cache lacks of ``texts``; their cache keys."""
        return self.caches[side].add(texts, lambda missing: self._encode(side, missing))

    def _encode(self, side: str, texts: list[str]) -> np.ndarray:
        from pipeline.models import load_bi_encoder

        if self.model is None:
            self.model = load_bi_encoder(self.config.embedder, self.config.device, self.config.max_length)
        self.calls["encode_calls"] += 1
        self.calls["texts_embedded"] += len(texts)
        return encode_texts(self.model, texts, prompt_name=side_prompt_name(self.model, side, self.prompt_names[side]))
