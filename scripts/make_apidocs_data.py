"""Build a held-out retrieval dataset in BEIR layout from the API documentation of Python
libraries: the standard library and the scientific packages installed beside this project.

Queries are the one-line summaries that open a function's, class's or method's docstring
(``numpy.linalg.norm`` gives ``Matrix or vector norm``); passages are the object's name and the
rest of its docstring up to its examples; each query is judged relevant to its own object. Text
written by the libraries' authors, in a domain (programming interfaces) and a style (reST and
numpydoc) that neither the demo data nor the manual pages have. The objects of one module form a
family and stay inside one split, so no test text leaks into training and their siblings
(``mean``, ``nanmean``, ``average``) are natural hard negatives.

Input: the modules listed in ``MODULES``, as installed (run it with the project's virtual
environment: ``.venv/bin/python scripts/make_apidocs_data.py``). Output is deterministic for given
installed versions, which ``versions.json`` records: objects are collected in a sorted order,
deduplicated and split by hashes of names.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import warnings
from importlib import metadata
from pathlib import Path

from heldout import assign_splits, keep, write_beir

# Public modules whose objects are documented for their users (private and test modules left out).
MODULES = [
    # the standard library
    "abc", "argparse", "array", "ast", "asyncio", "base64", "binascii", "bisect", "builtins", "bz2", "calendar",
    "cmath", "codecs", "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "ctypes", "dataclasses", "datetime", "decimal", "difflib", "dis", "email.message", "email.utils", "enum", "filecmp",
    "fnmatch", "fractions", "ftplib", "functools", "gc", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies", "http.server", "imaplib", "importlib",
    "inspect", "io", "ipaddress", "itertools", "json", "keyword", "locale", "logging", "logging.handlers", "lzma",
    "mailbox", "math", "mimetypes", "multiprocessing", "numbers", "operator", "os", "os.path", "pathlib", "pdb",
    "pickle", "pkgutil", "platform", "plistlib", "pprint", "queue", "quopri", "random", "re", "reprlib", "runpy",
    "sched", "secrets", "select", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess", "sys", "sysconfig",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace", "traceback", "tracemalloc",
    "types", "typing", "unicodedata", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "zipfile", "zlib", "zoneinfo",
    # scientific Python
    "numpy", "numpy.fft", "numpy.linalg", "numpy.ma", "numpy.polynomial.polynomial", "numpy.random", "numpy.strings",
    "scipy.cluster.hierarchy", "scipy.fft", "scipy.integrate", "scipy.interpolate", "scipy.linalg", "scipy.ndimage",
    "scipy.optimize", "scipy.signal", "scipy.sparse", "scipy.sparse.linalg", "scipy.spatial", "scipy.special",
    "scipy.stats", "pandas", "networkx", "sympy", "matplotlib.pyplot", "sklearn.metrics", "sklearn.preprocessing",
    "sklearn.cluster", "sklearn.decomposition", "sklearn.linear_model",
    "torch", "torch.fft", "torch.linalg", "torch.nn", "torch.nn.functional", "torch.special", "pyarrow",
    "pyarrow.compute", "pyarrow.parquet",
]
PASSAGE_WORDS = 150
MIN_PASSAGE_WORDS = 20
MAX_QUERY_WORDS = 30
# Where a docstring's prose ends: its examples, doctests and cross-references.
PROSE_ENDS = re.compile(r"^\s*(Examples?|Example usage|See Also|References|Notes)\s*:?\s*$|^\s*>>>", re.M)
SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
MARKUP = [
    (re.compile(r":[\w:]+:`~?([^`<]*?)(\s*<[^>]*>)?`"), r"\1"),  # :func:`~numpy.mean` -> numpy.mean
    (re.compile(r"`+([^`]*)`+_?"), r"\1"),
    (re.compile(r"^\s*[-=~^*]{3,}\s*$", re.M), ""),  # section underlines
    (re.compile(r"\.\. \w+::.*$", re.M), ""),  # directives
    (re.compile(r"\*\*?([^*]+)\*\*?"), r"\1"),
]


def split_docstring(doc: str) -> tuple[str, str] | None:
    """(summary line, the prose after it), or None when the docstring has no usable summary."""
    lines = inspect.cleandoc(doc).splitlines()
    while lines and (not lines[0].strip() or SIGNATURE.match(lines[0].strip())):
        lines.pop(0)  # torch and C extensions open with the signature
    if not lines:
        return None
    summary, rest = [], lines
    while rest and rest[0].strip():  # the summary may wrap over a few lines before its blank line
        summary.append(rest.pop(0).strip())
    summary_text = " ".join(summary)
    body = "\n".join(rest)
    end = PROSE_ENDS.search(body)
    body = body[: end.start()] if end else body
    for pattern, repl in MARKUP:
        summary_text, body = pattern.sub(repl, summary_text), pattern.sub(repl, body)
    return summary_text.strip(" ."), " ".join(body.split())


def public_objects(module_name: str):
    """(qualified name, object) of a module's public functions and classes, and of those
    classes' public methods, defined in the module's package."""
    module = importlib.import_module(module_name)
    root = module_name.split(".")[0]
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if obj is None or inspect.ismodule(obj):
            continue
        home = getattr(obj, "__module__", None) or ""
        if not (home.split(".")[0] == root or (root in sys.stdlib_module_names and home in ("builtins", module_name))):
            continue  # re-exported from another package: documented there
        if inspect.isclass(obj):
            yield f"{module_name}.{name}", obj
            for attr in sorted(vars(obj)):
                if not attr.startswith("_") and callable(getattr(obj, attr, None)):
                    yield f"{module_name}.{name}.{attr}", getattr(obj, attr)
        elif callable(obj):
            yield f"{module_name}.{name}", obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/apidocs")
    parser.add_argument("--max-docs", type=int, default=3000, help="keep this many objects, chosen by a hash of the name")
    parser.add_argument("--max-family", type=int, default=40, help="keep at most this many objects of one module")
    parser.add_argument("--seed", default="apidocs")
    args = parser.parse_args()

    warnings.simplefilter("ignore")
    found: dict[str, tuple[str, str, str]] = {}  # name -> (family, summary, passage)
    seen_summaries: set[str] = set()
    seen_passages: set[str] = set()
    # Held, not only their ids: a bound method made by getattr would free its id for the next one.
    seen_objects: dict[int, object] = {}
    skipped_modules = []
    for module_name in MODULES:
        try:
            objects = list(public_objects(module_name))
        except Exception as exc:  # noqa: BLE001 - a module that does not import here is left out, and said
            skipped_modules.append(f"{module_name}: {type(exc).__name__}")
            continue
        for name, obj in objects:
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str) or id(obj) in seen_objects:
                continue
            seen_objects[id(obj)] = obj
            parts = split_docstring(doc)
            if parts is None:
                continue
            summary, body = parts
            words = body.split()
            if not 3 <= len(summary.split()) <= MAX_QUERY_WORDS or len(words) < MIN_PASSAGE_WORDS:
                continue
            text = " ".join(words[:PASSAGE_WORDS])
            # Aliases and inherited docstrings repeat a summary or a body: keep the first.
            if summary.lower() in seen_summaries or text in seen_passages:
                continue
            seen_summaries.add(summary.lower())
            seen_passages.add(text)
            found[name] = (module_name, summary, text)

    names = keep({name: found[name][0] for name in found}, args.seed, args.max_docs, args.max_family)
    split_of = assign_splits({name: found[name][0] for name in names}, args.seed)
    out = Path(args.out)
    sizes = write_beir(out, [(name, found[name][1], found[name][2], split_of[name]) for name in names])
    roots = sorted({m.split(".")[0] for m in MODULES if m.split(".")[0] not in sys.stdlib_module_names})
    versions = {"python": sys.version.split()[0], **{r: _version(r) for r in roots}}
    (out / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    print(json.dumps({"objects_kept_after_dedup": len(found), "kept": len(names), "families": len(set(f for f, _, _ in (found[n] for n in names))),
                      **sizes, "modules_left_out": skipped_modules}))


def _version(package: str) -> str:
    try:
        return metadata.version({"sklearn": "scikit-learn"}.get(package, package))
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
