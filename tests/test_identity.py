"""Cheap, exact identities for fingerprints: file digests remembered across processes while a file
is unchanged, and hub models keyed by the commit they resolve to."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO
from pipeline import artifacts, models

DIGEST = """
import sys
import pipeline.artifacts as a
if sys.argv[2] == "no-hashing":
    def refuse(path, chunk=0):
        raise AssertionError("hashed again")
    a._sha256_of_file = refuse
print(a.file_digest(sys.argv[1]))
"""


def _digest_in_a_new_process(path, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", DIGEST, str(path), mode], env=env, capture_output=True, text=True)


def test_a_file_is_hashed_once_across_processes_until_it_changes(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 4096)
    first = _digest_in_a_new_process(f, "hash")
    assert first.returncode == 0, first.stderr
    again = _digest_in_a_new_process(f, "no-hashing")
    assert again.returncode == 0, again.stderr  # served from the cache, the file not read
    assert again.stdout == first.stdout
    # Same size, modification time put back: the change time still tells the content moved.
    st = f.stat()
    f.write_bytes(b"b" * 4096)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = _digest_in_a_new_process(f, "no-hashing")
    assert changed.returncode != 0 and "hashed again" in changed.stderr
    assert _digest_in_a_new_process(f, "hash").stdout != first.stdout


def test_a_cache_that_cannot_be_opened_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(artifacts.DIGEST_CACHE_ENV, str(blocker))
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"_id": "d1", "text": "x"}\n')
    assert artifacts.file_digest(f) == artifacts._sha256_of_file(f)


def test_a_local_model_is_known_by_its_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")
    assert models.model_identity(str(a)) == models.model_identity(str(b))  # a copy keeps its artifacts
    (b / "model.safetensors").write_bytes(b"retrained")
    assert models.model_identity(str(a)) != models.model_identity(str(b))


def test_a_hub_model_is_known_by_the_commit_it_resolves_to(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--reranker" / "refs" / "main"
    refs.parent.mkdir(parents=True)
    identities = []
    for commit in ("1" * 40, "2" * 40):
        refs.write_text(commit)
        models.hub_revision.cache_clear()
        identities.append(models.model_identity("org/reranker"))
    assert identities == [f"org/reranker@{'1' * 40}", f"org/reranker@{'2' * 40}"]
    models.hub_revision.cache_clear()
    assert models.model_identity("org/unknown") == "org/unknown"  # nothing known: the name alone
    models.hub_revision.cache_clear()
