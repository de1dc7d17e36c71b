#!/usr/bin/env python
"""Raw-text corpora for the selection experiments, built from text a Debian machine with Python,
Node.js, Perl, Vim, CMake and git already holds (no download).

Each corpus has four domains of different kinds (prose, code, logs, markup), with one minority
domain at about 3% of the characters and one mid-size domain (20-40%), and comes from sources
the project's demo corpus (GSM8K / CHAMP / B3DB / HumanEval / the Python standard library) does
not use::

    python tools/make_corpora.py --out .cache/corpora          # all three
    python tools/make_corpora.py --out .cache/corpora sysdocs  # one

=========  ==========================================================================
sysdocs    man pages (roff stripped) 45%, C headers 30%, Debian changelogs 22%, Tcl 3%
webdocs    npm's JavaScript 40%, Markdown 33%, Vim help 24%, npm package.json manifests 3%
textlib    Perl modules 38%, CMake reStructuredText docs 35%, git release notes 24%, shell 3%
=========  ==========================================================================

Output: ``<out>/<name>.jsonl`` with ``{"text", "domain"}`` per document (pieces of
``--max-doc-chars`` of a file), files taken in a fixed pseudo-random order (hash of the path) until the
domain's share of ``--chars`` is reached. The same machine image gives the same corpus; a
domain whose sources are missing stops the build with a message naming them.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import sys

# name -> [(domain, share, [glob patterns])]
CORPORA = {
    "sysdocs": [
        ("manpages", 0.45, ["/usr/share/man/man1/*.gz", "/usr/share/man/man5/*.gz", "/usr/share/man/man8/*.gz"]),
        ("c_headers", 0.30, ["/usr/include/**/*.h"]),
        ("changelogs", 0.22, ["/usr/share/doc/*/changelog.Debian.gz"]),
        ("tcl", 0.03, ["/usr/share/tcltk/**/*.tcl", "/usr/lib/tcltk/**/*.tcl"]),
    ],
    "webdocs": [
        ("javascript", 0.40, ["/usr/lib/node_modules/npm/**/*.js", "/usr/share/nodejs/**/*.js"]),
        ("markdown", 0.33, ["/usr/lib/node_modules/**/*.md", "/usr/share/doc/**/*.md"]),
        ("vimhelp", 0.24, ["/usr/share/vim/vim*/doc/*.txt"]),
        ("manifests", 0.03, ["/usr/lib/node_modules/**/package.json"]),
    ],
    "textlib": [
        ("perl", 0.38, ["/usr/share/perl/**/*.pm", "/usr/lib/x86_64-linux-gnu/perl/**/*.pm",
                        "/usr/share/perl5/**/*.pm"]),
        ("rst_docs", 0.35, ["/usr/share/cmake-*/Help/**/*.rst"]),
        ("relnotes", 0.24, ["/usr/share/doc/git/RelNotes/*.txt", "/usr/share/doc/git/RelNotes/*.txt.gz"]),
        ("shell", 0.03, ["/usr/lib/perf-core/**/*.sh", "/usr/share/doc/**/*.sh", "/usr/lib/node_modules/**/*.sh",
                         "/usr/share/cmake-*/**/*.sh", "/usr/lib/x86_64-linux-gnu/**/*.sh", "/etc/**/*.sh"]),
    ],
}

_ROFF_FONT = re.compile(r"\\f[BIRP]|\\f\(..|\\\*\(..|\\\*.|\\\(..|\\[&-]")


def read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read(4 << 20)
    text = data.decode("utf-8", errors="replace")
    if "/man/man" in path:  # roff: drop requests and comments, keep the running text
        lines = []
        for line in text.splitlines():
            if line.startswith((".\\\"", "'\\\"")):
                continue
            if line.startswith("."):
                words = line.split(None, 1)
                if len(words) == 2 and words[0] in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".IP", ".TP"):
                    lines.append(words[1].replace('"', ""))
                continue
            lines.append(line)
        text = _ROFF_FONT.sub("", "\n".join(lines))
    return text


def files_of(patterns: list) -> list:
    seen = set()
    for pattern in patterns:
        for path in glob.glob(pattern, recursive=True):
            if os.path.isfile(path) and not os.path.islink(path):
                seen.add(os.path.realpath(path))
    # a fixed pseudo-random order: the same files for the same machine image
    return sorted(seen, key=lambda p: hashlib.sha256(p.encode()).hexdigest())


def build(name: str, out: str, chars: int, max_doc: int) -> dict:
    counts = {}
    path = os.path.join(out, f"{name}.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for domain, share, patterns in CORPORA[name]:
            files = files_of(patterns)
            if not files:
                raise SystemExit(f"{name}: no source files for domain {domain!r} (looked for {patterns}); "
                                 f"install the package that ships them or drop the corpus")
            budget, used, docs = int(share * chars), 0, 0
            # a small domain in shorter pieces: enough documents for a held-out fraction of them
            size = max(300, int(max_doc * min(1.0, share / 0.1)))
            for f in files:
                text = read_text(f)[:8 * max_doc]
                # long files become several documents, so a small domain still spreads over
                # enough documents for a held-out split
                for piece in (text[i:i + size].strip() for i in range(0, len(text), size)):
                    if len(piece) < 200 or used >= budget:
                        continue
                    fh.write(json.dumps({"text": piece, "domain": domain}) + "\n")
                    used += len(piece)
                    docs += 1
                if used >= budget:
                    break
            if used < budget * 0.9:
                print(f"warning: {name}/{domain}: only {used} of {budget} characters available", file=sys.stderr)
            counts[domain] = {"docs": docs, "chars": used}
    os.replace(tmp, path)
    total = sum(c["chars"] for c in counts.values())
    for domain, c in counts.items():
        c["share"] = round(c["chars"] / total, 4)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"corpora to build (default all: {', '.join(CORPORA)})")
    ap.add_argument("--out", default=".cache/corpora")
    ap.add_argument("--chars", type=int, default=3_000_000, help="characters per corpus")
    ap.add_argument("--max-doc-chars", type=int, default=1_500,
                    help="documents are pieces of at most this many characters of a file (at most 8 per file)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in CORPORA]
    if unknown:
        ap.error(f"unknown corpus {unknown}; valid: {', '.join(CORPORA)}")
    os.makedirs(args.out, exist_ok=True)
    for name in args.names or list(CORPORA):
        counts = build(name, args.out, args.chars, args.max_doc_chars)
        print(f"{name}: " + ", ".join(f"{d} {c['docs']} docs {100 * c['share']:.1f}%" for d, c in counts.items()),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
