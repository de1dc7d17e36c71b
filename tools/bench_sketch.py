#!/usr/bin/env python
"""Benchmark per-sample gradient sketches on a real causal LM against the torch.func baseline.

One run, one model, one pool (default: SmolLM2-135M, 32 sequences x 256 tokens, the nn.Linear
weights of the last 3 blocks). Methods, side by side:

- ``forward``  : a plain ``torch.no_grad`` forward of the pool (the physical floor).
- ``exact``    : ``GradientSketcher(mode="exact")``: the per-sample gradients themselves.
- ``exact_stream``: ``GradientSketcher(mode="exact").sketch_gram``: their Gram matrix and scores
  against a target, streamed per micro-batch and module (the features are never held whole).
- ``kron``     : ``GradientSketcher(mode="kron", kron_dims=k, dim=p)``.
- ``exact_fullhead`` / ``kron_fullhead``: the same with ``head_chunk=None``, the model's own
  full logits (the sketcher before the chunked LM head): the baseline of the chunked head.
- ``func``     : per-sample gradients by ``torch.func`` (``vmap(grad)``) for the same weights,
  then a dense Gaussian projection to the same ``p`` (rows of the ``D x p`` matrix generated in
  chunks, each chunk applied to the whole pool). Run in chunks of ``--func-chunk`` sequences.

Each method runs in a fresh Python process, so its peak memory is measured alone: the peak
resident set size during the method minus the resident set size after loading the model and
the pool (``VmHWM`` reset through ``/proc/self/clear_refs``), read right after the timed runs.
``peak_working_mib`` subtracts the returned features themselves (``n x p`` floats, which any
method must hold). Gram-matrix errors are ``||K_hat - K||_F / ||K||_F`` against the ``exact``
Gram ``K`` (unnormalized features).

Targets (issue 14), checked side by side in the same run and written under ``targets``: kron
peak <= 1.3x and exact peak <= 2x the plain forward's peak; both >= 10x less than ``func``; time
no worse than the full-logit baseline. ``exact_stream`` is held to the exact bound (2x): it is
how an exact sketch meets it, since ``exact``'s returned features alone exceed it. ``--profile`` adds a ``torch.profiler`` table (top
operators by self CPU time, with memory) of one extra sketch per method to the JSON.

Pool: the demo dataset (``.cache/demo_data/train.jsonl``) when present, else random token ids.
Each sequence is one example's prompt + response followed by the next examples' text until it
holds ``--seq`` tokens; ``loss_mask`` covers every token after the first prompt.

Usage::

    python tools/bench_sketch.py --out runs/bench_sketch.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from ds_partitionsel.rss import reset_peak, rss_kib

REPO = Path(__file__).resolve().parent.parent
METHODS = ("forward", "exact", "exact_stream", "kron", "exact_fullhead", "kron_fullhead", "func")


# --------------------------------------------------------------------------- pool

def build_pool(tokenizer, n: int, seq: int, data: Path | None, seed: int):
    import torch

    if data is not None and data.exists():
        rows = [json.loads(line) for line in data.open()]
        random.Random(seed).shuffle(rows)  # mix the domains
        ids, loss = [], []
        k = 0
        for _ in range(n):
            k += 1  # every sequence starts at a new example
            first = rows[k % len(rows)]
            prompt = tokenizer(first["prompt"] + "\n", add_special_tokens=False)["input_ids"]
            tokens = list(prompt)
            text = first["response"]
            while len(tokens) < seq:
                tokens += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
                k += 1
                nxt = rows[k % len(rows)]
                text = nxt["prompt"] + "\n" + nxt["response"]
            tokens = tokens[:seq]
            ids.append(tokens)
            n_prompt = min(len(prompt), seq - 2)  # keep at least one label
            loss.append([False] * n_prompt + [True] * (seq - n_prompt))
        source = str(data)
        return torch.tensor(ids), torch.ones(n, seq, dtype=torch.long), torch.tensor(loss), source
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tokenizer.vocab_size, (n, seq), generator=g)
    loss = torch.ones(n, seq, dtype=torch.bool)
    loss[:, : seq // 4] = False
    return ids, torch.ones(n, seq, dtype=torch.long), loss, "random token ids"


# --------------------------------------------------------------------------- methods

def gram64(features, chunk: int = 1 << 20):
    """``features @ features.T`` accumulated in float64 over column chunks.

    A float32 matmul over ~10^7 columns loses about 1e-3 relative accuracy on the diagonal,
    more than the differences this benchmark measures.
    """
    import torch

    n = features.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64, device=features.device)
    for s in range(0, features.shape[1], chunk):
        block = features[:, s:s + chunk].double()
        out += block @ block.T
    return out


def run_method(args) -> dict:
    """Time one method in this process; peak memory is measured beyond the loaded model and pool."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_partitionsel.sketch import GradientSketcher

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = Path(args.data) if args.data else None
    ids, attn, loss, source = build_pool(tokenizer, args.pool, args.seq, data, args.seed)
    ids, attn, loss = ids.to(device), attn.to(device), loss.to(device)
    cuda = device.type == "cuda"
    sketch_kwargs = dict(modules=args.blocks, normalize=False)
    names = GradientSketcher(model, **sketch_kwargs).module_names
    with torch.no_grad():  # warm-up (thread pools, lazy inits) outside the timed region
        model(input_ids=ids[:1, :16], use_cache=False)
    base_kib = rss_kib("VmRSS")
    peak_reset = reset_peak()
    if cuda:  # on a GPU the peak that matters is the device's: allocated beyond the model and pool
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    result = {"method": args.method, "pool_source": source, "peak_reset": peak_reset, "device": str(device)}

    def peak_extra_mib():
        if cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        return (rss_kib("VmHWM") - base_kib) / 1024

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    times, cpu_times = [], []  # wall and CPU (all threads) seconds; CPU time is less hurt by other jobs
    if args.method == "forward":
        for _ in range(args.repeats):
            c0 = time.process_time()
            t0 = now()
            with torch.no_grad():
                for s in range(0, args.pool, args.chunk):
                    model(input_ids=ids[s:s + args.chunk], attention_mask=attn[s:s + args.chunk],
                          use_cache=False)
            times.append(now() - t0)
            cpu_times.append(time.process_time() - c0)
        gram = None
        result["peak_extra_mib"] = peak_extra_mib()
        if args.profile:
            def plain_forward():
                with torch.no_grad():
                    for s in range(0, args.pool, args.chunk):
                        model(input_ids=ids[s:s + args.chunk], attention_mask=attn[s:s + args.chunk],
                              use_cache=False)
            result["profile_table"] = profile_table(plain_forward)
    elif args.method in ("exact", "kron", "exact_fullhead", "kron_fullhead"):
        mode = args.method.split("_")[0]
        mode_kwargs = ({"mode": "exact"} if mode == "exact"
                       else {"mode": "kron", "kron_dims": args.kron_dims, "dim": args.dim})
        head_chunk = None if args.method.endswith("_fullhead") else (args.head_chunk or "auto")
        sk = GradientSketcher(model, **sketch_kwargs, **mode_kwargs, head_chunk=head_chunk)
        result["head_chunk"] = sk.head_chunk
        for _ in range(args.repeats):
            feats = None  # the previous result is not held during the next run
            c0 = time.process_time()
            t0 = now()
            feats = sk.sketch(ids, attn, loss, batch_size=args.chunk)
            times.append(now() - t0)
            cpu_times.append(time.process_time() - c0)
        result["peak_extra_mib"] = peak_extra_mib()
        result["features_mib"] = feats.numel() * feats.element_size() / 2**20
        result["feature_dim"] = feats.shape[1]
        if args.profile:
            result["profile_table"] = profile_table(lambda: sk.sketch(ids, attn, loss, batch_size=args.chunk))
        gram = gram64(feats)
        del feats
    elif args.method == "exact_stream":
        # what selection needs (Gram, scores against a target, losses), the features never held
        sk = GradientSketcher(model, **sketch_kwargs, mode="exact", head_chunk=args.head_chunk or "auto")
        result["head_chunk"] = sk.head_chunk
        target = torch.randn(sk.feature_dim, generator=torch.Generator().manual_seed(args.seed))
        for _ in range(args.repeats):
            c0 = time.process_time()
            t0 = now()
            gram, scores, _ = sk.sketch_gram(ids, attn, loss, target=target, batch_size=args.chunk)
            times.append(now() - t0)
            cpu_times.append(time.process_time() - c0)
        del target, scores
        result["peak_extra_mib"] = peak_extra_mib()
        result["feature_dim"] = sk.feature_dim
    else:  # one repeat: minutes long
        t0 = time.perf_counter()
        gram = func_baseline(model, names, ids, attn, loss, args, result)
        times.append(time.perf_counter() - t0)
    result["seconds"] = min(times)
    result["all_seconds"] = times
    result["cpu_seconds"] = min(cpu_times) if cpu_times else None
    if "peak_extra_mib" not in result:  # func: its peak includes the projection and the Grams
        result["peak_extra_mib"] = peak_extra_mib()
    result["gram"] = None if gram is None else gram.double().tolist()
    result["hooked_params"] = sum(dict(model.named_modules())[n].weight.numel() for n in names)
    return result


def profile_table(fn, rows: int = 15) -> str:
    """``torch.profiler`` table of one call of ``fn``: top operators by self CPU time, with memory."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def func_baseline(model, names, ids, attn, loss, args, result):
    """torch.func per-sample gradients (vmap of grad) then a dense Gaussian projection to p."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap
    from tqdm import tqdm

    from ds_partitionsel.projection import BlockGaussianProjection

    modules = dict(model.named_modules())
    params = {n + ".weight": modules[n].weight.detach() for n in names}

    # The pool has no padding; HF's mask builder branches on the mask's values, which vmap
    # cannot trace, so the baseline runs without an attention mask.
    if not bool(attn.all()):
        raise ValueError("the torch.func baseline needs an unpadded pool")

    def row_loss(p, row_ids, row_mask):
        out = functional_call(model, p, (row_ids[None],), {"use_cache": False})
        w = row_mask[1:].float()
        nll = F.cross_entropy(out.logits[0, :-1].float(), row_ids[1:], reduction="none")
        return (nll * w).sum() / w.sum()

    per_sample = vmap(grad(row_loss), in_dims=(None, 0, 0))
    grads = {n: [] for n in names}
    t0 = time.perf_counter()
    with torch.no_grad():  # only torch.func's own level differentiates
        for s in tqdm(range(0, args.pool, args.func_chunk), desc="torch.func chunks", file=sys.stderr):
            sl = slice(s, s + args.func_chunk)
            g = per_sample(params, ids[sl], loss[sl])
            for n in names:
                grads[n].append(g[n + ".weight"].flatten(1))
            del g
        grads = {n: torch.cat(v) for n, v in grads.items()}
        result["func_seconds"] = time.perf_counter() - t0
        exact_gram = sum(gram64(v) for v in grads.values())
        t1 = time.perf_counter()
        proj = BlockGaussianProjection(args.dim, seed=args.seed, chunk_rows=4096, cache_bytes=0)
        out = None
        for n in tqdm(names, desc="dense projection", file=sys.stderr):
            out = proj.project_block(n, grads[n], out)
            del grads[n]
        result["projection_seconds"] = time.perf_counter() - t1
    result["feature_dim"] = args.dim
    result["exact_gram"] = exact_gram.double().tolist()
    return gram64(out)


# --------------------------------------------------------------------------- driver

def rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / ".cache/models/smollm2-135m"))
    ap.add_argument("--data", default=str(REPO / ".cache/demo_data/train.jsonl"))
    ap.add_argument("--pool", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=3, help="hook every nn.Linear of the last N blocks")
    ap.add_argument("--kron-dims", type=int, default=32)
    ap.add_argument("--dim", type=int, default=256, help="p: output width of kron and of the baseline")
    ap.add_argument("--chunk", type=int, default=8, help="sequences per forward for forward/exact/kron")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed repeats of forward/exact/kron (the minimum is reported; func runs once)")
    ap.add_argument("--func-chunk", type=int, default=8, help="sequences per torch.func vmap call")
    ap.add_argument("--head-chunk", type=int, default=None,
                    help="label positions per chunk of the LM head (default: the sketcher's 'auto')")
    ap.add_argument("--profile", action="store_true",
                    help="add a torch.profiler table of one extra run per method to the JSON")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the model runs (peak memory: RSS on "
                                                    "the CPU, max allocated on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(REPO / "runs/bench_sketch.json"))
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args(argv)

    if args.method:
        print(json.dumps(run_method(args)))
        return 0
    from ds_partitionsel.bench_inputs import DEMO_DATA, ensure_demo_data, ensure_model  # built on first use

    ensure_model(args.model)
    if args.data and Path(os.path.abspath(args.data)) == DEMO_DATA / "train.jsonl":
        ensure_demo_data()

    results = {}
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        cmd = [sys.executable, __file__, "--method", method] + [
            a for a in (argv if argv is not None else sys.argv[1:])]
        print(f"[bench_sketch] running {method} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            sys.exit(f"method {method} failed with exit code {proc.returncode}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    exact_gram = (results.get("exact") or {}).get("gram")
    if exact_gram is not None:
        for r in results.values():
            if r.get("gram") is not None:
                r["gram_rel_err"] = rel_err(r["gram"], exact_gram)
            if r.get("exact_gram") is not None:
                r["func_exact_gram_rel_err"] = rel_err(r["exact_gram"], exact_gram)
    floor = results.get("forward", {}).get("seconds")
    floor_peak = results.get("forward", {}).get("peak_extra_mib")
    func = results.get("func", {})
    rows = []
    for m, r in results.items():
        base = results.get(f"{m}_fullhead")  # the full-logit baseline of a chunked-head method
        working = r["peak_extra_mib"] - r.get("features_mib", 0.0)
        row = {"method": m, "seconds": r["seconds"], "peak_extra_mib": r["peak_extra_mib"],
               "feature_dim": r.get("feature_dim"), "gram_rel_err": r.get("gram_rel_err"),
               "x_forward": r["seconds"] / floor if floor else None,
               "speedup_vs_func": func["seconds"] / r["seconds"] if func and m != "forward" else None,
               "mem_ratio_vs_func": (func["peak_extra_mib"] / r["peak_extra_mib"]
                                     if func and m != "forward" and r["peak_extra_mib"] > 0 else None),
               "head_chunk": r.get("head_chunk"),
               "features_mib": r.get("features_mib"),
               "peak_working_mib": working,
               "peak_x_forward": r["peak_extra_mib"] / floor_peak if floor_peak else None,
               "working_peak_x_forward": working / floor_peak if floor_peak else None,
               "x_fullhead": r["seconds"] / base["seconds"] if base else None,
               "cpu_seconds": r.get("cpu_seconds"),
               "cpu_x_forward": (r["cpu_seconds"] / results["forward"]["cpu_seconds"]
                                 if r.get("cpu_seconds") and results.get("forward", {}).get("cpu_seconds") else None),
               "cpu_x_fullhead": (r["cpu_seconds"] / base["cpu_seconds"]
                                  if base and r.get("cpu_seconds") and base.get("cpu_seconds") else None),
               "peak_x_fullhead": r["peak_extra_mib"] / base["peak_extra_mib"] if base else None}
        rows.append(row)
    by_method = {row["method"]: row for row in rows}
    targets = {}
    for m, bound in (("kron", 1.3), ("exact", 2.0), ("exact_stream", 2.0)):
        row = by_method.get(m)
        if row is None or row["peak_x_forward"] is None:
            continue
        targets[f"{m}_peak_x_forward"] = {"bound": bound, "value": row["peak_x_forward"],
                                          "met": row["peak_x_forward"] <= bound}
        targets[f"{m}_working_peak_x_forward"] = {"bound": bound, "value": row["working_peak_x_forward"],
                                                  "met": row["working_peak_x_forward"] <= bound}
        if row["mem_ratio_vs_func"] is not None:
            targets[f"{m}_mem_ratio_vs_func"] = {"bound": 10.0, "value": row["mem_ratio_vs_func"],
                                                 "met": row["mem_ratio_vs_func"] >= 10.0}
        if row["x_fullhead"] is not None:
            # timings are noisy on a shared machine: 5% counts as unchanged
            targets[f"{m}_time_x_fullhead"] = {"bound": 1.05, "value": row["x_fullhead"],
                                               "met": row["x_fullhead"] <= 1.05}
        if row["cpu_x_fullhead"] is not None:
            targets[f"{m}_cpu_time_x_fullhead"] = {"bound": 1.05, "value": row["cpu_x_fullhead"],
                                                   "met": row["cpu_x_fullhead"] <= 1.05}

    print(f"\nSketch benchmark: {Path(args.model).name}, pool {args.pool} x {args.seq} tokens, "
          f"last {args.blocks} blocks ({results[methods[0]]['hooked_params']:,} weights), "
          f"{args.threads} threads, pool: {results[methods[0]]['pool_source']}")
    print(f"kron: kron_dims={args.kron_dims}, dim={args.dim}; func: vmap(grad) in chunks of "
          f"{args.func_chunk} + dense Gaussian projection to {args.dim}; others in chunks of {args.chunk}")
    fmt = "{:<15} {:>8} {:>9} {:>9} {:>10} {:>11} {:>9} {:>10} {:>8} {:>9} {:>9} {:>9}"
    print(fmt.format("method", "time s", "peak MiB", "work MiB", "p", "Gram err", "x forward",
                     "peak x fwd", "speedup", "mem ratio", "x fullhd", "peak x fh"))

    def f(v, spec):
        return "-" if v is None else format(v, spec)
    for row in rows:
        print(fmt.format(row["method"], f(row["seconds"], ".2f"), f(row["peak_extra_mib"], ".0f"),
                         f(row["peak_working_mib"], ".0f"),
                         f(row["feature_dim"], ","), f(row["gram_rel_err"], ".2e"),
                         f(row["x_forward"], ".2f"), f(row["peak_x_forward"], ".2f"),
                         f(row["speedup_vs_func"], ".1f"), f(row["mem_ratio_vs_func"], ".1f"),
                         f(row["x_fullhead"], ".2f"), f(row["peak_x_fullhead"], ".2f")))
    for name, t in targets.items():
        print(f"target {name}: {t['value']:.2f} (bound {t['bound']}) {'met' if t['met'] else 'MISSED'}")
    if func:
        print(f"func split: per-sample grads {func['func_seconds']:.1f} s, projection "
              f"{func['projection_seconds']:.1f} s; its exact Gram vs ours: "
              f"{func.get('func_exact_gram_rel_err', float('nan')):.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in results.values():
        r.pop("gram", None)
        r.pop("exact_gram", None)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "method"},
                               "table": rows, "targets": targets, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
