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
5. plot the run (tools/analyze_run.py) and print the summary.

    python launch/demo.py --pretrain [--steps 60] [--pack 128] [--method partitionsel] [--out runs/pretrain_demo]
"""
import argparse
import json
import os
import shutil
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo import BIN, REPO, report, run  # noqa: E402  (the demo's paths, runner and report)

from ds_partitionsel.launch_env import free_port  # noqa: E402


def write_corpus(data_dir: str, path: str) -> dict:
    """Raw-text corpus jsonl ``{"text", "domain"}``: demo records as documents + stdlib sources."""
    counts = {}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for split in ("train", "valid"):
            for line in open(os.path.join(data_dir, f"{split}.jsonl"), encoding="utf-8"):
                rec = json.loads(line)
                out.write(json.dumps({"text": rec["prompt"] + "\n" + rec["response"], "domain": rec["domain"]},
                                     ensure_ascii=False) + "\n")
                counts[rec["domain"]] = counts.get(rec["domain"], 0) + 1
        stdlib = sysconfig.get_paths()["stdlib"]
        for name in sorted(os.listdir(stdlib)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="ignore") as fh:
                text = fh.read()
            if text.strip() and len(text) <= 200_000:
                out.write(json.dumps({"text": text, "domain": "python"}, ensure_ascii=False) + "\n")
                counts["python"] = counts.get("python", 0) + 1
    os.replace(tmp, path)
    return counts


def train_tokenizer(corpus: str, out_dir: str, vocab_size: int) -> None:
    """Byte-level BPE trained on the corpus, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for line in open(corpus, encoding="utf-8"):
            yield json.loads(line)["text"]

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts(), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>").save_pretrained(out_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--method", default="partitionsel")
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
    out = os.path.join(REPO, args.out)
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run([os.path.join(BIN, "deepspeed"), "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "launch/train.py", "--tiny", "llama", "--num-layers", str(args.layers),
         "--tokenizer", tok, "--pool", pool, "--deepspeed_config", args.config, "--steps", str(args.steps),
         "--method", args.method, "--lr", str(args.lr), "--set", "eval_interval=10", "--set", "eval_samples=64",
         "--eval-at-start", "--eval-at-end", "--output-dir", args.out], env=env)
    report(args.out, "pretraining demo", f"windows of {args.pack} tokens from pools of {{pool_size}}; "
                                          f"tiny Llama from scratch, vocabulary {args.vocab}")


if __name__ == "__main__":
    main()
