#!/usr/bin/env python
"""Print a per-domain table of a candidate pool: records, token lengths, trained tokens, truncation.

    python tools/inspect_pool.py .cache/pools/demo            # every split
    python tools/inspect_pool.py .cache/pools/demo --split valid --json stats.json

Lengths are counted from the arrays (not copied from the manifest), so the table also checks
that the arrays and the manifest agree: a mismatch is reported and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ds_partitionsel.data import CandidatePool, PoolFormatError
from ds_partitionsel.pool_format import read_manifest


def domain_stats(pool: CandidatePool) -> list:
    """One dict per domain present in ``pool`` (plus an ``all`` row) with the columns of the table."""
    lengths = pool.lengths.numpy()
    domains = pool.domains.numpy()
    truncated = pool.truncated.numpy()
    loss_tokens = pool.loss_token_counts().numpy()
    rows = []
    groups = [(name, domains == d) for d, name in enumerate(pool.domain_names)] + [("all", np.ones_like(truncated))]
    for name, sel in groups:
        n = int(sel.sum())
        if n == 0:
            continue
        ln = lengths[sel]
        rows.append({
            "domain": name, "records": n, "share": n / len(lengths),
            "len_min": int(ln.min()), "len_mean": float(ln.mean()), "len_max": int(ln.max()),
            "tokens": int(ln.sum()), "loss_tokens": int(loss_tokens[sel].sum()),
            "truncated": int(truncated[sel].sum()), "truncated_share": float(truncated[sel].mean()),
        })
    return rows


def format_table(rows: list) -> str:
    head = (f"{'domain':12s} {'records':>8s} {'share':>6s} {'len min':>7s} {'mean':>7s} {'max':>6s} "
            f"{'tokens':>9s} {'trained':>9s} {'trunc':>6s} {'trunc%':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['domain']:12s} {r['records']:8d} {r['share']:6.1%} {r['len_min']:7d} {r['len_mean']:7.1f} "
                     f"{r['len_max']:6d} {r['tokens']:9d} {r['loss_tokens']:9d} {r['truncated']:6d} "
                     f"{r['truncated_share']:6.1%}")
    return "\n".join(lines)


def check_against_manifest(pool: CandidatePool, rows: list) -> list:
    """Differences between the counted rows and the manifest's per-domain block."""
    per_domain = pool.manifest["splits"][pool.split]["per_domain"]
    problems = []
    for r in rows:
        if r["domain"] == "all":
            continue
        m = per_domain.get(r["domain"], {})
        for ours, theirs in (("records", "records"), ("tokens", "tokens"), ("loss_tokens", "loss_tokens"),
                             ("truncated", "truncated")):
            if m.get(theirs) != r[ours]:
                problems.append(f"{pool.split}/{r['domain']}: {ours} counted {r[ours]}, manifest {m.get(theirs)}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pool", help="pool directory")
    p.add_argument("--split", action="append", help="split(s) to show (default: all)")
    p.add_argument("--json", default=None, help="also write the table as JSON to this file")
    args = p.parse_args(argv)
    try:
        manifest = read_manifest(args.pool)
        splits = args.split or list(manifest["splits"])
        tok = manifest["tokenizer"]
        print(f"pool {args.pool}: tokenizer {tok['name_or_path']} ({tok['class']}, vocab {tok['vocab_size']}, "
              f"fingerprint {tok['fingerprint_sha256'][:12]}), candidates {manifest.get('candidates', 'sft')}, "
              f"template {manifest['template']}, max_length {manifest['max_length']}"
              + (f", packed windows of {manifest['pack']}" if manifest.get("pack") else ""))
        report, problems = {}, []
        for split in splits:
            pool = CandidatePool(args.pool, split=split)
            rows = domain_stats(pool)
            report[split] = rows
            problems += check_against_manifest(pool, rows)
            entry = manifest["splits"][split]
            print(f"\n[{split}] {len(pool)} records, {entry['num_tokens']} tokens, {pool.num_shards} shard(s)"
                  + (f", skipped bad {entry['skipped_bad']}" if entry.get("skipped_bad") else "")
                  + (f", dropped (no response left after truncation) {entry['dropped_no_response_after_truncation']}"
                     if entry.get("dropped_no_response_after_truncation") else ""))
            print(format_table(rows))
    except PoolFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    for msg in problems:
        print(f"mismatch: {msg}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
