"""Benchmark distributed selection: replicated vs sharded, side by side, with the auto choice.

Measured part: for each world size, real gloo ranks on 127.0.0.1 (one spawn per world size)
run ``ds_partitionsel.distributed.select`` over pools of several sizes in each mode, and report
per rank the time of a call (median over repeats, slowest rank) and ``Selection.bytes_sent``,
plus what ``mode="auto"`` chose and which mode was faster.

Analytic part: bytes sent per rank and collective rounds per step from the cost model for
world sizes and pools we cannot run here (8 to 1024 ranks, up to 1M candidates).

    python tools/bench_distributed.py                       # measured + analytic, JSON + tables
    python tools/bench_distributed.py --analytic-only --markdown
    python tools/bench_distributed.py --worlds 1 2 --pools 1024 4096 --repeats 2

Not a test: it prints and saves numbers (default ``runs/bench_distributed.json``).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ds_partitionsel.collectives import Communicator  # noqa: E402
from ds_partitionsel.budgets import allocate_budgets  # noqa: E402
from ds_partitionsel.distributed import CostModel  # noqa: E402
from ds_partitionsel.launch_env import free_port  # noqa: E402

MODES = ("replicated", "sharded", "auto")




def _pool(n, p, n_dom, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n, p, generator=gen), dim=1).to(dtype)
    domains = torch.randint(0, n_dom, (n,), generator=gen)
    target = (torch.randn(p, generator=gen) / p ** 0.5).to(dtype)
    return feats, domains, target


def _rank_main(rank, world, port, cfg, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from ds_partitionsel import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    dtype = getattr(torch, cfg["dtype"])
    comm = Communicator(context="bench_distributed")
    rows = []
    for n in cfg["pools"]:
        feats, domains, target = _pool(n, cfg["p"], cfg["domains"], dtype)
        budgets = allocate_budgets(torch.bincount(domains, minlength=cfg["domains"]), cfg["k"])
        lo, hi = rank * n // world, (rank + 1) * n // world
        shard = (feats[lo:hi].clone(), domains[lo:hi].clone(), target, budgets)
        for mode in MODES:
            times, sel = [], None
            for rep in range(cfg["repeats"] + 1):  # the first call warms up
                gen = torch.Generator().manual_seed(rep)
                comm.barrier("benchmark barrier")
                t0 = time.perf_counter()
                sel = distributed.select(cfg["method"], *shard, lr=0.5, mode=mode,
                                         rule=cfg["rule"], generator=gen, step=rep)
                if rep:
                    times.append(time.perf_counter() - t0)
            slowest = comm.all_reduce(torch.tensor([statistics.median(times)], dtype=torch.float64),
                                      "max", "slowest rank's time")
            rows.append({"world": world, "n": n, "mode": mode, "ran": sel.info["mode"],
                         "seconds": float(slowest), "bytes_sent": sel.bytes_sent,
                         "bytes_received": sel.info["bytes_received"],
                         "rounds": sel.info["rounds"],
                         "estimates": sel.info.get("estimates")})
    dist.destroy_process_group()
    if rank == 0:
        results.put(rows)


def measure(cfg, worlds):
    ctx = torch.multiprocessing.get_context("spawn")
    rows = []
    try:
        from tqdm import tqdm
        worlds_iter = tqdm(worlds, desc="world sizes", file=sys.stderr)
    except ImportError:
        worlds_iter = worlds
    for world in worlds_iter:
        results = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, cfg, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        rows.extend(results.get(timeout=3600))
        for p in procs:
            p.join()
    return rows


def analytic(model, worlds, pools, p, k, itemsize):
    """Cost-model rows for the scale we cannot run: bytes and rounds per rank per step."""
    out = []
    for world in worlds:
        for n in pools:
            shape = dict(n_total=n, n_max=-(-n // world), p=p, itemsize=itemsize, k=k, world=world)
            row = {"world": world, "n": n}
            for mode, rule in (("replicated", "greedy"), ("sharded", "greedy"), ("sharded", "rrg")):
                est = model.estimate(mode, rule=rule, **shape)
                row[f"{mode}_{rule}"] = est
            row["auto"] = model.choose(rule="greedy", **shape)[0]
            row["auto_nccl"] = CostModel.for_backend("nccl").choose(rule="greedy", **shape)[0]
            out.append(row)
    return out


def _fmt_bytes(b):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def print_measured(rows, markdown):
    by = {(r["world"], r["n"], r["mode"]): r for r in rows}
    keys = sorted({(r["world"], r["n"]) for r in rows})
    head = ["world", "N", "replicated s", "sharded s", "replicated B/rank", "sharded B/rank",
            "rounds rep/shd", "auto chose", "faster"]
    lines = [head]
    for world, n in keys:
        rep, shd, auto = (by[(world, n, m)] for m in MODES)
        faster = "replicated" if rep["seconds"] < shd["seconds"] else "sharded"
        lines.append([str(world), str(n), f"{rep['seconds']:.4f}", f"{shd['seconds']:.4f}",
                      _fmt_bytes(rep["bytes_sent"]), _fmt_bytes(shd["bytes_sent"]),
                      f"{rep['rounds']}/{shd['rounds']}", auto["ran"], faster])
    _print_table(lines, markdown)


def print_analytic(rows, markdown):
    head = ["ranks", "N", "replicated sent/recv per rank", "rounds",
            "sharded greedy sent/recv", "rounds", "sharded rrg sent/recv", "rounds", "auto gloo", "auto nccl"]
    lines = [head]

    def pair(est):
        return f"{_fmt_bytes(est['bytes_sent'])} / {_fmt_bytes(est['bytes_received'])}"
    for r in rows:
        rep, shd, rrg = r["replicated_greedy"], r["sharded_greedy"], r["sharded_rrg"]
        lines.append([str(r["world"]), str(r["n"]), pair(rep), str(rep["rounds"]), pair(shd),
                      str(shd["rounds"]), pair(rrg), str(rrg["rounds"]), r["auto"],
                      r["auto_nccl"]])
    _print_table(lines, markdown)


def _print_table(lines, markdown):
    if markdown:
        print("| " + " | ".join(lines[0]) + " |")
        print("|" + "|".join("---" for _ in lines[0]) + "|")
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--pools", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--p", type=int, default=256, help="feature width")
    ap.add_argument("--k", type=int, default=64, help="batch size (picks per step)")
    ap.add_argument("--domains", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--rule", default="greedy", choices=["greedy", "rrg"])
    ap.add_argument("--method", default="partitionsel")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--analytic-only", action="store_true")
    ap.add_argument("--analytic-p", type=int, default=8192)
    ap.add_argument("--analytic-k", type=int, default=1024)
    ap.add_argument("--markdown", action="store_true", help="print tables as markdown")
    ap.add_argument("--out", default="runs/bench_distributed.json")
    args = ap.parse_args(argv)

    cfg = {k: getattr(args, k) for k in ("pools", "p", "k", "domains", "dtype", "rule", "method",
                                         "repeats")}
    report = {"config": cfg, "cost_model": dict(vars(CostModel()))}
    if not args.analytic_only:
        rows = measure(cfg, args.worlds)
        report["measured"] = rows
        print(f"\nmeasured: gloo on 127.0.0.1, {cfg['method']} rule={cfg['rule']}, p={cfg['p']}, "
              f"k={cfg['k']}, {cfg['dtype']}, median of {cfg['repeats']} (slowest rank)")
        print_measured(rows, args.markdown)
    worlds = [8, 32, 128, 512, 1024]
    pools = [16384, 131072, 1048576]
    rows = analytic(CostModel(), worlds, pools, args.analytic_p, args.analytic_k, 4)
    report["analytic"] = {"p": args.analytic_p, "k": args.analytic_k, "itemsize": 4, "rows": rows}
    print(f"\nanalytic (cost model, per rank per step): p={args.analytic_p}, "
          f"k={args.analytic_k}, float32 features")
    print_analytic(rows, args.markdown)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
