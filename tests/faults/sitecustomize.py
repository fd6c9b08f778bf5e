"""Fault injection for the tests' subprocesses: this folder goes on PYTHONPATH only there, and
Python imports ``sitecustomize`` at start-up.

``DISTILL_FAULT_WRITE_DELAY`` (seconds) holds every finished temporary (``.name.XXXX.tmp``) back
before its rename, so a SIGKILL can land between "written" and "in place" in any stage.
``DISTILL_FAULT_BATCH_DELAY`` (seconds) slows each teacher scoring batch, so a kill can land inside
a shard. The product code knows nothing of either.
"""

import importlib.machinery
import os
import sys
import time

_WRITE_DELAY = float(os.environ.get("DISTILL_FAULT_WRITE_DELAY", "0"))
_BATCH_DELAY = float(os.environ.get("DISTILL_FAULT_BATCH_DELAY", "0"))

if _WRITE_DELAY:
    _replace = os.replace

    def _delayed_replace(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(src))
        if name.startswith(".") and name.endswith(".tmp"):
            time.sleep(_WRITE_DELAY)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _delayed_replace


class _SlowScoringBatches:
    """Wraps ``pipeline.scoring.relevance``, which the scorer calls once per batch, as the module loads."""

    target = "pipeline.scoring"

    def find_spec(self, name, path=None, target=None):
        if name != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_slow(module):
            exec_module(module)
            relevance = module.relevance

            def slow_relevance(logits):
                time.sleep(_BATCH_DELAY)
                return relevance(logits)

            module.relevance = slow_relevance

        spec.loader.exec_module = exec_and_slow
        return spec


if _BATCH_DELAY:
    sys.meta_path.insert(0, _SlowScoringBatches())
