"""Stage settings: each stage takes one frozen dataclass, and its artifact's fingerprint hashes
every field of it.

A setting reaches a stage only through its configuration object, so it cannot change an
artifact without changing the artifact's fingerprint. A field declared with :func:`run_only`
changes how the work runs (on which device, in what batches, where caches live) and never
what it writes; it says why, and it is left out of the fingerprint. A field declared with
:func:`model` names a model: the fingerprint takes the model's identity (a local folder's
content hash), not its path.

A stage whose code comes to write something else for the same settings says so by raising its
configuration class's ``REVISION``: its artifacts, and those downstream of it, get new
fingerprints, and every other stage's artifacts stay valid.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from pipeline.artifacts import fingerprint


def run_only(default: Any, why: str) -> Any:
    """A field left out of the fingerprint, with the reason it cannot change the artifact."""
    return dataclasses.field(default=default, metadata={"run_only": why})


def model(default: str = "") -> Any:
    """A field naming a model (or comma-separated models, each optionally ``kind:``-prefixed)."""
    return dataclasses.field(default=default, metadata={"model": True})


def fingerprinted_fields(config) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config) if "run_only" not in f.metadata]


def config_fingerprint(config, identity: Callable[[str], str], *upstream: str) -> str:
    """The fingerprint of ``config``'s artifact: its upstream artifacts' fingerprints and every
    field but the run-only ones, models by ``identity``."""
    parts = {}
    for f in fingerprinted_fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("model") and value:
            value = [identity(ref.strip()) for ref in str(value).split(",") if ref.strip()]
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        parts[f.name] = value
    name = type(config).__name__
    revision = getattr(type(config), "REVISION", 0)
    # Revision 0 is left out, so that a stage never revised keeps the fingerprints it had.
    return fingerprint(f"{name}/{revision}" if revision else name, *upstream, parts)
