"""The teacher score cache: one model's raw scores keyed by a 128-bit digest of the exact
(query, passage) text, kept between runs so that no pair reaches the same model twice.

Parts are Arrow IPC files sorted by key and read memory-mapped. A lookup sorts the wanted keys
and binary-searches each part for them, touching a few pages per key: its cost follows the
number of keys looked up (times the logarithm of the cache's size), not the size of the cache.
Each writer adds a part of its own by an atomic rename, so concurrent shards never write one
file; when parts pile up, one writer merges them into a single part under the folder's lock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipeline.artifacts import atomic_file, exclusive

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("key_hi", pa.uint64()), ("key_lo", pa.uint64()), ("score", pa.float32())])
PART_GLOB = "part-*.arrow"


def pair_keys(pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """(n, 2) uint64: the 128-bit BLAKE2b digest of each pair's exact texts, high word first."""
    blob = b"".join(hashlib.blake2b(f"{q}\x1f{p}".encode(), digest_size=16).digest() for q, p in pairs)
    return np.frombuffer(blob, dtype=">u8").astype(np.uint64).reshape(-1, 2)


class ScoreCache:
    """One model's scores in ``folder`` (the model's fingerprint names the folder)."""

    def __init__(self, folder: str | Path, max_parts: int = 16):
        self.folder = Path(folder)
        self.max_parts = max_parts

    def parts(self) -> list[Path]:
        """The parts, oldest first (their names start with the time they were written)."""
        return sorted(self.folder.glob(PART_GLOB)) if self.folder.is_dir() else []

    def __len__(self) -> int:
        return sum(_read(p).num_rows for p in self.parts())

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For (n, 2) ``keys``: a mask of the keys the cache holds and their scores (NaN elsewhere)."""
        keys = np.asarray(keys, np.uint64).reshape(-1, 2)
        scores = np.full(len(keys), np.nan, np.float32)
        found = np.zeros(len(keys), bool)
        if not len(keys):
            return found, scores
        order = np.argsort(keys[:, 0], kind="stable")
        hi, lo = keys[order, 0], keys[order, 1]
        for part in reversed(self.parts()):  # newest first: a rescored pair's latest score wins
            todo = ~found[order]
            if not todo.any():
                break
            try:
                table = _read(part)
            except FileNotFoundError:  # merged away since it was listed; its rows are in the new part
                continue
            if not table.num_rows:
                continue
            part_hi, part_lo, part_scores = (_column(table, c) for c in ("key_hi", "key_lo", "score"))
            want = np.flatnonzero(todo)
            pos = np.minimum(np.searchsorted(part_hi, hi[want]), len(part_hi) - 1)
            # A miss on the (vanishingly rare) equal high words of two keys only costs a rescore.
            hit = (part_hi[pos] == hi[want]) & (part_lo[pos] == lo[want])
            rows = order[want[hit]]
            scores[rows] = part_scores[pos[hit]]
            found[rows] = True
        return found, scores

    def add(self, keys: np.ndarray, scores: Sequence[float]) -> None:
        """Add a part with these keys and scores; merge the parts when there are too many."""
        keys = np.asarray(keys, np.uint64).reshape(-1, 2)
        scores = np.asarray(scores, np.float32)
        if not len(keys) or not np.isfinite(scores).all():
            return  # never cache a broken score; write_scores reports it
        self.folder.mkdir(parents=True, exist_ok=True)
        _write(_part_name(self.folder), keys, scores)
        if len(self.parts()) > self.max_parts:
            self.compact()

    def compact(self) -> None:
        """Merge every part into one, sorted and without repeated keys (the newest score kept)."""
        with exclusive(self.folder / ".compact.lock"):
            parts = self.parts()
            if len(parts) <= 1:
                return
            tables = [_read(p) for p in parts]  # oldest first, so the stable sort keeps the newest last
            keys = np.concatenate([np.stack([_column(t, "key_hi"), _column(t, "key_lo")], 1) for t in tables])
            scores = np.concatenate([_column(t, "score") for t in tables])
            order = np.lexsort((keys[:, 1], keys[:, 0]))
            keys, scores = keys[order], scores[order]
            keep = np.ones(len(keys), bool)
            keep[:-1] = np.any(keys[1:] != keys[:-1], axis=1)  # the last of equal keys
            # Named as old as the newest part it replaces: a part written meanwhile stays newer.
            _write(_part_name(self.folder, parts[-1].name.split("-")[1]), keys[keep], scores[keep])
            for p in parts:
                p.unlink(missing_ok=True)
            log.info("score cache %s: %d parts merged into one of %d pairs", self.folder, len(parts), int(keep.sum()))


def _part_name(folder: Path, written: str | None = None) -> Path:
    return folder / f"part-{written or f'{time.time_ns():020d}'}-{uuid.uuid4().hex}.arrow"


def _write(path: Path, keys: np.ndarray, scores: np.ndarray) -> None:
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    batch = pa.record_batch(
        [pa.array(keys[order, 0], pa.uint64()), pa.array(keys[order, 1], pa.uint64()), pa.array(scores[order], pa.float32())],
        schema=SCHEMA,
    )
    with atomic_file(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_batch(batch)


def _read(path: Path) -> pa.Table:
    """The part, memory-mapped: its pages are read only where a search touches them."""
    with pa.memory_map(os.fspath(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    return (col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()).to_numpy(zero_copy_only=False)
