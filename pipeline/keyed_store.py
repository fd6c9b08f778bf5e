"""A store of fixed-width values keyed by 128-bit digests, kept between runs: under the teacher's
score cache and the retriever's search cache.

Parts are Arrow IPC files sorted by key and read memory-mapped. A lookup sorts the wanted keys
and binary-searches each part for them slice by slice, so that each search runs in a slice small
enough to stay in the CPU's cache: its cost follows the number of keys looked up, not the size of
the store (beyond the pages its keys lie on).
Each writer adds a part of its own by an atomic rename, so concurrent writers never share a
file; when parts pile up, one writer merges them into a single part under the folder's lock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa

from pipeline.artifacts import atomic_file, exclusive

log = logging.getLogger(__name__)

KEY_FIELDS = [pa.field("key_hi", pa.uint64()), pa.field("key_lo", pa.uint64())]
PART_GLOB = "part-*.arrow"


def digest_keys(items: Iterable[str | bytes]) -> np.ndarray:
    """(n, 2) uint64: the 128-bit BLAKE2b digest of each text (or bytes), high word first."""
    blob = b"".join(hashlib.blake2b(t.encode() if isinstance(t, str) else t, digest_size=16).digest() for t in items)
    return np.frombuffer(blob, dtype=">u8").astype(np.uint64).reshape(-1, 2)


class KeyedStore:
    """Rows of ``values`` (an Arrow schema of scalar or fixed-size-list fields) by key, in ``folder``."""

    def __init__(self, folder: str | Path, values: pa.Schema, max_parts: int = 16):
        self.folder = Path(folder)
        self.values = values
        self.schema = pa.schema(KEY_FIELDS + list(values))
        self.max_parts = max_parts

    def parts(self) -> list[Path]:
        """The parts, oldest first (their names start with the time they were written)."""
        return sorted(self.folder.glob(PART_GLOB)) if self.folder.is_dir() else []

    def __len__(self) -> int:
        return sum(_read(p).num_rows for p in self.parts())

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """For (n, 2) ``keys``: a mask of the keys the store holds, and each value field's rows
        (NaN, or -1 for integers, where a key is missing)."""
        keys = np.asarray(keys, np.uint64).reshape(-1, 2)
        found = np.zeros(len(keys), bool)
        out = {f.name: _empty(f.type, len(keys)) for f in self.values}
        if not len(keys):
            return found, out
        order = np.argsort(keys[:, 0])
        hi, lo = keys[order, 0], keys[order, 1]
        for part in reversed(self.parts()):  # newest first: a rewritten key's latest value wins
            todo = ~found[order]
            if not todo.any():
                break
            try:
                table = _read(part)
            except FileNotFoundError:  # merged away since it was listed; its rows are in the new part
                continue
            if not table.num_rows:
                continue
            part_hi, part_lo = _column(table, "key_hi"), _column(table, "key_lo")
            want = np.flatnonzero(todo)
            pos, same_hi = sorted_find(part_hi, hi[want])
            # Only keys whose high word is there need their low word read (a missing key's, never).
            # A miss on the (vanishingly rare) equal high words of two keys only costs a recompute.
            hit = np.flatnonzero(same_hi)
            hit = hit[part_lo[pos[hit]] == lo[want[hit]]]
            rows = order[want[hit]]
            for name, values in out.items():
                values[rows] = _column(table, name)[pos[hit]]
            found[rows] = True
        return found, out

    def add(self, keys: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        """Add a part with these keys and values; merge the parts when there are too many."""
        keys = np.asarray(keys, np.uint64).reshape(-1, 2)
        if not len(keys):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write(_part_name(self.folder), keys, values)
        if len(self.parts()) > self.max_parts:
            self.compact()

    def compact(self) -> None:
        """Merge every part into one, sorted and without repeated keys (the newest value kept)."""
        with exclusive(self.folder / ".compact.lock"):
            parts = self.parts()
            if len(parts) <= 1:
                return
            tables = [_read(p) for p in parts]  # oldest first, so the stable sort keeps the newest last
            keys = np.concatenate([np.stack([_column(t, "key_hi"), _column(t, "key_lo")], 1) for t in tables])
            values = {f.name: np.concatenate([_column(t, f.name) for t in tables]) for f in self.values}
            order = np.lexsort((keys[:, 1], keys[:, 0]))
            keys = keys[order]
            keep = np.ones(len(keys), bool)
            keep[:-1] = np.any(keys[1:] != keys[:-1], axis=1)  # the last of equal keys
            # Named as old as the newest part it replaces: a part written meanwhile stays newer.
            self._write(
                _part_name(self.folder, parts[-1].name.split("-")[1]), keys[keep], {n: v[order][keep] for n, v in values.items()}
            )
            for p in parts:
                p.unlink(missing_ok=True)
            log.info("%s: %d parts merged into one of %d rows", self.folder, len(parts), int(keep.sum()))

    def _write(self, path: Path, keys: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        arrays = [pa.array(keys[order, 0], pa.uint64()), pa.array(keys[order, 1], pa.uint64())]
        for f in self.values:
            v = np.asarray(values[f.name])[order]
            if pa.types.is_fixed_size_list(f.type):
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), f.type.value_type), f.type.list_size))
            else:
                arrays.append(pa.array(v, f.type))
        batch = pa.record_batch(arrays, schema=self.schema)
        with atomic_file(path) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, self.schema) as writer:
                writer.write_batch(batch)


SLICE = 1 << 14  # keys of one search slice: 128 KiB of high words, within a core's L2 cache


def sorted_find(haystack: np.ndarray, needles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sorted needles: ``np.searchsorted(haystack, needles)``, and whether the haystack holds
    each needle there, one slice of the haystack at a time.

    A plain search over a store of millions restarts every needle's bisection from the whole
    array, and each of its first steps misses the CPU's cache; bisecting only the slice a needle
    falls in keeps those steps in the cache, and so does comparing the key found while its
    slice is still there.
    """
    n = len(haystack)
    if n <= 2 * SLICE:
        pos = np.searchsorted(haystack, needles)
        return pos, (haystack[np.minimum(pos, n - 1)] == needles) if n else np.zeros(len(needles), bool)
    starts = np.arange(0, n, SLICE)
    # A needle's answer lies in the first slice whose end boundary is >= the needle: at most the
    # next slice's first key, so each slice is searched with that key after it.
    cuts = np.concatenate([[0], np.searchsorted(needles, haystack[starts[1:]], side="right"), [len(needles)]])
    pos = np.empty(len(needles), np.int64)
    same = np.empty(len(needles), bool)
    for b in np.flatnonzero(cuts[1:] > cuts[:-1]):
        lo, hi = cuts[b], cuts[b + 1]
        piece = haystack[starts[b] : starts[b] + SLICE + 1]
        found = np.searchsorted(piece, needles[lo:hi])
        same[lo:hi] = piece[np.minimum(found, len(piece) - 1)] == needles[lo:hi]
        pos[lo:hi] = starts[b] + found
    return pos, same


def _empty(kind: pa.DataType, n: int) -> np.ndarray:
    width = (kind.list_size,) if pa.types.is_fixed_size_list(kind) else ()
    dtype = (kind.value_type if width else kind).to_pandas_dtype()
    return np.full((n, *width), np.nan if np.issubdtype(dtype, np.floating) else -1, dtype)


def _part_name(folder: Path, written: str | None = None) -> Path:
    return folder / f"part-{written or f'{time.time_ns():020d}'}-{uuid.uuid4().hex}.arrow"


def _read(path: Path) -> pa.Table:
    """The part, memory-mapped: its pages are read only where a search touches them."""
    with pa.memory_map(os.fspath(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    chunk = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if pa.types.is_fixed_size_list(chunk.type):
        return chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, chunk.type.list_size)
    return chunk.to_numpy(zero_copy_only=False)
