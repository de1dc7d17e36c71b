#!/usr/bin/env python
"""What selection costs against a training step: every cheap option, side by side in one run.

A main model (a Llama built from a config, ``--main``) trains on batches of ``--batch``
packed windows of ``--seq`` tokens of real text and code (the demo data, a BPE tokenizer trained
on it, a pool built by tools/build_pool.py --pack, all under ``--work``, once). For each

- scorer: the main model itself (``main_over_proxy`` 1) and proxies built from a config
  (``sketch.proxy_config``) about 4x, 16x and 64x smaller in forward FLOPs per token, trained
  alongside on the selected batches (their training is counted as selection cost);
- feature mode: ``blocks_kron`` (Kronecker sketches of every linear of the last 3 blocks, a
  backward through them), ``last_block_kron`` (the last block only: a shorter backward) and
  ``head_kron`` (the LM head's gradient from a forward only, ``sketch.mode head_kron``);
- ``steps_per_pool`` m in {1, 2, 4} (one scoring pass of the pool selects m batches);
- ``score_len``: whole windows, or a seeded window of ``--score-len`` tokens;

the real :class:`~ds_partitionsel.selector.Selector` runs ``--steps`` steps (whole groups of m)
(``select`` and ``after_step`` for every step), and

    selection_over_train = CPU seconds of selection per step / CPU seconds of one training step

with the training step (forward, backward and AdamW step of the main model on one batch)
measured in the same process, before, between and after the rows (the median). CPU seconds are
the process's (``time.process_time``), with ``--threads`` threads (default 1), so other jobs on
a shared machine change them less than wall time. Prints a table (progress on stderr), writes
JSON ``{"rows": [...], "models": {...}, "train_cpu_s": [...], "args": {...}}``.

    python tools/bench_overhead.py --out runs/bench_overhead.json
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

# the data, the main model and the proxies' shapes (hidden, layers, heads: about 4x, 16x and 64x
# fewer FLOPs per token than the default main model) are shared with tools/bench_proxy_sizes.py
from ds_partitionsel.bench_inputs import PROXY_SHAPES, build_packed_pool, llama_from_config  # noqa: E402

FEATURES = {"blocks_kron": {"mode": "kron", "modules": 3},
            "last_block_kron": {"mode": "kron", "modules": 1},
            "head_kron": {"mode": "head_kron"}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_costs(model, seq: int) -> dict:
    """Forward FLOPs per token of ``model`` (:func:`~ds_partitionsel.proxy.flops_per_token`), of its
    head (``2 V d``) and of one block's linears (``2 x`` their weights, the last block)."""
    from torch import nn

    from ds_partitionsel.proxy import flops_per_token
    from ds_partitionsel.sketch import transformer_blocks

    head = model.get_output_embeddings()
    _, blocks = transformer_blocks(model)
    block = sum(m.weight.numel() for m in blocks[-1].modules() if isinstance(m, nn.Linear))
    return {"flops_per_token": flops_per_token(model, seq), "head_flops": 2.0 * head.weight.numel(),
            "block_flops": 2.0 * block, "layers": len(blocks), "vocab": head.out_features}


def modelled_ratio(costs: dict, main_costs: dict, features: str, m: int, score_len, seq: int, pool_factor: int,
                   anchors: int, batch: int, kron_out: int = 32, trained_proxy: bool = True) -> float:
    """The cost model of docs/COST.md: selection / training step from FLOPs per token alone,

        ((f + A/k) (T_s / T) c / (3 m rho)) + [trained proxy] 1 / rho,   rho = F_main / F_scorer,

    with ``c`` the scoring pass per token over a forward: 1 + 2 V k_out / F for ``head_kron``
    (the projected softmax), 1 + (sketched blocks' F + the head's ``d nll / d h``) / F for the
    block modes (the backward computes activation gradients only: the weight gradients are
    replaced by the sketch reductions)."""
    F = costs["flops_per_token"]
    if features == "head_kron":
        c = 1.0 + 2.0 * costs["vocab"] * kron_out / F
    else:
        sketched = min(3 if features == "blocks_kron" else 1, costs["layers"])
        c = 1.0 + (sketched * costs["block_flops"] + costs["head_flops"]) / F
    rho = main_costs["flops_per_token"] / F
    t_s = min(score_len or seq, seq) / seq
    scoring = (pool_factor + anchors / batch) * t_s * c / (3.0 * m * rho)
    return scoring + (1.0 / rho if trained_proxy else 0.0)


def add_model(row: dict, models: dict, args, seq: int) -> None:
    """``row["modelled_selection_over_train"]`` and the measured / modelled ratio."""
    scorer = "main" if row["proxy"] == "1x" else row["proxy"]
    row["modelled_selection_over_train"] = modelled_ratio(
        models[scorer], models["main"], row["features"], row["steps_per_pool"], row["score_len"], seq,
        args.pool_factor, args.anchors, args.batch, trained_proxy=scorer != "main")
    row["measured_over_modelled"] = row["selection_over_train"] / row["modelled_selection_over_train"]


def train_step_cpu(model, optimizer, pool, ids, pad) -> float:
    """CPU seconds of one training step of ``model`` on records ``ids``."""
    from ds_partitionsel.loss import per_sequence_loss

    import torch

    batch = pool.collate(ids, pad)
    t0 = time.process_time()
    per_seq, _ = per_sequence_loss(model, batch, torch.device("cpu"))
    per_seq.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.process_time() - t0


def print_table(rows) -> None:
    print("| scorer | main/proxy FLOPs | features | m | score_len | selection CPU s/step | of which proxy training | "
          "selection / train | modelled | measured / modelled |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['proxy']} | {r['main_over_proxy']:.1f} | {r['features']} | {r['steps_per_pool']} | "
              f"{r['score_len'] or 'whole'} | {r['selection_cpu_s_per_step']:.3f} | "
              f"{r['proxy_train_cpu_s_per_step']:.3f} | {r['selection_over_train']:.3f} | "
              f"{r['modelled_selection_over_train']:.3f} | {r['measured_over_modelled']:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(REPO / ".cache/bench_overhead"), help="data, tokenizer and pool (built once)")
    ap.add_argument("--pool", help="an existing packed pool instead (with --tokenizer)")
    ap.add_argument("--tokenizer")
    ap.add_argument("--seq", type=int, default=128, help="tokens per packed window")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--main", type=int, nargs=3, default=[256, 6, 4], metavar=("HIDDEN", "LAYERS", "HEADS"))
    ap.add_argument("--proxies", nargs="*", default=list(PROXY_SHAPES), choices=list(PROXY_SHAPES))
    ap.add_argument("--features", nargs="*", default=list(FEATURES), choices=list(FEATURES))
    ap.add_argument("--steps-per-pool", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--score-len", type=int, default=32, help="the short window (0: whole windows only)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pool-factor", type=int, default=8)
    ap.add_argument("--anchors", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="steps measured per row (rounded up to whole groups)")
    ap.add_argument("--train-repeats", type=int, default=2, help="training steps timed at each of 3 points")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "runs/bench_overhead.json"))
    ap.add_argument("--report-only", action="store_true",
                    help="recompute the model columns and the table of the rows in --out (no timing)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    from ds_partitionsel.config import PartitionSelConfig
    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.proxy import flops_per_token, proxy_from_config
    from ds_partitionsel.selector import Selector

    torch.set_num_threads(args.threads)
    if args.pool:
        pool_dir, tok_dir = Path(args.pool), Path(args.tokenizer)
    else:
        pool_dir, tok_dir = build_packed_pool(Path(args.work), args.seq, args.vocab)
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    pool = CandidatePool(pool_dir, "train", tokenizer=tok)
    valid = CandidatePool(pool_dir, "valid")
    pad = tok.pad_token_id
    vocab = len(tok)
    hidden, layers, heads = args.main
    main_model = llama_from_config(vocab, hidden, layers, heads, seed=args.seed)
    optimizer = torch.optim.AdamW(main_model.parameters(), lr=1e-4)
    seq = int(pool.lengths.max())
    main_flops = flops_per_token(main_model, seq)
    models = {"main": {"hidden": hidden, "layers": layers, "heads": heads, "vocab": vocab,
                       "params": sum(p.numel() for p in main_model.parameters()), **model_costs(main_model, seq)}}
    for name in args.proxies:
        h, n_layers, n_heads = PROXY_SHAPES[name]
        proxy = proxy_from_config(main_model, hidden_size=h, layers=n_layers, heads=n_heads)
        models[name] = {"hidden": h, "layers": n_layers, "heads": n_heads, **model_costs(proxy, seq),
                        "params": sum(p.numel() for p in proxy.parameters())}
        models[name]["main_over_proxy"] = main_flops / models[name]["flops_per_token"]
        del proxy
    if args.report_only:
        saved = json.loads(Path(args.out).read_text())
        train = statistics.median(saved["train_cpu_s"])
        for row in saved["rows"]:
            add_model(row, models, args, seq)
        print_table(saved["rows"])
        saved["models"] = models
        Path(args.out).write_text(json.dumps(saved, indent=1))
        print(f"training step: median {train:.3f} CPU s; rewrote {args.out}")
        return 0
    log("models: " + ", ".join(f"{k} {v['flops_per_token'] / 1e6:.2f} MFLOP/token" for k, v in models.items()))

    gen = torch.Generator().manual_seed(args.seed)
    train_cpu = []

    def time_training():
        for _ in range(args.train_repeats):
            ids = torch.randint(0, len(pool), (args.batch,), generator=gen).tolist()
            train_cpu.append(train_step_cpu(main_model, optimizer, pool, ids, pad))

    train_step_cpu(main_model, optimizer, pool, list(range(args.batch)), pad)  # warm-up, not counted
    time_training()
    log(f"training step: {statistics.median(train_cpu):.3f} CPU s (batch {args.batch} x {seq} tokens)")

    scorers = ["1x"] + list(args.proxies)
    lens = [None] + ([args.score_len] if args.score_len else [])
    plan = [(s, f, m, w) for s in scorers for f in args.features for w in lens for m in args.steps_per_pool]
    rows = []
    started = time.perf_counter()
    for i, (scorer, feat, m, width) in enumerate(plan):
        if i == len(plan) // 2:
            time_training()  # the training step again, halfway
        sketch = dict(FEATURES[feat], kron_dims=32, micro_batch=args.batch, score_len=width)
        if scorer != "1x":
            h, n_layers, n_heads = PROXY_SHAPES[scorer]
            sketch.update(proxy_config={"hidden_size": h, "layers": n_layers, "heads": n_heads}, proxy_train=True,
                          proxy_lr=1e-3)
        cfg = PartitionSelConfig.from_dict({"pool_factor": args.pool_factor, "steps_per_pool": m,
                                            "seed": args.seed, "validation": {"anchors": args.anchors},
                                            "sketch": sketch})
        selector = Selector(main_model, cfg, pool, valid, batch_size=args.batch, pad_token_id=pad)
        cpu = sketch_s = proxy_s = 0.0
        steps = m * -(-args.steps // m)
        for step in range(steps):
            t0 = time.process_time()
            sel = selector.select(step, lr=1e-4, with_features=False)
            t1 = time.process_time()
            selector.after_step(sel)
            t2 = time.process_time()
            cpu += t2 - t0
            proxy_s += t2 - t1
            sketch_s += sel.timings.sketch + sel.timings.anchors
        per_step = cpu / steps
        train = statistics.median(train_cpu)
        ratio = 1.0 if scorer == "1x" else models[scorer]["main_over_proxy"]
        row = {"proxy": scorer, "main_over_proxy": round(ratio, 2), "features": feat, "steps_per_pool": m,
               "score_len": width, "selection_over_train": per_step / train, "selection_cpu_s_per_step": per_step,
               "proxy_train_cpu_s_per_step": proxy_s / steps, "scoring_wall_s_per_step": sketch_s / steps,
               "train_cpu_s": train}
        rows.append(row)
        done = time.perf_counter() - started
        log(f"[{i + 1}/{len(plan)}] {scorer:>3} {feat:<15} m={m} score_len={width}: selection/train "
            f"{row['selection_over_train']:.3f} ({done:.0f} s elapsed, ~{done / (i + 1) * (len(plan) - i - 1):.0f} s left)")
        del selector
    time_training()
    train = statistics.median(train_cpu)
    for row in rows:  # every row against the same training step: the median of all its timings
        row["selection_over_train"] = row["selection_cpu_s_per_step"] / train
        row["train_cpu_s"] = train
        add_model(row, models, args, seq)

    print(f"\ntraining step: median {train:.3f} CPU s over {len(train_cpu)} steps "
          f"(min {min(train_cpu):.3f}, max {max(train_cpu):.3f})")
    print_table(rows)
    best = [r for r in rows if r["main_over_proxy"] >= 16 and r["selection_over_train"] <= 0.10]
    print(f"\nrows with main_over_proxy >= 16 and selection_over_train <= 0.10: {len(best)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "models": models, "train_cpu_s": train_cpu, "args": vars(args)},
                              indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
