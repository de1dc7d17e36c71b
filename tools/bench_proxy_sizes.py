#!/usr/bin/env python
"""How much of the main model's own selection quality do proxies 4x, 16x and 64x smaller keep?

The reference-model setting of pretraining: a main model and proxies of the same family and
tokenizer (``ds_partitionsel.proxy.proxy_from_config``, the shapes of ``tools/bench_overhead.py``:
width 128 x 5 blocks, 64 x 3, 32 x 1 against a main of width 256 x 6 blocks), all from random
weights, trained side by side on the same batches (the main model with AdamW, each proxy with its
own, as ``sketch.proxy_train`` does). Every ``--measure-every`` steps, on that step's pool:

1. the main model sketches the pool and ``--anchors`` held-out windows and selects ``k`` with
   the package's PartitionSel (greedy, the default ``validation`` budgets): ``S_main``;
2. each proxy does the same with its own sketches and target: ``S_proxy``;
3. every choice is judged on the main model's terms, as ``tools/bench_proxy.py`` does:
   ``utility_ratio = U*(S_proxy) / U*(S_main)``, ``gain_ratio = (U*(S_proxy) - U*(S_rand)) /
   (U*(S_main) - U*(S_rand))`` (1: the main model's own choice, 0: no better than random, mean of
   16 random draws), ``overlap = |S_proxy ∩ S_main| / k`` (random: ``k / n``).

Staleness (``--staleness 1 2 3``): the main model's own choice made with its weights of ``s`` steps
earlier (what batch ``s`` of an amortized group, ``steps_per_pool > s``, trains on: it was scored
``s`` steps before it is used), judged on the current model's terms; rows ``stale_s``.

Between measurements the models train on uniformly drawn batches (the data the proxies see does
not depend on their own choices, so the sizes are compared on equal terms). Sketches: Kronecker
(``kron_dims`` 16) of every linear of the last ``min(3, blocks)`` blocks of each model. Prints a
table, writes JSON (``rows``: one per proxy, means over measured steps, and over the second half
alone; ``steps``: every measurement) and a PNG of the gain ratio over training.

    python tools/bench_proxy_sizes.py --out runs/bench_proxy_sizes.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the same data, main model and proxy shapes as tools/bench_overhead.py, the same judgement as
# tools/bench_proxy.py
from ds_partitionsel.bench_inputs import PROXY_SHAPES, build_packed_pool, llama_from_config  # noqa: E402
from ds_partitionsel.proxy_quality import best_utility, sketch_pool  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(REPO / ".cache/bench_overhead"), help="data, tokenizer and pool (built once)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--main", type=int, nargs=3, default=[256, 6, 4], metavar=("HIDDEN", "LAYERS", "HEADS"))
    ap.add_argument("--proxies", nargs="*", default=list(PROXY_SHAPES), choices=list(PROXY_SHAPES))
    ap.add_argument("--steps", type=int, default=120, help="training steps")
    ap.add_argument("--measure-every", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pool-factor", type=int, default=8)
    ap.add_argument("--anchors", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of the main model and of every proxy")
    ap.add_argument("--staleness", type=int, nargs="*", default=[1, 2, 3],
                    help="also judge the main model's choice made s steps earlier (amortized pools)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "runs/bench_proxy_sizes.json"))
    args = ap.parse_args(argv)

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from tqdm import tqdm

    from ds_partitionsel.budgets import allocate_budgets
    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.loss import per_sequence_loss
    from ds_partitionsel.proxy import ProxyModel, flops_per_token, proxy_from_config
    from ds_partitionsel.sampler import PoolSampler, generator
    from ds_partitionsel.selection import select
    from ds_partitionsel.sketch import GradientSketcher

    torch.set_num_threads(args.threads)
    pool_dir, tok_dir = build_packed_pool(Path(args.work), args.seq, args.vocab)
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    pool, valid = CandidatePool(pool_dir, "train", tokenizer=tok), CandidatePool(pool_dir, "valid")
    pad, seq = tok.pad_token_id, int(pool.lengths.max())
    hidden, layers, heads = args.main
    main_model = llama_from_config(len(tok), hidden, layers, heads, seed=args.seed)
    main_opt = torch.optim.AdamW(main_model.parameters(), lr=args.lr, weight_decay=0.0)
    main_flops = flops_per_token(main_model, seq)
    proxies, ratios = {}, {}
    for name in args.proxies:
        h, n_layers, n_heads = PROXY_SHAPES[name]
        model = proxy_from_config(main_model, hidden_size=h, layers=n_layers, heads=n_heads, seed=args.seed)
        proxies[name] = ProxyModel(model, train=True, lr=args.lr)
        ratios[name] = main_flops / flops_per_token(model, seq)

    def sketcher(model):
        n_blocks = model.config.num_hidden_layers
        return GradientSketcher(model, modules=min(3, n_blocks), mode="kron", kron_dims=16, seed=args.seed)

    scorers = {"main": sketcher(main_model), **{n: sketcher(p.model) for n, p in proxies.items()}}
    stale_model = llama_from_config(len(tok), hidden, layers, heads, seed=args.seed) if args.staleness else None
    stale_sketcher = sketcher(stale_model) if stale_model is not None else None
    keep = max(args.staleness, default=0)
    history = []  # the main model's weights of the last `keep` steps, newest last

    def loss_fn(batch, module):
        return per_sequence_loss(module, batch, torch.device("cpu"))

    k, n = args.batch, args.batch * args.pool_factor
    sampler = PoolSampler(len(pool), n, args.seed)
    draw = torch.Generator().manual_seed(args.seed)
    names = pool.domain_names
    target_counts = valid.domain_counts().tolist()
    steps = []
    start = time.time()
    for step in tqdm(range(args.steps + 1), desc="bench_proxy_sizes", file=sys.stderr):
        if step % args.measure_every == 0:
            pool_ids = sampler.pool(step).tolist()
            anchor_ids = torch.randperm(len(valid), generator=generator("anchors", args.seed, step))[:args.anchors]
            domains = pool.domains[torch.tensor(pool_ids)]
            budgets = allocate_budgets(torch.bincount(domains, minlength=len(names)), k, "validation",
                                       target_counts=target_counts, floor=0.25)

            def choose(sk):
                """(features, target, picks) of one scorer on this step's pool and anchors."""
                feats = sketch_pool(sk, pool, pool_ids, pad, 32)
                target = sketch_pool(sk, valid, anchor_ids.tolist(), pad, 32).mean(0)
                feats = torch.nn.functional.normalize(feats.double(), dim=1)
                target = torch.nn.functional.normalize(target.double(), dim=0)
                return feats, target, select("partitionsel", feats, domains, target, budgets, lr=args.lr).indices

            chosen = {name: choose(sk) for name, sk in scorers.items()}
            main_terms = chosen["main"][:2]
            picks = {name: c[2] for name, c in chosen.items()}
            for lag in args.staleness:
                if lag <= len(history):
                    stale_model.load_state_dict(history[-lag])
                    picks[f"stale_{lag}"] = choose(stale_sketcher)[2]

            def u_star(indices):
                return best_utility(main_terms[0], main_terms[1], indices, args.lr)

            u_main = u_star(picks["main"])
            u_rand = statistics.fmean(
                u_star(select("random", main_terms[0], domains, main_terms[1], budgets,
                              generator=generator("bench-random", args.seed, step, r)).indices) for r in range(16))
            main_set = set(picks["main"].tolist())
            record = {"step": step, "u_main": u_main, "u_random": u_rand, "random_utility_ratio": u_rand / u_main,
                      "proxies": {}}
            for name in [*proxies, *(f"stale_{lag}" for lag in args.staleness)]:
                if name not in picks:
                    continue
                u = u_star(picks[name])
                record["proxies"][name] = {"utility_ratio": u / u_main,
                                           "gain_ratio": (u - u_rand) / (u_main - u_rand),
                                           "overlap": len(main_set & set(picks[name].tolist())) / k}
            steps.append(record)
        if step == args.steps:
            break
        if keep:
            history = (history + [{key: v.detach().clone() for key, v in main_model.state_dict().items()}])[-keep:]
        ids = torch.randint(0, len(pool), (k,), generator=draw).tolist()
        batch = pool.collate(ids, pad)
        main_model.train()
        main_opt.zero_grad(set_to_none=True)
        loss_fn(batch, main_model)[0].mean().backward()
        main_opt.step()
        main_model.eval()
        for proxy in proxies.values():
            proxy.train_on([batch], loss_fn)

    rows = []
    late = [s for s in steps if s["step"] >= args.steps / 2]
    for name in [*proxies, *(f"stale_{lag}" for lag in args.staleness)]:
        seen = [s for s in steps if name in s["proxies"]]
        seen_late = [s for s in late if name in s["proxies"]]
        if not seen:
            continue
        row = {"proxy": name, "main_over_proxy": round(ratios[name], 1) if name in ratios else 1.0}
        for key in ("utility_ratio", "gain_ratio", "overlap"):
            row[key] = statistics.fmean(s["proxies"][name][key] for s in seen)
            row[key + "_late"] = statistics.fmean(s["proxies"][name][key] for s in seen_late) if seen_late else None
        rows.append(row)
    random_ratio = statistics.fmean(s["random_utility_ratio"] for s in steps)
    print(f"\nProxy sizes: main width {hidden} x {layers} blocks, {args.steps} steps, measured every "
          f"{args.measure_every} ({len(steps)} pools of {n} -> k={k}); {time.time() - start:.0f} s")
    fmt = "{:<8} {:>14} {:>14} {:>11} {:>9} {:>16} {:>14}"
    print(fmt.format("proxy", "main/proxy", "utility ratio", "gain ratio", "overlap", "gain (2nd half)",
                     "overlap (2nd)"))
    for r in rows:
        late_cells = [f"{r[key]:.3f}" if r[key] is not None else "-" for key in ("gain_ratio_late", "overlap_late")]
        print(fmt.format(r["proxy"], f"{r['main_over_proxy']:.1f}x", f"{r['utility_ratio']:.3f}",
                         f"{r['gain_ratio']:.3f}", f"{r['overlap']:.3f}", *late_cells))
    print(f"random choice: utility ratio {random_ratio:.3f}, gain ratio 0, overlap {k / n:.3f} in expectation")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "random_utility_ratio": random_ratio,
                               "random_overlap": k / n, "steps": steps}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in [*proxies, *(f"stale_{lag}" for lag in args.staleness)]:
            pts = [(s["step"], s["proxies"][name]["gain_ratio"]) for s in steps if name in s["proxies"]]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if name in proxies else ":",
                    label=f"{name} ({ratios[name]:.0f}x fewer FLOPs)" if name in ratios
                    else f"main, {name.split('_')[1]} steps old")
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.axhline(1, color="black", lw=0.8, ls=":")
        ax.set_xlabel("training step")
        ax.set_ylabel("gain ratio (1 = main's own choice)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    except ImportError:
        print(f"wrote {out} (matplotlib missing: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
