#!/usr/bin/env python
"""Build a candidate pool directory from jsonl files, local HF datasets or Megatron indexed datasets.

    # fine-tuning records (prompt, response, domain):
    python tools/build_pool.py --tokenizer .cache/models/smollm2-135m \\
        --train .cache/demo_data/train.jsonl --valid .cache/demo_data/valid.jsonl \\
        --max-length 512 --out .cache/pools/demo

    # pretraining text (text, domain), packed into windows of 256 tokens:
    python tools/build_pool.py --tokenizer TOK --train T.jsonl --valid V.jsonl \\
        --text-field text --pack 256 --out P

    # Megatron indexed datasets (PREFIX.bin + PREFIX.idx), one or more per domain:
    python tools/build_pool.py --tokenizer TOK --megatron prose=PFX1 --megatron code=PFX2 \\
        --pack 256 --valid-fraction 0.05 --out P

    # any of these sharded over 3 MPI ranks (the same files for any number of ranks):
    mpiexec -n 3 --oversubscribe --mca btl self,sm -x OMP_NUM_THREADS=1 \\
        python tools/build_pool.py ... --out P

Fine-tuning records (the default) need a prompt, a response and a non-empty domain (field names
configurable). They are tokenized with the tokenizer's chat template when it has one (else
``prompt + "\\n"`` then ``response + EOS``); prompt tokens are masked out of the loss; records
longer than ``--max-length`` are cut (counted per domain and reported); a record cut before its
first response token is dropped (counted), and a domain that loses every record of a split that
way (or, packed, has less than one window) is an error unless ``--allow-missing-domains``.
jsonl files are read as strict UTF-8 (``--encoding``, ``--encoding-errors replace`` to change it).

Pretraining text (``--text-field``, ``--megatron`` or ``--pack``): every token is a target.
Each document is ``encode(text)`` (no special tokens) followed by EOS; Megatron documents are
taken as stored (their ids are checked against the tokenizer). Without ``--pack`` a candidate
is one document cut to ``--max-length``; with ``--pack S`` each domain's documents are
concatenated and cut into windows of S tokens (``pool_format.pack_windows``: one-token overlap,
every token a target once; a window never spans two domains). Validation data comes from
``--valid`` files or from ``--valid-fraction``: a document is held out when a hash of its
content falls below the fraction (deterministic, per document, independent of order).

The input is read as a stream, in shards of ``--shard-docs`` documents (lines, rows); a shard is
tokenized (in batches, for text) and written by one process as its own files, and the manifest
lists them. Under ``mpiexec`` rank r builds shards r, r + n, ...; rank 0 gathers only their
descriptions (JSON) and writes the manifest. Memory is bounded by one shard, whatever the
corpus size, and the files do not depend on the number of ranks. Everything is written to a
hidden directory next to ``--out`` and renamed into place at the end: a failed build leaves
nothing half-written. ``--overwrite`` replaces only a pool of ours (never a file, a folder that
is not a pool, a pool with foreign files, or a folder that holds an input), and only once the
new pool is complete. The format is described in docs/POOLS.md and
``ds_partitionsel/pool_format.py``; the reader is ``ds_partitionsel.data.CandidatePool``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ds_partitionsel.pool_builder import (MEGATRON_EXTRA, build, check_encoding, get_comm,  # noqa: F401
                                          held_out)  # held_out: tests


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tokenizer", required=True, help="local folder of a Hugging Face tokenizer (or model)")
    p.add_argument("--train", nargs="+", default=[], metavar="PATH",
                   help="jsonl/json/parquet/arrow files or save_to_disk folders")
    p.add_argument("--valid", nargs="+", default=[], metavar="PATH", help="held-out split inputs")
    p.add_argument("--megatron", action="append", default=[], metavar="DOMAIN=PATH_PREFIX",
                   help="a Megatron indexed dataset (PREFIX.bin/.idx) of one domain; repeatable, several "
                        "prefixes per domain allowed (needs " + MEGATRON_EXTRA + ")")
    p.add_argument("--out", required=True, type=Path, help="pool directory to create")
    p.add_argument("--text-field", default=None,
                   help="pretraining text: the field holding each document's text (records need only it and "
                        "the domain field)")
    p.add_argument("--pack", type=int, default=None, metavar="SEQ_LEN",
                   help="pretraining: pack each domain's documents (joined by EOS) into windows of SEQ_LEN tokens")
    p.add_argument("--valid-fraction", type=float, default=None,
                   help="hold out this fraction of the documents (deterministic, per document) as validation")
    p.add_argument("--max-length", type=int, default=1024, help="cut records to this many tokens (default 1024)")
    p.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                   help="fine-tuning records: use the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--domains", default=None,
                   help="comma-separated domain names fixing the id order (default: sorted names found)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--domain-field", default="domain")
    p.add_argument("--shard-docs", type=int, default=16384,
                   help="documents (lines, rows) per shard: the unit of parallel work and of memory (default 16384)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of failing")
    p.add_argument("--allow-missing-domains", action="store_true",
                   help="build even when every record of a domain is dropped in a split (cut before its response "
                        "by --max-length, or shorter than one --pack window); default: an error naming the domain")
    p.add_argument("--encoding", default="utf-8",
                   help="text encoding of jsonl inputs (default utf-8; must write ASCII as single bytes, e.g. "
                        "latin-1, cp1252)")
    p.add_argument("--encoding-errors", choices=("strict", "replace"), default="strict",
                   help="jsonl bytes that are not valid --encoding: strict (default) fails with file:line (or "
                        "skips and counts the line with --skip-bad); replace puts U+FFFD in their place and "
                        "counts the lines")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing pool at --out (only a pool built by this tool; kept if the build fails)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = p.parse_args(argv)
    if args.max_length < 2:
        p.error(f"--max-length must be at least 2, got {args.max_length}")
    if args.pack is not None and args.pack < 2:
        p.error(f"--pack must be at least 2 tokens, got {args.pack}")
    if args.shard_docs < 1:
        p.error(f"--shard-docs must be at least 1, got {args.shard_docs}")
    if not args.train and not args.megatron:
        p.error("give the input: --train PATH ... and/or --megatron DOMAIN=PATH_PREFIX")
    if args.encoding != "utf-8" or args.encoding_errors != "strict":
        if not args.train and not args.valid:
            p.error("--encoding/--encoding-errors apply to jsonl inputs (--train/--valid); --megatron holds tokens")
    try:
        check_encoding(args.encoding)
    except ValueError as e:
        p.error(str(e))
    if args.valid_fraction is not None:
        if not 0 < args.valid_fraction < 1:
            p.error(f"--valid-fraction must be in (0, 1), got {args.valid_fraction}")
        if args.valid:
            p.error("pass either --valid files or --valid-fraction, not both")
    return args


def _exit_on_sigterm(signum, frame):
    # turn SIGTERM into SystemExit so the staging directory is removed on the way out
    sys.exit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    if __name__ == "__main__":
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return build(args, get_comm())


if __name__ == "__main__":
    sys.exit(main())
