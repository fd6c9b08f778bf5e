"""Model registry for scheduled retraining: run history, the promotion gate, and ``current``.

Layout of a registry folder::

    history.jsonl        one JSON line per event: a finished run, a failed run, a rollback
    runs/<run>.json      the record of a finished run (its presence marks the run done)
    students/<run>/      a copy of every promoted student, with fusion.json: the weight of its
                         fusion with the retriever that its evaluation chose
    current -> students/<run>    the champion a serving process loads
    report.md            the history as a table

``current`` is swapped atomically (a new link renamed over the old one), so a reader sees the
old champion or the new one, never a missing path.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path

from pipeline.artifacts import atomic_dir, atomic_file, exclusive, point_link, write_json
from pipeline.errors import PipelineError
from pipeline.fusion import FUSION_FILE

log = logging.getLogger(__name__)


GATE_SPLIT = "dev"  # never the reported test split: the gate must not choose on what is reported


def gate_decision(
    challenger: float, champion: float | None, tolerance: float, retriever: float | None = None
) -> tuple[bool, str]:
    """Promote a challenger that beats the retriever's own order (when given) and is not worse
    than the champion's nDCG@10 by more than ``tolerance``."""
    if retriever is not None and not challenger > retriever:
        return False, f"challenger {challenger:.4f} does not beat the retriever's own order {retriever:.4f}"
    if champion is None:
        return True, "no champion yet"
    if challenger >= champion - tolerance:
        return True, f"challenger {challenger:.4f} >= champion {champion:.4f} - tolerance {tolerance:g}"
    return False, f"challenger {challenger:.4f} < champion {champion:.4f} - tolerance {tolerance:g}"


class Registry:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def history_path(self) -> Path:
        return self.root / "history.jsonl"

    def history(self) -> list[dict]:
        if not self.history_path.exists():
            return []
        with open(self.history_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def run_record(self, run: str) -> Path:
        return self.root / "runs" / f"{run}.json"

    def champions(self) -> list[dict]:
        """Promoted runs still standing, oldest first: promotions push, rollbacks pop."""
        stack: list[dict] = []
        for event in self.history():
            if event.get("status") == "finished" and event.get("promoted"):
                stack.append(event)
            elif event.get("status") == "rollback" and stack:
                stack.pop()
        return stack

    def champion(self) -> dict | None:
        stack = self.champions()
        return stack[-1] if stack else None

    def lock(self):
        """Held while a run is gated and recorded (``promote_or_keep``) or a rollback is made: the
        champion a decision reads stays the champion until the decision is written."""
        return exclusive(self.root / ".lock")

    def current(self) -> Path | None:
        link = self.root / "current"
        return link.resolve() if link.exists() else None

    def _append(self, event: dict) -> None:
        # One short line per event, appended with O_APPEND: concurrent writers never interleave
        # inside a line, and earlier lines are never rewritten.
        self.root.mkdir(parents=True, exist_ok=True)
        event = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **event}
        line = json.dumps(event, sort_keys=False, default=str) + "\n"
        fd = os.open(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.write_report()

    def record_run(self, run: str, record: dict, student_dir: str | os.PathLike) -> dict:
        """Append a finished run; when promoted, copy its student in and point ``current`` at it."""
        event = {"run": run, "status": "finished", **record}
        if record.get("promoted"):
            target = self.root / "students" / run
            if not target.exists():
                with atomic_dir(target) as tmp:
                    shutil.copytree(Path(student_dir).resolve(), tmp, dirs_exist_ok=True)
                    if record.get("fusion"):
                        write_json(tmp / FUSION_FILE, record["fusion"])
            event["registry_student"] = str(target)
            point_link(self.root / "current", target)
        self._append(event)
        write_json(self.run_record(run), event)  # last: it marks the run done
        return event

    def record_failure(self, run: str, stage: str, error: str) -> None:
        self._append({"run": run, "status": "failed", "stage": stage, "error": error[:500]})

    def rollback(self, retire: str = "") -> dict:
        """Point ``current`` back to the champion before this one. With ``retire`` (a run name),
        only when that run is the champion: a repeated rollback then changes nothing."""
        with self.lock():
            return self._rollback(retire)

    def _rollback(self, retire: str) -> dict:
        stack = self.champions()
        if retire and (not stack or stack[-1]["run"] != retire):
            log.info("rollback: %s is not the current champion; nothing to do", retire)
            return {"status": "rollback", "run": stack[-1]["run"] if stack else None, "retired": None}
        if len(stack) < 2:
            raise PipelineError(f"{self.root}: no earlier champion to roll back to ({len(stack)} promoted run(s) standing)")
        retired, back = stack[-1], stack[-2]
        point_link(self.root / "current", self.root / "students" / back["run"])
        event = {"status": "rollback", "run": back["run"], "retired": retired["run"]}
        self._append(event)
        log.info("rolled back: current is %s again (retired %s)", back["run"], retired["run"])
        return event

    def write_report(self) -> None:
        lines = [
            "# Registry history",
            "",
            f"current: `{os.readlink(self.root / 'current') if (self.root / 'current').is_symlink() else 'none'}`",
            "",
            "| time | run | status | challenger nDCG@10 (dev) | champion | retriever | decision | fusion weight | stage / note |",
            "|---|---|---|---:|---:|---:|---|---:|---|",
        ]
        for e in self.history():
            gate = e.get("gate", {})
            fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
            decision = {True: "promoted", False: "kept champion"}.get(e.get("promoted"), "")
            if e.get("status") == "failed":
                note = f"failed in {e.get('stage')}: {e.get('error', '')[:80]}"
            elif e.get("status") == "rollback":
                note = f"current back to {e.get('run')}, retired {e.get('retired')}"
            else:
                note = gate.get("reason", "")
            lines.append(
                f"| {e.get('time', '')} | {e.get('run', '')} | {e.get('status')} | {fmt(gate.get('challenger'))} | "
                f"{fmt(gate.get('champion'))} | {fmt(gate.get('retriever'))} | {decision} | {(e.get('fusion') or {}).get('weight', '')} | {note} |"
            )
        with atomic_file(self.root / "report.md") as tmp:
            tmp.write_text("\n".join(lines) + "\n")


def gate_ndcg(
    model_dirs: dict[str, str | os.PathLike],
    data_dir,
    mined_dir,
    device: str = "cpu",
    precision: str = "auto",
    max_length: int = 256,
    max_queries: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """nDCG@10 of the retriever's own order and of each model reranking the same dev candidates
    of the gate dataset (the retriever's true top-k).

    With ``cache_dir``, a model's scores are kept under its content hash, the precision, the
    length and the exact pairs: a champion gated again on the same candidates (the next date's
    gate, when it was the challenger of this one) is not rescored."""
    import numpy as np

    from pipeline.artifacts import fingerprint
    from pipeline.data import pair_texts
    from pipeline.evaluation import judged_candidates, pairs_digest, ranking_metrics, to_run
    from pipeline.mining import ds_source
    from pipeline.models import load_cross_encoder, model_identity, resolve_precision
    from pipeline.scoring import CrossEncoderScorer

    found = judged_candidates(data_dir, mined_dir, GATE_SPLIT, max_queries or None)
    if found is None:
        raise PipelineError(
            f"{ds_source(data_dir)}: no {GATE_SPLIT} judgments (qrels/{GATE_SPLIT}.tsv) to gate promotion on; the gate "
            "never judges on the reported test split: add a dev split or pass --gate-dataset"
        )
    qrels, qids, dids, retrieval = found
    pairs = pair_texts(data_dir, qids, dids)
    dtype = resolve_precision(precision, device)
    out = {"retriever": ranking_metrics(to_run(qids, dids, retrieval), qrels)["ndcg@10"]}
    digest = pairs_digest(qids, dids, pairs)
    for name, model in model_dirs.items():
        kept = Path(cache_dir) / f"{fingerprint(model_identity(str(model)), device, str(dtype), max_length, digest)}.npy" if cache_dir else None
        if kept is not None and kept.is_file():
            scores = np.load(kept)
        else:
            scorer = CrossEncoderScorer(load_cross_encoder(str(model), device, max_length), device, dtype)
            scores = np.asarray(scorer.score(pairs, desc=f"gate: {name}"), np.float32)
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                with atomic_file(kept) as tmp, open(tmp, "wb") as f:
                    np.save(f, scores)
        out[name] = ranking_metrics(to_run(qids, dids, scores), qrels)["ndcg@10"]
    return out


def promote_or_keep(
    registry: str | os.PathLike,
    run: str,
    student_dir: str | os.PathLike,
    metrics_path: str | os.PathLike,
    gate_data_dir,
    gate_mined_dir,
    tolerance: float,
    record: dict,
    device: str = "cpu",
    precision: str = "auto",
    max_length: int = 256,
    max_queries: int = 0,
    gate_on_retriever: bool = True,
) -> dict:
    """Stage entry: gate the run's student against the retriever and the champion on the gate
    set's dev split, record the run, and promote it when the gate allows."""
    reg = Registry(registry)
    # Under the lock, the champion read here stays the champion until this run is recorded.
    with reg.lock():
        champion = reg.champion()
        models = {"challenger": student_dir}
        if champion:
            models["champion"] = champion["registry_student"]
        scores = gate_ndcg(models, gate_data_dir, gate_mined_dir, device, precision, max_length, max_queries, reg.root / "gate-scores")
        promoted, reason = gate_decision(
            scores["challenger"], scores.get("champion"), tolerance, scores["retriever"] if gate_on_retriever else None
        )
        gate = {
            "split": GATE_SPLIT,
            "challenger": scores["challenger"],
            "champion": scores.get("champion"),
            "retriever": scores["retriever"],
            "champion_run": champion["run"] if champion else None,
            "tolerance": tolerance,
            "reason": reason,
        }
        log.info("promotion gate for %s: %s -> %s", run, reason, "promoted" if promoted else "kept the champion")
        metrics = json.loads(Path(metrics_path).read_text())
        # The evaluation writes the student's fusion record beside its metrics.
        fusion_file = Path(metrics_path).with_name(FUSION_FILE)
        fusion = json.loads(fusion_file.read_text()) if fusion_file.is_file() else None
        event = reg.record_run(
            run,
            {**record, "promoted": promoted, "gate": gate, "metrics": metrics.get("test"), "stages": metrics.get("stages"),
             "timings": metrics.get("timings"), "fusion": fusion, "student": str(Path(student_dir).resolve())},
            student_dir,
        )
        return event
