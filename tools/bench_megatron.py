#!/usr/bin/env python
"""Benchmark tensor-parallel sketches: TP=N against TP=1 on the same Megatron GPT model and rows.

Run under torchrun with N ranks (CPU: gloo, ``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1``; GPUs: NCCL):

    torchrun --nproc_per_node 2 tools/bench_megatron.py --out runs/bench_megatron.json

One process group, two phases on the same seed (the same whole weights, ``use_cpu_initialization``):
``TP=N`` (one model split over the N ranks) and its baseline ``TP=1`` (every rank holds the
whole model: N data-parallel replicas). In each phase every rank sketches the same ``--rows``
random sequences with ``TensorParallelSketcher`` (all linears but the head, micro batches of
``--micro``) in ``exact`` and ``kron`` mode. Reported per mode, side by side: seconds per row at
TP=1 and TP=N and their ratio, the bytes one rank sent to the TP all-gathers per row, and the
largest difference between the TP=N and the TP=1 features relative to the largest TP=1 entry
(float rounding only: the sketches are the same quantity). Timings are the median of
``--repeats`` runs after one warm-up; on a CPU shared with other jobs they are noisy.
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--kron", type=int, default=32, help="kron_dims of the kron mode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the JSON here (rank 0)")
    return ap.parse_args(argv)


def _phase(tp, args, ids, device):
    """``{mode: (seconds per row, TP bytes sent per row, features)}`` of one parallel layout."""
    import torch
    from megatron.core import parallel_state

    from ds_partitionsel.collectives import Communicator
    from ds_partitionsel.megatron import TensorParallelSketcher, build_gpt, initialize_parallel

    initialize_parallel(tp, seed=args.seed)
    model = build_gpt(vocab_size=args.vocab, tp=tp, num_layers=args.layers, hidden_size=args.hidden,
                      num_heads=args.heads, seq_length=args.seq, seed=args.seed, device=device)
    out = {}
    for mode in ("exact", "kron"):
        sk = TensorParallelSketcher(model, modules="all_linear", mode=mode, kron_dims=args.kron, seed=args.seed,
                                    normalize=False)
        sk.sketch(ids[: args.micro], batch_size=args.micro)  # warm-up
        times = []
        sent_before = sk.tp_comm.bytes_sent
        for _ in range(args.repeats):
            Communicator(None).barrier("bench barrier")
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            feats = sk.sketch(ids, batch_size=args.micro)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        sent = (sk.tp_comm.bytes_sent - sent_before) / args.repeats / ids.shape[0]
        out[mode] = (statistics.median(times) / ids.shape[0], sent, feats.double().cpu())
    parallel_state.destroy_model_parallel()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    from ds_partitionsel.launch_env import init_distributed

    device = torch.device("cpu")
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.rows, args.seq), generator=gen).to(device)
    if rank == 0:
        print(f"TP={world} vs TP=1: {args.layers} layers, hidden {args.hidden}, {args.rows} rows x {args.seq} "
              f"tokens, micro {args.micro}, kron {args.kron}, device {device}", file=sys.stderr, flush=True)
    split = _phase(world, args, ids, device)
    whole = _phase(1, args, ids, device)
    rows = []
    for mode in ("exact", "kron"):
        t_n, sent, f_n = split[mode]
        t_1, _, f_1 = whole[mode]
        rows.append({"mode": mode, "features": int(f_1.shape[1]), "tp1_s_per_row": t_1, f"tp{world}_s_per_row": t_n,
                     "time_ratio": t_n / t_1, "tp_bytes_sent_per_row": sent,
                     "max_rel_diff": float((f_n - f_1).abs().max() / f_1.abs().max())})
    if rank == 0:
        head = f"{'mode':6} {'features':>9} {'TP=1 s/row':>11} {f'TP={world} s/row':>11} {'ratio':>6} " \
               f"{'TP bytes/row':>13} {'max rel diff':>13}"
        print(head)
        for r in rows:
            print(f"{r['mode']:6} {r['features']:>9} {r['tp1_s_per_row']:>11.4f} {r[f'tp{world}_s_per_row']:>11.4f} "
                  f"{r['time_ratio']:>6.2f} {r['tp_bytes_sent_per_row']:>13.0f} {r['max_rel_diff']:>13.2e}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), "tp": world, "device": str(device),
                                                  "table": rows}, indent=2) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
