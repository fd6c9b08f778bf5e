"""Teacher scoring speed: the project's scorer against CrossEncoder.predict on the same unique pairs.

Two pair sets: demo pairs (each sampled query with its positive and random passages) and a long
tail (passages of log-normally distributed length, a few near max_length), scored in one run by:
``CrossEncoder.predict(pairs, batch_size=32)`` in fp32, the project's scorer in fp32, and the
project's scorer at a faster precision with its fidelity against fp32. Reports pairs/s, the
ratio to predict, the faster scorer's real-text pairs/s against its forward passes alone on
batches tokenized beforehand, and model-FLOP utilisation against this machine's measured matmul peak.

    make bench-score      # writes benchmarks/results/score.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import atomic_file, write_json
from pipeline.data import read_dataset
from pipeline.fidelity import compare, sample_groups
from pipeline.models import cut_student, native_bf16_cpu
from pipeline.scoring import CrossEncoderScorer, quantize_int8


def matmul_peak(precision: str, device: str = "cpu", d: int = 384, seconds: float = 2.0) -> float:
    """GFLOP/s of a matrix product at this precision: encoder-shaped (2048 x d x 4d) on a CPU,
    8192-square on a GPU."""
    if device != "cpu":
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        a = torch.randn(8192, 8192, device=device, dtype=dtype)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            a @ a
            torch.cuda.synchronize()
            n += 1
        return n * 2 * 8192**3 / (time.perf_counter() - t0) / 1e9
    # 2048 rows: the scorer's CPU batch, so the peak is measured where its batches run; best of
    # three windows, since this shared VM's speed drifts.
    x = torch.randn(2048, d)
    lin = torch.nn.Linear(d, 4 * d)
    if precision == "bf16":
        x, lin = x.bfloat16(), lin.bfloat16()
    if precision == "int8":
        lin = quantize_int8(torch.nn.Sequential(lin))
    flops, best = 2 * 2048 * d * 4 * d, 0.0
    with torch.inference_mode():
        lin(x)
        for _ in range(3):
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds / 3:
                lin(x)
                n += 1
            best = max(best, n * flops / (time.perf_counter() - t0) / 1e9)
    return best


def model_flops(lengths, config) -> float:
    """Forward FLOPs of a BERT-style encoder over sequences of these token lengths."""
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    total = 0.0
    for n in lengths:
        total += layers * n * (2 * (4 * d * d + 2 * d * ff) + 4 * n * d)
    return total


def long_tail_pairs(dataset, n: int, seed: int = 1) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    texts = [dataset.passage(d) for d in dataset.corpus]
    queries = list(dataset.queries.values())
    pairs = []
    for i in range(n):
        words = int(min(600, rng.lognormal(mean=3.6, sigma=0.8)))
        start = int(rng.integers(0, len(texts)))
        body = []
        while len(body) < words:
            body += texts[start % len(texts)].split()
            start += 1
        pairs.append((queries[i % len(queries)], " ".join(body[:words])))
    return pairs


def timed(fn, n) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = np.asarray(fn(), np.float32)
    return out, n / (time.perf_counter() - t0)


def pretokenized_pairs_per_s(scorer: CrossEncoderScorer, pairs, device: str) -> float:
    """Pairs/s of the scorer's forward passes alone, on batches tokenized and collated beforehand:
    the ceiling its real-text throughput reaches when tokenization is off the critical path."""
    _, _, collated = scorer.prepare(pairs)

    def forward():
        with torch.inference_mode():
            scores = [scorer.net({k: v.to(device, non_blocking=True) for k, v in f.items()})["scores"] for f in collated]
        return torch.cat(scores).float().cpu().numpy()  # the copy back waits for the device

    return timed(forward, len(pairs))[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/all-MiniLM-L6-v2", help="cross-encoder (or backbone) to time")
    ap.add_argument(
        "--head", default="auto", choices=["auto", "cosine", "mean", "cls"],
        help="head for a backbone (pipeline.models.cut_student): auto gives a sentence-embedding model its "
        "cosine head, whose scores rank, so the fidelity numbers are about a ranking, not a random head's noise",
    )
    ap.add_argument("--dataset", default="data/debian-descriptions")
    ap.add_argument("--pairs", type=int, default=768, help="pairs per set")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument(
        "--fast-precision", default="auto", choices=["auto", "int8", "bf16", "fp16"],
        help="auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, int8 on other CPUs",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", default="benchmarks/results/score")
    args = ap.parse_args()

    if args.fast_precision == "auto":
        args.fast_precision = "bf16" if args.device.startswith("cuda") or native_bf16_cpu() else "int8"
    ds = read_dataset(args.dataset)
    demo, groups = sample_groups(ds, args.pairs // 8, 8)
    sets = {"demo": (demo, groups), "long-tail": (long_tail_pairs(ds, args.pairs), [str(i // 8) for i in range(args.pairs)])}
    ce = cut_student(args.model, 0, args.device, args.max_length, head=args.head)  # 0 layers: keep them all
    tok = ce.tokenizer
    identity = torch.nn.Identity()
    peaks = {p: matmul_peak(p, args.device) for p in ("fp32", args.fast_precision) if p != "int8" or args.device == "cpu"}
    on_gpu = args.device.startswith("cuda")
    processor = torch.cuda.get_device_name(args.device) if on_gpu else platform.processor() or platform.machine()
    results = {"machine": {"cpu": processor, "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "matmul_peak_gflops": peaks}, "sets": {}}

    for name, (pairs, grp) in sets.items():
        lengths = [len(x) for x in tok([p[0] for p in pairs], [p[1] for p in pairs], truncation=True, max_length=args.max_length)["input_ids"]]
        flops = model_flops(lengths, ce.model.config)
        ce.model.float()
        if on_gpu:  # kernels are chosen and loaded per shape on first use: one untimed pass over every shape
            ce.predict(pairs, batch_size=32, show_progress_bar=False)
            CrossEncoderScorer(ce, args.device, torch.float32).score(pairs)
        ref, predict_pps = timed(lambda: ce.predict(pairs, batch_size=32, activation_fn=identity, show_progress_bar=False), len(pairs))
        ours32, ours_pps = timed(lambda: CrossEncoderScorer(ce, args.device, torch.float32).score(pairs), len(pairs))
        fast_scorer = (
            CrossEncoderScorer(ce, args.device, torch.float32, quantize=True)
            if args.fast_precision == "int8"
            else CrossEncoderScorer(cut_student(args.model, 0, args.device, args.max_length, head=args.head), args.device,
                                    torch.bfloat16 if args.fast_precision == "bf16" else torch.float16)
        )
        if on_gpu:
            fast_scorer.score(pairs)
        fast, fast_pps = timed(lambda: fast_scorer.score(pairs), len(pairs))
        pretokenized_pps = pretokenized_pairs_per_s(fast_scorer, pairs, args.device)
        ce.model.float()
        row = {
            "pairs": len(pairs),
            "mean_tokens": float(np.mean(lengths)),
            "max_tokens": int(np.max(lengths)),
            "predict_fp32_pairs_per_s": predict_pps,
            "ours_fp32_pairs_per_s": ours_pps,
            f"ours_{args.fast_precision}_pairs_per_s": fast_pps,
            "ratio_fp32": ours_pps / predict_pps,
            f"ratio_{args.fast_precision}": fast_pps / predict_pps,
            f"ours_{args.fast_precision}_pretokenized_pairs_per_s": pretokenized_pps,
            "real_text_over_pretokenized": fast_pps / pretokenized_pps,
            "ours_fp32_matches_predict_max_abs": float(np.max(np.abs(ours32 - ref))),
            f"fidelity_{args.fast_precision}": compare(ref, fast, grp),
        }
        if fp32_peak := peaks.get("fp32"):
            per_pair = flops / len(pairs)
            row["mfu_predict_fp32"] = predict_pps * per_pair / 1e9 / fp32_peak
            row["mfu_ours_fp32"] = ours_pps * per_pair / 1e9 / fp32_peak
            if args.fast_precision in peaks:
                row[f"mfu_ours_{args.fast_precision}"] = fast_pps * per_pair / 1e9 / peaks[args.fast_precision]
        results["sets"][name] = row
        print(json.dumps({name: row}, indent=1))

    out = Path(args.results)
    write_json(out.with_suffix(".json"), results)
    fp = args.fast_precision
    lines = [
        f"`make bench-score` on {results['machine']['cpu']}, {results['machine']['threads']} threads, torch {torch.__version__}; "
        f"measured matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()) + ".",
        "",
        f"| pairs | mean tokens | predict fp32 pairs/s | ours fp32 | ours {fp} | ratio fp32 | ratio {fp} | ours {fp} pre-tokenized | real text / pre-tokenized | MFU predict / ours fp32 / ours {fp} | {fp} Spearman scores / margins | {fp} max abs diff scores / margins |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for name, r in results["sets"].items():
        f = r[f"fidelity_{fp}"]
        mfu = " / ".join(f"{r.get(k, float('nan')):.0%}" for k in ("mfu_predict_fp32", "mfu_ours_fp32", f"mfu_ours_{fp}"))
        lines.append(
            f"| {name} ({r['pairs']}) | {r['mean_tokens']:.0f} | {r['predict_fp32_pairs_per_s']:.1f} | {r['ours_fp32_pairs_per_s']:.1f} | "
            f"{r[f'ours_{fp}_pairs_per_s']:.1f} | {r['ratio_fp32']:.2f}x | {r[f'ratio_{fp}']:.2f}x | "
            f"{r[f'ours_{fp}_pretokenized_pairs_per_s']:.1f} | {r['real_text_over_pretokenized']:.0%} | {mfu} | "
            f"{f['scores']['spearman']:.5f} / {f['margins']['spearman']:.5f} | {f['scores']['max_abs_diff']:.4f} / {f['margins']['max_abs_diff']:.4f} |"
        )
    with atomic_file(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
