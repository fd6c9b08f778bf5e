"""Every loss of the table trains from the pipeline's own data: rows built by BuildLabels from
teacher-scored groups, a few CrossEncoderTrainer steps, and the loss on a fixed batch goes down,
for a student with a cross-encoder's own head and for one with the cosine head."""

from __future__ import annotations

import json
from pathlib import Path

import luigi
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from datasets import load_from_disk

import tasks
from losses import LOSS_TABLE, build_loss, resolve_loss
from losses.table import FORMATS
from pipeline.labels import LabelConfig, build_labels, format_rows, write_labels
from pipeline.models import cut_student
from pipeline.scoring import read_scores
from pipeline.training import _with_num_labels, fit_head_scale, student_loss_kwargs, train_student
from tests.conftest import dag_params

SEED = 12
OPTIONS = {
    "CachedMultipleNegativesRankingLoss": {"mini_batch_size": 4},
    "MultipleNegativesRankingLoss": {"num_negatives": 2},
    "LambdaLoss": {"weighting_scheme": "NDCGLoss2PPScheme"},
}


@pytest.fixture(scope="module")
def scored(small_beir, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("losses")
    # The tiny bi-encoder teaches: a tiny random cross-encoder scores every pair within 3e-5 of
    # the others in fp32, so unit-spread labels sat hundreds of spreads from zero on CPUs that
    # score in fp32, out of reach of a pointwise loss's few steps.
    score = tasks.ScoreWithTeacher(**dag_params(small_beir, tiny_models, out, tasks.ScoreWithTeacher, teacher=f"bi:{tiny_models['embedder']}"))
    assert luigi.build([score], local_scheduler=True, log_level="WARNING")
    return {
        "data": score.clone(tasks.PrepareData).output().path,
        "mined": score.clone(tasks.MineHardNegatives).output().path,
        "scores": score.output().path,
        "out": out,
        "unit_scale": 1.0 / float(np.std(read_scores(score.output().path)[0].column("score").to_numpy())),
    }


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_labels_built_in_batches_equal_one_pass(fmt, scored, tmp_path):
    """Batches of three groups, each with only its own texts and scores, give the rows and
    counts that one pass over every group gives."""
    needs_scores = fmt not in ("pair-binary", "pair-class", "ntuple")
    # Negatives half a spread above the lowest positive count as false ones: some groups lose some.
    margin = -0.5 / scored["unit_scale"]
    config = LabelConfig(fmt, false_negatives="drop" if needs_scores else "keep", false_negative_margin=margin)

    built = {}
    for name, size in (("whole", 10**6), ("batched", 3)):
        stats = write_labels(scored["data"], scored["mined"], scored["scores"] if needs_scores else None,
                             tmp_path / name, config, format_rows(config), groups_per_batch=size)
        built[name] = (stats, load_from_disk(str(tmp_path / name / "dataset")))
    (whole, whole_rows), (batched, batched_rows) = built["whole"], built["batched"]
    assert batched_rows.num_rows == whole_rows.num_rows > 0
    assert batched_rows.data.table.equals(whole_rows.data.table)
    assert batched_rows.features == whole_rows.features
    if needs_scores:
        assert 0 < whole["false_negatives"]["suspected"] < 3 * whole["judged_queries"]
    assert batched.pop("false_negatives", None) == whole.pop("false_negatives", None)
    assert {k: v for k, v in batched.items() if k != "seconds"} == pytest.approx({k: v for k, v in whole.items() if k != "seconds"})


def test_queries_short_of_negatives_count_in_batches_that_build_no_rows(scored, tmp_path):
    """Every mined negative asked for, and suspected false negatives dropped (so some groups
    fall short), one group a batch: each short group's batch builds no rows at all, and its
    query still counts as short, as in one pass over every group."""
    groups = pq.read_table(Path(scored["mined"]) / "groups.parquet")
    config = LabelConfig("ntuple", num_negatives=pc.max(pc.list_value_length(groups["negative_ids"])).as_py(),
                         false_negatives="drop", false_negative_margin=-0.5 / scored["unit_scale"])

    whole, alone = (write_labels(scored["data"], scored["mined"], scored["scores"], tmp_path / name, config, format_rows(config),
                                 groups_per_batch=size)
                    for name, size in (("whole", 10**6), ("alone", 1)))
    assert 0 < whole["queries_short_of_negatives"] < groups.num_rows
    assert alone["queries_short_of_negatives"] == whole["queries_short_of_negatives"]
    assert alone["rows"] == whole["rows"]


def _collate(rows):
    """What CrossEncoderDataCollator hands a loss: text columns in order, then the labels."""
    cols = [c for c in rows.column_names if c not in ("label", "labels")]
    label_col = "label" if "label" in rows.column_names else "labels" if "labels" in rows.column_names else None
    inputs = [rows[c] for c in cols]
    if label_col is None:
        return inputs, None
    values = rows[label_col]
    labels = [torch.tensor(v) for v in values] if isinstance(values[0], list) else torch.tensor(values)
    return inputs, labels


def _loss_value(model, name, inputs, labels):
    loss = build_loss(model, name, student_loss_kwargs(model, name, OPTIONS.get(name)))
    model.eval()  # no dropout: compare like with like
    with torch.no_grad():
        return float(loss(inputs, labels))


def _loss_before_and_after(name, backbone, scored, tiny_models, tmp_path, learning_rate=1e-2):
    """The loss on a fixed batch of pipeline rows for the starting student, exactly as
    train_student starts it (cut, resized head, head scale fitted to the labels), and after training."""
    spec, _ = resolve_loss(name)
    # A random tiny teacher scores every pair almost alike; scaling its scores to unit spread gives
    # listwise losses a teacher distribution that is not uniform, as a trained teacher's is.
    stats = build_labels(
        scored["data"], scored["mined"], scored["scores"] if spec.needs_teacher else None,
        tmp_path / "labels", LabelConfig(spec.format, num_negatives=3, label_scale=scored["unit_scale"]),
    )
    rows = load_from_disk(str(tmp_path / "labels" / "dataset")).select(range(8))
    inputs, labels = _collate(rows)
    num_labels = stats.get("num_classes", 1)

    from transformers import set_seed

    set_seed(SEED)
    # A classification loss always gets the sequence-classification head (as train_student does).
    start = cut_student(tiny_models[backbone], 2, "cpu", 64, head="cls" if num_labels != 1 else "auto")
    if num_labels != 1:
        start = _with_num_labels(start, num_labels)
    # The fitted scale alone can lower a loss; "before" includes it, so only learning counts.
    fit_head_scale(start, rows, spec.format)
    before = _loss_value(start, name, inputs, labels)

    train_student(
        rows, name, tmp_path / "student", student=tiny_models[backbone], student_layers=2,
        loss_kwargs=OPTIONS.get(name), epochs=12, batch_size=8, learning_rate=learning_rate, warmup_ratio=0.0,
        max_length=64, num_labels=num_labels, seed=SEED,
    )
    from pipeline.models import load_cross_encoder

    trained = load_cross_encoder(str(tmp_path / "student"), "cpu", 64)
    if num_labels != 1:
        trained.activation_fn = torch.nn.Identity()
    return before, _loss_value(trained, name, inputs, labels)


@pytest.mark.parametrize("backbone", ["student", "embedder"], ids=["cross-encoder-head", "cosine-head"])
@pytest.mark.parametrize("name", sorted(LOSS_TABLE))
def test_loss_trains_from_pipeline_data(name, backbone, scored, tiny_models, tmp_path):
    before, after = _loss_before_and_after(name, backbone, scored, tiny_models, tmp_path)
    assert _learned(before, after), f"{name}: loss {before:.4f} -> {after:.4f}"


def _learned(before: float, after: float) -> bool:
    """A real drop: 1% of the loss at least. Float noise is far below it (a frozen model's change
    is below 1e-5 relative: see the next test), and so is a model that barely moves (12 steps at
    2e-3 moved these tiny students by 0.03-0.2%)."""
    return after < before - 0.01 * abs(before)


@pytest.mark.parametrize("backbone", ["student", "embedder"], ids=["cross-encoder-head", "cosine-head"])
def test_a_model_that_does_not_learn_fails_the_check(backbone, scored, tiny_models, tmp_path):
    """The same measurement with a learning rate of 0: the start, head scale included, is what
    the trained model is, so the loss does not move and the check above would fail."""
    before, after = _loss_before_and_after("PackedMarginMSELoss", backbone, scored, tiny_models, tmp_path, learning_rate=0.0)
    assert after == pytest.approx(before, rel=1e-5, abs=1e-7)
    assert not _learned(before, after)


def test_custom_loss_class_reaches_the_model_card(small_beir, tiny_models, tmp_path):
    fit = tasks.FitStudent(**dag_params(small_beir, tiny_models, tmp_path, tasks.FitStudent, max_dev_queries=0,
                                        loss="tests.custom_loss:ScaledMarginMSELoss", loss_kwargs=json.dumps({"scale": 0.25})))
    assert luigi.build([fit], local_scheduler=True, log_level="WARNING")
    card = (fit.artifact() / "README.md").read_text()
    assert "ScaledMarginMSELoss" in card
    assert "scaled-margin-test" in card and "0.25" in card
    assert "scaledmargin2026" in card


def test_custom_loss_must_take_model_first():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="cannot import"):
        resolve_loss("tests.custom_loss:Nope")
    with pytest.raises(PipelineError, match="nn.Module"):
        resolve_loss("json:dumps")


def test_squashing_losses_see_the_cosine_heads_scores_as_they_are(tiny_models):
    """MNRL's default Sigmoid on the cosine head's scaled cosines saturates, so the cosine head gets
    an identity activation and scale 1; a [CLS] head and explicit options keep what they had."""
    cosine = cut_student(tiny_models["embedder"], 2, "cpu", 64, head="cosine")
    cls = cut_student(tiny_models["student"], 2, "cpu", 64, head="cls")
    opts = student_loss_kwargs(cosine, "MultipleNegativesRankingLoss", '{"num_negatives": 2}')
    assert opts == {"num_negatives": 2, "activation_fn": "torch.nn.Identity", "scale": 1.0}
    assert student_loss_kwargs(cls, "MultipleNegativesRankingLoss", None) == {}
    explicit = {"activation_fn": "torch.nn.Sigmoid", "scale": 5.0}
    assert student_loss_kwargs(cosine, "CachedMultipleNegativesRankingLoss", explicit) == explicit
    assert student_loss_kwargs(cosine, "MarginMSELoss", None) == {}


def test_dev_check_reads_the_same_samples_as_the_whole_dataset_gives(scored):
    """The dev check reads only its queries' texts; its samples are those the whole dataset gives."""
    import pyarrow.parquet as pq

    from pipeline.data import load_normalized
    from pipeline.training import dev_check_samples, reranking_samples

    ds = load_normalized(scored["data"])
    path = f"{scored['mined']}/candidates-dev.parquet"
    cand = pq.read_table(path).to_pydict()
    whole = reranking_samples(dict(zip(cand["query_id"], cand["doc_ids"])), ds.relevant("dev"), ds.queries, ds.passage)[:3]
    assert len(whole) == 3 and dev_check_samples(scored["data"], path, 3) == whole


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dev_metrics_are_those_of_the_saved_student(scored, tiny_models, tmp_path, precision):
    """The dev check in the student's statistics (in fp32 the trainer's last-step evaluation,
    reused rather than run twice; in bf16 one evaluation without the trainer's autocast) equals a
    fresh evaluation of the saved student."""
    import pyarrow.parquet as pq
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    from pipeline.data import load_normalized
    from pipeline.models import load_cross_encoder
    from pipeline.training import reranking_samples

    build_labels(scored["data"], scored["mined"], scored["scores"], tmp_path / "labels", LabelConfig("ntuple-margin", num_negatives=3))
    rows = load_from_disk(str(tmp_path / "labels" / "dataset"))
    ds = load_normalized(scored["data"])
    cand = pq.read_table(f"{scored['mined']}/candidates-dev.parquet").to_pydict()
    samples = reranking_samples(dict(zip(cand["query_id"], cand["doc_ids"])), ds.relevant("dev"), ds.queries, ds.passage)
    stats = train_student(rows, "PackedMarginMSELoss", tmp_path / "student", student=tiny_models["student"], student_layers=2,
                          epochs=1, batch_size=8, max_length=64, dev_samples=samples, seed=SEED, precision=precision)
    evaluator = CrossEncoderRerankingEvaluator(samples, at_k=10, name="dev", batch_size=64, write_csv=False, always_rerank_positives=False)
    again = evaluator(load_cross_encoder(str(tmp_path / "student"), "cpu", 64))
    assert stats["dev"] and set(stats["dev"]) == set(again)
    assert stats["dev"] == pytest.approx({k: float(v) for k, v in again.items()}, abs=1e-6)
