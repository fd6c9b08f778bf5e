"""The whole DAG on tiny models: runs end to end, publishes a loadable student, reruns do nothing,
and a changed setting builds new artifacts instead of reusing stale ones."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import luigi
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import tasks
from pipeline.data import prepare_data
from pipeline.errors import PipelineError
from pipeline.mining import MineConfig, mine_hard_negatives
from tests.conftest import dag_params as _params


def _build(task) -> bool:
    return luigi.build([task], local_scheduler=True, workers=1, log_level="WARNING")


# The whole-DAG run's settings beyond dag_params: a label-only student beside the distilled one.
FINISHED = {"label_only_loss": "BinaryCrossEntropyLoss"}


@pytest.fixture(scope="module")
def finished_run(small_beir, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    t0 = time.perf_counter()
    assert _build(tasks.TrainStudent(**_params(small_beir, tiny_models, out, **FINISHED)))
    return out, time.perf_counter() - t0


def test_whole_dag_publishes_student_metrics_and_report(finished_run):
    out, _ = finished_run
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("retriever", "teacher", "student", "student_untrained", "student_label_only"):
        m = metrics["test"][name]
        assert set(m) >= {"ndcg@10", "mrr@10", "map", "pairs_per_second", "ms_per_query"}
        assert 0.0 <= m["ndcg@10"] <= 1.0 and m["pairs_per_second"] > 0 and m["ms_per_query"] > 0
    # Every ranker is timed on the same pairs: pairs/s and ms per query describe the same run.
    speed = metrics["speed"]
    queries, pairs = speed["queries"], speed["pairs"]
    assert 0 < queries <= metrics["test_queries"] and 0 < pairs <= metrics["test_pairs"] and speed["turns"] >= 1
    for m in metrics["test"].values():
        assert 1000 * pairs / m["pairs_per_second"] / queries == pytest.approx(m["ms_per_query"], rel=0.02)
    for stage in ("PrepareData", "MineHardNegatives", "ScoreWithTeacher", "BuildLabels", "FitStudent"):
        assert stage in metrics["timings"] and "seconds" in metrics["stages"][stage]
    assert metrics["params"]["loss"] == "PackedMarginMSELoss"
    # The label-only baseline: the same student trained with BCE on the judged pairs alone.
    baseline = metrics["stages"]["FitStudent (label-only)"]
    assert baseline["loss"] == "BinaryCrossEntropyLoss" and baseline["rows"] != metrics["stages"]["FitStudent"]["rows"]
    assert {"student vs student_label_only", "student_label_only vs retriever"} <= set(metrics["significance"])
    assert any("judgments alone" in line for line in metrics["verdict"])
    report = (out / "report.md").read_text()
    assert "| retriever |" in report and "| student |" in report and "| student_label_only |" in report
    n = metrics["stages"]["PrepareData"]["split_queries"]
    assert f"judged queries: {n['train']} train, {n['dev']} dev, {n['test']} test." in report and n["dev"] > 0
    assert (out / "teacher_vs_student.png").stat().st_size > 1000
    # Each student also ranks fused with the retriever, its weight chosen on every dev query.
    for name in ("student", "student_label_only"):
        f = metrics["fusion"][name]
        assert f["dev_queries"] == n["dev"] and f"{f['weight']:g}" in f["dev_ndcg@10"]
        assert f["dev_ndcg@10"][f"{f['weight']:g}"] == max(f["dev_ndcg@10"].values())
        assert metrics["test"][f"{name}_fused"]["pairs_per_second"] == metrics["test"][name]["pairs_per_second"]
    # The distilled student's weight is published beside it for serving.
    from pipeline.fusion import fusion_weight

    assert fusion_weight(out) == metrics["fusion"]["student"]["weight"]
    assert json.loads((out / "fusion.json").read_text())["retriever"] == metrics["params"]["embedder"]
    assert "its w is in `fusion.json` beside this report" in report
    assert {"student_fused vs retriever", "student_fused vs student_label_only_fused"} <= set(metrics["significance"])
    assert "## Fused with the retriever" in report and "| student_fused |" in report
    # The teacher was checked against the retriever on dev before the other shards were scored.
    dev = metrics["stages"]["ScoreWithTeacher"]["dev_check"]
    assert dev["queries"] == min(4, n["dev"]) and dev["seconds"] > 0 and f"Checked by the first shard on {dev['queries']} dev queries" in report


def test_the_teachers_dev_check_ranks_the_true_top_k_and_warns_when_it_is_not_ahead(tmp_path, caplog):
    """A teacher that puts the judged positive first is ahead of a retriever that ranked it lower
    (a positive the retriever missed counting as a miss for both); a teacher that ranks as the
    retriever does is not, and the log says so."""
    from pipeline.evaluation import per_query_metrics, to_run
    from pipeline.mining import CANDIDATES_SCHEMA
    from pipeline.scoring import teacher_dev_check
    from tests.conftest import write_beir

    n, k = 30, 5
    corpus = {f"d{i}": (f"title {i}", f"passage number {i}") for i in range(n + k)}
    queries = {f"q{i}": f"query number {i}" for i in range(n)}
    qrels = {"train": [("t0", "d0", 1)], "dev": [(f"q{i}", f"d{i}", 1) for i in range(n)], "test": [("t1", "d1", 1)]}
    data = tmp_path / "data"
    prepare_data(write_beir(tmp_path / "beir", {**queries, "t0": "train query", "t1": "test query"}, corpus, qrels), data)
    # Query i's positive at rank i % k + 1 of its candidates, except every seventh, whose top-k missed it.
    rows = {"query_id": [], "doc_ids": [], "scores": []}
    for i in range(n):
        others = [f"d{n + j}" for j in range(k)]
        docs = others[: k - 1] if i % 7 == 6 else others[: i % k] + [f"d{i}"] + others[i % k : k - 1]
        rows["query_id"].append(f"q{i}")
        rows["doc_ids"].append(docs)
        rows["scores"].append([float(k - r) for r in range(len(docs))])
    mined = tmp_path / "mined"
    mined.mkdir()
    pq.write_table(pa.table(rows, schema=CANDIDATES_SCHEMA), mined / "candidates-dev.parquet")
    qids = [q for q, docs in zip(rows["query_id"], rows["doc_ids"]) for _ in docs]
    dids = [d for docs in rows["doc_ids"] for d in docs]
    retrieval = [s for scores in rows["scores"] for s in scores]

    class Fixed:  # a teacher whose scores of the dev candidates, in their order, are given
        def __init__(self, scores):
            self.scores = scores

        def score(self, pairs, query_ids, cache_dir=None, show_progress=True):
            m = len(query_ids)
            assert list(query_ids) == qids[:m] and [p[0] for p in pairs] == [queries[q] for q in qids[:m]]
            return self.scores[:m]

    with caplog.at_level("WARNING", logger="pipeline.scoring"):
        ahead = teacher_dev_check(Fixed([float(q[1:] == d[1:]) for q, d in zip(qids, dids)]), data, mined, 0)
        level = teacher_dev_check(Fixed(retrieval), data, mined, 0)
    missed = sum(i % 7 == 6 for i in range(n))
    assert ahead["queries"] == level["queries"] == n
    assert ahead["teacher_ndcg@10"] == pytest.approx((n - missed) / n)
    retriever = per_query_metrics(to_run(qids, dids, retrieval), {q: {f"d{q[1:]}": 1} for q in queries}, list(queries))["ndcg@10"]
    assert ahead["retriever_ndcg@10"] == level["retriever_ndcg@10"] == pytest.approx(retriever.mean())
    assert ahead["diff"] > 0 and ahead["p_value"] < 0.05 and level["diff"] == 0 and level["p_value"] == 1.0
    warned = [r.getMessage() for r in caplog.records if "unlikely to beat the retriever" in r.getMessage()]
    assert len(warned) == 1 and f"{retriever.mean():.4f}" in warned[0]  # for the second teacher only
    # Limited to the first queries of the candidates file, as --max-dev-queries asks.
    assert teacher_dev_check(Fixed(retrieval), data, mined, 4)["queries"] == 4


def test_long_passages_are_truncated_and_counted(finished_run, small_beir):
    from pipeline.data import read_dataset
    from pipeline.models import load_cross_encoder

    out, _ = finished_run
    metrics = json.loads((out / "metrics.json").read_text())
    # The tiny run scores with teacher_max_length 64: count the pairs that do not fit.
    groups = __import__("pyarrow.parquet", fromlist=["x"]).read_table(next(out.glob("mined/*/groups.parquet"))).to_pydict()
    ds = read_dataset(small_beir)
    tok = load_cross_encoder(metrics["params"]["teacher"]).tokenizer
    pairs = {(q, d) for q, p, n in zip(groups["query_id"], groups["positive_ids"], groups["negative_ids"]) for d in p + n}
    too_long = sum(len(tok(ds.queries[q], ds.passage(d))["input_ids"]) > 64 for q, d in pairs)
    assert too_long > 0
    assert metrics["stages"]["ScoreWithTeacher"]["truncated_pairs"] == too_long
    assert f"{too_long} pairs were truncated" in (out / "report.md").read_text()


def test_published_student_loads_as_cross_encoder(finished_run):
    from sentence_transformers.cross_encoder import CrossEncoder

    out, _ = finished_run
    model = CrossEncoder(str(out / "student"))
    assert model.model.config.num_hidden_layers == 2
    scores = model.predict([("how to parse xml", "An XML library."), ("q", "d")])
    assert scores.shape == (2,)
    card = (out / "student" / "README.md").read_text()
    assert "MarginMSELoss" in card


def test_published_students_predict_what_their_loss_trained_their_scores_to_be(finished_run, small_beir, tiny_models):
    """predict with no arguments: a distilled student's raw scores (they rank, in the teacher's
    units, and a sigmoid would tie the highest), a BCE student's probabilities (log-odds logits)."""
    from sentence_transformers.cross_encoder import CrossEncoder

    out, _ = finished_run
    evaluation = tasks.TrainStudent(**_params(small_beir, tiny_models, out, **FINISHED)).clone(tasks.EvaluateStudent)
    pairs = [("how to parse xml", "An XML library."), ("image viewer", "A fast image viewer."), ("q", "d")]
    for folder, activation in ((out / "student", torch.nn.Identity), (evaluation.label_only_student().artifact(), torch.nn.Sigmoid)):
        model = CrossEncoder(str(folder))
        assert isinstance(model.activation_fn, activation)
        raw = model.predict(pairs, activation_fn=torch.nn.Identity())
        np.testing.assert_allclose(model.predict(pairs), activation()(torch.as_tensor(raw)).numpy(), atol=1e-6)


def test_teacher_scores_carry_identity_metadata(finished_run, tiny_models):
    from pipeline.scoring import read_scores

    out, _ = finished_run
    [path] = list((out / "scores").glob("*/scores.arrow"))
    table, meta = read_scores(path)
    assert table.schema.field("score").type.bit_width == 32
    [ident] = meta["teacher"]
    assert ident["model"] == tiny_models["teacher"]
    assert len(ident["weights_sha256"]) == 16 and ident["max_length"] == 64
    assert ident["activation"].startswith("identity")
    assert table.num_rows == len(set(zip(table.column("query_id").to_pylist(), table.column("doc_id").to_pylist())))


def test_unchanged_rerun_does_nothing(finished_run, small_beir, tiny_models):
    out, _ = finished_run
    task = tasks.TrainStudent(**_params(small_beir, tiny_models, out, **FINISHED))
    assert task.complete()
    stamp = (out / "metrics.json").resolve().stat().st_mtime_ns
    assert _build(task)
    assert (out / "metrics.json").resolve().stat().st_mtime_ns == stamp


def test_changed_setting_gets_new_artifacts(finished_run, small_beir, tiny_models):
    out, _ = finished_run
    base = tasks.TrainStudent(**_params(small_beir, tiny_models, out, **FINISHED))
    changed = tasks.TrainStudent(**_params(small_beir, tiny_models, out, num_negatives=2, **FINISHED))
    assert not changed.complete()
    mine = lambda t: t.clone(tasks.MineHardNegatives)
    assert mine(base).fp != mine(changed).fp
    assert mine(base).clone(tasks.PrepareData).fp == mine(changed).clone(tasks.PrepareData).fp
    lr = tasks.TrainStudent(**_params(small_beir, tiny_models, out, learning_rate=1e-3))
    assert lr.clone(tasks.FitStudent).fp != base.clone(tasks.FitStudent).fp
    assert lr.clone(tasks.ScoreWithTeacher).fp == base.clone(tasks.ScoreWithTeacher).fp


def test_fine_tuned_teacher_path(small_beir, tiny_models, tmp_path):
    """With no --teacher, a cross-encoder teacher is fine-tuned from --teacher-backbone first."""
    p = _params(small_beir, tiny_models, tmp_path, teacher="", teacher_backbone=tiny_models["teacher"],
                teacher_epochs=0.5, max_train_queries=12)
    task = tasks.ScoreWithTeacher(**{k: v for k, v in p.items() if k in tasks.ScoreWithTeacher.get_param_names()})
    assert _build(task)
    teacher_dir = task.clone(tasks.FineTuneTeacher).artifact()
    assert (teacher_dir / "stats.json").exists()
    from pipeline.scoring import read_scores

    _, meta = read_scores(task.output().path)
    assert meta["teacher"][0]["model"] == str(teacher_dir)


def test_label_only_baseline_needs_a_label_only_loss(small_beir, tiny_models, tmp_path):
    from pipeline.errors import PipelineError

    p = _params(small_beir, tiny_models, tmp_path, label_only_loss="MarginMSELoss")
    ev = tasks.EvaluateStudent(**{k: v for k, v in p.items() if k in tasks.EvaluateStudent.get_param_names()})
    with pytest.raises(PipelineError, match="needs teacher scores"):
        ev.requires()


def test_ensemble_teacher_is_two_fine_tuned_members_and_scores_as_their_mix(small_beir, tiny_models, tmp_path):
    """--teacher-kind ensemble: a bi-encoder, then a cross-encoder started from it; the scores are
    the weighted sum of each member's per-query z-scores, recomputed here from the saved members."""
    from sentence_transformers import SentenceTransformer

    from pipeline.models import load_cross_encoder
    from pipeline.scoring import read_scores

    p = _params(small_beir, tiny_models, tmp_path, teacher="", teacher_kind="ensemble", teacher_backbone=tiny_models["embedder"],
                teacher_epochs=0.5, teacher_ensemble_weight="0.7", score_precision="fp32", max_train_queries=12)
    task = tasks.ScoreWithTeacher(**{k: v for k, v in p.items() if k in tasks.ScoreWithTeacher.get_param_names()})
    assert _build(task)
    folder = task.clone(tasks.FineTuneTeacher).artifact()
    manifest = json.loads((folder / "ensemble.json").read_text())
    assert [(m["path"], m["kind"], m["weight"]) for m in manifest["members"]] == [
        ("cross-encoder", "cross-encoder", 0.7), ("bi-encoder", "bi-encoder", 0.3)]
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["cross-encoder"]["loss"] == "MultipleNegativesRankingLoss" and stats["bi-encoder"]["kind"] == "bi-encoder"
    # The bi-encoder learns from one (query, positive, first negative) triplet per judged positive.
    groups = pq.read_table(task.clone(tasks.MineHardNegatives).artifact() / "groups.parquet").to_pydict()
    assert stats["bi-encoder"]["rows"] == sum(len(p) for p, n in zip(groups["positive_ids"], groups["negative_ids"]) if n) > 0
    assert not Path(f"{folder}.parts").exists()

    table, meta = read_scores(task.output().path)
    assert [m["kind"] for m in meta["teacher"]] == ["cross-encoder", "bi-encoder"]
    t = table.to_pydict()
    ds = __import__("pipeline.data", fromlist=["x"]).load_normalized(task.clone(tasks.PrepareData).artifact())
    pairs = [(ds.queries[q], ds.passage(d)) for q, d in zip(t["query_id"], t["doc_id"])]
    ce = load_cross_encoder(str(folder / "cross-encoder"), "cpu", 64)
    ce_raw = ce.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=8)
    # Trained to rank (MultipleNegativesRankingLoss), the published cross-encoder predicts its raw scores.
    assert isinstance(ce.activation_fn, torch.nn.Identity)
    bi = SentenceTransformer(str(folder / "bi-encoder"), device="cpu")
    bi.max_seq_length = 64
    q = bi.encode([a for a, _ in pairs], normalize_embeddings=True, prompt_name=None)
    d = bi.encode([b for _, b in pairs], normalize_embeddings=True, prompt_name=None)
    bi_raw = (q * d).sum(1)

    def z(x):
        out = np.empty(len(x))
        for qid in set(t["query_id"]):
            i = [k for k, v in enumerate(t["query_id"]) if v == qid]
            out[i] = (x[i] - x[i].mean()) / (x[i].std() or 1.0)
        return out

    np.testing.assert_allclose(t["score"], 0.7 * z(np.asarray(ce_raw, np.float64)) + 0.3 * z(bi_raw.astype(np.float64)), atol=2e-3)


def test_an_ensemble_teachers_share_is_the_mix_that_ranks_the_dev_split_best(small_beir, tiny_models, tmp_path):
    """By default the cross-encoder's share of an ensemble teacher is chosen on dev: recomputed
    here from the published members' own scores and ir-measures, the recorded nDCG@10 of the
    bi-encoder alone, the cross-encoder alone and the chosen mix are right, and no share of the
    grid mixes better; both members are kept whatever the share. The members' dev scores go to
    the teacher score cache, so the scoring stage's dev check scores none of its pairs again."""
    import ir_measures
    from ir_measures import nDCG
    from sentence_transformers import SentenceTransformer

    from pipeline.models import load_cross_encoder
    from pipeline.teacher import TeacherConfig, fine_tune_teacher

    mine = tasks.MineHardNegatives(**_params(small_beir, tiny_models, tmp_path, tasks.MineHardNegatives))
    assert _build(mine)
    data, mined = mine.clone(tasks.PrepareData).output().path, mine.output().path
    folder = tmp_path / "teacher"
    cache = tmp_path / "teacher-scores"
    stats = fine_tune_teacher(data, mined, folder, TeacherConfig(
        backbone=tiny_models["embedder"], kind="ensemble", epochs=0.5, batch_size=8, bi_encoder_batch_size=8,
        max_length=64, precision="fp32", device="cpu", cache_dir=str(cache)))
    choice = stats["share_chosen_on_dev"]
    share = choice["weight"]
    manifest = json.loads((folder / "ensemble.json").read_text())
    assert {m["kind"]: m["weight"] for m in manifest["members"]} == {
        k: w for k, w in (("cross-encoder", share), ("bi-encoder", round(1 - share, 6))) if w > 0}
    assert (folder / "cross-encoder" / "config.json").is_file() and (folder / "bi-encoder" / "config.json").is_file()

    cand = pq.read_table(Path(mined) / "candidates-dev.parquet").to_pydict()
    qids = [q for q, docs in zip(cand["query_id"], cand["doc_ids"]) for _ in docs]
    dids = [d for docs in cand["doc_ids"] for d in docs]
    qrels: dict[str, dict[str, int]] = {}
    for line in (small_beir / "qrels" / "dev.tsv").read_text().splitlines()[1:]:
        q, d, grade = line.split("\t")
        qrels.setdefault(q, {})[d] = int(grade)
    assert choice["dev_queries"] == len(set(qids) & set(qrels)) > 0
    ds = __import__("pipeline.data", fromlist=["x"]).load_normalized(data)
    pairs = [(ds.queries[q], ds.passage(d)) for q, d in zip(qids, dids)]
    ce = np.asarray(load_cross_encoder(str(folder / "cross-encoder"), "cpu", 64).predict(
        pairs, activation_fn=torch.nn.Identity(), batch_size=8), np.float64)
    bi = SentenceTransformer(str(folder / "bi-encoder"), device="cpu")
    bi.max_seq_length = 64
    be = (bi.encode([a for a, _ in pairs], normalize_embeddings=True) * bi.encode([b for _, b in pairs], normalize_embeddings=True)).sum(1)

    def z(x):
        x, out = np.asarray(x, np.float64), np.empty(len(qids))
        for q in set(qids):
            i = [k for k, v in enumerate(qids) if v == q]
            out[i] = (x[i] - x[i].mean()) / (x[i].std() or 1.0)
        return out

    def ndcg(scores):
        run: dict[str, dict[str, float]] = {}
        for q, d, s in zip(qids, dids, scores):
            run.setdefault(q, {})[d] = float(s)
        return ir_measures.calc_aggregate([nDCG @ 10], {q: qrels[q] for q in run if q in qrels}, run)[nDCG @ 10]

    table = choice["dev_ndcg@10"]
    assert table["0"] == pytest.approx(ndcg(be), abs=1e-4) and table["1"] == pytest.approx(ndcg(ce), abs=1e-4)
    assert table[f"{share:g}"] == pytest.approx(ndcg(share * z(ce) + (1 - share) * z(be)), abs=1e-4)
    assert table[f"{share:g}"] == max(table.values()) and len(table) == 21
    # The report's teacher section shows the members alone and the chosen mix.
    from pipeline.report import _teacher_section

    section = "\n".join(_teacher_section(stats, {}, {}))
    assert f"ranks {choice['dev_queries']} dev queries'" in section and f"| bi-encoder alone | {table['0']:.4f} |" in section
    assert f"| cross-encoder alone | {table['1']:.4f} |" in section and f"share {share:g}** | **{table[f'{share:g}']:.4f}** |" in section

    from pipeline.scoring import TeacherSpec, load_teacher, member_fingerprint, teacher_dev_check

    teacher = load_teacher(TeacherSpec.parse(str(folder)), "cpu", "fp32", 64)
    check = teacher_dev_check(teacher, data, mined, 1000, cache)
    # Counted in pairs, not member scores: every member read every pair from the cache.
    assert teacher.cache_misses == 0 and teacher.cache_hits == len(pairs)
    assert check["teacher_ndcg@10"] == pytest.approx(table[f"{share:g}"], abs=1e-4)
    # A pair one member has to score again counts as scored, however many members read it cached.
    shutil.rmtree(cache / member_fingerprint(teacher.identity[0]))
    again = load_teacher(TeacherSpec.parse(str(folder)), "cpu", "fp32", 64)
    assert teacher_dev_check(again, data, mined, 1000, cache)["teacher_ndcg@10"] == pytest.approx(check["teacher_ndcg@10"], abs=1e-6)
    assert again.cache_misses == len(pairs) and again.cache_hits == 0


def test_an_ensemble_teacher_without_judged_dev_queries_mixes_half_and_half(tmp_path, caplog):
    """No dev candidates to choose on: the share falls back to half and half, and the log says why."""
    from pipeline.teacher import TeacherConfig, ensemble_share

    (tmp_path / "mined").mkdir()
    with caplog.at_level("WARNING"):
        choice = ensemble_share(tmp_path / "data", tmp_path / "mined", tmp_path / "bi", tmp_path / "ce", TeacherConfig(kind="ensemble"))
    assert choice == {"weight": 0.5, "dev_queries": 0}
    assert "no judged dev query to choose the ensemble teacher's shares on" in caplog.text


def test_an_ensemble_folder_stands_for_its_weighted_members(tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.scoring import TeacherSpec

    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "ensemble.json").write_text(json.dumps({"members": [
        {"path": "cross-encoder", "kind": "cross-encoder", "weight": 0.6}, {"path": "bi-encoder", "kind": "bi-encoder", "weight": 0.4}]}))
    spec = TeacherSpec.parse(f"other/model,{folder}", "1,2")
    assert spec.refs == ["other/model", f"ce:{folder / 'cross-encoder'}", f"bi:{folder / 'bi-encoder'}"]
    assert spec.weights == pytest.approx([1.0, 1.2, 0.8])
    (folder / "ensemble.json").write_text(json.dumps({"members": [{"path": "x"}]}))
    with pytest.raises(PipelineError, match="ensemble.json: not an ensemble manifest"):
        TeacherSpec.parse(str(folder))


def test_bad_dataset_fails_before_any_model_loads(tiny_models, tmp_path):
    from tests.conftest import write_beir

    ds = write_beir(tmp_path / "bad", {"q1": "a"}, {"d1": ("", "b")}, {"test": [("q1", "d2", 1)]})
    task = tasks.TrainStudent(**_params(ds, tiny_models, tmp_path / "out"))
    assert not _build(task)
    assert not (tmp_path / "out" / "mined").exists()


def test_dataset_without_training_pairs_says_so(tiny_models, tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.mining import MineConfig, mine_hard_negatives
    from pipeline.data import prepare_data
    from tests.conftest import write_beir

    ds = write_beir(tmp_path / "testonly", {"q1": "a b"}, {"d1": ("", "b c")}, {"test": [("q1", "d1", 1)]})
    prepare_data(ds, tmp_path / "norm")
    with pytest.raises(PipelineError, match="no judged training pairs"):
        mine_hard_negatives(tmp_path / "norm", tmp_path / "mined", MineConfig(embedder=tiny_models["embedder"], cache_dir=str(tmp_path / "cache")))


def test_evaluation_requires_the_fine_tuned_teacher_even_for_losses_without_teacher_scores(small_beir, tiny_models, tmp_path):
    p = _params(small_beir, tiny_models, tmp_path, teacher="", teacher_backbone=tiny_models["teacher"],
                loss="BinaryCrossEntropyLoss")
    ev = tasks.EvaluateStudent(**{k: v for k, v in p.items() if k in tasks.EvaluateStudent.get_param_names()})
    assert "scores" not in ev.clone(tasks.BuildLabels).requires()
    assert isinstance(ev.requires()["teacher"], tasks.FineTuneTeacher)


def _corpus_and_queries(folder):
    """The dataset's texts read straight from its files, as a user's own script would."""
    corpus, queries = {}, {}
    for line in (folder / "corpus.jsonl").read_text().splitlines():
        r = json.loads(line)
        corpus[r["_id"]] = f"{r['title']}. {r['text']}" if r.get("title") else r["text"]
    for line in (folder / "queries.jsonl").read_text().splitlines():
        r = json.loads(line)
        queries[r["_id"]] = r["text"]
    return corpus, queries


@pytest.fixture(scope="module")
def distinct_passages(small_beir, tiny_models, tmp_path_factory):
    """small_beir without passages that another passage repeats as the embedder sees it (the same
    tokens once cut to the run's max_length; distinct texts with a long shared opening tie too):
    the retriever's order over such ties depends on last-bit embedding noise, which varies with
    batch shapes and CPU kernels, so no independent check can reproduce it."""
    from sentence_transformers import SentenceTransformer

    from tests.conftest import write_beir

    tokenizer = SentenceTransformer(tiny_models["embedder"], device="cpu").tokenizer
    max_length = _params(small_beir, tiny_models, "")["max_length"]
    corpus, queries = _corpus_and_queries(small_beir)
    raw = {}
    for line in (small_beir / "corpus.jsonl").read_text().splitlines():
        r = json.loads(line)
        raw[r["_id"]] = (r.get("title", ""), r["text"])
    seen, keep = set(), {}
    for d, text in corpus.items():
        tokens = tuple(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        if tokens not in seen:
            seen.add(tokens)
            keep[d] = raw[d]
    qrels = {}
    for split in ("train", "dev", "test"):
        rows = [line.split("\t") for line in (small_beir / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]]
        qrels[split] = [(q, d, int(s)) for q, d, s in rows if d in keep]
    used = {q for rows in qrels.values() for q, _, _ in rows}
    return write_beir(tmp_path_factory.mktemp("distinct") / "beir", {q: queries[q] for q in used}, keep, qrels)


def _check_script():
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("check_metrics", REPO / "scripts" / "check_metrics.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    return check


def test_the_independent_check_counts_queries_whose_retriever_scores_tie_in_the_top_k():
    """A tie decides the order only down to the (k+1)-th score: one below it does not count."""
    top_k = _check_script().retriever_top_k
    sims = np.array([
        [0.9, 0.8, 0.8, 0.1, 0.0],  # tied inside the top-2
        [0.9, 0.8, 0.7, 0.7, 0.0],  # tied at the boundary: 3rd and 4th for k = 3
        [0.9, 0.8, 0.7, 0.1, 0.1],  # tied at the 4th and 5th: below the (k+1)-th for k = 3
        [0.5, 0.9, 0.2, 0.3, 0.2 + 5e-7],  # unsorted; within 1e-6 at the 4th and 5th
    ])
    assert [top_k(sims, k)[1] for k in (2, 3, 4)] == [1, 2, 4]
    assert top_k(sims[:, :1], 1)[1] == 0
    # The top k is the retriever's order, ties kept in column order.
    assert top_k(sims, 3)[0].tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [1, 0, 3]]


def test_metrics_equal_an_independent_rerank_of_the_true_top_k(distinct_passages, tiny_models, tmp_path):
    """metrics.json against scripts/check_metrics.py, a plain script that shares no code with the
    pipeline: the retriever's own top-k by exact search over sentence-transformers embeddings,
    ir-measures over every test judgment (a positive outside the top-k is a miss), and the
    published student reranking those candidates with CrossEncoder.predict. Timing covers only
    the first test queries, so the student's scores come from the timing for
    those and from the quality pass for the rest."""
    check = _check_script()
    out = tmp_path / "run"
    # A short list, so that the retriever misses some positives.
    assert _build(tasks.TrainStudent(**_params(distinct_passages, tiny_models, out, rerank_top_k=5, timing_queries=3)))
    got = check.independent_metrics(out)
    assert got["tied_queries"] == 0  # what distinct_passages is for
    for name, tolerance in check.TOLERANCE.items():
        assert got["reported"][name] == pytest.approx(got[name], abs=tolerance), name

    # The check has teeth: some positives sit outside the top-k (an appended positive would have
    # lifted every ranker), and some inside (the metric is not 0 for every ranker).
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["test_queries_with_positive_in_top_k"] < metrics["test_queries"]
    assert metrics["speed"]["queries"] == 3 < metrics["test_queries"]
    assert got["retriever"] > 0
    assert set(metrics["significance"]) >= {"student vs retriever", "teacher vs retriever"}
    assert all(0.0 <= t["p_value"] <= 1.0 for t in metrics["significance"].values())
    # Every reported paired test follows from the per-query figures, by scipy's own t-test; a
    # tampered p-value is caught.
    assert got["significance_off"] == []
    key = next(k for k, t in metrics["significance"].items() if 0 < t["p_value"] < 1)
    metrics["significance"][key]["p_value"] *= 1.01
    assert check.significance_agrees(metrics) == [key]


def test_unjudged_queries_train_the_student_with_teacher_labels(small_beir, tiny_models, tmp_path):
    """Training queries whose judgments are withheld, half of them left in queries.jsonl and half
    moved to an --unlabeled-queries file: with --max-unjudged-queries -1 they get retrieved
    candidates and teacher labels, the report counts them, and a label-only loss leaves them out
    without asking for teacher scores."""
    import shutil

    import pyarrow.parquet as pq

    data = tmp_path / "partly-judged"
    shutil.copytree(small_beir, data)
    lines = (data / "qrels" / "train.tsv").read_text().splitlines()
    qids = list(dict.fromkeys(x.split("\t")[0] for x in lines[1:]))
    withheld = set(qids[-10:])
    (data / "qrels" / "train.tsv").write_text("\n".join(x for x in lines if x.split("\t")[0] not in withheld) + "\n")
    queries = [json.loads(x) for x in (data / "queries.jsonl").read_text().splitlines()]
    moved = set(qids[-5:])
    (data / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] not in moved))
    unlabeled = tmp_path / "unlabeled.jsonl"
    unlabeled.write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] in moved))

    out = tmp_path / "run"
    prepare_data(data, tmp_path / "norm", unlabeled)
    with pytest.raises(PipelineError, match="5 queries from --unlabeled-queries, but --max-unjudged-queries is 0"):
        mine_hard_negatives(tmp_path / "norm", tmp_path / "mined", MineConfig(embedder=tiny_models["embedder"], cache_dir=str(tmp_path / "cache")))
    assert _build(tasks.TrainStudent(**_params(data, tiny_models, out, max_unjudged_queries=-1, unlabeled_queries=str(unlabeled))))
    groups = pq.read_table(next(out.glob("mined/*/groups.parquet"))).to_pydict()
    unjudged = {q for q, p in zip(groups["query_id"], groups["positive_ids"]) if not p}
    assert unjudged == withheld
    assert all(len(n) == 3 + 1 for q, n in zip(groups["query_id"], groups["negative_ids"]) if q in unjudged)
    metrics = json.loads((out / "metrics.json").read_text())
    labels = metrics["stages"]["BuildLabels"]
    assert (labels["judged_queries"], labels["unjudged_queries"]) == (len(qids) - 10, 10)
    assert "from 30 judged and 10 unjudged queries" in (out / "report.md").read_text()

    # A fine-tuned teacher learns from the judged queries only.
    ft = tasks.FineTuneTeacher(**_params(data, tiny_models, out, tasks.FineTuneTeacher, max_unjudged_queries=-1,
                                         unlabeled_queries=str(unlabeled),
                                         teacher_backbone=tiny_models["teacher"], teacher_epochs=0.5))
    assert _build(ft)
    ft_stats = json.loads((ft.artifact() / "stats.json").read_text())
    assert (ft_stats["judged_queries"], ft_stats["unjudged_queries"]) == (len(qids) - 10, 0)

    bce = tasks.BuildLabels(**_params(data, tiny_models, out, tasks.BuildLabels, max_unjudged_queries=-1,
                                      unlabeled_queries=str(unlabeled), loss="BinaryCrossEntropyLoss"))
    assert "scores" not in bce.requires()
    assert _build(bce)
    assert json.loads((bce.artifact() / "stats.json").read_text())["unjudged_queries"] == 0


def test_a_dataset_judged_only_for_test_distils_from_a_trained_teacher_alone(small_beir, tiny_models, tmp_path):
    """Most BEIR datasets judge test queries only. With queries nobody judged and a trained
    teacher, the student learns from the teacher's labels alone; a teacher to fine-tune, or a
    label-only baseline, has nothing to learn from and says so."""
    from pipeline.labels import NoRowsError, build_rows
    from pipeline.data import NormalizedTables, read_dataset
    from pipeline.teacher import TeacherConfig, fine_tune_teacher
    from tests.conftest import write_beir

    ds = read_dataset(small_beir)
    test = [(q, d, s) for q, d, s, split in ds.qrels if split == "test"]
    tested = {q for q, _, _ in test}
    data = write_beir(tmp_path / "test-only", {q: t for q, t in ds.queries.items() if q in tested}, ds.corpus, {"test": test})
    unlabeled = tmp_path / "logs.jsonl"
    unlabeled.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in ds.queries.items() if q not in tested))
    out = tmp_path / "run"
    assert _build(tasks.TrainStudent(**_params(data, tiny_models, out, max_unjudged_queries=-1, unlabeled_queries=str(unlabeled))))
    labels = json.loads((out / "metrics.json").read_text())["stages"]["BuildLabels"]
    assert labels["judged_queries"] == 0 and labels["unjudged_queries"] == len(ds.queries) - len(tested) > 0

    # Asked to fine-tune a teacher, the run stops while luigi schedules it, before mining embeds a thing.
    fine_tune = tmp_path / "fine-tune"
    teacher_to_train = dict(teacher="", teacher_backbone=tiny_models["embedder"])
    assert not _build(tasks.TrainStudent(**_params(data, tiny_models, fine_tune, max_unjudged_queries=-1,
                                                   unlabeled_queries=str(unlabeled), **teacher_to_train)))
    assert not (fine_tune / "mined").exists() and not (fine_tune / "data").exists()
    # So does a label-only student to compare with (the demo's luigi.cfg asks for one).
    assert not _build(tasks.TrainStudent(**_params(data, tiny_models, fine_tune, max_unjudged_queries=-1,
                                                   unlabeled_queries=str(unlabeled), label_only_loss="BinaryCrossEntropyLoss")))
    assert not (fine_tune / "mined").exists() and not (fine_tune / "data").exists()
    mined = next(out.glob("mined/*"))
    with pytest.raises(PipelineError, match="no judged training queries to fine-tune a teacher on"):
        fine_tune_teacher(next(out.glob("data/*")), mined, tmp_path / "teacher", TeacherConfig(backbone=tiny_models["teacher"]))
    assert not (tmp_path / "teacher").exists()
    groups = pq.read_table(mined / "groups.parquet")
    with pytest.raises(NoRowsError, match="takes judged queries only, and none of these"):
        build_rows("pair-binary", groups, None, NormalizedTables(next(out.glob("data/*"))).texts())
    # Without the unjudged queries there is nothing to train on at all.
    prepare_data(data, tmp_path / "norm")
    with pytest.raises(PipelineError, match="no judged training pairs .* and no unjudged queries"):
        mine_hard_negatives(tmp_path / "norm", tmp_path / "m", MineConfig(embedder=tiny_models["embedder"], max_unjudged_queries=-1,
                                                                         cache_dir=str(tmp_path / "cache")))
