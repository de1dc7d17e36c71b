#!/usr/bin/env python
"""Train a Hugging Face causal LM with PartitionSel batch selection under DeepSpeed.

Works with every launcher we support (the process group comes from its variables):

    deepspeed --num_gpus 2 launch/train.py --model .cache/models/smollm2-135m \
        --pool .cache/pools/demo --deepspeed_config ds_configs/zero2.json --steps 20 --output-dir runs/x
    mpirun -n 2 python launch/train.py ...        (see launch/mpirun.sh)
    srun python launch/train.py ...               (see launch/slurm.sbatch)
    python launch/train.py ...                    (one process)

The model is a local HF folder (``--model``) or a tiny named config (``--tiny llama|qwen2``, for
tests; vocabulary from the pool's tokenizer). ``--num-layers N`` keeps only the first N blocks
of a pretrained model (real weights, fast runs). ``--lora`` trains LoRA adapters (peft) on the
last blocks instead of the full model.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face model folder")
    src.add_argument("--tiny", choices=["llama", "qwen2"], help="tiny model built from a config (tests)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the model folder, or the pool's)")
    ap.add_argument("--num-layers", type=int, default=None, help="keep only the first N transformer blocks")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters (rank 16) on the last 3 blocks")
    ap.add_argument("--pool", required=True, help="pool directory from tools/build_pool.py")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None, help="override the optimizer learning rate")
    ap.add_argument("--method", default=None, help="override partitionsel.method")
    ap.add_argument("--seed", type=int, default=None, help="override partitionsel.seed (and the model init)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a partitionsel key, e.g. --set pool_factor=4 --set sketch.mode='\"kron\"'")
    ap.add_argument("--output-dir", default=None, help="metrics.jsonl and summary.json go here")
    ap.add_argument("--save-dir", default=None, help="save a DeepSpeed checkpoint here at the end")
    ap.add_argument("--resume", default=None, help="resume from a checkpoint directory")
    ap.add_argument("--eval-at-start", action="store_true", help="held-out loss per domain before the first step")
    ap.add_argument("--eval-at-end", action="store_true", help="held-out loss per domain after the last step")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def load_config(path, args):
    with open(path) as fh:
        cfg = json.load(fh)
    block = cfg.setdefault("partitionsel", {})
    if args.method:
        block["method"] = args.method
    if args.seed is not None:
        block["seed"] = args.seed
    for item in args.set:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--set expects KEY=JSON, got {item!r}")
        node = block
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = json.loads(value)
        except json.JSONDecodeError:
            node[leaf] = value
    return cfg


def build_model(args, tokenizer):
    import torch
    import transformers

    if args.tiny:
        config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[args.tiny]
        config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=args.num_layers or 4,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                            max_position_embeddings=2048, tie_word_embeddings=False)
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                                  dtype=torch.float32)
        if args.num_layers:
            blocks = model.model.layers
            if not 0 < args.num_layers <= len(blocks):
                raise SystemExit(f"--num-layers must be in 1..{len(blocks)}")
            model.model.layers = blocks[: args.num_layers]
            model.config.num_hidden_layers = args.num_layers
    if args.lora:
        from peft import LoraConfig, get_peft_model

        n = model.config.num_hidden_layers
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          layers_to_transform=list(range(max(0, n - 3), n)))
        model = get_peft_model(model, lora)
    return model


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers

    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.engine import initialize
    from ds_partitionsel.launch_env import init_distributed

    init_distributed()
    rank = torch.distributed.get_rank()
    cfg = load_config(args.deepspeed_config, args)
    seed = cfg["partitionsel"].get("seed", 1234)
    torch.manual_seed(seed)
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    tok_path = args.tokenizer or args.model
    if tok_path is None:
        with open(os.path.join(args.pool, "manifest.json")) as fh:
            tok_path = json.load(fh)["tokenizer"]["name_or_path"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    pool = CandidatePool(args.pool, "train", tokenizer=tokenizer)
    valid = CandidatePool(args.pool, "valid")
    model = build_model(args, tokenizer)
    if args.lr is not None:
        cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
    optimizer = None
    if "optimizer" not in cfg or cfg["optimizer"].get("type") is None:
        lr = args.lr if args.lr is not None else 1e-4
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        cfg.pop("optimizer", None)
    engine, _, _, _ = initialize(model, cfg, pool, valid, optimizer=optimizer, tokenizer=tokenizer,
                                 output_dir=args.output_dir)
    if args.resume:
        engine.load_checkpoint(args.resume)

    eval_start = engine.evaluate() if args.eval_at_start else None
    t0 = time.perf_counter()
    records = []
    from tqdm import tqdm
    bar = tqdm(range(engine.global_step, args.steps), desc=f"{engine.cfg.method}", disable=rank != 0)
    for _ in bar:
        rec = engine.train_step()
        records.append(rec)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", cp=rec.get("conflicting_pairs", "-"))
    eval_loss = engine.evaluate() if args.eval_at_end else None
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
    if rank == 0:
        summary = summarize(records, eval_loss, time.perf_counter() - t0, engine)
        summary["eval_loss_start"] = eval_start
        print(json.dumps(summary, indent=2))
        if args.output_dir:
            with open(os.path.join(args.output_dir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def summarize(records, eval_loss, seconds, engine):
    mix = {}
    for r in records:
        for name, c in r["domain_counts"].items():
            mix[name] = mix.get(name, 0) + c
    pairs = [r["conflicting_pairs"] for r in records if r.get("conflicting_pairs", -1) >= 0]
    return {
        "method": engine.cfg.method, "steps": len(records), "world_size": engine.world,
        "batch_size": engine.batch_size, "pool_size": engine.pool_size,
        "first_loss": records[0]["train_loss"] if records else None,
        "last_loss": records[-1]["train_loss"] if records else None,
        "selected_domain_mix": mix,
        "mean_conflicting_pairs": sum(pairs) / len(pairs) if pairs else None,
        "eval_loss": eval_loss, "seconds": round(seconds, 2),
    }


if __name__ == "__main__":
    main()
