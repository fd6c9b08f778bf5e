"""Build the demo dataset in data/debian-descriptions from Debian's package description files.

Queries are package synopses, passages are long descriptions, and each query is
judged relevant to its own package. Binary packages that share a first paragraph
(``0ad``, ``0ad-data``, ...) form a family; a family stays inside one split so no
test text leaks into training, and its members are natural hard negatives.

Input: the Translation-<lang> files that ``apt-get update -o Acquire::Languages=en,de,fr,it``
leaves (lz4-compressed) in /var/lib/apt/lists. Output is deterministic for given inputs.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import random
import subprocess
from pathlib import Path

LISTS = "/var/lib/apt/lists"


def read_translation(lang: str) -> dict[str, tuple[str, str, str]]:
    """package -> (description md5, synopsis, long description) for one language."""
    files = sorted(glob.glob(f"{LISTS}/*_debian_dists_bookworm_main_i18n_Translation-{lang}.lz4"))
    if not files:
        raise SystemExit(f"no Translation-{lang} file in {LISTS}; run apt-get update with Acquire::Languages")
    text = subprocess.run(["lz4", "-dc", files[0]], capture_output=True, check=True).stdout.decode("utf-8")
    out = {}
    for block in text.split("\n\n"):
        pkg = md5 = None
        desc_lines: list[str] = []
        for line in block.split("\n"):
            if line.startswith("Package: "):
                pkg = line[9:].strip()
            elif line.startswith("Description-md5: "):
                md5 = line[17:].strip()
            elif line.startswith(f"Description-{lang}: "):
                desc_lines.append(line.split(": ", 1)[1])
            elif line.startswith(" ") and desc_lines:
                desc_lines.append(line[1:])
        if pkg and md5 and desc_lines:
            synopsis = desc_lines[0].strip()
            paragraphs, cur = [], []
            for line in desc_lines[1:]:
                if line.strip() == ".":
                    paragraphs.append(" ".join(cur))
                    cur = []
                else:
                    cur.append(line.strip())
            paragraphs.append(" ".join(cur))
            body = "\n".join(p for p in paragraphs if p)
            out[pkg] = (md5, synopsis, body)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/debian-descriptions")
    ap.add_argument("--families", type=int, default=3200, help="description families to keep")
    ap.add_argument("--max-family", type=int, default=4, help="packages kept per family")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()

    en = read_translation("en")
    families: dict[str, list[str]] = collections.defaultdict(list)
    seen_synopsis = collections.Counter(v[1].lower() for v in en.values())
    for pkg, (_, synopsis, body) in sorted(en.items()):
        words = len(body.split())
        if not 20 <= words <= 160 or seen_synopsis[synopsis.lower()] > 1 or len(synopsis.split()) < 3:
            continue
        families[body.split("\n")[0]].append(pkg)

    rng = random.Random(args.seed)
    keys = sorted(families)
    rng.shuffle(keys)
    keys = keys[: args.families]
    n_test, n_dev = len(keys) * 15 // 100, len(keys) * 7 // 100
    split_of = {k: "test" if i < n_test else "dev" if i < n_test + n_dev else "train" for i, k in enumerate(keys)}

    out = Path(args.out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    chosen = []
    for k in keys:
        members = families[k]
        rng.shuffle(members)
        chosen += [(p, split_of[k]) for p in sorted(members[: args.max_family])]

    langs = {"de": read_translation("de"), "fr": read_translation("fr"), "it": read_translation("it")}
    with open(out / "corpus.jsonl", "w") as fc, open(out / "queries.jsonl", "w") as fq:
        for pkg, _ in chosen:
            fc.write(json.dumps({"_id": pkg, "title": "", "text": en[pkg][2]}, ensure_ascii=False) + "\n")
            fq.write(json.dumps({"_id": f"q-{pkg}", "text": en[pkg][1]}, ensure_ascii=False) + "\n")
    for lang, tr in langs.items():
        n = 0
        with open(out / f"corpus.{lang}.jsonl", "w") as fc, open(out / f"queries.{lang}.jsonl", "w") as fq:
            for pkg, _ in chosen:
                # A translation only counts when it translates this exact English description.
                if pkg in tr and tr[pkg][0] == en[pkg][0] and tr[pkg][2]:
                    fc.write(json.dumps({"_id": pkg, "title": "", "text": tr[pkg][2]}, ensure_ascii=False) + "\n")
                    fq.write(json.dumps({"_id": f"q-{pkg}", "text": tr[pkg][1]}, ensure_ascii=False) + "\n")
                    n += 1
        print(f"{lang}: {n} translated packages")
    for split in ("train", "dev", "test"):
        with open(out / "qrels" / f"{split}.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for pkg, s in chosen:
                if s == split:
                    f.write(f"q-{pkg}\t{pkg}\t1\n")
    print(f"{len(chosen)} packages in {len(keys)} families:",
          collections.Counter(s for _, s in chosen))


if __name__ == "__main__":
    main()
