"""ONNX export of a trained cross-encoder: one graph from token ids to the relevance score, head
included, checked against the PyTorch model before it is published.

sentence-transformers' ONNX backend (``CrossEncoder(path, backend="onnx")``) goes through
optimum-onnx, whose releases require transformers < 4.58, and it exports the transformer alone:
a head of sentence-transformers modules or this package's cosine head stays in PyTorch. This
exports the whole model with PyTorch's own exporter and runs it with onnxruntime, so the folder
serves with ``onnxruntime`` and a tokenizer, without torch, sentence-transformers or this package.

    python -m pipeline.export runs/demo/student runs/demo/student-onnx
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.artifacts import atomic_dir, read_json, write_json
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
MANIFEST = "onnx.json"
OPSET = 17
# Largest |ONNX - PyTorch| score accepted on the check pairs, relative to the scores' spread
# (at least 1): fp32 kernels differ in summation order, not more.
TOLERANCE = 1e-4

# Pairs of several lengths, so the check covers padding and the dynamic sequence axis.
CHECK_PAIRS = (
    ("how do I list the files in a folder", "ls lists information about the files in a directory, sorted alphabetically."),
    ("compress", "gzip reduces the size of the named files using Lempel-Ziv coding."),
    ("which program shows running processes and how much memory each one takes",
     "top provides a dynamic real-time view of a running system: a summary of system information and the list of "
     "processes or threads currently managed by the kernel, with their memory and processor use."),
    ("mail client", "a text editor for programmers"),
)


class _Scores(nn.Module):
    """The CrossEncoder's modules as one function of its tokenizer's tensors, for the exporter."""

    def __init__(self, net: nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.net = net
        self.input_names = list(input_names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.net(dict(zip(self.input_names, tensors)))["scores"]


def export_onnx(model_dir: str | Path, out_dir: str | Path, max_length: int | None = None, trust_remote_code: bool = False) -> dict:
    """Export the CrossEncoder at ``model_dir`` to ``out_dir`` (``model.onnx``, its tokenizer and
    ``onnx.json``); refuses to publish a graph whose scores differ from the model's."""
    from pipeline.models import load_cross_encoder

    model = load_cross_encoder(str(model_dir), "cpu", max_length, trust_remote_code=trust_remote_code)
    model.eval()
    tokenizer = model.tokenizer
    features = _tokenize(tokenizer, CHECK_PAIRS, model.max_seq_length)
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in features]
    wrapper = _Scores(model, names).eval()
    with torch.inference_mode():
        expected = wrapper(*(features[k] for k in names)).float().numpy().reshape(-1)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        with warnings.catch_warnings():
            # The TorchScript exporter traces the model (torch.export's needs onnxscript and fails on
            # more of transformers' code); its deprecation notice and tracer warnings are about
            # shapes, which the check below covers with another batch shape than the traced one.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, tuple(features[k] for k in names), str(tmp / ONNX_FILE), input_names=names, output_names=["scores"],
                dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in names}, "scores": {0: "batch"}},
                opset_version=OPSET, dynamo=False,
            )
        tokenizer.save_pretrained(str(tmp))
        onnx_model = OnnxCrossEncoder(tmp)
        # The traced batch, and each pair alone (no padding, other lengths).
        diff = max(float(np.abs(onnx_model.predict(CHECK_PAIRS, batch_size=size) - expected).max()) for size in (len(CHECK_PAIRS), 1))
        if diff > TOLERANCE * max(float(np.ptp(expected)), 1.0):
            raise PipelineError(f"{model_dir}: the ONNX graph's scores differ from the model's by {diff:.3g}; not exported")
        manifest = {
            "source": str(model_dir),
            "inputs": names,
            "opset": OPSET,
            "max_length": model.max_seq_length,
            "check_pairs": len(CHECK_PAIRS),
            "max_abs_difference": diff,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_json(tmp / MANIFEST, manifest)
    log.info("exported %s to %s (largest score difference %.2g)", model_dir, out_dir, diff)
    return manifest


class OnnxCrossEncoder:
    """Scores (query, passage) pairs with an exported folder: onnxruntime and a tokenizer only."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / ONNX_FILE).is_file():
            raise PipelineError(f"{folder}: no {ONNX_FILE} (export one with python -m pipeline.export)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        manifest = folder / MANIFEST
        self.max_length = read_json(manifest)["max_length"] if manifest.is_file() else None

    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(pairs), batch_size):
            feats = _tokenize(self.tokenizer, pairs[start : start + batch_size], self.max_length)
            out.append(self.session.run(None, {k: feats[k].numpy() for k in self.inputs})[0].reshape(-1))
        return np.concatenate(out) if out else np.empty(0, np.float32)


def _tokenize(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int | None) -> dict[str, torch.Tensor]:
    return tokenizer(
        [q for q, _ in pairs], [p for _, p in pairs], padding=True, truncation="longest_first",
        max_length=max_length, return_tensors="pt",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a CrossEncoder folder (the pipeline's student or teacher)")
    parser.add_argument("out", help="the folder to write: model.onnx, the tokenizer, onnx.json")
    parser.add_argument("--max-length", type=int, default=None, help="truncation length (default: the model's)")
    parser.add_argument("--trust-remote-code", action="store_true", help="let a model that ships its own code load")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = export_onnx(args.model, args.out, args.max_length, args.trust_remote_code)
    except PipelineError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.out}: {ONNX_FILE} (largest score difference against PyTorch {manifest['max_abs_difference']:.2g})")


if __name__ == "__main__":
    main()
