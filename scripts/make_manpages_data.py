"""Build a held-out retrieval dataset in BEIR layout from the system's manual pages.

Queries are the one-line summaries of a page's NAME section (``ls - list directory
contents`` gives ``list directory contents``); passages are the page's name and the opening
of its DESCRIPTION; each query is judged relevant to its own page. Text written by the
software's authors, in a domain (command-line tools) and a style (roff manuals) the demo data
does not have. Pages whose names share the part before the first ``-``, ``.`` or ``_`` (``git-*``,
``systemd-*``) form a family and stay inside one split, so no test text leaks into training and
their siblings are natural hard negatives.

Input: the gzipped roff sources under /usr/share/man (sections 1, 3, 5, 7 and 8). Output is
deterministic for given inputs: pages are parsed, deduplicated and split by hashes of names.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

from heldout import assign_splits, keep, write_beir

SECTIONS = ("man1", "man3", "man5", "man7", "man8")
PASSAGE_WORDS = 150  # the opening of a DESCRIPTION; the rest is mostly option lists
MIN_PASSAGE_WORDS = 20
# roff escapes: fonts (\fB, \f(CW, \f[I]), sizes, zero-width markers, named characters.
ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\s[+-]?\d"), ""),
    (re.compile(r"\\\*\(Aq"), "'"),
    (re.compile(r"\\\*\(.."), ""),
    (re.compile(r"\\\*\[[^\]]*\]"), ""),
    (re.compile(r"\\\*."), ""),
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\(aq"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^/,:%)]"), ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\c"), ""),
    (re.compile(r'\\".*'), ""),
]
# Macros whose arguments are text (the rest, like .TP or .PP, only format).
TEXT_MACROS = re.compile(r"^\.(B|I|BI|IB|BR|RB|IR|RI|SM|SB|Nm|Nd|Ar|Fl|Pa|Xr|Em|Sy|It|Dq|Ql)\s+(.*)$")


def plain(line: str) -> str:
    """A roff text line without its escapes."""
    for pattern, repl in ESCAPES:
        line = pattern.sub(repl, line)
    return line.replace('"', " ").strip() if line.startswith(".") else line.strip()


def sections(source: str) -> dict[str, list[str]]:
    """Section name (upper case) -> its plain text lines."""
    out: dict[str, list[str]] = {}
    current = None
    for raw in source.splitlines():
        head = re.match(r'^\.S[Hh]\s+"?([^"]*)"?\s*$', raw) or re.match(r"^\.Sh\s+(.*)$", raw)
        if head:
            current = head.group(1).strip().upper()
            out.setdefault(current, [])
            continue
        if current is None:
            continue
        macro = TEXT_MACROS.match(raw)
        if macro:
            text = plain(macro.group(2))
        elif raw.startswith((".", "'")):
            continue
        else:
            text = plain(raw)
        if text:
            out[current].append(text)
    return out


def parse_page(path: Path) -> tuple[str, str, str] | None:
    """(name, summary, description opening) of one page, or None if it lacks either part."""
    try:
        source = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    except (OSError, EOFError):
        return None
    if source.lstrip().startswith(".so "):  # an alias of another page
        return None
    parts = sections(source)
    name_lines = parts.get("NAME") or []
    summary = " ".join(name_lines)
    if "-" not in summary:
        return None
    # "ls \- list directory contents": after the first dash that follows the names.
    summary = re.split(r"\s+-+\s+|\s*\\-\s*", summary, maxsplit=1)[-1].strip(" .")
    words = " ".join(parts.get("DESCRIPTION") or []).split()
    if len(summary.split()) < 3 or len(words) < MIN_PASSAGE_WORDS:
        return None
    name = path.name.removesuffix(".gz")
    return name, summary, " ".join(words[:PASSAGE_WORDS])


def family(name: str) -> str:
    return re.split(r"[-._]", name, maxsplit=1)[0].lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--man-dir", default="/usr/share/man")
    parser.add_argument("--out", default="data/manpages")
    parser.add_argument("--max-pages", type=int, default=3000, help="keep this many pages, chosen by a hash of the name")
    parser.add_argument("--max-family", type=int, default=20, help="keep at most this many pages of one family")
    parser.add_argument("--seed", default="manpages")
    args = parser.parse_args()

    pages: dict[str, tuple[str, str, str]] = {}
    seen_summaries: set[str] = set()
    seen_passages: set[str] = set()
    files = sorted(p for s in SECTIONS for p in (Path(args.man_dir) / s).glob("*.gz"))
    for path in files:
        page = parse_page(path)
        if page is None:
            continue
        name, summary, text = page
        # Versioned copies (llvm-*-14, python3.11) repeat a summary or a description: keep the first.
        if summary.lower() in seen_summaries or text in seen_passages:
            continue
        seen_summaries.add(summary.lower())
        seen_passages.add(text)
        pages[name] = page
    # At most --max-family pages of one family (gcloud alone has over a thousand), then --max-pages.
    names = keep({name: family(name) for name in pages}, args.seed, args.max_pages, args.max_family)
    split_of = assign_splits({name: family(name) for name in names}, args.seed)
    sizes = write_beir(Path(args.out), [(name.rsplit(".", 1)[0], pages[name][1], pages[name][2], split_of[name]) for name in names])
    print(json.dumps({"pages_parsed": len(pages), "kept": len(names), **sizes}))


if __name__ == "__main__":
    main()
