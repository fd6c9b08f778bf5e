"""Fidelity check: how far scores at a reduced precision are from fp32 on a sample of pairs.

    python -m pipeline.fidelity --model MODEL --dataset DIR --precision bf16 [--sample 512]

Prints Pearson and Spearman correlations and the largest absolute difference, for the scores
and for the margins (positive minus each negative within a query) that MarginMSE distils.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np


def sample_groups(dataset, n_queries: int, docs_per_query: int, seed: int = 0) -> tuple[list, list[str]]:
    """(query, passage) pairs: each sampled query's judged positive first, then random passages."""
    rng = random.Random(seed)
    rel = {}
    for split in ("train", "dev", "test"):
        rel.update(dataset.relevant(split))
    qids = sorted(rel)
    rng.shuffle(qids)
    doc_ids = list(dataset.corpus)
    pairs, groups = [], []
    for q in qids[:n_queries]:
        docs = [next(iter(rel[q]))] + rng.sample(doc_ids, docs_per_query - 1)
        pairs += [(dataset.queries[q], dataset.passage(d)) for d in docs]
        groups += [q] * len(docs)
    return pairs, groups


def compare(reference: np.ndarray, other: np.ndarray, groups: list[str]) -> dict:
    from scipy.stats import pearsonr, spearmanr

    def margins(s):
        out, start = [], 0
        while start < len(groups):
            end = start
            while end < len(groups) and groups[end] == groups[start]:
                end += 1
            out += [s[start] - s[j] for j in range(start + 1, end)]
            start = end
        return np.asarray(out)

    ref_m, oth_m = margins(reference), margins(other)
    return {
        "scores": {
            "pearson": float(pearsonr(reference, other)[0]),
            "spearman": float(spearmanr(reference, other)[0]),
            "max_abs_diff": float(np.max(np.abs(reference - other))),
        },
        "margins": {
            "pearson": float(pearsonr(ref_m, oth_m)[0]),
            "spearman": float(spearmanr(ref_m, oth_m)[0]),
            "max_abs_diff": float(np.max(np.abs(ref_m - oth_m))),
        },
    }


def fidelity(model_ref: str, pairs, groups, precision: str, device: str = "cpu", max_length: int = 256) -> dict:
    from pipeline.scoring import load_teacher, TeacherSpec

    spec = TeacherSpec.parse(model_ref)
    ref = load_teacher(spec, device, "fp32", max_length).score(pairs, groups)
    other = load_teacher(spec, device, precision, max_length).score(pairs, groups)
    return {"precision": precision, "pairs": len(pairs), **compare(ref, other, groups)}


def main() -> None:
    from pipeline.data import read_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="teacher (cross-encoder or bi-encoder), hub id or folder")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--precision", required=True, choices=["bf16", "fp16", "int8", "fp32"])
    ap.add_argument("--sample", type=int, default=512, help="pairs to compare")
    ap.add_argument("--docs-per-query", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    pairs, groups = sample_groups(read_dataset(args.dataset), max(1, args.sample // args.docs_per_query), args.docs_per_query)
    print(json.dumps(fidelity(args.model, pairs, groups, args.precision, args.device, args.max_length), indent=2))


if __name__ == "__main__":
    main()
