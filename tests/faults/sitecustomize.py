"""Fault injection for the tests' subprocesses: this folder goes on PYTHONPATH only there, and
Python imports ``sitecustomize`` at start-up.

``DISTILL_FAULT_WRITE_DELAY`` (seconds) holds every finished temporary (``.name.XXXX.tmp``) back
before its rename, so a SIGKILL can land between "written" and "in place" in any stage.
``DISTILL_FAULT_BATCH_DELAY`` (seconds) slows each teacher scoring batch, so a kill can land inside
a shard. ``DISTILL_FAULT_SHARD_BARRIER`` (a folder) holds each process's first scoring shard until
``DISTILL_FAULT_SHARD_PARTIES`` processes have each started one, so workers that share a DAG are
known to share its shards whatever the machine's speed. The product code knows nothing of these.
"""

import importlib.machinery
import os
import sys
import time
from pathlib import Path

_WRITE_DELAY = float(os.environ.get("DISTILL_FAULT_WRITE_DELAY", "0"))
_BATCH_DELAY = float(os.environ.get("DISTILL_FAULT_BATCH_DELAY", "0"))
_SHARD_BARRIER = os.environ.get("DISTILL_FAULT_SHARD_BARRIER", "")
_SHARD_PARTIES = int(os.environ.get("DISTILL_FAULT_SHARD_PARTIES", "2"))
# Long enough for a loaded machine to bring up the other workers; past it the shard goes ahead,
# and the test that set the barrier sees that one process took every shard.
_BARRIER_TIMEOUT = 300.0

if _WRITE_DELAY:
    _replace = os.replace

    def _delayed_replace(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(src))
        if name.startswith(".") and name.endswith(".tmp"):
            time.sleep(_WRITE_DELAY)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _delayed_replace


class _ScoringFaults:
    """Wraps ``pipeline.scoring`` as it loads: ``relevance`` (called once per batch) sleeps, and
    ``score_shard`` waits at the barrier the first time this process calls it."""

    target = "pipeline.scoring"

    def find_spec(self, name, path=None, target=None):
        if name != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_with_faults(module):
            exec_module(module)
            if _BATCH_DELAY:
                module.relevance = _slowed(module.relevance)
            if _SHARD_BARRIER:
                module.score_shard = _behind_barrier(module.score_shard)

        spec.loader.exec_module = exec_with_faults
        return spec


def _slowed(relevance):
    def slow_relevance(logits):
        time.sleep(_BATCH_DELAY)
        return relevance(logits)

    return slow_relevance


def _behind_barrier(score_shard):
    arrived = []

    def score_shard_after_barrier(*args, **kwargs):
        if not arrived:
            arrived.append(True)
            folder = Path(_SHARD_BARRIER)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / str(os.getpid())).touch()
            deadline = time.monotonic() + _BARRIER_TIMEOUT
            while len(list(folder.iterdir())) < _SHARD_PARTIES and time.monotonic() < deadline:
                time.sleep(0.1)
        return score_shard(*args, **kwargs)

    return score_shard_after_barrier


if _BATCH_DELAY or _SHARD_BARRIER:
    sys.meta_path.insert(0, _ScoringFaults())
