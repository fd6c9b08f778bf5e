"""Scheduled retraining: dated runs share caches, a worse challenger is not promoted, a failed
stage leaves current alone and is recorded, rollback restores the previous champion."""

from __future__ import annotations

import datetime
import json
import shutil
import time

import luigi
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import dag_params
from pipeline.artifacts import read_json
from pipeline.fusion import fusion_weight
from pipeline.registry import Registry, gate_decision
from tasks import RangeDaily, RetrainStudent

D1, D2, D3, D4, D5 = (datetime.date(2026, 11, d) for d in (24, 25, 26, 27, 28))


def _retrain(snapshots, tiny_models, root, date, **over):
    # Random tiny students rarely beat a random tiny retriever: the promotion flow is tested with
    # the retriever check off, and the check itself in test_student_that_does_not_beat_the_retriever_is_kept_out.
    over = {"gate_on_retriever": False, **over}
    params = dag_params(
        str(snapshots / "{date}"), tiny_models, root / "runs", RetrainStudent, registry=str(root / "registry"), **over
    )
    task = RetrainStudent(date=date, **params)
    t0 = time.perf_counter()
    ok = luigi.build([task], local_scheduler=True, workers=1, log_level="WARNING")
    return ok, time.perf_counter() - t0


def _drop_train_queries(folder, n):
    """Remove the last ``n`` training queries' judgments and texts (the 'earlier' snapshot)."""
    lines = (folder / "qrels" / "train.tsv").read_text().splitlines()
    qids = list(dict.fromkeys(line.split("\t")[0] for line in lines[1:]))
    gone = set(qids[-n:])
    (folder / "qrels" / "train.tsv").write_text("\n".join(line for line in lines if line.split("\t")[0] not in gone) + "\n")
    rows = [json.loads(x) for x in (folder / "queries.jsonl").read_text().splitlines()]
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["_id"] not in gone))
    return gone


@pytest.fixture(scope="module")
def retrained(small_beir, tiny_models, tmp_path_factory):
    """Two dates: the second adds 10% new training queries; the second is promoted with a wide tolerance."""
    root = tmp_path_factory.mktemp("retrain")
    snapshots = root / "snapshots"
    shutil.copytree(small_beir, snapshots / D1.isoformat())
    shutil.copytree(small_beir, snapshots / D2.isoformat())
    new = _drop_train_queries(snapshots / D1.isoformat(), 4)
    ok1, t1 = _retrain(snapshots, tiny_models, root, D1)
    ok2, t2 = _retrain(snapshots, tiny_models, root, D2, promotion_tolerance=1.0)
    assert ok1 and ok2
    print(f"\nretrain wall time: first date {t1:.1f} s, second date (+10% queries) {t2:.1f} s")
    return root, snapshots, new


def _record(root, date):
    return json.loads((root / "registry" / "runs" / f"{date.isoformat()}.json").read_text())


def test_second_date_scores_only_new_pairs(retrained):
    root, _, new = retrained
    second = _record(root, D2)
    groups = pq.read_table(next((root / "runs" / D2.isoformat() / "mined").iterdir()) / "groups.parquet").to_pydict()
    new_pairs = {(q, d) for q, p, n in zip(groups["query_id"], groups["positive_ids"], groups["negative_ids"]) if q in new for d in p + n}
    old_pairs = {(q, d) for q, p, n in zip(groups["query_id"], groups["positive_ids"], groups["negative_ids"]) if q not in new for d in p + n}
    scoring = second["stages"]["ScoreWithTeacher"]
    assert len(new_pairs) > 0
    assert scoring["pairs_scored"] == len(new_pairs)
    assert scoring["pairs_from_cache"] == len(old_pairs)
    # Mining embedded only the new query texts; the corpus came from the shared cache.
    assert second["stages"]["MineHardNegatives"]["texts_embedded"] == len(new)
    assert _record(root, D1)["stages"]["ScoreWithTeacher"]["pairs_from_cache"] == 0
    assert set(second["timings"]) >= {"MineHardNegatives", "ScoreWithTeacher", "FitStudent"}


def test_second_date_trains_the_champion_further_on_its_new_queries(retrained, tiny_models, monkeypatch):
    from datasets import load_from_disk

    root, snapshots, new = retrained
    first, second = _record(root, D1), _record(root, D2)
    champion = root / "registry" / "students" / D1.isoformat()
    fit = second["stages"]["FitStudent"]
    assert "warm_start" not in first["stages"]["FitStudent"] and first["student_started_from"] == tiny_models["student"]
    assert fit["warm_start"] == second["student_started_from"] == str(champion)
    # Every row of a new query trains, and as many rows of seen queries are replayed.
    labels = next((root / "runs" / D2.isoformat() / "labels").iterdir()) / "dataset"
    from pipeline.data import load_normalized

    ds = load_normalized(next((root / "runs" / D2.isoformat() / "data").iterdir()))
    new_texts = {ds.queries[q] for q in new}
    rows = load_from_disk(str(labels))
    expected = sum(q in new_texts for q in rows["query"])
    assert 0 < expected < len(rows)
    assert fit["new_rows"] == expected and fit["replayed_rows"] == expected and fit["rows"] == 2 * expected
    assert fit["rows_available"] == len(rows)

    # A later date continues whichever champion stands; without --continue-champion, or with
    # another student recipe, it trains a new student on its whole snapshot.
    params = dag_params(str(snapshots / "{date}"), tiny_models, root / "runs", RetrainStudent, registry=str(root / "registry"))
    later = datetime.date(2026, 12, 1)
    assert RetrainStudent(date=later, **params).requires()["run"].warm_start == str(root / "registry" / "students" / D2.isoformat())
    assert RetrainStudent(date=later, continue_champion=False, **params).requires()["run"].warm_start == ""
    other = {**params, "student_layers": params.get("student_layers", 2) + 1}
    assert RetrainStudent(date=later, **other).requires()["run"].warm_start == ""

    # A champion recorded before --student-speedup existed was made without one: it is continued,
    # and not by a run that measures its depth.
    from pipeline.registry import Registry

    record = Registry(str(root / "registry")).champion()
    older = {**record, "params": {k: v for k, v in record["params"].items() if k != "student_speedup"}}
    assert "student_speedup" in record["params"]
    monkeypatch.setattr(Registry, "champion", lambda self: older)
    assert RetrainStudent(date=later, **params).requires()["run"].warm_start == str(root / "registry" / "students" / D2.isoformat())
    assert RetrainStudent(date=later, **{**params, "student_speedup": 3.0}).requires()["run"].warm_start == ""


def test_unchanged_rankers_are_not_rescored_on_a_later_date(retrained, monkeypatch, tmp_path):
    """The second date's test candidates are the first's: its retriever, teacher and untrained
    scores come from the first date's evaluation (their speed is timed again, in turns with the
    new student). A champion gated again on the same candidates
    is read back, not rescored."""
    import pipeline.scoring
    from pipeline.registry import gate_ndcg

    root, _, _ = retrained

    def evaluation(date):
        return json.loads(next((root / "runs" / date.isoformat() / "eval").glob("*/metrics.json")).read_text())

    assert not evaluation(D1)["baselines_from_cache"] and evaluation(D2)["baselines_from_cache"]
    quality = ("ndcg@10", "mrr@10", "map")
    for name in ("retriever", "teacher", "student_untrained"):
        assert {k: evaluation(D2)["test"][name][k] for k in quality} == {k: evaluation(D1)["test"][name][k] for k in quality}
        assert evaluation(D2)["test"][name]["pairs_per_second"] > 0  # speed is measured again, beside the new student

    data, mined = (next((root / "runs" / D2.isoformat() / stage).iterdir()) for stage in ("data", "mined"))
    champion = {"champion": root / "registry" / "students" / D1.isoformat()}
    first = gate_ndcg(champion, data, mined, max_length=64, cache_dir=tmp_path / "gate-scores")
    monkeypatch.setattr(pipeline.scoring, "CrossEncoderScorer", lambda *a, **k: pytest.fail("rescored"))
    assert gate_ndcg(champion, data, mined, max_length=64, cache_dir=tmp_path / "gate-scores") == first
    with pytest.raises(pytest.fail.Exception):  # another length scores other token windows
        gate_ndcg(champion, data, mined, max_length=32, cache_dir=tmp_path / "gate-scores")


def test_promotion_history_and_rerun_does_nothing(retrained, tiny_models):
    root, snapshots, _ = retrained
    reg = Registry(root / "registry")
    first, second = _record(root, D1), _record(root, D2)
    assert first["promoted"] and first["gate"]["champion"] is None
    assert second["promoted"] and second["gate"]["champion_run"] == D1.isoformat()
    assert reg.current() == (root / "registry" / "students" / D2.isoformat()).resolve()
    assert (reg.current() / "config.json").exists()
    # The champion carries the fusion weight its own evaluation chose, for a server that fuses it.
    chosen = json.loads((root / "runs" / D2.isoformat() / "metrics.json").read_text())["fusion"]["student"]["weight"]
    assert fusion_weight(reg.current()) == chosen == second["fusion"]["weight"]
    assert fusion_weight(root / "registry" / "students" / D1.isoformat()) == first["fusion"]["weight"]
    events = len(reg.history())
    ok, _ = _retrain(snapshots, tiny_models, root, D2)
    assert ok and len(reg.history()) == events
    # RangeDaily asks only for dates not yet done.
    of_params = {k: v for k, v in dag_params(str(snapshots / "{date}"), tiny_models, root / "runs", RetrainStudent,
                                             registry=str(root / "registry")).items()}
    earlier = datetime.date(2026, 11, 23)
    missing = RangeDaily(of=RetrainStudent, start=earlier, stop=D3, of_params=of_params).requires()
    assert [t.date for t in missing] == [earlier]
    report = (root / "registry" / "report.md").read_text()
    assert f"| {D1.isoformat()} | finished |" in report and f"| {D2.isoformat()} | finished |" in report


def _gate_set(root, snapshots, name, scores_of):
    """A copy of the second date's snapshot whose dev judgments mark, for each dev query, the
    candidate that ``scores_of(ds, query id, candidate ids, retrieval scores)`` scores highest
    among the retriever's top-k. Queries whose best two are within 1e-6 are left unjudged, so that
    no tie-break decides what is "first"."""
    from pipeline.data import read_dataset

    gate = root / name
    shutil.copytree(snapshots / D2.isoformat(), gate)
    ds = read_dataset(gate)
    cands = pq.read_table(next((root / "runs" / D2.isoformat() / "mined").iterdir()) / "candidates-dev.parquet").to_pydict()
    lines = ["query-id\tcorpus-id\tscore"]
    for q, docs, retrieval in zip(cands["query_id"], cands["doc_ids"], cands["scores"]):
        scores = np.asarray(scores_of(ds, q, docs, retrieval), np.float64)
        first, second = np.sort(scores)[::-1][:2]
        if first - second > 1e-6:
            lines.append(f"{q}\t{docs[int(np.argmax(scores))]}\t1")
    assert len(lines) > 2, "too few untied dev queries for a gate set"
    (gate / "qrels" / "dev.tsv").write_text("\n".join(lines) + "\n")
    return gate


def test_worse_challenger_is_not_promoted_then_rollback(retrained, tiny_models):
    root, snapshots, _ = retrained
    reg = Registry(root / "registry")
    champion = reg.current()
    # A gate set on which the champion is perfect: each dev query's judged passage is the
    # champion's own first choice among the candidates, scored as the gate scores: in fp32, since
    # a tiny random model's scores tie in bf16.
    import torch

    from pipeline.models import load_cross_encoder
    from pipeline.scoring import CrossEncoderScorer

    ce = CrossEncoderScorer(load_cross_encoder(str(champion), "cpu", 64), "cpu", torch.float32)
    gate = _gate_set(
        root, snapshots, "gate", lambda ds, q, docs, _: ce.score([(ds.queries[q], ds.passage(d)) for d in docs]),
    )

    # The challenger: one layer, trained on inverted margins.
    shutil.copytree(snapshots / D2.isoformat(), snapshots / D3.isoformat())
    ok, _ = _retrain(
        snapshots, tiny_models, root, D3, gate_dataset=str(gate), student_layers=1, label_scale=-20.0, score_precision="fp32"
    )
    assert ok
    third = _record(root, D3)
    assert third["gate"]["champion"] == pytest.approx(1.0)
    assert third["gate"]["challenger"] < 1.0
    assert not third["promoted"]
    assert reg.current() == champion

    # Rollback: current goes back to the first date's student.
    params = dag_params(str(snapshots / "{date}"), tiny_models, root / "runs", RetrainStudent, registry=str(root / "registry"))
    assert luigi.build([RetrainStudent(rollback=True, **params)], local_scheduler=True, workers=1, log_level="WARNING")
    assert reg.current() == (root / "registry" / "students" / D1.isoformat()).resolve()
    assert reg.history()[-1]["status"] == "rollback" and reg.history()[-1]["retired"] == D2.isoformat()
    # Retiring D2 again changes nothing: a rollback that names its champion is safe to repeat.
    events = len(reg.history())
    again = RetrainStudent(rollback=True, rollback_from=D2.isoformat(), **params)
    assert luigi.build([again], local_scheduler=True, workers=1, log_level="WARNING")
    assert reg.current() == (root / "registry" / "students" / D1.isoformat()).resolve() and len(reg.history()) == events


def test_failed_stage_leaves_current_and_is_recorded(retrained, tiny_models):
    root, snapshots, _ = retrained
    reg = Registry(root / "registry")
    current = reg.current()
    bad = snapshots / D4.isoformat()
    shutil.copytree(snapshots / D2.isoformat(), bad)
    with open(bad / "corpus.jsonl", "a") as f:
        f.write('{"_id": "broken", "text": \n')
    ok, _ = _retrain(snapshots, tiny_models, root, D4)
    assert not ok
    last = reg.history()[-1]
    assert last["run"] == D4.isoformat() and last["status"] == "failed" and last["stage"] == "PrepareData"
    assert "corpus.jsonl" in last["error"]
    assert reg.current() == current
    assert not reg.run_record(D4.isoformat()).exists()


def test_student_that_does_not_beat_the_retriever_is_kept_out(retrained, tiny_models):
    """On a gate set where the retriever's own first choice is the judged passage, no student can
    beat its order: with the default gate the run is recorded and not promoted, however lenient
    the tolerance against the champion."""
    root, snapshots, _ = retrained
    reg = Registry(root / "registry")
    current = reg.current()
    gate = _gate_set(root, snapshots, "gate-retriever-perfect", lambda ds, q, docs, retrieval: retrieval)
    shutil.copytree(snapshots / D2.isoformat(), snapshots / D5.isoformat())
    ok, _ = _retrain(snapshots, tiny_models, root, D5, gate_dataset=str(gate), promotion_tolerance=1.0, gate_on_retriever=True)
    assert ok
    fifth = _record(root, D5)
    assert fifth["gate"]["split"] == "dev"
    assert fifth["gate"]["retriever"] == pytest.approx(1.0)
    assert not fifth["promoted"] and "retriever" in fifth["gate"]["reason"]
    assert reg.current() == current


def test_gate_decision():
    assert gate_decision(0.5, None, 0.0)[0]
    assert gate_decision(0.49, 0.5, 0.02)[0]
    assert not gate_decision(0.47, 0.5, 0.02)[0]
    # The retriever's own order is a bar of its own: a tie does not pass it.
    assert not gate_decision(0.6, None, 0.0, retriever=0.6)[0]
    assert not gate_decision(0.6, 0.5, 1.0, retriever=0.7)[0]
    assert gate_decision(0.61, 0.5, 0.0, retriever=0.6)[0]


def test_an_earlier_dates_fine_tuned_teacher_is_kept_until_it_is_too_old(small_beir, tiny_models, tmp_path):
    """With a fine-tuned teacher, the second date keeps the first date's (same recipe, young
    enough), so the score cache serves every old pair; past --teacher-max-age-days a date
    fine-tunes its own."""
    snapshots = tmp_path / "snapshots"
    for day in (D1, D2, D3):
        shutil.copytree(small_beir, snapshots / day.isoformat())
    new = _drop_train_queries(snapshots / D1.isoformat(), 4)
    fine_tuned = dict(teacher="", teacher_kind="cross-encoder", teacher_backbone=tiny_models["embedder"], teacher_epochs=0.5,
                      promotion_tolerance=1.0)
    assert _retrain(snapshots, tiny_models, tmp_path, D1, **fine_tuned)[0]
    assert _retrain(snapshots, tiny_models, tmp_path, D2, **fine_tuned)[0]
    first_teacher = next((tmp_path / "runs" / D1.isoformat() / "teacher").glob("*/stats.json")).parent
    assert "settings" in read_json(first_teacher / "stats.json")  # the recipe, written inside the folder's rename
    assert not (tmp_path / "runs" / D2.isoformat() / "teacher").exists()
    second = _record(tmp_path, D2)
    assert second["teacher"] == str(first_teacher)
    groups = pq.read_table(next((tmp_path / "runs" / D2.isoformat() / "mined").iterdir()) / "groups.parquet").to_pydict()
    pairs = {(q, d) for q, p, n in zip(groups["query_id"], groups["positive_ids"], groups["negative_ids"]) for d in p + n}
    new_pairs = {(q, d) for q, d in pairs if q in new}
    assert second["stages"]["ScoreWithTeacher"]["pairs_scored"] == len(new_pairs) > 0
    assert second["stages"]["ScoreWithTeacher"]["pairs_from_cache"] == len(pairs - new_pairs)
    # D3 is two days after D1: with a one-day limit the first teacher is too old, so D3 fine-tunes.
    assert _retrain(snapshots, tiny_models, tmp_path, D3, teacher_max_age_days=1, **fine_tuned)[0]
    assert _record(tmp_path, D3)["teacher"] == "fine-tuned on this date"
    assert read_json(next((tmp_path / "runs" / D3.isoformat() / "teacher").glob("*/stats.json")))["settings"]
