#!/usr/bin/env python
"""Per-step cost of PartitionSel against ``random`` and against the unavoidable floor.

In one run, on 2 ranks (``deepspeed`` launcher), for ZeRO-2 and ZeRO-3, with a small real model
(SmolLM2-135M, LoRA on its last 3 blocks sketched exactly, as the experiment of docs/RESULTS.md;
``--no-lora --num-layers N --sketch-mode kron`` trains the first N blocks instead) on the demo pool:

- ``partitionsel``: a full ``train_step`` (pool -> sketch -> select -> train);
- ``random``: the same step selecting the same batch size at random (no sketches);
- ``floor``: a plain no-grad forward of this rank's pool shard plus ``random``'s train part.

The overhead beyond the floor is ``partitionsel - floor``, reported in seconds and as a fraction
of the pool's plain forward; ``sketch`` covers the pool and the validation anchors, and the
anchors' share is reported apart. Medians over the measured steps, as before, and means beside
them (``*_mean``): with ``--refresh-interval R`` the anchors are sketched on one step in ``R``,
and only the mean over a multiple of ``R`` steps shows their amortized cost. The target of
issue 14 is ``overhead_over_pool_forward <= 0.35`` (``target`` in each row). ``--profile`` adds a
``torch.profiler`` table of one extra step on rank 0 (top operators by self CPU time, and the
sketcher's named phases ``sketch.forward/backward/head/reduce``) to the JSON. Prints a table,
writes JSON.

    python tools/bench_step.py --out runs/bench_step.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ds_partitionsel.launch_env import free_port  # noqa: E402

from ds_partitionsel.bench_inputs import ensure_demo_pool, ensure_model  # noqa: E402




def ds_config(stage, method, args):
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6,
        "partitionsel": {"method": method, "pool_factor": args.pool_factor, "seed": 3,
                         "sketch": {"modules": 3, "mode": args.sketch_mode, "micro_batch": args.sketch_batch,
                                    **({"head_chunk": args.head_chunk} if args.head_chunk else {})},
                         "validation": {"anchors": args.anchors, "refresh_interval": args.refresh_interval},
                         "mode": "auto"},
    }


def worker(args):
    import torch
    import transformers
    from tqdm import tqdm

    from ds_partitionsel.collectives import Communicator
    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.engine import initialize
    from ds_partitionsel.launch_env import init_distributed

    init_distributed()
    rank = torch.distributed.get_rank()
    torch.set_num_threads(1)
    tok = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    pool = CandidatePool(args.pool, "train", tokenizer=tok)
    valid = CandidatePool(args.pool, "valid")
    results = []
    cases = [(stage, method) for stage in args.stages for method in ("partitionsel", "random")]
    for stage, method in tqdm(cases, disable=rank != 0, desc="bench_step"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                                  dtype=torch.float32)
        if args.num_layers:
            model.model.layers = model.model.layers[: args.num_layers]
            model.config.num_hidden_layers = args.num_layers
        if args.lora:  # as launch/train.py --lora: rank-16 adapters on the last 3 blocks
            from ds_partitionsel.extras import require

            peft = require("peft", "--lora")
            LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

            n = model.config.num_hidden_layers
            model = get_peft_model(model, LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                layers_to_transform=list(range(n - 3, n))))
        engine, _, _, _ = initialize(model, ds_config(stage, method, args), pool, valid,
                                     optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                                 lr=1e-5), tokenizer=tok)
        steps, forwards = [], []
        for step in range(args.warmup + args.steps):
            rec = engine.train_step()
            # the floor's forward: a plain no-grad forward of the same pool shard
            ids = engine.selector.plan(step).local_ids.tolist()  # the step's own plan: this rank's shard
            Communicator(context="bench_step").barrier("barrier")
            t0 = time.perf_counter()
            with torch.no_grad():
                engine.module.eval()
                for s in range(0, len(ids), args.sketch_batch):
                    b = pool.collate(ids[s:s + args.sketch_batch], engine.pad_token_id)
                    engine.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                engine.module.train()
            Communicator(context="bench_step").barrier("barrier")
            t_fwd = time.perf_counter() - t0
            if step >= args.warmup:
                steps.append(rec["time_s"])
                forwards.append(t_fwd)
        med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        mean = {k: statistics.fmean(s[k] for s in steps) for k in steps[0]}
        row = {"stage": stage, "method": method, "time_s": med, "time_s_mean": mean,
               "pool_forward_s": statistics.median(forwards), "pool_forward_s_mean": statistics.fmean(forwards),
               "pool_size": engine.pool_size, "batch_size": engine.batch_size,
               "sketch_dim": engine.sketcher.feature_dim, "head_chunk": engine.sketcher.head_chunk}
        if args.profile and method == "partitionsel":
            row.update(profile_step(engine, rank))
        results.append(row)
        del engine
    if rank == 0:
        with open(args.out + ".raw", "w") as fh:
            json.dump(results, fh)
    Communicator(context="bench_step").barrier("barrier")


def profile_step(engine, rank, rows=20):
    """One more step, profiled on rank 0: the top operators and the sketcher's named phases."""
    from torch.profiler import ProfilerActivity, profile

    if rank != 0:
        engine.train_step()
        return {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.train_step()
    averages = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 for e in averages
              if e.key.startswith("sketch.")}
    return {"profile_table": averages.table(sort_by="self_cpu_time_total", row_limit=rows),
            "profile_phases_s": phases}


def report(args):
    with open(args.out + ".raw") as fh:
        raw = json.load(fh)
    os.remove(args.out + ".raw")
    rows = []
    for stage in args.stages:
        ps = next(r for r in raw if r["stage"] == stage and r["method"] == "partitionsel")
        rnd = next(r for r in raw if r["stage"] == stage and r["method"] == "random")
        fwd = ps["pool_forward_s"]
        floor = fwd + rnd["time_s"]["train"]
        t_ps = ps["time_s"]["total"]
        overhead = t_ps - floor
        # means: the anchors' cost amortized over the refresh interval
        fwd_mean = ps["pool_forward_s_mean"]
        overhead_mean = ps["time_s_mean"]["total"] - fwd_mean - rnd["time_s_mean"]["train"]
        rows.append({"zero_stage": stage, "pool_size": ps["pool_size"], "batch_size": ps["batch_size"],
                     "sketch_dim": ps.get("sketch_dim"),
                     "partitionsel_s": t_ps, "random_s": rnd["time_s"]["total"], "floor_s": floor,
                     "pool_forward_s": fwd, "sketch_s": ps["time_s"]["sketch"],
                     "anchors_s": ps["time_s"].get("anchors", 0.0), "solve_s": ps["time_s"]["solve"],
                     "comm_s": ps["time_s"]["comm"], "train_s": ps["time_s"]["train"],
                     "overhead_beyond_floor_s": overhead, "overhead_over_pool_forward": overhead / fwd,
                     "sketch_over_pool_forward": ps["time_s"]["sketch"] / fwd,
                     "ratio_vs_random": t_ps / rnd["time_s"]["total"],
                     "sketch_mode": args.sketch_mode, "lora": args.lora, "head_chunk": ps.get("head_chunk"),
                     "refresh_interval": args.refresh_interval,
                     "anchors_over_pool_forward": ps["time_s"].get("anchors", 0.0) / fwd,
                     "pool_sketch_over_pool_forward": (ps["time_s"]["sketch"] - ps["time_s"].get("anchors", 0.0)) / fwd,
                     "anchors_over_pool_forward_mean": ps["time_s_mean"].get("anchors", 0.0) / fwd_mean,
                     "overhead_over_pool_forward_mean": overhead_mean / fwd_mean,
                     "target": {"bound": 0.35, "value": overhead / fwd, "met": overhead / fwd <= 0.35,
                                "value_mean": overhead_mean / fwd_mean, "met_mean": overhead_mean / fwd_mean <= 0.35},
                     "profile_phases_s": ps.get("profile_phases_s"), "profile_table": ps.get("profile_table")})
    hdr = (f"{'ZeRO':>4} | {'PS s':>7} {'random s':>8} {'floor s':>7} | {'fwd s':>6} {'sketch s':>8} {'anchor s':>8} "
           f"{'solve s':>7} {'comm s':>6} {'train s':>7} | {'x random':>8} {'overhead/fwd':>12}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['zero_stage']:>4} | {r['partitionsel_s']:>7.2f} {r['random_s']:>8.2f} {r['floor_s']:>7.2f} | "
              f"{r['pool_forward_s']:>6.2f} {r['sketch_s']:>8.2f} {r['anchors_s']:>8.2f} {r['solve_s']:>7.3f} {r['comm_s']:>6.3f} "
              f"{r['train_s']:>7.2f} | {r['ratio_vs_random']:>8.2f} {r['overhead_over_pool_forward']:>12.2f}")
    for r in rows:
        t = r["target"]
        print(f"ZeRO-{r['zero_stage']} target overhead/fwd <= {t['bound']}: median {t['value']:.2f} "
              f"({'met' if t['met'] else 'MISSED'}), mean over steps {t['value_mean']:.2f} "
              f"({'met' if t['met_mean'] else 'MISSED'}); anchors/fwd {r['anchors_over_pool_forward']:.2f} "
              f"(mean {r['anchors_over_pool_forward_mean']:.2f}), pool sketch/fwd "
              f"{r['pool_sketch_over_pool_forward']:.2f}; mode {r['sketch_mode']}, refresh {r['refresh_interval']}")
        if r.get("profile_phases_s"):
            print("  profiled phases (s, rank 0, one step): " +
                  ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["profile_phases_s"].items())))
    meta = {k: v for k, v in vars(args).items() if k != "worker"}
    with open(args.out, "w") as fh:
        json.dump({"config": meta, "results": rows}, fh, indent=2)
    print(f"wrote {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=".cache/models/smollm2-135m")
    ap.add_argument("--pool", default=".cache/pools/demo256")
    ap.add_argument("--num-layers", type=int, default=0, help="keep the first N blocks (0: all)")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                    help="train and sketch LoRA adapters on the last 3 blocks (default), or all weights")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--pool-factor", type=int, default=8)
    ap.add_argument("--sketch-batch", type=int, default=8)
    ap.add_argument("--sketch-mode", default="exact")
    ap.add_argument("--anchors", type=int, default=8)
    ap.add_argument("--refresh-interval", type=int, default=1,
                    help="steps between validation anchor refreshes (validation.refresh_interval)")
    ap.add_argument("--head-chunk", type=int, default=0,
                    help="label positions per chunk of the sketch's LM head (0: the sketcher's 'auto')")
    ap.add_argument("--profile", action="store_true",
                    help="profile one extra step on rank 0 and add the tables to the JSON")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_step.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    if args.worker:
        return worker(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    # the inputs exist before any rank starts (built on first use: bench_inputs)
    ensure_model(args.model)
    ensure_demo_pool(args.pool)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(args.ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker",
           *sys.argv[1:]]
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    report(args)


if __name__ == "__main__":
    main()
