#!/usr/bin/env python
"""How close the Kronecker-compatible rank-1 Adam preconditioner comes to the element-wise one.

A small Llama (byte-level vocabulary, so it needs no tokenizer download) trains ``--steps`` AdamW
steps on real text (the demo data when present, else this repository's Python files), then for
``--n`` held-out sequences the per-sample gradients ``G_i`` of the last ``--modules`` blocks'
linears are taken exactly (``GradientSketcher(mode="exact")``) and compared, side by side:

- ``raw``      : ``G_i``
- ``diag``     : ``M * G_i`` with ``M = 1 / (sqrt(v_hat) + eps)`` (what ``exact`` mode sketches)
- ``rank1``    : ``(r c^T) * G_i`` with Adafactor's factors (what ``kron`` mode sketches before
  its projections; :func:`ds_partitionsel.precondition.rank_one_preconditioner`)

Columns: the mean and minimum per-sample cosine between two of them, and the Pearson
correlation and top-quarter overlap of the candidates' scores ``<x_i, target>`` against a raw
target (the mean gradient of ``--n`` other sequences), which is what the selection ranks. Also
the sketch time of ``kron`` mode with and without the preconditioner (same run, as a ratio).

Usage::

    python tools/bench_precondition.py --out runs/bench_precondition.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ds_partitionsel.precondition import build_preconditioners, read_adam_moments  # noqa: E402
from ds_partitionsel.sketch import GradientSketcher, resolve_modules  # noqa: E402


def _text() -> bytes:
    demo = os.path.join(ROOT, ".cache", "demo_data", "train.jsonl")
    if os.path.isfile(demo):
        return open(demo, "rb").read()
    return b"".join(open(p, "rb").read() for p in sorted(glob.glob(os.path.join(ROOT, "ds_partitionsel", "*.py"))))


def _batches(data: bytes, seq: int, gen: torch.Generator, n: int) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (n,), generator=gen).tolist()
    return torch.tensor([list(data[s:s + seq]) for s in starts], dtype=torch.long)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--modules", type=int, default=2, help="last N blocks sketched")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100, help="AdamW steps before measuring")
    ap.add_argument("--n", type=int, default=32, help="candidates (and as many target sequences)")
    ap.add_argument("--kron", type=int, default=16, help="kron_dims of the timed kron sketch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)

    import transformers

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=args.seq))
    data = _text()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids = _batches(data, args.seq, gen, args.batch)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"[train] step {step + 1}/{args.steps} loss {float(loss):.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    modules = resolve_modules(model, args.modules)
    moments = read_adam_moments(opt, modules)
    cands = _batches(data, args.seq, gen, args.n)
    anchors = _batches(data, args.seq, gen, args.n)

    exact = GradientSketcher(model, modules=args.modules, mode="exact", normalize=False)
    diag = build_preconditioners(moments, "exact")
    factors = build_preconditioners(moments, "kron")
    # rank-1 M as an element-wise one: the exact sketch of (r c^T) * G
    rank1 = {name: type(p)(weight=torch.outer(factors[name].row, factors[name].col)) for name, p in diag.items()}
    feats = {"raw": exact.sketch(cands), "diag": exact.sketch(cands, preconditioner=diag),
             "rank1": exact.sketch(cands, preconditioner=rank1)}
    target = exact.sketch(anchors).double().mean(0)
    scores = {k: v.double() @ target for k, v in feats.items()}
    top = max(1, args.n // 4)

    def overlap(a, b):
        return len(set(a.topk(top).indices.tolist()) & set(b.topk(top).indices.tolist())) / top

    rows = []
    for a, b in (("diag", "rank1"), ("raw", "diag"), ("raw", "rank1")):
        cos = _cos(feats[a], feats[b])
        corr = float(torch.corrcoef(torch.stack([scores[a], scores[b]]))[0, 1])
        rows.append({"pair": f"{a} vs {b}", "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                     "score_corr": corr, "top25_overlap": overlap(scores[a], scores[b])})

    kron = GradientSketcher(model, modules=args.modules, mode="kron", kron_dims=args.kron)
    timing = {}
    for name, pre in (("kron_raw", None), ("kron_adam", factors)):
        kron.sketch(cands[:4], preconditioner=pre)  # warm-up
        t = time.perf_counter()
        for _ in range(3):
            kron.sketch(cands, preconditioner=pre)
        timing[name] = (time.perf_counter() - t) / 3
    t = time.perf_counter()
    read_adam_moments(opt, modules)
    build_preconditioners(read_adam_moments(opt, modules), "kron")
    timing["read_and_factor"] = (time.perf_counter() - t) / 2

    print(f"\nmodel hidden {args.hidden} x {args.layers} layers, last {args.modules} blocks "
          f"({sum(m.weight.numel() for _, m in modules)} weights), {args.steps} AdamW steps, {args.n} candidates")
    print(f"{'pair':<16}{'cos mean':>10}{'cos min':>10}{'score corr':>12}{'top-25% overlap':>17}")
    for r in rows:
        print(f"{r['pair']:<16}{r['cos_mean']:>10.3f}{r['cos_min']:>10.3f}{r['score_corr']:>12.3f}{r['top25_overlap']:>17.2f}")
    ratio = timing["kron_adam"] / timing["kron_raw"]
    print(f"\nkron sketch of {args.n}: raw {timing['kron_raw'] * 1e3:.1f} ms, adam {timing['kron_adam'] * 1e3:.1f} ms "
          f"(x{ratio:.2f}); reading + factoring the moments {timing['read_and_factor'] * 1e3:.1f} ms")
    result = {"args": vars(args), "rows": rows, "timing_s": timing, "kron_time_ratio": ratio,
              "step": moments.step}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
