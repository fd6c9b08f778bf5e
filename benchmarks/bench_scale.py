"""make bench-scale: the pipeline's own cost at the scale its users run, with a model that costs
nearly nothing.

A synthetic, seeded BEIR folder (``--passages`` passages of about 40 words, ``--queries``
training queries of 6 words drawn from their passage), the tests' 2-layer, 32-wide random
bi-encoder and cross-encoder, and a teacher score cache pre-filled with ``--cache-pairs`` other
pairs. Each stage runs as a luigi process of its own (PrepareData, MineHardNegatives,
ScoreWithTeacher with its shards, BuildLabels), so its wall time and peak RSS are its own. For
scoring it also reports the tokenizer's time, the forward passes', and the pipeline's own
microseconds per pair outside them. A second date adds 10% new queries and reuses the caches.
Separately, one shard's cache lookup is timed against caches of 1M and 10M other pairs,
alternating in one process.

    make bench-scale        # writes benchmarks/results/scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' tiny random models

WORDS = 20_000
PASSAGE_WORDS = 40
QUERY_WORDS = 6
HELD_OUT = 1_000  # dev and test queries each


def write_dataset(folder: Path, passages: int, queries: int, seed: int = 0) -> None:
    """A BEIR folder: Zipf-distributed words; training query ``q<i>`` is drawn from passage ``d<i>``
    and the held-out queries from the last passages, so a later date with more queries has the
    same corpus, the same held-out queries and the same texts for the queries it shares."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(WORDS)])
    ranks = np.minimum(rng.zipf(1.2, size=(passages, PASSAGE_WORDS)) - 1, WORDS - 1)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(passages):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(vocab[ranks[i]])}) + "\n")
    held = {"dev": range(passages - 2 * HELD_OUT, passages - HELD_OUT), "test": range(passages - HELD_OUT, passages)}
    sources = {"train": [(f"q{i}", i) for i in range(queries)], **{s: [(f"{s}{i}", i) for i in r] for s, r in held.items()}}
    with open(folder / "queries.jsonl", "w") as f:
        for rows in sources.values():
            for qid, i in rows:
                pick = np.random.default_rng([seed, i]).permutation(PASSAGE_WORDS)[:QUERY_WORDS]
                f.write(json.dumps({"_id": qid, "text": " ".join(vocab[ranks[i, pick]])}) + "\n")
    for split, rows in sources.items():
        with open(folder / "qrels" / f"{split}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"{qid}\td{i}\t1\n" for qid, i in rows)


def stage(task: str, params: dict, env: dict) -> dict:
    """Run one luigi task in a process of its own; its wall time and peak RSS."""
    import tasks

    names = set(getattr(tasks, task).get_param_names(include_significant=True))
    args = [sys.executable, "-m", "luigi", "--module", "tasks", task, "--local-scheduler", "--workers", "1"]
    for k, v in params.items():
        if k in names:
            args += [f"--{k.replace('_', '-')}", str(v)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0 or ":)" not in out:
        raise SystemExit(f"{task} failed:\n{out[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}


def teacher_cache(teacher: str, cache_root: Path, max_length: int):
    """The score cache the scoring stage will use for ``teacher`` (fp32, ``max_length``)."""
    from pipeline.scoring import ScoreCache, TeacherSpec, load_teacher, member_fingerprint

    loaded = load_teacher(TeacherSpec.parse(teacher), "cpu", "fp32", max_length)
    return ScoreCache(cache_root / "teacher-scores" / member_fingerprint(loaded.identity[0]))


def prefill(cache, pairs: int, seed: int, chunk: int = 5_000_000) -> None:
    rng = np.random.default_rng(seed)
    for start in range(0, pairs, chunk):
        n = min(chunk, pairs - start)
        cache.add(rng.integers(0, 2**63, size=(n, 2), dtype=np.uint64), rng.standard_normal(n).astype(np.float32))
    cache.compact()


def _commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def lookup_times(work: Path, shard_keys: int, sizes=(1_000_000, 10_000_000), repeats: int = 3) -> dict:
    """One shard's lookup (all hits) in caches that also hold ``sizes`` other pairs, A/B alternated."""
    from pipeline.score_cache import ScoreCache

    rng = np.random.default_rng(7)
    wanted = rng.integers(0, 2**63, size=(shard_keys, 2), dtype=np.uint64)
    caches = {}
    for size in sizes:
        cache = ScoreCache(work / f"lookup-{size}")
        shutil.rmtree(cache.folder, ignore_errors=True)
        prefill(cache, size, seed=size)
        cache.add(wanted, np.ones(shard_keys, np.float32))
        cache.compact()
        caches[size] = cache
    times = {size: [] for size in sizes}
    for _ in range(repeats):
        for size, cache in caches.items():
            t0 = time.perf_counter()
            found, _ = cache.lookup(wanted)
            times[size].append(time.perf_counter() - t0)
            assert found.all()
    for cache in caches.values():
        shutil.rmtree(cache.folder, ignore_errors=True)
    return {str(size): {"seconds_median": round(statistics.median(t), 4), "us_per_key": round(statistics.median(t) / shard_keys * 1e6, 3)}
            for size, t in times.items()}


def run_date(name: str, dataset: Path, work: Path, params: dict, env: dict) -> dict:
    out = work / name
    p = {**params, "dataset": str(dataset), "output_dir": str(out)}
    stages = {}
    t0 = time.perf_counter()
    for task in ("PrepareData", "MineHardNegatives", "ScoreWithTeacher", "BuildLabels"):
        stages[task] = stage(task, p, env)
        print(f"[{name}] {task}: {stages[task]}", flush=True)
    wall = time.perf_counter() - t0
    score = json.loads(next((out / "scores").glob("*/stats.json")).read_text())
    pairs = score["pairs_scored"] + score["pairs_from_cache"]
    model = score.get("model_seconds", 0.0)
    waited = score.get("tokenizer_wait_seconds", 0.0)
    stages["ScoreWithTeacher"].update({
        "pairs": pairs,
        "pairs_scored": score["pairs_scored"],
        "pairs_from_cache": score["pairs_from_cache"],
        "tokenize_us_per_pair": round(score.get("tokenize_seconds", 0.0) / max(score["pairs_scored"], 1) * 1e6, 2),
        "model_us_per_pair": round(model / max(score["pairs_scored"], 1) * 1e6, 2),
        "cache_us_per_pair": round(score.get("cache_seconds", 0.0) / max(pairs, 1) * 1e6, 2),
        # The shards' own time (data read, grouping, cache, Arrow writes, batching) outside the
        # forward passes and the waits on the tokenizer thread, per pair of the shards.
        "pipeline_us_per_pair": round((score["stage_seconds"] - model - waited) / max(pairs, 1) * 1e6, 2),
        "shard_seconds": score["stage_seconds"],
    })
    return {"wall_seconds": round(wall, 1), "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300_000)
    ap.add_argument("--cache-pairs", type=int, default=10_000_000, help="other pairs pre-filled in the teacher's cache")
    ap.add_argument("--new-share", type=float, default=0.10, help="new training queries on the second date")
    ap.add_argument("--shard-keys", type=int, default=600_000, help="keys of the lookup comparison")
    ap.add_argument("--work", default="runs/bench-scale")
    ap.add_argument("--results", default="benchmarks/results/scale")
    ap.add_argument("--lookup-only", action="store_true", help="only the lookup comparison, to <results>-lookup.json")
    args = ap.parse_args()
    if args.lookup_only:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        lookups = lookup_times(Path(args.work), args.shard_keys)
        small, large = (lookups[k]["seconds_median"] for k in ("1000000", "10000000"))
        run = {"commit": _commit(), "date": time.strftime("%Y-%m-%d"), **lookups, "ratio_10M_over_1M": round(large / small, 3)}
        # One process's ratio moves by 0.1-0.3 from the next one's: every run is kept, and the
        # median over them is the figure.
        path = Path(f"{args.results}-lookup.json")
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        runs = [*(earlier.get("runs", []) if earlier.get("shard_keys") == args.shard_keys else []), run]
        out = {"shard_keys": args.shard_keys, "runs": runs,
               "ratio_10M_over_1M_median": round(statistics.median(r["ratio_10M_over_1M"] for r in runs), 3)}
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out, indent=2))
        return

    from conftest import make_bi_encoder, make_cross_encoder

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    new = round(args.queries * args.new_share)
    first, second = work / "data" / "date-1", work / "data" / "date-2"
    write_dataset(first, args.passages, args.queries)
    write_dataset(second, args.passages, args.queries + new)
    embedder = str(make_bi_encoder(work / "models" / "embedder", layers=2, seed=1))
    teacher = str(make_cross_encoder(work / "models" / "teacher", layers=2, seed=2))
    print(f"data and models: {time.perf_counter() - t0:.0f}s", flush=True)
    params = dict(
        embedder=embedder, teacher=teacher, student=teacher, cache_dir=str(work / "cache"), max_length=64, teacher_max_length=128,
        score_precision="fp32", score_shards=4, max_unjudged_queries=0, device="cpu",
    )
    cache = teacher_cache(teacher, work / "cache", 128)
    t0 = time.perf_counter()
    prefill(cache, args.cache_pairs, seed=1)
    print(f"cache pre-filled with {len(cache):,} pairs: {time.perf_counter() - t0:.0f}s", flush=True)

    dates = {"date-1": run_date("date-1", first, work, params, env)}
    dates["date-2"] = run_date("date-2", second, work, params, env)
    lookups = lookup_times(work, args.shard_keys)
    small, large = (lookups[k]["seconds_median"] for k in ("1000000", "10000000"))
    result = {
        "passages": args.passages, "train_queries": args.queries, "new_queries_date_2": new,
        "cache_pairs_before_date_1": args.cache_pairs, "cache_pairs_after": len(cache),
        "dates": dates,
        "date_2_cost_share": round(dates["date-2"]["wall_seconds"] / dates["date-1"]["wall_seconds"], 3),
        "lookup_per_shard": {**lookups, "ratio_10M_over_1M": round(large / small, 3)},
        "peak_rss_gib_max": max(s["peak_rss_gib"] for d in dates.values() for s in d["stages"].values()),
        "cpu": os.cpu_count(), "bench_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    results.with_suffix(".md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    lines = [
        f"# make bench-scale: {r['passages']:,} passages, {r['train_queries']:,} training queries, "
        f"{r['cache_pairs_after']:,} pairs in the score cache at the end",
        "",
        "| date | stage | seconds | peak RSS (GiB) |",
        "|---|---|---:|---:|",
    ]
    for date, d in r["dates"].items():
        for name, s in d["stages"].items():
            lines.append(f"| {date} | {name} | {s['seconds']} | {s['peak_rss_gib']} |")
        lines.append(f"| {date} | **all** | **{d['wall_seconds']}** | |")
    lines += ["", "| date | pairs | scored | from cache | tokenize µs/pair | model µs/pair | cache µs/pair | pipeline µs/pair |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for date, d in r["dates"].items():
        s = d["stages"]["ScoreWithTeacher"]
        lines.append(f"| {date} | {s['pairs']:,} | {s['pairs_scored']:,} | {s['pairs_from_cache']:,} | {s['tokenize_us_per_pair']} | "
                     f"{s['model_us_per_pair']} | {s['cache_us_per_pair']} | {s['pipeline_us_per_pair']} |")
    lk = r["lookup_per_shard"]
    lines += ["", f"Date 2 cost {r['date_2_cost_share']:.0%} of date 1. One shard's lookup: "
              f"{lk['1000000']['seconds_median']} s with 1M other pairs, {lk['10000000']['seconds_median']} s with 10M "
              f"(ratio {lk['ratio_10M_over_1M']}). Largest peak RSS of a stage process: {r['peak_rss_gib_max']} GiB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
