#!/usr/bin/env python
"""Peak memory of one exact PartitionSel selection step: held features against ``sketch.stream``.

Three variants, each in its own process (so each peak is its own), on the same model, pool and
seed:

- ``forward``: a plain no-grad forward over the step's pool, ``sketch.micro_batch`` rows at a
  time: the baseline the sketch's memory is measured against;
- ``held``: ``Selector.select`` with exact sketches held as ``(n, p)`` features (the default);
- ``stream``: the same with ``sketch.stream: true``: the features go micro-batch by micro-batch
  into the pool's Gram matrix and scores and are never held.

Peak: the rise of the process's resident set (``VmHWM`` reset through ``/proc/self/clear_refs``)
over its level once the model and pools are loaded. Prints a table with each peak as a multiple
of ``forward``'s, ``stream``'s peak over ``held``'s and over one micro-batch's exact features (the
least any exact sketch of that micro-batch holds), and whether ``stream`` picked the batch
``held`` picked; writes JSON. (The sketch-level target, exact sketches within 2x a plain
forward's peak, is ``tools/bench_sketch.py``'s ``exact_stream`` row, on SmolLM2-135M, whose
forward holds large logits; this model's small vocabulary makes its forward tiny.)

Model: a Llama from random weights (``--hidden``, ``--layers``), the demo data packed into
``--seq``-token windows with a BPE of ``--vocab`` tokens (built on first use under
``.cache/bench_stream``); exact sketches of every linear of the last ``--modules`` blocks.

    python tools/bench_stream.py --out runs/bench_stream.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ds_partitionsel.rss import reset_peak, rss_kib

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("forward", "held", "stream")


def worker(args) -> dict:
    import torch
    import transformers

    from ds_partitionsel.bench_inputs import llama_from_config
    from ds_partitionsel.config import PartitionSelConfig
    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.selector import Selector

    torch.set_num_threads(args.threads)
    tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    pool = CandidatePool(args.pool, "train", tokenizer=tok)
    valid = CandidatePool(args.pool, "valid")
    model = llama_from_config(len(tok), args.hidden, args.layers, args.heads, seed=args.seed)
    block = {"pool_factor": args.pool_factor, "seed": args.seed, "rule": "greedy",
             "sketch": {"modules": args.modules, "mode": "exact", "micro_batch": args.micro_batch,
                        "stream": args.variant == "stream"}}
    selector = Selector(model, PartitionSelConfig.from_dict(block), pool, valid, batch_size=args.batch,
                        pad_token_id=tok.pad_token_id)
    ids = selector.plan(0).pool_ids.tolist()
    with torch.no_grad():  # warm-up outside the measured region (thread pools, lazy inits)
        model(input_ids=pool.collate(ids[:1], tok.pad_token_id)["input_ids"][:, :16], use_cache=False)
    base = rss_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    out = {"variant": args.variant, "feature_dim": selector.sketcher.feature_dim, "pool": len(ids)}
    if args.variant == "forward":
        with torch.no_grad():
            for lo in range(0, len(ids), args.micro_batch):
                batch = pool.collate(ids[lo:lo + args.micro_batch], tok.pad_token_id)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    else:
        sel = selector.select(0, lr=1e-3, with_features=False)
        out["indices"] = sel.indices.tolist()
    out["seconds"] = time.perf_counter() - start
    out["peak_mib"] = (rss_kib("VmHWM") - base) / 1024
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pool-factor", type=int, default=4)
    ap.add_argument("--modules", type=int, default=3, help="exact sketches of the last N blocks' linears")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "runs/bench_stream.json"))
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return

    from tqdm import tqdm

    from ds_partitionsel.bench_inputs import build_packed_pool

    pool, tok = build_packed_pool(REPO / ".cache/bench_stream", args.seq, args.vocab)
    results = {}
    shape = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
             ("hidden", "layers", "heads", "vocab", "seq", "batch", "pool_factor", "modules", "micro_batch",
              "threads", "seed")]
    for variant in tqdm(VARIANTS, desc="bench_stream"):
        cmd = [sys.executable, __file__, *shape, "--variant", variant, "--pool", str(pool), "--tokenizer", str(tok)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["forward"]["peak_mib"]
    p = results["held"]["feature_dim"]
    print(f"\nexact sketches of p = {p:,} per row, pool of {results['held']['pool']} rows "
          f"({results['held']['pool'] * p * 4 / 2**20:,.0f} MiB of float32 features)")
    print(f"{'variant':>8} | {'seconds':>8} | {'peak MiB':>9} | {'x forward':>9}")
    for v in VARIANTS:
        r = results[v]
        r["peak_x_forward"] = r["peak_mib"] / base if base > 0 else None
        print(f"{v:>8} | {r['seconds']:>8.1f} | {r['peak_mib']:>9.0f} | "
              f"{r['peak_x_forward'] if r['peak_x_forward'] is not None else float('nan'):>9.2f}")
    same = results["held"]["indices"] == results["stream"]["indices"]
    floor = args.micro_batch * p * 4 / 2**20  # one micro-batch's exact features
    ratio = results["stream"]["peak_mib"] / results["held"]["peak_mib"]
    print(f"\nstream picks the batch held picks: {same}")
    print(f"stream / held: peak {ratio:.2f}, time {results['stream']['seconds'] / results['held']['seconds']:.2f}")
    print(f"one micro-batch's exact features (the least an exact sketch of {args.micro_batch} rows holds): "
          f"{floor:.0f} MiB; stream's peak is {results['stream']['peak_mib'] / floor:.2f}x that")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("variant", "pool", "tokenizer")},
                   "results": results, "same_selection": same, "stream_over_held_peak": ratio,
                   "micro_batch_features_mib": floor}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
