"""What the held-out dataset builders share: which items to keep (a hash order, a cap per
family), splits by family (no text of a test family in training), and the BEIR files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SHARE = {"train": 0.7, "dev": 0.1, "test": 0.2}


def keep(family_of: dict[str, str], seed: str, max_items: int, max_family: int) -> list[str]:
    """Names of at most ``max_items`` items, at most ``max_family`` of one family, taken in an
    order set by a hash of the name (so one huge family cannot crowd the others out); sorted."""
    per_family: dict[str, int] = {}
    names = []
    for name in sorted(family_of, key=lambda n: hashlib.sha1(f"{seed}:{n}".encode()).hexdigest()):
        fam = family_of[name]
        if per_family.get(fam, 0) < max_family and len(names) < max_items:
            per_family[fam] = per_family.get(fam, 0) + 1
            names.append(name)
    return sorted(names)


def assign_splits(family_of: dict[str, str], seed: str) -> dict[str, str]:
    """Name -> split. Families, in an order set by a hash, each go to the split furthest below
    its share of ``SHARE``, so a large family cannot skew the sizes."""
    families: dict[str, list[str]] = {}
    for name, fam in family_of.items():
        families.setdefault(fam, []).append(name)
    size = dict.fromkeys(SHARE, 0)
    out = {}
    for fam in sorted(families, key=lambda f: hashlib.sha1(f"{seed}:{f}".encode()).hexdigest()):
        split = min(SHARE, key=lambda s: (size[s] + 1) / SHARE[s])
        size[split] += len(families[fam])
        out.update(dict.fromkeys(families[fam], split))
    return out


def write_beir(out: Path, items: list[tuple[str, str, str, str]]) -> dict[str, int]:
    """``corpus.jsonl``, ``queries.jsonl`` and ``qrels/{train,dev,test}.tsv`` in ``out`` from
    (title, query, passage, split) items, each query judged relevant to its own passage;
    the number of queries per split."""
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    qrels: dict[str, list[str]] = {split: [] for split in SHARE}
    with open(out / "corpus.jsonl", "w") as corpus, open(out / "queries.jsonl", "w") as queries:
        for i, (title, query, passage, split) in enumerate(items):
            pid, qid = f"p{i}", f"q{i}"
            corpus.write(json.dumps({"_id": pid, "title": title, "text": passage}) + "\n")
            queries.write(json.dumps({"_id": qid, "text": query}) + "\n")
            qrels[split].append(f"{qid}\t{pid}\t1")
    for split, rows in qrels.items():
        (out / "qrels" / f"{split}.tsv").write_text("\n".join(["query-id\tcorpus-id\tscore", *rows]) + "\n")
    return {split: len(rows) for split, rows in qrels.items()}
