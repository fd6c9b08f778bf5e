"""Model loading and students: fp32 master weights from any checkpoint; the students' heads save,
load and score alike; the cosine head's scale is fitted to the labels."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from conftest import make_bi_encoder, make_cross_encoder
from pipeline.models import cut_student, load_bi_encoder, load_cross_encoder


def test_half_precision_checkpoints_load_as_fp32(tmp_path):
    ce_dir = make_cross_encoder(tmp_path / "ce")
    BertForSequenceClassification.from_pretrained(ce_dir).half().save_pretrained(ce_dir)
    bi_dir = make_bi_encoder(tmp_path / "bi")
    bi = load_bi_encoder(str(bi_dir))
    bi.half().save(str(bi_dir))
    assert next(BertForSequenceClassification.from_pretrained(ce_dir).parameters()).dtype == torch.float16

    for model in (load_cross_encoder(str(ce_dir), num_labels=1), cut_student(str(ce_dir), 1), load_bi_encoder(str(bi_dir))):
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_mean_head_student_scores_from_the_token_mean(tiny_models, tmp_path):
    import numpy as np
    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.scoring import CrossEncoderScorer

    student = cut_student(tiny_models["embedder"], 1, "cpu", 64, head="mean")
    assert [type(m).__name__ for m in student] == ["Transformer", "Pooling", "Dense"]
    assert student.model.config.num_hidden_layers == 1 and student.num_labels == 1
    assert type(cut_student(tiny_models["embedder"], 1, "cpu", 64, head="cls").model).__name__ == "BertForSequenceClassification"
    assert [type(m).__name__ for m in cut_student(tiny_models["student"], 1, "cpu", 64)] == ["Transformer"]

    student.save_pretrained(str(tmp_path / "s"))
    loaded = CrossEncoder(str(tmp_path / "s"), device="cpu")
    pairs = [("a query", "a passage about it"), ("another query", "text"), ("q", "a much longer passage " * 5)]
    predicted = loaded.predict(pairs, activation_fn=torch.nn.Identity())
    ours = CrossEncoderScorer(loaded, "cpu", torch.float32).score(pairs)
    np.testing.assert_allclose(ours, predicted, atol=1e-5)
    assert np.ptp(ours) > 0


def test_a_mean_head_cross_encoder_teaches_and_is_cut_as_a_cross_encoder(tiny_models, tmp_path):
    """A CrossEncoder of sentence-transformers' modules (Transformer, mean Pooling, Dense: a
    mean-head student, or a teacher fine-tuned with --teacher-head mean) has a Pooling module, as
    an embedder does. Given as a teacher it is still scored as a cross-encoder, and a student cut
    from it keeps its trained head instead of getting a cosine head."""
    import numpy as np
    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.models import model_kind
    from pipeline.scoring import TeacherSpec, load_teacher

    trained = cut_student(tiny_models["embedder"], 0, "cpu", 64, head="mean")
    with torch.no_grad():
        trained[-1].linear.weight.normal_()
        trained[-1].linear.bias.fill_(0.25)
    ref = str(tmp_path / "ce-mean")
    trained.save_pretrained(ref)
    assert model_kind(ref) == "cross-encoder" and model_kind(tiny_models["embedder"]) == "bi-encoder"

    student = cut_student(ref, 1, "cpu", 64)
    assert [type(m).__name__ for m in student] == ["Transformer", "Pooling", "Dense"]
    torch.testing.assert_close(student[-1].linear.weight, trained[-1].linear.weight)
    assert student.model.config.num_hidden_layers == 1

    pairs = [("a query", "a passage about it"), ("a query", "text"), ("q", "a much longer passage " * 5)]
    teacher = load_teacher(TeacherSpec.parse(ref), "cpu", "fp32", 64)
    expected = CrossEncoder(ref, device="cpu").predict(pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(teacher.score(pairs, ["q1", "q1", "q2"], show_progress=False), expected, atol=1e-5)


def test_segment_cosine_splits_the_pair_at_the_first_separator():
    from pipeline.heads import SegmentCosine

    head = SegmentCosine(separator_id=2)
    tokens = torch.randn(2, 7, 4)
    # BERT layout [CLS] q q [SEP] p [SEP] pad, and XLM-R layout <s> q </s> </s> p p </s>.
    ids = torch.tensor([[0, 5, 6, 2, 7, 2, 1], [0, 5, 2, 2, 7, 8, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        head.scale.fill_(3.0)
        head.bias.fill_(0.5)
        out = head({"token_embeddings": tokens, "attention_mask": mask, "input_ids": ids})["scores"]
    assert out.shape == (2, 1)
    for row, query_end, end in ((0, 4, 6), (1, 3, 7)):
        q, p = tokens[row, :query_end].mean(0), tokens[row, query_end:end].mean(0)
        expected = 3.0 * torch.nn.functional.cosine_similarity(q, p, dim=0) + 0.5
        torch.testing.assert_close(out[row, 0], expected)


def test_cosine_head_student_loads_with_our_code_or_with_its_own_copy_when_trusted(tiny_models, tmp_path):
    import numpy as np
    import pytest
    from sentence_transformers.cross_encoder import CrossEncoder

    from pipeline.heads import SegmentCosine, self_contained
    from pipeline.scoring import CrossEncoderScorer

    student = cut_student(tiny_models["embedder"], 1, "cpu", 64)
    assert [type(m).__name__ for m in student] == ["Transformer", "SegmentCosine"]
    assert student.num_labels == 1 and student.model.config.num_hidden_layers == 1
    with torch.no_grad():
        student[-1].scale.fill_(7.0)
    student.save_pretrained(str(tmp_path / "s"))
    assert self_contained(tmp_path / "s") and (tmp_path / "s" / "segment_cosine.py").is_file()

    loaded = load_cross_encoder(str(tmp_path / "s"), "cpu", 64)
    assert type(loaded[-1]) is SegmentCosine and loaded[-1].scale.item() == 7.0
    pairs = [("a query", "a passage about it"), ("another query", "text"), ("q", "a much longer passage " * 5)]
    ours = CrossEncoderScorer(loaded, "cpu", torch.float32).score(pairs)
    np.testing.assert_allclose(ours, student.predict(pairs, activation_fn=torch.nn.Identity()), atol=1e-5)
    assert np.ptp(ours) > 0
    # Plain sentence-transformers runs the folder's own copy of the head, and only when trusted.
    with pytest.raises(ValueError, match="trust_remote_code"):
        CrossEncoder(str(tmp_path / "s"), device="cpu")
    plain = CrossEncoder(str(tmp_path / "s"), device="cpu", trust_remote_code=True, max_length=64)
    assert type(plain[-1]).__module__.startswith("transformers_modules")
    np.testing.assert_allclose(plain.predict(pairs, activation_fn=torch.nn.Identity()), ours, atol=1e-5)


def test_head_scale_is_fitted_to_the_labels_units(tiny_models):
    from datasets import Dataset

    from pipeline.training import COSINE_LOGIT_SCALE, _cosines, fit_head_scale

    student = cut_student(tiny_models["embedder"], 1, "cpu", 64)
    rows = [("what is vim", "a text editor", "a web browser"), ("python", "a language", "a snake"), ("tea", "a drink", "a car")]
    cos = [_cosines(student, [(q, p), (q, n)]) for q, p, n in rows]
    margins = Dataset.from_dict({
        "query": [r[0] for r in rows], "positive": [r[1] for r in rows], "negative_1": [r[2] for r in rows],
        # Teacher margins 40 times the student's own: the fitted scale is exactly 40.
        "label": [[40.0 * float(c[0] - c[1])] for c in cos],
    })
    assert abs(fit_head_scale(student, margins, "ntuple-margin") - 40.0) < 1e-3
    assert abs(student[-1].scale.item() - 40.0) < 1e-3
    binary = Dataset.from_dict({"query": ["a"], "passage": ["b"], "label": [1.0]})
    assert fit_head_scale(student, binary, "pair-binary") == COSINE_LOGIT_SCALE
    assert fit_head_scale(cut_student(tiny_models["embedder"], 1, "cpu", 64, head="mean"), margins, "ntuple-margin") is None


def test_head_scale_fit_reads_every_score_format(tiny_models):
    import numpy as np
    from datasets import Dataset

    from pipeline.training import _cosines, fit_head_scale

    student = cut_student(tiny_models["embedder"], 1, "cpu", 64)
    q, docs = "what is vim", ["a text editor", "a web browser", "a snake", "tea"]
    cos = _cosines(student, [(q, d) for d in docs])
    # Teacher scores 8 * cosine + 3: the shift is per query, so only the 8 is the head's to learn.
    listwise = Dataset.from_dict({"query": [q], "docs": [docs], "labels": [list(8.0 * cos + 3.0)]})
    pointwise = Dataset.from_dict({"query": [q] * 4, "passage": docs, "label": list(8.0 * cos + 3.0)})
    soft = Dataset.from_dict({"query": [q] * 4, "passage": docs, "label": list(1 / (1 + np.exp(-(8.0 * cos + 3.0))))})
    for fmt, rows in (("list", listwise), ("pair-score", pointwise), ("pair-soft", soft)):
        assert abs(fit_head_scale(student, rows, fmt) - 8.0) < 1e-2, fmt


def test_cosine_head_scores_in_bf16_like_fp32(tiny_models):
    import numpy as np

    from pipeline.scoring import CrossEncoderScorer

    pairs = [("a query", "a passage about it"), ("another query", "text"), ("q", "a much longer passage " * 5)] * 3
    fp32 = CrossEncoderScorer(cut_student(tiny_models["embedder"], 2, "cpu", 64), "cpu", torch.float32).score(pairs)
    student = cut_student(tiny_models["embedder"], 2, "cpu", 64)
    bf16 = CrossEncoderScorer(student, "cpu", torch.bfloat16).score(pairs)
    assert student[0].model.dtype == torch.bfloat16 and bf16.dtype == np.float32
    # The encoder runs in bf16 (about 3 significant digits); the pooling and cosine stay in fp32.
    np.testing.assert_allclose(bf16, fp32, atol=2e-2)
    assert np.ptp(fp32) > 0.05


def test_a_hub_embedder_not_yet_downloaded_gets_the_cosine_head_it_gets_once_cached(tiny_models, tmp_path, monkeypatch):
    """The student's head is chosen by the backbone's kind, read from its modules.json and the
    class it was saved from. A hub sentence-embedding model that is not in the local cache yet,
    the hub being on, is still a bi-encoder (so the cosine head, and the same fingerprint as
    after its download): the files are fetched, not taken as missing."""
    import huggingface_hub
    from huggingface_hub import constants

    from pipeline import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    fetched = []

    def hub_download(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename))
        return str(Path(tiny_models["embedder"]) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub_download)
    assert models.model_kind("org/embedder") == "bi-encoder"
    assert models.student_head("org/embedder") == "cosine"
    assert fetched == [("org/embedder", "modules.json"), ("org/embedder", "config_sentence_transformers.json")] * 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # off: nothing is fetched, and nothing is known
    assert models.model_kind("org/embedder") == "cross-encoder" and len(fetched) == 4


def test_a_cosine_student_from_the_hub_cache_loads_with_our_code(tiny_models, tmp_path):
    """A published cosine-head student given by hub id (here from the local hub cache, offline)
    loads through the pipeline's loader with this package's head, as from a folder: no
    --trust-remote-code, and the folder's own copy of the code never runs."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO
    from pipeline.heads import self_contained

    student = cut_student(tiny_models["embedder"], 1, "cpu", 64)
    commit = "c" * 40
    snapshot = tmp_path / "hub" / "models--org--student" / "snapshots" / commit
    student.save_pretrained(str(snapshot))
    assert self_contained(snapshot)  # as the pipeline publishes it: the head's code in the folder
    (snapshot / "segment_cosine.py").write_text((snapshot / "segment_cosine.py").read_text() + "\nraise SystemExit('the copy ran')\n")
    (tmp_path / "hub" / "models--org--student" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--student" / "refs" / "main").write_text(commit)
    code = "from pipeline.models import load_cross_encoder; m = load_cross_encoder('org/student', 'cpu', 64); print(type(m[-1]).__module__)"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "pipeline.heads"
    shutil.rmtree(tmp_path / "hub")


def _texts_of_lengths(word: str, lengths: list[int]) -> list[str]:
    return [" ".join([word] * n) for n in lengths]


def test_an_unset_input_length_keeps_three_in_four_pairs_whole(tiny_models, tmp_path):
    """Queries of 3 tokens and passages of 100 or 300: the 75th percentile pair (3 + 300 and 3
    special tokens) needs 306 tokens, so the length is the next step of 32; short texts get the
    floor, texts longer than the model's positions its 512, and a length given is kept."""
    from conftest import write_beir

    from pipeline.models import LENGTH_FLOOR, fitting_max_length

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    assert len(tokenizer("apple apple apple", add_special_tokens=False)["input_ids"]) == 3  # one token a word
    special = tokenizer.num_special_tokens_to_add(pair=True)

    def dataset(name: str, passage_lengths: list[int]) -> Path:
        queries = dict(zip((f"q{i}" for i in range(20)), _texts_of_lengths("apple", [3] * 20)))
        corpus = {f"d{i}": ("", t) for i, t in enumerate(_texts_of_lengths("apple", passage_lengths))}
        return write_beir(tmp_path / name, queries, corpus, {"test": [("q0", "d0", 1)]})

    mixed = dataset("mixed", [100] * 70 + [300] * 30)  # the 75th percentile passage is a 300
    needed = 3 + 300 + special
    fitted = fitting_max_length(0, tiny_models["student"], mixed)
    assert fitted % 32 == 0 and needed <= fitted < needed + 32
    assert fitting_max_length(0, tiny_models["student"], dataset("short", [20] * 100)) == LENGTH_FLOOR
    assert fitting_max_length(0, tiny_models["student"], dataset("long", [900] * 100)) == 512
    assert fitting_max_length(200, tiny_models["student"], mixed) == 200
    # Three in four whole, not fewer: with a quarter of the passages long, the length holds them too.
    assert fitting_max_length(0, tiny_models["student"], dataset("quarter", [100] * 76 + [300] * 24)) == LENGTH_FLOOR


def test_the_input_length_is_fitted_to_the_whole_of_a_sorted_corpus(tiny_models, tmp_path):
    """A corpus or pairs file sorted by length (here 2,000 short passages, then 6,000 of 300
    tokens) is sampled across the whole file: three in four of its pairs are long, so the length
    holds them, where its first 2,000 rows alone would give the floor. The draw is seeded."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import write_beir

    from pipeline.data import sample_texts
    from pipeline.models import LENGTH_FLOOR, fitting_max_length

    lengths = [5] * 2000 + [300] * 6000
    corpus = {f"d{i}": ("", t) for i, t in enumerate(_texts_of_lengths("apple", lengths))}
    sorted_beir = write_beir(tmp_path / "sorted", {f"q{i}": "apple" for i in range(50)}, corpus, {"test": [("q0", "d0", 1)]})
    short_first = write_beir(tmp_path / "short", {f"q{i}": "apple" for i in range(50)}, dict(list(corpus.items())[:2000]), {"test": [("q0", "d0", 1)]})
    assert fitting_max_length(0, tiny_models["student"], short_first) == LENGTH_FLOOR
    assert fitting_max_length(0, tiny_models["student"], sorted_beir) == 320

    _, passages = sample_texts(sorted_beir)
    assert len(passages) == 2000 and 0.2 < sum(len(t.split()) == 5 for t in passages) / 2000 < 0.3
    assert sample_texts(sorted_beir) == sample_texts(sorted_beir)

    pairs = tmp_path / "pairs.parquet"
    table = pa.table({"query": ["apple"] * len(lengths), "positive": _texts_of_lengths("apple", lengths)})
    pq.write_table(table, pairs, row_group_size=2000)
    assert fitting_max_length(0, tiny_models["student"], pairs) == 320


def test_the_input_length_is_fitted_from_a_pairs_file_a_gzip_corpus_and_a_teachers_member(tiny_models, tmp_path):
    """Every dataset form the stages read is sampled the same way; rows that do not parse are left
    to PrepareData's one-line error, and a teacher folder of members is measured in its members'
    tokens."""
    import gzip

    from conftest import write_beir

    from pipeline.models import fitting_max_length

    long = " ".join(["apple"] * 300)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("not json\n" + "".join(json.dumps({"query": "apple", "positive": long}) + "\n" for _ in range(10)))
    assert fitting_max_length(0, tiny_models["student"], pairs) == 320

    beir = write_beir(tmp_path / "gz", {"q0": "apple"}, {f"d{i}": ("title", long) for i in range(5)}, {"test": [("q0", "d0", 1)]})
    with open(beir / "corpus.jsonl", "rb") as src, gzip.open(beir / "corpus.jsonl.gz", "wb") as dst:
        dst.write(src.read())
    (beir / "corpus.jsonl").unlink()
    assert fitting_max_length(0, tiny_models["student"], beir) == 320  # the title and its full stop: 306 tokens

    ensemble = tmp_path / "teacher"
    shutil.copytree(tiny_models["student"], ensemble / "cross-encoder")
    (ensemble / "ensemble.json").write_text("{}")
    assert fitting_max_length(0, str(ensemble), pairs) == 320
    assert fitting_max_length(0, str(tmp_path / "no-such-model"), pairs) == 128  # its loader reports it when the stage runs
