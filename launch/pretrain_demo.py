#!/usr/bin/env python
"""The pretraining demo (``python launch/demo.py --pretrain``): a small Llama trained from
scratch with PartitionSel on 2 ranks, on packed windows of real multi-domain text and code.

1. fetch the demo data (tools/fetch_demo_data.py --data-only) and write a raw-text corpus: the
   math, molecule and code records as plain documents, plus the Python standard library's own
   ``.py`` files on this machine (domain ``python``);
2. train a byte-level BPE tokenizer on that corpus (vocabulary ``--vocab``), once;
3. build a packed pool (tools/build_pool.py --text-field text --pack SEQ_LEN --valid-fraction),
   once;
4. train a tiny Llama (launch/train.py --tiny llama) with ``deepspeed --num_gpus 2`` (ZeRO-2,
   PartitionSel, Kronecker sketches), with held-out loss per domain before, during and after;
5. train ``--baseline`` (default ``random``) on the same seed and pools and compare the held-out
   curves (``<out>/report/compare.png``); plot the run (tools/analyze_run.py), print the summary.

    python launch/demo.py --pretrain [--steps 60] [--pack 128] [--method partitionsel] [--out runs/pretrain_demo]
"""
import argparse
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, REPO)  # the package, uninstalled

from ds_partitionsel.cli import compare_runs, report_run, run_command, runs_with_baseline  # noqa: E402
from ds_partitionsel.corpus import train_tokenizer, write_corpus  # noqa: E402
from ds_partitionsel.launch_env import free_port  # noqa: E402


def run(cmd, **kw):
    run_command(cmd, REPO, **kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--method", default="partitionsel")
    ap.add_argument("--baseline", default="random",
                    help="also train this method on the same seed and pools (<out>_<baseline>) and compare "
                         "the held-out curves; none: skip")
    ap.add_argument("--config", default="ds_configs/zero2.json")
    ap.add_argument("--pack", type=int, default=128, help="window length (tokens)")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained on the corpus")
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks of the tiny Llama")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--cache", default=".cache", help="where data, tokenizer and pool go (created if missing)")
    ap.add_argument("--out", default="runs/pretrain_demo")
    args = ap.parse_args(argv)

    cache = os.path.join(REPO, args.cache)
    data = os.path.join(cache, "demo_data")
    work = os.path.join(cache, "pretrain_demo")
    os.makedirs(work, exist_ok=True)
    run([sys.executable, "tools/fetch_demo_data.py", "--data-only", "--cache", cache])
    corpus = os.path.join(work, "corpus.jsonl")
    tok = os.path.join(work, f"tokenizer{args.vocab}")
    pool = os.path.join(work, f"pool_pack{args.pack}_v{args.vocab}")
    if not os.path.exists(corpus):
        print(f"corpus documents per domain: {write_corpus(data, corpus)}", flush=True)
    if not os.path.exists(os.path.join(tok, "tokenizer.json")):
        train_tokenizer(corpus, tok, args.vocab)
    if not os.path.exists(os.path.join(pool, "manifest.json")):
        run([sys.executable, "tools/build_pool.py", "--tokenizer", tok, "--train", corpus, "--text-field", "text",
             "--pack", str(args.pack), "--valid-fraction", "0.05", "--out", pool])
        run([sys.executable, "tools/inspect_pool.py", pool])
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    runs = runs_with_baseline(args.method, args.baseline, args.out)
    for method, out in runs.items():
        shutil.rmtree(os.path.join(REPO, out), ignore_errors=True)
        run([os.path.join(BIN, "deepspeed"), "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), "launch/train.py", "--tiny", "llama", "--num-layers", str(args.layers),
             "--tokenizer", tok, "--pool", pool, "--deepspeed_config", args.config, "--steps", str(args.steps),
             "--method", method, "--lr", str(args.lr), "--set", "eval_interval=10", "--set", "eval_samples=64",
             "--eval-at-start", "--eval-at-end", "--output-dir", out], env=env)
    report_run(REPO, args.out, "pretraining demo", f"windows of {args.pack} tokens from pools of {{pool_size}}; "
                                                 f"tiny Llama from scratch, vocabulary {args.vocab}")
    if len(runs) > 1:  # did the selection pay on this data? the same seed without it
        compare_runs(REPO, runs, os.path.join(args.out, "report"))


if __name__ == "__main__":
    main()
