"""Model loading: devices and precisions, model identities, students cut from a backbone.

Every model argument is a hub id or a local folder. ``trust_remote_code`` is off
unless the caller passes it explicitly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> str:
    """'auto' picks cuda when present, else cpu; anything else is checked and returned."""
    if device in ("", "auto", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    return device


def resolve_precision(precision: str, device: str) -> torch.dtype:
    """'auto' is bf16 on a GPU that supports it and on a CPU that multiplies bf16 natively
    (``native_bf16_cpu``), fp32 elsewhere: one rule for scoring, training, evaluation and the
    retraining gate, so that no stage reads 'auto' differently from another."""
    if precision in ("", "auto", None):
        if device.startswith("cuda"):
            return torch.bfloat16 if cuda_bf16_supported() else torch.float32
        return torch.bfloat16 if native_bf16_cpu() else torch.float32
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision '{precision}' (choose fp32, bf16, fp16, auto; int8 for CPU scoring)")
    if precision == "fp16" and not device.startswith("cuda"):
        raise PipelineError("fp16 inference is only supported on CUDA; use bf16 or fp32 on CPU")
    return PRECISIONS[precision]


def cuda_bf16_supported() -> bool:
    """Whether the GPU computes in bf16, asked without initialising CUDA in this process.

    ``torch.cuda.is_bf16_supported()`` initialises CUDA, and a process that has done so cannot
    fork children that use CUDA: luigi's ``--workers N`` fork the process that built every
    stage's configuration, 'auto' precision included. Until this process uses CUDA itself, a
    child process answers (once per process; about as long as importing torch).
    """
    if torch.cuda.is_initialized():
        return torch.cuda.is_bf16_supported()
    return _cuda_bf16_in_child()


@functools.cache
def _cuda_bf16_in_child() -> bool:
    probe = "import torch; print(int(torch.cuda.is_available() and torch.cuda.is_bf16_supported()))"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        raise PipelineError(
            f"could not ask a child process whether the GPU computes in bf16 ({str(detail).strip()[-300:]}); "
            "pass --score-precision and --train-precision"
        ) from None
    return done.stdout.strip().endswith("1")


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX).

    On 2 threads of a Xeon with AMX, bf16 teacher scoring ran 2.5-3.7x the pairs/s of
    ``CrossEncoder.predict`` in fp32, at Spearman 0.9999 against fp32 (docs/scoring.md);
    on a CPU without them bf16 is emulated and several times slower than fp32.
    """
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def model_identity(ref: str) -> str:
    """Identity for fingerprints: the content hash of a local folder (so a copied or moved model
    keeps its artifacts and a model retrained in place does not), or the hub id with the commit it
    resolves to (so an updated hub model does not reuse the old one's artifacts)."""
    path = Path(strip_kind(ref)).resolve()
    if path.is_dir():
        from pipeline.artifacts import file_digest

        h = hashlib.sha256()
        for p in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            h.update(str(p.relative_to(path)).encode())
            h.update(file_digest(p).encode())
        return f"local@{h.hexdigest()[:16]}"
    revision = hub_revision(strip_kind(ref)) if _looks_like_hub_id(strip_kind(ref)) else None
    return f"{ref}@{revision}" if revision else ref


@functools.lru_cache(maxsize=64)
def hub_revision(repo_id: str) -> str | None:
    """The commit a hub model id stands for now: the hub's answer when it can be asked, else the
    commit the local hub cache holds for ``main``; None when neither knows it."""
    from huggingface_hub import constants

    if not _offline():
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo_id, timeout=10).sha
        except Exception as e:  # no network, unknown or private repository: the cache may still know
            log.debug("%s: the hub did not answer (%s); trying the local cache", repo_id, e)
    refs = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    if refs.is_file():
        return refs.read_text().strip() or None
    log.warning("%s: no commit known for this hub model; its artifacts are keyed by name only", repo_id)
    return None


def weights_hash(model: nn.Module) -> str:
    """Content hash of a model's parameters and buffers (precision-independent: hashed in fp32)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_kind(ref: str) -> str:
    """'bi-encoder' for SentenceTransformer folders with pooling, else 'cross-encoder'.

    A prefix forces the kind: ``bi:model`` or ``ce:model``.
    """
    if ref.startswith("bi:"):
        return "bi-encoder"
    if ref.startswith("ce:"):
        return "cross-encoder"
    if not any("Pooling" in t for t in _module_types(ref)):
        return "cross-encoder"
    # A CrossEncoder of sentence-transformers' modules (Transformer, mean Pooling, Dense: a
    # mean-head student or teacher) has a Pooling module too; the class it was saved from says.
    saved = _saved_file(ref, "config_sentence_transformers.json")
    model_type = json.loads(saved.read_text()).get("model_type") if saved is not None else None
    return "cross-encoder" if model_type == "CrossEncoder" else "bi-encoder"


def _module_types(ref: str) -> list[str]:
    """The module classes a saved model's ``modules.json`` names (a folder's, or a hub model's);
    empty when it has none."""
    modules = _saved_file(ref, "modules.json")
    return [m.get("type", "") for m in json.loads(modules.read_text())] if modules is not None else []


def _saved_file(ref: str, name: str) -> Path | None:
    """A file of a saved model: in its folder, or a hub model's from the local cache, else (the
    hub being on) fetched, so that a model not yet downloaded gets the same kind, and so the same
    student head and fingerprint, as after its first download. None when it has none."""
    if Path(ref).is_dir():
        return Path(ref) / name if (Path(ref) / name).is_file() else None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        found = try_to_load_from_cache(ref, name)
        if found is None and not _offline() and _looks_like_hub_id(ref):
            found = hf_hub_download(ref, name)
    except Exception as e:  # no such file or model, no network: kind by the file's absence
        log.debug("%s: no %s found (%s)", ref, name, e)
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def strip_kind(ref: str) -> str:
    return ref.split(":", 1)[1] if ref.startswith(("bi:", "ce:")) else ref


def load_cross_encoder(
    ref: str,
    device: str = "cpu",
    max_length: int | None = None,
    num_labels: int | None = None,
    trust_remote_code: bool = False,
):
    from sentence_transformers.cross_encoder import CrossEncoder

    ref = strip_kind(ref)
    _check_exists(ref)
    kwargs = dict(
        device=device,
        max_length=max_length,
        num_labels=num_labels,
        trust_remote_code=trust_remote_code,
        local_files_only=_offline(),
        model_kwargs=_model_kwargs(ref),
    )
    with _remote_code_refused(ref), _model_found(ref):
        if uses_own_head(ref):
            model = _load_with_own_head(ref, kwargs)
        else:
            model = CrossEncoder(ref, **kwargs)
    if max_length:
        model.max_seq_length = max_length
    return model


def uses_own_head(ref: str) -> bool:
    """Whether the saved model ``ref`` has this package's head (which plain ``CrossEncoder(ref)``
    loads only with ``trust_remote_code``)."""
    from pipeline.heads import CLASS_REFS

    return any(t in CLASS_REFS for t in _module_types(ref))


def _load_with_own_head(ref: str, kwargs: dict):
    """Load a student whose head is this package's ``SegmentCosine``, from this package's code.

    sentence-transformers imports a module class from outside its own namespace only under
    ``trust_remote_code``, which would run the copy in the folder and any other code the folder
    names. Mapping the reference to our own class keeps the flag for everything else; the
    mapping hook is private, hence the check.
    """
    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.heads import CLASS_REFS, SegmentCosine

    loader = getattr(CrossEncoder, "_load_with_module_classes", None)
    if loader is None:
        raise PipelineError(
            f"{ref}: this sentence-transformers cannot load the SegmentCosine head without --trust-remote-code"
        )
    return loader(ref, dict.fromkeys(CLASS_REFS, SegmentCosine), **kwargs)


def load_bi_encoder(ref: str, device: str = "cpu", max_length: int | None = None, trust_remote_code: bool = False):
    from sentence_transformers import SentenceTransformer

    ref = strip_kind(ref)
    _check_exists(ref)
    with _remote_code_refused(ref), _model_found(ref):
        model = SentenceTransformer(
            ref, device=device, trust_remote_code=trust_remote_code, local_files_only=_offline(), model_kwargs=_model_kwargs(ref)
        )
    if max_length:
        model.max_seq_length = max_length
    return model


STUDENT_HEADS = ("auto", "cosine", "mean", "cls")


def student_head(backbone: str, head: str = "auto") -> str:
    """The head ``cut_student`` gives ``backbone`` for ``head`` (resolves ``auto``)."""
    if head not in STUDENT_HEADS:
        raise PipelineError(f"unknown student head '{head}' (one of {', '.join(STUDENT_HEADS)})")
    if head == "auto":
        return "cosine" if model_kind(backbone) == "bi-encoder" else "cls"
    return head


def cut_student(
    backbone: str,
    num_layers: int,
    device: str = "cpu",
    max_length: int | None = None,
    trust_remote_code: bool = False,
    head: str = "auto",
):
    """A one-output CrossEncoder whose encoder keeps the first ``num_layers`` layers of ``backbone``.

    Keeping the lowest layers is the usual way to initialise a shallow student from a deep model
    (it keeps the embeddings and the layers the upper ones were trained on top of).

    ``head``: ``cls`` is the sequence-classification head (a linear layer on the [CLS] token),
    ``mean`` a linear layer on the mean of the token vectors (sentence-transformers' Transformer,
    Pooling and Dense modules), ``cosine`` the cosine between the query's and the passage's token
    means (``pipeline.heads.SegmentCosine``). ``auto`` takes ``cosine`` for a sentence-embedding
    backbone: untrained, that student already ranks by the embedder's similarity, and it is far
    ahead of the [CLS] head on the demo's dev split (docs/benchmarks.md). A
    backbone that is already a cross-encoder keeps its own head.
    """
    head = student_head(backbone, head)
    if head in ("mean", "cosine"):
        model = _pooled_cross_encoder(backbone, head, device, max_length, trust_remote_code)
    else:
        model = load_cross_encoder(backbone, device, max_length, num_labels=1, trust_remote_code=trust_remote_code)
    hf = model.model
    total = hf.config.num_hidden_layers
    if num_layers <= 0 or num_layers >= total:
        if num_layers > total:
            log.warning("--student-layers %d exceeds the backbone's %d layers; keeping all", num_layers, total)
        return model
    layers = _layer_list(hf, total)
    kept = nn.ModuleList(list(layers)[:num_layers])
    parent, attr = _parent_of(hf, layers)
    setattr(parent, attr, kept)
    hf.config.num_hidden_layers = num_layers
    return model


def _pooled_cross_encoder(backbone: str, head: str, device: str, max_length: int | None, trust_remote_code: bool):
    """CrossEncoder(Transformer, mean Pooling, Dense -> 1 score) or CrossEncoder(Transformer,
    SegmentCosine) from a backbone's encoder."""
    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.heads import SegmentCosine

    encoder = load_bi_encoder(backbone, device, max_length, trust_remote_code)[0]
    if head == "cosine":
        if encoder.tokenizer.sep_token_id is None:
            raise PipelineError(f"{backbone}: its tokenizer has no separator token, so --student-head cosine cannot split a pair")
        modules = [encoder, SegmentCosine(encoder.tokenizer.sep_token_id)]
        # CrossEncoder.num_labels reads the encoder's config when the last module is not a Dense.
        encoder.model.config.num_labels = 1
    else:
        modules = [encoder, *mean_head(encoder)]
    model = CrossEncoder(modules=modules, device=device)
    if max_length:
        model.max_seq_length = max_length
    return model


def mean_head(encoder) -> tuple:
    """sentence-transformers' own modules that score a pair from ``encoder``'s token vectors: a
    mean Pooling and a Dense to one output."""
    from sentence_transformers.base.modules import Dense
    from sentence_transformers.sentence_transformer.modules import Pooling

    dim = encoder.get_embedding_dimension() if hasattr(encoder, "get_embedding_dimension") else encoder.get_word_embedding_dimension()
    dense = Dense(dim, 1, activation_function=nn.Identity(), module_input_name="sentence_embedding", module_output_name="scores")
    return Pooling(dim, "mean"), dense


# What transformers configs call the dropout on attention probabilities: BERT, RoBERTa, XLM-R,
# MPNet and ELECTRA the first; DistilBERT, ModernBERT and most decoder models the second.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def set_attention_dropout(config, p: float) -> str:
    """Set the attention-probability dropout of a transformers ``config`` (read when a model is
    built from it) to ``p``; returns the setting's name."""
    for key in ATTENTION_DROPOUT_KEYS:
        if isinstance(getattr(config, key, None), (int, float)):
            setattr(config, key, p)
            return key
    raise PipelineError(f"{type(config).__name__} has no attention dropout setting ({' or '.join(ATTENTION_DROPOUT_KEYS)}) to set")


def _layer_list(model: nn.Module, total: int) -> nn.ModuleList:
    """The encoder's stack of transformer blocks (the ModuleList with num_hidden_layers entries)."""
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == total]
    if not candidates:
        raise PipelineError(f"cannot find the {total} transformer layers of {type(model).__name__} to cut a student")
    return candidates[0]


def _parent_of(root: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for module in root.modules():
        for name, sub in module.named_children():
            if sub is child:
                return module, name
    raise PipelineError("layer stack has no parent module")


@contextlib.contextmanager
def _remote_code_refused(ref: str):
    """transformers' refusal to run a model's own code, as one line that says what to do."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise PipelineError(
            f"{ref}: this model ships its own Python code (auto_map in config.json, or a module class of its own in modules.json), which is not run by default; "
            "pass --trust-remote-code only for a model you trust"
        ) from None


@contextlib.contextmanager
def _model_found(ref: str):
    """A hub id that neither the hub nor the local cache can give, as one line that says what to
    do, instead of the loaders' chained tracebacks."""
    try:
        yield
    except OSError as e:
        if not _looks_like_hub_id(ref):
            raise
        where = (
            "the local Hugging Face cache has no copy of it and the hub is off (HF_HUB_OFFLINE=1)"
            if _offline() else "the hub did not give it"
        )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(
            f"{ref}: no such local folder, and {where} ({first}); pass a model folder, or fetch it once where the hub is reachable"
        ) from None


def _model_kwargs(ref: str) -> dict:
    # fp32 master weights whatever dtype the checkpoint was saved in (transformers otherwise keeps a
    # bf16/fp16 checkpoint's dtype); reduced precision is applied per stage, by autocast or the scorer.
    kwargs = {"dtype": torch.float32}
    if _has_safetensors(ref):
        kwargs["use_safetensors"] = True
    return kwargs


def _has_safetensors(ref: str) -> bool:
    path = Path(ref)
    return path.is_dir() and any(path.glob("*.safetensors"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _check_exists(ref: str) -> None:
    looks_local = ref.startswith((".", "/", "~")) or os.sep in ref and not _looks_like_hub_id(ref)
    if looks_local and not Path(ref).expanduser().exists():
        raise PipelineError(f"model folder not found: {ref}")


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not Path(ref).exists()


# A model's input length when it is asked to fit the data (--max-length 0): long enough to keep
# most of the dataset's pairs whole. Pairs past it are cut, and a batch pads to its longest
# pair, so covering every outlier would cost the many for the few; below the floor nothing is
# saved on short texts, since batches pad to their own longest pair anyway.
COVERED_PAIRS = 0.75
LENGTH_FLOOR = 128
LENGTH_STEP = 32


def fitting_max_length(requested: int, model: str, dataset: str | Path) -> int:
    """``requested`` if positive; else the tokens ``model`` needs to keep three in four of
    ``dataset``'s (query, passage) pairs whole, in steps of 32, at least 128 and at most what
    the model takes (512 for most encoders).

    Decided from 2,000 queries and 2,000 passages drawn from the dataset's files (seeded), so it
    is known when the stages are scheduled, before any of them runs, and is the same in every stage.
    """
    if requested > 0:
        return requested
    return _fitting_max_length(strip_kind(model), str(dataset))


@functools.lru_cache(maxsize=32)
def _fitting_max_length(model: str, dataset: str) -> int:
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.data import sample_texts

    queries, passages = sample_texts(dataset)
    # A teacher folder of several members (ensemble.json) keeps its tokenizers in their folders.
    found = sorted(Path(model).glob("*/tokenizer_config.json")) if not (Path(model) / "tokenizer_config.json").is_file() else []
    source = str(found[0].parent) if found else model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=_offline())
        # The positions the model has, not the tokenizer's model_max_length: a saved
        # sentence-transformers model writes its last max_seq_length there.
        positions = getattr(AutoConfig.from_pretrained(source, local_files_only=_offline()), "max_position_embeddings", 512)
    except (OSError, ValueError) as e:  # no such model here: its loader says so when the stage runs
        log.debug("%s: no tokenizer to fit the input length to (%s)", model, e)
        return LENGTH_FLOOR
    limit = min(512, positions or 512)
    if not queries or not passages:
        return min(LENGTH_FLOOR, limit)

    def lengths(texts: list[str]) -> np.ndarray:
        return np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]])

    # Every query with every passage: the candidates of a query are passages it was not written for.
    pairs = np.add.outer(lengths(queries), lengths(passages)).ravel() + tokenizer.num_special_tokens_to_add(pair=True)
    needed = int(np.ceil(np.quantile(pairs, COVERED_PAIRS)))
    fitted = max(LENGTH_FLOOR, -(-needed // LENGTH_STEP) * LENGTH_STEP)
    chosen = min(fitted, limit)
    log.info(
        "%s: max_length %d keeps %.0f%% of %s's pairs whole (%d%% wanted)",
        model, chosen, 100 * float((pairs <= chosen).mean()), dataset, round(100 * COVERED_PAIRS),
    )
    return chosen
