"""The teacher score cache: one model's raw scores keyed by a 128-bit digest of the exact
(query, passage) text, kept between runs so that no pair reaches the same model twice.

A :class:`~pipeline.keyed_store.KeyedStore` of one float32 ``score`` per key: sorted Arrow
parts, read memory-mapped and binary-searched, so a shard's lookup costs what its own keys cost,
whatever the cache's size; concurrent shards each add a part of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipeline.keyed_store import KeyedStore, digest_keys

VALUES = pa.schema([("score", pa.float32())])


def pair_keys(pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """(n, 2) uint64: the 128-bit BLAKE2b digest of each pair's exact texts, high word first."""
    return digest_keys(f"{q}\x1f{p}" for q, p in pairs)


class ScoreCache(KeyedStore):
    """One model's scores in ``folder`` (the model's fingerprint names the folder)."""

    def __init__(self, folder: str | Path, max_parts: int = 16):
        super().__init__(folder, VALUES, max_parts)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For (n, 2) ``keys``: a mask of the keys the cache holds and their scores (NaN elsewhere)."""
        found, values = super().lookup(keys)
        return found, values["score"]

    def add(self, keys: np.ndarray, scores: Sequence[float]) -> None:
        """Add a part with these keys and scores; merge the parts when there are too many."""
        scores = np.asarray(scores, np.float32)
        if not np.isfinite(scores).all():
            return  # never cache a broken score; write_scores reports it
        super().add(keys, {"score": scores})
