"""Check a run's metrics.json against a plain script that shares no code with the pipeline.

The retriever's own top-k comes from exact search over sentence-transformers embeddings
(``encode_query`` / ``encode_document``, which apply the embedder's query and document prompts),
nDCG@10 from ``ir_measures.calc_aggregate`` over every test judgment (a positive outside the top-k
is a miss), and the student's order from ``CrossEncoder.predict`` on those candidates.

    python scripts/check_metrics.py runs/demo            # exits 1 when a figure is off
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# The pipeline reports the retriever exactly (1e-4); the student through its own batching and
# precision, which may move scores in the last bits and so break near-ties (0.005).
TOLERANCE = {"retriever": 1e-4, "student": 0.005}


def read_beir(folder: Path) -> tuple[dict[str, str], dict[str, str], list[tuple[str, str, int]]]:
    """Passages ("title. text"), queries and the test judgments, straight from the files."""
    corpus, queries = {}, {}
    for line in (folder / "corpus.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            corpus[r["_id"]] = f"{r['title']}. {r['text']}" if r.get("title") else r["text"]
    for line in (folder / "queries.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            queries[r["_id"]] = r["text"]
    rows = [x.split("\t") for x in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:] if x.strip()]
    return corpus, queries, [(q, d, int(s)) for q, d, s in rows]


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
    top = {q: np.argsort(-sims[i], kind="stable")[:k] for i, q in enumerate(test_ids)}
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
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
