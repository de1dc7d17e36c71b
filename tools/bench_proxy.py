#!/usr/bin/env python
"""Proxy-model scoring on real data: how much cheaper, and how good is the proxy's choice?

Main model: SmolLM2-135M (``--model``). Proxies: the same model truncated to its first ``L``
blocks for each ``L`` in ``--layers`` (same tokenizer, no extra download), frozen; plus, with
``--train-layers L``, one proxy of ``L`` blocks trained on the selected batches with its own
AdamW (``sketch.proxy_train``). Every step of ``--steps``, on the demo pool:

1. the main model sketches the step's pool (``--pool-size`` candidates) and ``--anchors``
   held-out records (its target), and selects ``k = pool_size / pool_factor`` with PartitionSel
   (greedy, proportional budgets, ``lr``): the reference choice ``S_main``;
2. each proxy does the same with its own sketches and target: ``S_proxy``;
3. both are judged on the main model's terms ``a, Q`` (:mod:`ds_partitionsel.solver`): the
   set's utility at its best nonnegative weights, ``U*(S) = max_{w >= 0} <w, a_S> - 1/2 w^T Q_SS w``
   (what the greedy maximizes: how much of the validation gradient the set's gradients
   reach), also for the ``random`` method's choice ``S_rand`` (``k`` uniformly, mean of 16
   draws). Reported: ``utility_ratio = U*(S_proxy) / U*(S_main)`` beside
   ``random_utility_ratio = U*(S_rand) / U*(S_main)``, ``gain_ratio = (U*(S_proxy) - U*(S_rand)) /
   (U*(S_main) - U*(S_rand))`` (1: as good as the main model's own choice, 0: no better than
   random), ``utility_ratio_unit`` (the same ratio with unit weights, as the engine trains by
   default), ``overlap = |S_proxy ∩ S_main| / k`` (random: ``k / n`` in expectation), and the
   sketch time ratio proxy / main (pool + anchors, same process, same threads);
4. ``--train-steps`` of those steps then train: the main model (AdamW, ``--lr``) on the trained
   proxy's choice, as a proxy run would, and the trained proxy on the same batch.

Sketches: ``modules=3`` (every linear of the last 3 blocks), ``mode=kron``, ``kron_dims=32`` for
the main model and every proxy. Prints a table, writes JSON (``table``: one row per proxy,
means over steps; ``steps``: every step).

    python tools/bench_proxy.py --out runs/bench_proxy.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ds_partitionsel.proxy_quality import best_utility, sketch_pool  # noqa: E402


def score(sketcher, pool, valid, pool_ids, anchor_ids, pad, batch):
    """(features, target, seconds) of one scorer: the pool's sketches and the anchors' mean."""
    t0 = time.perf_counter()
    feats = sketch_pool(sketcher, pool, pool_ids, pad, batch)
    target = sketch_pool(sketcher, valid, anchor_ids, pad, batch).mean(0)
    return feats, target, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / ".cache/models/smollm2-135m"))
    ap.add_argument("--pool", default=str(REPO / ".cache/pools/demo256"))
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="frozen proxies: first L blocks")
    ap.add_argument("--train-layers", type=int, default=4, help="blocks of the trained proxy (0: none)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--train-steps", type=int, default=None, help="steps that also train (default: all)")
    ap.add_argument("--pool-size", type=int, default=64)
    ap.add_argument("--pool-factor", type=int, default=8)
    ap.add_argument("--anchors", type=int, default=8)
    ap.add_argument("--sketch-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5,
                    help="main model's lr (all weights, AdamW) and the utility's")
    ap.add_argument("--proxy-lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "runs/bench_proxy.json"))
    args = ap.parse_args(argv)
    from ds_partitionsel.bench_inputs import ensure_demo_pool, ensure_model  # built on first use

    ensure_model(args.model)
    ensure_demo_pool(args.pool)

    import torch
    import transformers
    from tqdm import tqdm

    from ds_partitionsel.budgets import allocate_budgets
    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.proxy import ProxyModel
    from ds_partitionsel.sampler import PoolSampler, generator
    from ds_partitionsel.selection import select, selection_utility
    from ds_partitionsel.sketch import GradientSketcher

    torch.set_num_threads(args.threads)
    tok = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pool = CandidatePool(args.pool, "train", tokenizer=tok)
    valid = CandidatePool(args.pool, "valid")
    torch.manual_seed(args.seed)
    main_model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                                   dtype=torch.float32)
    n_blocks = main_model.config.num_hidden_layers
    sketch_kwargs = dict(modules=3, mode="kron", kron_dims=32, seed=args.seed)
    scorers = {"main": GradientSketcher(main_model, **sketch_kwargs)}
    proxies = {}
    for layers in args.layers:
        proxies[f"first {layers} (frozen)"] = ProxyModel(args.model, layers=layers)
    trained = None
    if args.train_layers:
        trained = f"first {args.train_layers} (trained)"
        proxies[trained] = ProxyModel(args.model, layers=args.train_layers, train=True, lr=args.proxy_lr)
    for name, proxy in proxies.items():
        scorers[name] = GradientSketcher(proxy.model, **sketch_kwargs)
    main_opt = torch.optim.AdamW(main_model.parameters(), lr=args.lr, weight_decay=0.0)
    train_steps = args.steps if args.train_steps is None else args.train_steps
    k = args.pool_size // args.pool_factor
    sampler = PoolSampler(len(pool), args.pool_size, args.seed)

    def per_sequence_loss(batch, module):  # the engine's training loss: mean label NLL per row
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                ignore_index=-100, reduction="none").view(labels.shape)
        count = (labels != -100).sum(1)
        return nll.sum(1) / count.clamp(min=1), count

    steps = []
    for step in tqdm(range(args.steps), desc="bench_proxy steps", file=sys.stderr):
        pool_ids = sampler.pool(step).tolist()
        anchor_ids = torch.randperm(len(valid), generator=generator("anchors", args.seed, step))[:args.anchors].tolist()
        domains = pool.domains[torch.tensor(pool_ids)]
        budgets = allocate_budgets(torch.bincount(domains, minlength=len(pool.domain_names)), k)
        scored = {name: score(sk, pool, valid, pool_ids, anchor_ids, pad, args.sketch_batch)
                  for name, sk in scorers.items()}
        picks = {name: select("partitionsel", f, domains, t, budgets, lr=args.lr)
                 for name, (f, t, _) in scored.items()}
        main_f, main_t, main_s = scored["main"]
        ones = torch.ones(k, dtype=torch.float64)

        def u_main(indices):
            return selection_utility(main_f, main_t, indices, ones, lr=args.lr)

        def u_star(indices):
            return best_utility(main_f, main_t, indices, args.lr)

        randoms = [select("random", main_f, domains, main_t, budgets,
                          generator=generator("bench-random", args.seed, step, r)).indices for r in range(16)]
        u_best, u_best_unit = u_star(picks["main"].indices), u_main(picks["main"].indices)
        u_rand = statistics.fmean(u_star(idx) for idx in randoms)
        main_set = set(picks["main"].indices.tolist())
        record = {"step": step, "k": k, "n": len(pool_ids), "main_sketch_s": main_s,
                  "u_main": u_best, "u_random": u_rand, "random_utility_ratio": u_rand / u_best,
                  "proxies": {}}
        for name in proxies:
            u = u_star(picks[name].indices)
            record["proxies"][name] = {
                "sketch_s": scored[name][2], "time_ratio": scored[name][2] / main_s,
                "utility_ratio": u / u_best, "gain_ratio": (u - u_rand) / (u_best - u_rand),
                "utility_ratio_unit": u_main(picks[name].indices) / u_best_unit,
                "overlap": len(main_set & set(picks[name].indices.tolist())) / k}
        if trained is not None and step < train_steps:
            chosen = [pool_ids[i] for i in picks[trained].indices.tolist()]
            batches = [pool.collate(chosen[s:s + args.sketch_batch], pad)
                       for s in range(0, k, args.sketch_batch)]
            main_model.train()
            main_opt.zero_grad(set_to_none=True)
            loss = sum(per_sequence_loss(b, main_model)[0].sum() for b in batches) / k
            loss.backward()
            main_opt.step()
            main_opt.zero_grad(set_to_none=True)
            main_model.eval()
            record["main_train_loss"] = float(loss.detach())
            record["proxy_train_loss"] = proxies[trained].train_on(batches, per_sequence_loss)
        steps.append(record)

    rows = []
    for name, proxy in proxies.items():
        per = [s["proxies"][name] for s in steps]
        rows.append({"proxy": name, "blocks": proxy.model.config.num_hidden_layers, "main_blocks": n_blocks,
                     "trained": proxy.train,
                     **{key: statistics.fmean(p[key] for p in per)
                        for key in ("time_ratio", "utility_ratio", "gain_ratio", "utility_ratio_unit", "overlap")},
                     "gain_ratio_min": min(p["gain_ratio"] for p in per)})
    random_overlap = k / args.pool_size
    print(f"\nProxy scoring: {Path(args.model).name} ({n_blocks} blocks), pool {args.pool_size} -> k={k}, "
          f"{args.anchors} anchors, {args.steps} steps ({train_steps} training), kron sketches of the last 3 blocks")
    random_ratio = statistics.fmean(s["random_utility_ratio"] for s in steps)
    fmt = "{:<22} {:>10} {:>13} {:>10} {:>9} {:>12} {:>9}"
    print(fmt.format("proxy", "time ratio", "utility ratio", "gain ratio", "gain min", "unit-w ratio", "overlap"))
    for r in rows:
        print(fmt.format(r["proxy"], f"{r['time_ratio']:.3f}", f"{r['utility_ratio']:.3f}",
                         f"{r['gain_ratio']:.3f}", f"{r['gain_ratio_min']:.3f}",
                         f"{r['utility_ratio_unit']:.3f}", f"{r['overlap']:.3f}"))
    print(f"random choice: utility ratio {random_ratio:.3f}, gain ratio 0, overlap {random_overlap:.3f} "
          f"in expectation")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "table": rows, "random_overlap": random_overlap,
                               "random_utility_ratio": random_ratio,
                               "steps": steps}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
