"""Check a run's metrics.json against a plain script that shares no code with the pipeline.

The retriever's own top-k comes from exact search over sentence-transformers embeddings
(``encode_query`` / ``encode_document``, which apply the embedder's query and document prompts),
nDCG@10 from ``ir_measures.calc_aggregate`` over every test judgment (a positive outside the top-k
is a miss), the student's order from ``CrossEncoder.predict`` on those candidates, and each
reported paired comparison from ``scipy.stats.ttest_rel`` on the per-query figures.

    python scripts/check_metrics.py runs/demo            # exits 1 when a figure is off
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

# The pipeline reports the retriever exactly (1e-4); the student through its own batching and
# precision, which may move scores in the last bits and so break near-ties (0.005).
TOLERANCE = {"retriever": 1e-4, "student": 0.005}
# Retriever scores closer than this count as tied (last-bit noise is about 1e-7).
TIE = 1e-6


def read_text(path: Path) -> str:
    """A file's text, or its gzipped copy's (``name.gz``) where the plain file is absent."""
    if path.exists():
        return path.read_text(encoding="utf-8-sig")
    with gzip.open(path.with_name(path.name + ".gz"), "rt", encoding="utf-8-sig") as f:
        return f.read()


def read_beir(folder: Path) -> tuple[dict[str, str], dict[str, str], list[tuple[str, str, int]]]:
    """Passages ("title. text"), queries and the test judgments, straight from the files (the
    judgments in BEIR's three columns, with or without the header, or TREC's four)."""
    corpus, queries = {}, {}
    for line in read_text(folder / "corpus.jsonl").splitlines():
        if line.strip():
            r = json.loads(line)
            corpus[r["_id"]] = f"{r['title']}. {r['text']}" if r.get("title") else r["text"]
    for line in read_text(folder / "queries.jsonl").splitlines():
        if line.strip():
            r = json.loads(line)
            queries[r["_id"]] = r["text"]
    judged = []
    for line in read_text(folder / "qrels" / "test.tsv").splitlines():
        cols = line.split("\t") if "\t" in line else line.split()
        if not line.strip() or cols[0].strip() == "query-id":
            continue
        q, d, s = (cols[0], cols[2], cols[3]) if len(cols) == 4 else cols[:3]
        judged.append((q.strip(), d.strip(), int(float(s))))
    return corpus, queries, judged


def retriever_top_k(sims: np.ndarray, k: int, eps: float = TIE) -> tuple[np.ndarray, int]:
    """Each query's top ``k`` columns of ``sims``, best first (ties in column order), and how many
    queries hold two scores within ``eps`` down to the (k+1)-th: passages the embedder sees alike
    (e.g. the same tokens once cut to max_length). Their order is last-bit noise, which batch
    shapes and CPU kernels resolve differently in the pipeline and here."""
    order = np.argsort(-sims, axis=1, kind="stable")[:, : k + 1]
    head = np.take_along_axis(sims, order, axis=1)
    return order[:, :k], int((np.diff(head, axis=1) > -eps).any(axis=1).sum())


def significance_agrees(metrics: dict) -> list[str]:
    """The comparisons of metrics.json that scipy's paired t-test on its per-query nDCG@10 does
    not reproduce (difference, p-value, 95% interval); empty when all agree."""
    from scipy import stats

    per_query = metrics["per_query_ndcg@10"]
    off = []
    for key, t in metrics["significance"].items():
        a, b = key.split(" vs ")
        d = np.asarray(per_query[a], np.float64) - np.asarray(per_query[b], np.float64)
        if not d.any() or len(d) < 2:
            continue
        r = stats.ttest_rel(per_query[a], per_query[b])
        ci = r.confidence_interval(0.95)
        # metrics.json keeps per-query figures to 6 decimals, the tests ran on the unrounded ones.
        if not (np.isclose(t["diff"], d.mean(), rtol=0, atol=1e-6) and np.isclose(t["p_value"], r.pvalue, rtol=1e-4, atol=0)
                and np.allclose(t.get("ci95") or [np.nan] * 2, [ci.low, ci.high], rtol=0, atol=1e-6)):
            off.append(key)
    return off


def independent_metrics(run: Path, device: str = "cpu") -> dict:
    """nDCG@10 of the retriever's true top-k and of the run's student reranking it."""
    import ir_measures
    import torch
    from ir_measures import nDCG
    from sentence_transformers import CrossEncoder, SentenceTransformer

    metrics = json.loads((run / "metrics.json").read_text())
    p = metrics["params"]
    corpus, queries, judged = read_beir(Path(p["dataset"]))
    qrels = [ir_measures.Qrel(q, d, s) for q, d, s in judged]
    test_ids = sorted({q for q, _, _ in judged})
    if p.get("max_eval_queries"):
        raise SystemExit("this check covers runs that evaluate every test query (--max-eval-queries 0)")

    embedder = SentenceTransformer(p["embedder"], device=device)
    embedder.max_seq_length = int(p["max_length"])
    doc_ids = list(corpus)
    docs = embedder.encode_document([corpus[d] for d in doc_ids], normalize_embeddings=True, batch_size=64)
    qv = embedder.encode_query([queries[q] for q in test_ids], normalize_embeddings=True, batch_size=64)
    k = int(p["rerank_top_k"])
    sims = qv @ docs.T
    order, tied = retriever_top_k(sims, k)
    top = dict(zip(test_ids, order))
    retriever_run = [ir_measures.ScoredDoc(q, doc_ids[j], float(sims[i, j])) for i, (q, js) in enumerate(top.items()) for j in js]

    student = CrossEncoder(str(run / "student"), device=device, max_length=int(p["max_length"]), trust_remote_code=True)
    # Scored as the run scored it: in bf16 where the CPU multiplies bf16 natively, else fp32.
    if metrics.get("precision", {}).get("students") == "bf16":
        student.to(torch.bfloat16)
    pairs = [(queries[q], corpus[doc_ids[j]]) for q, js in top.items() for j in js]
    scores = student.predict(pairs, batch_size=64, show_progress_bar=False)
    student_run = [ir_measures.ScoredDoc(q, doc_ids[j], float(s))
                   for (q, j), s in zip(((q, j) for q, js in top.items() for j in js), scores)]
    measure = nDCG @ 10
    return {
        "retriever": ir_measures.calc_aggregate([measure], qrels, retriever_run)[measure],
        "student": ir_measures.calc_aggregate([measure], qrels, student_run)[measure],
        "reported": {name: metrics["test"][name]["ndcg@10"] for name in TOLERANCE},
        "tied_queries": tied,
        "significance_off": significance_agrees(metrics),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="an --output-dir with metrics.json and student/")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    got = independent_metrics(args.run, args.device)
    ok = True
    for name, tol in TOLERANCE.items():
        diff = abs(got[name] - got["reported"][name])
        ok &= diff <= tol
        print(f"{name:10s} metrics.json {got['reported'][name]:.4f}  independent {got[name]:.4f}  |diff| {diff:.5f} "
              f"({'ok' if diff <= tol else 'OFF'}, tolerance {tol:g})")
    if got["tied_queries"]:
        print(f"{got['tied_queries']} test queries have retriever scores tied within {TIE:g} in their top k+1: "
              "their order is last-bit noise, so the retriever may be off by their share without a fault")
    off = got["significance_off"]
    print(f"paired tests: {len(off)} of the reported comparisons not reproduced by scipy" + (f" ({', '.join(off)})" if off else ""))
    sys.exit(0 if ok and not off else 1)


if __name__ == "__main__":
    main()
