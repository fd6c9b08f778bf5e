"""Build a loss from its name (a row of the loss table) or from ``package.module:Class``."""

from __future__ import annotations

import importlib
import inspect
import json

from pipeline.errors import PipelineError

from losses.table import LOSS_TABLE, LossSpec


def resolve_loss(name: str) -> tuple[LossSpec, type]:
    """The table row and class for a loss name or a ``module:Class`` path.

    A custom class declares its data format with a ``data_format`` class attribute (a key of
    ``losses.table.FORMATS``); without one it trains on ``ntuple-margin`` rows, like MarginMSELoss.
    """
    if ":" in name:
        module_name, _, cls_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as e:
            raise PipelineError(f"--loss {name}: cannot import ({e})") from None
        _check_custom(name, cls)
        fmt = getattr(cls, "data_format", "ntuple-margin")
        spec = LossSpec(name, fmt, getattr(cls, "num_labels", 1), "custom", getattr(cls, "needs_teacher", True))
        return spec, cls
    if name not in LOSS_TABLE:
        raise PipelineError(f"unknown loss '{name}'; choose one of {', '.join(LOSS_TABLE)} or pass package.module:Class")
    spec = LOSS_TABLE[name]
    return spec, getattr(importlib.import_module(spec.module), spec.name)


def loss_options(kwargs: dict | str | None) -> dict:
    """Loss options from a dict or a JSON object string (``--loss-kwargs``)."""
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else {}
        except json.JSONDecodeError as e:
            raise PipelineError(f"--loss-kwargs is not valid JSON: {e}") from None
    return dict(kwargs or {})


def build_loss(model, name: str, kwargs: dict | str | None = None):
    """Instantiate a loss for ``model`` with keyword options (a dict or a JSON object string)."""
    kwargs = loss_options(kwargs)
    _, cls = resolve_loss(name)
    for key in ("activation_fn", "mini_batch_activation_fn"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = _import_object(kwargs[key])()
    if "weighting_scheme" in kwargs and isinstance(kwargs["weighting_scheme"], str):
        kwargs["weighting_scheme"] = _import_object(kwargs["weighting_scheme"], default_module="sentence_transformers.cross_encoder.losses")()
    try:
        return cls(model, **kwargs)
    except TypeError as e:
        raise PipelineError(f"--loss-kwargs for {name}: {e}") from None


def _import_object(path: str, default_module: str = "torch.nn"):
    module_name, _, attr = path.rpartition(".")
    module = importlib.import_module(module_name or default_module)
    return getattr(module, attr)


def _check_custom(name: str, cls) -> None:
    """The seed's requirements for custom losses: an nn.Module whose constructor takes the model
    first and whose forward takes (inputs, labels)."""
    import torch

    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        raise PipelineError(f"--loss {name}: a custom loss must be a torch.nn.Module subclass")
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    if not params or params[0] != "model":
        raise PipelineError(f"--loss {name}: the constructor must take the model as its first argument")
    fwd = list(inspect.signature(cls.forward).parameters)[1:]
    if len(fwd) < 2:
        raise PipelineError(f"--loss {name}: forward must take (inputs, labels)")
