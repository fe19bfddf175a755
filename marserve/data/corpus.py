"""Builds the local five-domain training corpus (code, prose, manuals, arithmetic, records) from files on this machine.

Sources, all read or generated locally (nothing is downloaded):

| domain | source | licence |
| --- | --- | --- |
| code | Python standard library sources, ``<sys.prefix>/lib/pythonX.Y/*.py`` (docstrings removed) | PSF License |
| prose | docstrings of the same stdlib modules, plus ``/usr/share/common-licenses/*`` | PSF License; the licence texts are verbatim-redistributable |
| manual | Debian man pages ``/usr/share/man/man1/*.1.gz`` with groff requests stripped | each package's own licence, all DFSG-free (see ``/usr/share/doc/<pkg>/copyright``) |
| math | arithmetic generated here from a seeded RNG | ours (Apache-2.0) |
| records | JSON and CSV records generated here from a seeded RNG | ours (Apache-2.0) |

Each domain is cut into documents, shuffled with the seed, balanced to the same number of characters,
and split into train (``<out>/<domain>.train.txt``) and a held-out slice (``<out>/<domain>.heldout.txt``).
Documents are separated by the end-of-text marker ``<|endoftext|>``.
Run: ``python -m marserve.data.corpus --out /tmp/marcorpus``.
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import json
import os
import random
import re
import sys
import sysconfig

from marserve import progress

DOMAINS = ("code", "prose", "manual", "math", "records")
EOT = "<|endoftext|>"
HELDOUT_DIR = os.path.join(os.path.dirname(__file__), "heldout")


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    return [f for f in files if "/test" not in f and "site-packages" not in f and "idlelib" not in f]


def _strip_docstrings(source: str) -> tuple[str, list[str]]:
    """Returns (source without docstrings, the docstrings), so code and prose do not overlap."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source, []
    docs, cut = [], []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                    and isinstance(first.value.value, str):
                docs.append(first.value.value)
                cut.append((first.lineno, first.end_lineno))
    lines = source.splitlines()
    for start, end in sorted(cut, reverse=True):
        indent = re.match(r"\s*", lines[start - 1]).group(0)
        lines[start - 1:end] = [indent + "pass"] if start > 1 else []
    return "\n".join(lines), docs


def code_and_prose_docs() -> tuple[list[str], list[str]]:
    code, prose = [], []
    for path in _stdlib_files():
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        stripped, docs = _strip_docstrings(source)
        # Functions are the documents: a whole module is far longer than a training sequence.
        for chunk in re.split(r"\n(?=def |class |\n)", stripped):
            if len(chunk.strip()) > 200:
                code.append(chunk.strip("\n"))
        prose += [re.sub(r"\n\s+", "\n", d.strip()) for d in docs if len(d) > 150]
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="ignore") as f:
                prose += [p.strip() for p in f.read().split("\n\n") if len(p.strip()) > 150]
    return code, prose


def _groff_to_text(src: str) -> str:
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            m = re.match(r"\.(SH|SS|B|I|BR|IR|IP|TP|PP|LP|P)\b\s*(.*)", line)
            if not m:
                continue
            req, rest = m.groups()
            if req in ("PP", "LP", "P", "TP"):
                out.append("")
                continue
            line = rest.replace('"', "")
            if req in ("SH", "SS"):
                line = "\n" + line.upper()
        line = re.sub(r"\\f[A-Z0-9]|\\f\(..|\\s[-+]?\d|\\\*\(..|\\\*.|\\\(..", "", line)
        line = line.replace("\\-", "-").replace("\\(em", "-").replace("\\&", "").replace("\\e", "\\")
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def manual_docs() -> list[str]:
    docs = []
    for path in sorted(glob.glob("/usr/share/man/man1/*.1.gz")):
        try:
            with gzip.open(path, "rt", encoding="utf-8", errors="ignore") as f:
                text = _groff_to_text(f.read())
        except (OSError, EOFError):
            continue
        docs += [s.strip() for s in re.split(r"\n(?=[A-Z][A-Z ]+\n)", text) if len(s.strip()) > 150]
    return docs


def math_docs(rng: random.Random, n: int) -> list[str]:
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(6, 14)):
            a, b = rng.randint(0, 999), rng.randint(1, 999)
            op = rng.choice("+-*/")
            if op == "+":
                lines.append(f"{a} + {b} = {a + b}")
            elif op == "-":
                lines.append(f"{a} - {b} = {a - b}")
            elif op == "*":
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                lines.append(f"{a} * {b} = {a * b}")
            else:
                q = rng.randint(0, 99)
                lines.append(f"{q * b} / {b} = {q}")
        docs.append("\n".join(lines))
    return docs


_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
          "oscar", "peggy", "trent", "victor", "walter"]
_CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Perth", "Dublin", "Nairobi", "Austin"]
_ITEMS = ["widget", "gadget", "bolt", "cable", "sensor", "valve", "panel", "filter", "pump", "relay"]


def records_docs(rng: random.Random, n: int) -> list[str]:
    docs = []
    for i in range(n):
        rows = rng.randint(4, 9)
        if i % 2 == 0:
            recs = [{"id": rng.randint(1000, 9999), "name": rng.choice(_NAMES), "city": rng.choice(_CITIES),
                     "age": rng.randint(18, 90), "active": rng.random() < 0.5,
                     "score": round(rng.uniform(0, 100), 2)} for _ in range(rows)]
            docs.append(json.dumps(recs, indent=1))
        else:
            lines = ["order_id,item,quantity,unit_price,city"]
            lines += [f"{rng.randint(10000, 99999)},{rng.choice(_ITEMS)},{rng.randint(1, 50)},"
                      f"{rng.uniform(0.5, 500):.2f},{rng.choice(_CITIES)}" for _ in range(rows)]
            docs.append("\n".join(lines))
    return docs


def build(out_dir: str, chars_per_domain: int = 2_000_000, heldout_chars: int = 40_000, seed: int = 0) -> dict:
    """Writes <domain>.train.txt / <domain>.heldout.txt for every domain; returns {domain: train chars}."""
    rng = random.Random(seed)
    # ~100 s in all, most of it parsing the stdlib: a line per source, with its time (on a terminal only).
    with progress.stage("corpus: code and prose from the Python standard library"):
        code, prose = code_and_prose_docs()
    with progress.stage("corpus: manual pages"):
        manual = manual_docs()
    with progress.stage("corpus: generating arithmetic and records"):
        arithmetic, records = math_docs(rng, chars_per_domain // 90), records_docs(rng, chars_per_domain // 300)
    sources = {"code": code, "prose": prose, "manual": manual, "math": arithmetic, "records": records}
    os.makedirs(out_dir, exist_ok=True)
    sizes = {}
    for domain in progress.bar(DOMAINS, desc=f"corpus: writing {out_dir}", unit="domain"):
        docs = sources[domain]
        if not docs:
            raise RuntimeError(f"domain {domain!r} found no source text on this machine")
        rng.shuffle(docs)
        held, train, n = [], [], 0
        for d in docs:
            if n < heldout_chars:
                held.append(d)
            else:
                train.append(d)
            n += len(d)
            if n >= chars_per_domain + heldout_chars:
                break
        # Small domains repeat so that every domain weighs the same in training.
        body = EOT.join(train)
        while len(body) < chars_per_domain:
            body += EOT + EOT.join(train)
        with open(os.path.join(out_dir, f"{domain}.train.txt"), "w", encoding="utf-8") as f:
            f.write(body[:chars_per_domain])
        with open(os.path.join(out_dir, f"{domain}.heldout.txt"), "w", encoding="utf-8") as f:
            f.write(EOT.join(held))
        sizes[domain] = min(len(body), chars_per_domain)
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--chars-per-domain", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    progress.add_quiet_flag(p)
    a = p.parse_args(argv)
    progress.set_quiet(a.quiet)
    sizes = build(a.out, a.chars_per_domain, seed=a.seed)
    print(json.dumps(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
