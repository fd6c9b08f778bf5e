"""Artifact helpers: parameter fingerprints and atomic writes of files and folders.

Every stage writes into a temporary sibling and renames it into place, so a
reader never sees a half-written file under a final name, and a killed run
leaves only temporaries that the next run ignores and overwrites.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when an artifact's layout changes, so old outputs are not reused


def fingerprint(*parts: Any, length: int = 12) -> str:
    """Short, stable hash of JSON-serialisable parts (dict key order does not matter)."""
    blob = json.dumps([FORMAT_VERSION, *parts], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def hash_files(paths: list[Path]) -> str:
    """Content hash of files (their names are part of the hash)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


# Where file digests are remembered between runs; the env variable moves it (tests, read-only homes).
DIGEST_CACHE_ENV = "RERANKER_DISTILL_CACHE"


def digest_cache_path() -> Path:
    root = os.environ.get(DIGEST_CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reranker-distill"
    return Path(root) / "file-digests.sqlite"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered across processes while its path, size, modification
    and change times and inode stay the same: a run hashes a multi-GB model or corpus once, not at
    every start. The change time moves on every write, even one that restores the old modification
    time, so rewritten content is hashed again. A cache that cannot be opened is skipped."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    db = _digest_db()
    if db is not None:
        try:
            row = db.execute("SELECT size, mtime, ctime, inode, digest FROM digests WHERE path = ?", key[:1]).fetchone()
            if row is not None and tuple(row[:4]) == key[1:]:
                return row[4]
        except sqlite3.Error:
            db = None
    digest = _sha256_of_file(path)
    if db is not None:
        try:
            with db:
                db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)", (*key, digest))
        except sqlite3.Error:
            pass
    return digest


def _sha256_of_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_DIGEST_DBS: dict[Path, sqlite3.Connection | None] = {}


def _digest_db() -> sqlite3.Connection | None:
    """This process's connection to the digest cache (None where it cannot be opened)."""
    where = digest_cache_path()
    if where not in _DIGEST_DBS:
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(where), timeout=30, check_same_thread=False)
            db.execute(
                "CREATE TABLE IF NOT EXISTS digests "
                "(path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, ctime INTEGER, inode INTEGER, digest TEXT)"
            )
            db.commit()
        except (OSError, sqlite3.Error):
            db = None
        _DIGEST_DBS[where] = db
    return _DIGEST_DBS[where]


@contextlib.contextmanager
def _disk_full_is_clear(path: Path) -> Iterator[None]:
    """ENOSPC / EDQUOT deep inside a writer, as one line naming the outermost output being written."""
    from pipeline.errors import DiskFullError

    try:
        yield
    except DiskFullError:
        raise DiskFullError(path) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(path) from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _disk_full_is_clear(path):
            yield tmp
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; it replaces ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _disk_full_is_clear(path):
            yield tmp
        _put_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _put_dir(new: Path, path: Path) -> None:
    """Move the folder ``new`` to ``path``. A folder already there is swapped out in one step
    (readers see the old folder or the new one, never none) and left at ``new`` to be removed.
    Two processes finishing the same output at once both succeed; the last one's folder stays."""
    while True:
        try:
            os.replace(new, path)  # no folder there (or an empty one)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if _exchange(new, path):
            return
        # No atomic exchange on this system: move the old folder aside, then try again.
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(path, old)
        except FileNotFoundError:
            continue  # another process moved it first
        shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without the wrapper (glibc < 2.28)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot, or ``b`` is gone."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOENT, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block, across
    processes and threads: a second holder waits until the first is done."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def one_writer(out_dir: str | os.PathLike) -> Iterator[Any]:
    """Hold ``out_dir``'s lock for a stage that trains into it; yields the folder's finished
    ``stats.json`` when another run completed it while this one waited, else None.

    Two runs of one training stage share its output folder and its scratch folders (checkpoints
    that a killed run resumes from, finished ensemble members), which the first to finish
    deletes; the second therefore waits, then takes the first's result instead of training again.
    """
    out_dir = Path(out_dir)
    with exclusive(out_dir.with_name(f".{out_dir.name}.lock")):
        done = out_dir / "stats.json"
        if done.is_file():
            log.info("%s: finished by another run meanwhile; kept", out_dir)
            yield read_json(done)
        else:
            yield None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def point_link(link: str | os.PathLike, target: str | os.PathLike) -> None:
    """Atomically make ``link`` a relative symlink to ``target`` (replacing what was there)."""
    link, target = Path(link), Path(target)
    rel = os.path.relpath(target, link.parent)
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(rel, tmp)
    if link.exists() and not link.is_symlink():
        shutil.rmtree(link) if link.is_dir() else link.unlink()
    os.replace(tmp, link)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
