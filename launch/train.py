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
import glob
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_partitionsel.config import (ConfigError, PartitionSelConfig, apply_override,  # noqa: E402
                                    check_deepspeed_config)
from ds_partitionsel.runs import ResumeMismatchError, RunDirError, check_run_dir  # noqa: E402

MONITORS = ("csv_monitor", "tensorboard")  # DeepSpeed monitors that write files under output_path


class UsageError(Exception):
    """A bad command line or input file: reported as one line, exit status 2."""


def _count(kind, minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{kind} must be >= {minimum}, got {value}")
        return value
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face model folder")
    src.add_argument("--tiny", choices=["llama", "qwen2"], help="tiny model built from a config (tests)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the model folder, or the pool's)")
    ap.add_argument("--num-layers", type=_count("--num-layers", 1), default=None,
                    help="keep only the first N transformer blocks")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters (rank 16) on the last 3 blocks")
    ap.add_argument("--pool", required=True, help="pool directory from tools/build_pool.py")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True)
    ap.add_argument("--steps", type=_count("--steps", 0), default=10,
                    help="train until this many steps (counted from the start of the run; 0: evaluate only)")
    ap.add_argument("--lr", type=_positive_float, default=None, help="override the optimizer learning rate")
    ap.add_argument("--method", default=None, help="override partitionsel.method")
    ap.add_argument("--seed", type=_count("--seed", 0), default=None,
                    help="override partitionsel.seed (and the model init)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a partitionsel key with a value of its type, e.g. --set pool_factor=4 "
                         "--set sketch.mode=kron --set use_weights=false "
                         "--set 'budget.minority_domains=[\"code\"]'")
    ap.add_argument("--output-dir", default=None,
                    help="this run's directory: metrics.jsonl, summary.json and the DeepSpeed monitors' "
                         "files (a directory that already holds another run's log is refused)")
    ap.add_argument("--save-dir", default=None, help="save a DeepSpeed checkpoint here at the end")
    ap.add_argument("--resume", default=None,
                    help="resume from a checkpoint directory (a pickle: load only checkpoints you trust); "
                         "its pool and selection config must match this run's")
    ap.add_argument("--resume-allow-changes", action="store_true",
                    help="resume even if the pool or the selection config differ from the checkpoint's")
    ap.add_argument("--eval-at-start", action="store_true", help="held-out loss per domain before the first step")
    ap.add_argument("--eval-at-end", action="store_true", help="held-out loss per domain after the last step")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def read_config(path, args, flag: str = "--deepspeed_config") -> dict:
    """The JSON config at ``path`` (given as ``flag``) with the command line's ``--method``,
    ``--seed`` and ``--set`` applied to its ``partitionsel`` block (created when missing)."""
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except OSError as e:
        raise UsageError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{flag} {path} must hold a JSON object, got {type(cfg).__name__}")
    block = cfg.setdefault("partitionsel", {})
    if not isinstance(block, dict):
        raise ConfigError(f"partitionsel in {path} must be a JSON object, got {type(block).__name__}")
    if args.method:
        block["method"] = args.method
    if args.seed is not None:
        block["seed"] = args.seed
    for item in args.set:
        apply_override(block, item)
    return cfg


def load_config(path, args):
    """The DeepSpeed config with the command line's overrides applied; the ``partitionsel`` block
    validated (:class:`ConfigError` names the key). Returns ``(config dict, PartitionSelConfig)``."""
    cfg = read_config(path, args)
    ps_cfg = PartitionSelConfig.from_dict(cfg["partitionsel"])
    check_deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return cfg, ps_cfg


def place_monitors(cfg, output_dir, config_path):
    """Point every enabled DeepSpeed file monitor into this run's directory.

    A relative (or empty) ``output_path`` is taken under ``output_dir`` (default ``monitor``); an
    absolute one is kept as the user wrote it. Without ``--output-dir`` an enabled monitor is an
    error: its files would land in a directory shared with every other run.
    """
    for name in MONITORS:
        mon = cfg.get(name)
        if not isinstance(mon, dict) or not mon.get("enabled"):
            continue
        path = mon.get("output_path") or "monitor"
        if os.path.isabs(path):
            continue
        if output_dir is None:
            raise UsageError(f"{name} is enabled in {config_path}: pass --output-dir so its files go under "
                             f"this run's own directory (or disable it, or give an absolute output_path)")
        mon["output_path"] = os.path.join(os.path.abspath(output_dir), path)


def check_run_dirs(args):
    """Refuse, before anything is built, a run directory or checkpoint that is not this run's."""
    if args.output_dir:
        check_run_dir(args.output_dir, resume=bool(args.resume))
    if args.resume:
        if not os.path.isdir(args.resume):
            raise UsageError(f"--resume {args.resume}: no such checkpoint directory")
        if not os.path.isfile(os.path.join(args.resume, "latest")):
            raise UsageError(f"--resume {args.resume} holds no DeepSpeed checkpoint (no 'latest' file); "
                             f"pass the --save-dir of an earlier run")
    if args.save_dir and os.path.isfile(os.path.join(args.save_dir, "latest")) and \
            not (args.resume and os.path.samefile(args.save_dir, args.resume)):
        raise UsageError(f"--save-dir {args.save_dir} already holds checkpoints of another run; choose a "
                         f"new directory (or --resume from it to continue that run)")
    if not os.path.isfile(os.path.join(args.pool, "manifest.json")):
        raise UsageError(f"--pool {args.pool} is not a candidate pool (no manifest.json); build one with "
                         f"python tools/build_pool.py")


def max_token_id(pool_dir, split) -> int:
    """Largest token id stored in a split (every ``tokens.npy`` of it, memory-mapped)."""
    import numpy as np

    top = -1
    for path in sorted(glob.glob(os.path.join(pool_dir, split, "**", "tokens.npy"), recursive=True)):
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        if tokens.size:
            top = max(top, int(tokens.max()))
    return top


def check_vocabulary(pool_dir, splits, model):
    """Every token id of the pool must index the model's embedding table."""
    vocab = model.get_input_embeddings().num_embeddings
    for split in splits:
        top = max_token_id(pool_dir, split)
        if top >= vocab:
            raise UsageError(f"pool {pool_dir} holds token id {top} in its {split} split, beyond the model's "
                             f"vocabulary of {vocab}: the pool was built with another tokenizer or is damaged; "
                             f"rebuild it with this model's tokenizer")


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
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise UsageError(f"--model {args.model} is not a Hugging Face model folder (no config.json); "
                             f"python tools/fetch_demo_data.py --model-only makes .cache/models/smollm2-135m")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                                      dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise UsageError(f"could not load a causal LM from --model {args.model}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if args.num_layers:
            blocks = model.model.layers
            if not 0 < args.num_layers <= len(blocks):
                raise UsageError(f"--num-layers must be in 1..{len(blocks)} for {args.model}, got {args.num_layers}")
            model.model.layers = blocks[: args.num_layers]
            model.config.num_hidden_layers = args.num_layers
    if args.lora:
        from ds_partitionsel.extras import require

        peft = require("peft", "--lora")
        LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

        n = model.config.num_hidden_layers
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          layers_to_transform=list(range(max(0, n - 3), n)))
        model = get_peft_model(model, lora)
    return model


def main(argv=None, train_fn=None) -> int:
    """Train (``train_fn``, default :func:`train`; ``launch/train_hf.py`` passes its own); returns
    the exit status. A user error is one line on stderr (status 2), a failed step one line naming
    the step and rank (status 1); no traceback for either."""
    train_fn = train_fn or train
    args = parse_args(argv)
    from ds_partitionsel.launch_env import map_launcher_env
    from ds_partitionsel.pool_format import PoolFormatError

    map_launcher_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"[rank {rank}] " if world > 1 else ""
    try:
        return train_fn(args)
    except (UsageError, ConfigError, PoolFormatError, RunDirError, ResumeMismatchError, ImportError) as e:
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 2
    except StepFailed as e:
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{where}interrupted", file=sys.stderr, flush=True)
        return 130


class StepFailed(Exception):
    """A training step (or evaluation) failed after training started; names the step."""


def _guarded(what, fn):
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - reported as one line that names the step
        first = (str(e).strip().splitlines() or [""])[0]
        raise StepFailed(f"{what} failed: {type(e).__name__}: {first}") from e


def train(args) -> int:
    cfg, ps_cfg = load_config(args.deepspeed_config, args)  # every config error before anything is built
    place_monitors(cfg, args.output_dir, args.deepspeed_config)
    check_run_dirs(args)
    import torch

    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.engine import initialize
    from ds_partitionsel.launch_env import init_distributed
    from ds_partitionsel.pool_format import load_tokenizer, read_manifest

    torch.manual_seed(ps_cfg.seed)
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    tok_path = args.tokenizer or args.model or read_manifest(args.pool)["tokenizer"]["name_or_path"]
    try:
        tokenizer = load_tokenizer(tok_path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        pool = CandidatePool(args.pool, "train", tokenizer=tokenizer)
    except ValueError as e:  # another tokenizer than the pool's
        raise UsageError(str(e)) from None
    valid = CandidatePool(args.pool, "valid")
    model = build_model(args, tokenizer)
    check_vocabulary(args.pool, ("train", "valid"), model)
    if args.lr is not None:
        cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
    optimizer = None
    if "optimizer" not in cfg or cfg["optimizer"].get("type") is None:
        lr = args.lr if args.lr is not None else 1e-4
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        cfg.pop("optimizer", None)

    # every collective of the job (DeepSpeed's included) waits at most partitionsel.timeout_s
    init_distributed(timeout_s=ps_cfg.timeout_s)
    rank = torch.distributed.get_rank()
    engine, _, _, _ = initialize(model, cfg, pool, valid, optimizer=optimizer, tokenizer=tokenizer,
                                 output_dir=args.output_dir, resume=bool(args.resume))
    if args.resume:
        if rank == 0:
            print(f"resuming from {args.resume} (checkpoints are pickles: only load ones you trust)",
                  file=sys.stderr, flush=True)
        engine.load_checkpoint(args.resume, allow_changes=args.resume_allow_changes)
        if args.steps <= engine.global_step:
            raise UsageError(f"--steps {args.steps} is not beyond the checkpoint's step {engine.global_step}: "
                             f"nothing to train (--steps counts from the start of the run)")

    eval_start = _guarded(f"evaluation at step {engine.global_step}", engine.evaluate) if args.eval_at_start else None
    t0 = time.perf_counter()
    records = []
    from tqdm import tqdm
    bar = tqdm(range(engine.global_step, args.steps), desc=f"{engine.cfg.method}", disable=rank != 0)
    for step in bar:
        rec = _guarded(f"training step {step} on rank {rank}", engine.train_step)
        records.append(rec)
        cp = rec.get("conflicting_pairs")
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", cp=cp if cp is not None and cp >= 0 else "-")
    eval_loss = _guarded(f"evaluation at step {engine.global_step}", engine.evaluate) if args.eval_at_end else None
    if args.save_dir:
        _guarded(f"saving the checkpoint at step {engine.global_step}", lambda: engine.save_checkpoint(args.save_dir))
    if rank == 0:
        summary = summarize(records, eval_loss, time.perf_counter() - t0, engine)
        summary["eval_loss_start"] = eval_start
        print(json.dumps(summary, indent=2))
        if args.output_dir:
            with open(os.path.join(args.output_dir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
    return finish(ps_cfg.timeout_s)


def finish(timeout_s: float) -> int:
    """End a run on every rank: wait for the others (rank 0 writes the summary last), then leave
    the process group. A rank that exits while the backend's threads still run can abort
    ("terminate called without an active exception")."""
    import torch

    from ds_partitionsel.collectives import Communicator

    _guarded("the final barrier", lambda: Communicator(None, timeout_s, "end of training").barrier("barrier"))
    torch.distributed.destroy_process_group()
    return 0


def summarize(records, eval_loss, seconds, engine):
    mix = {}
    for r in records:
        for name, c in r["domain_counts"].items():
            mix[name] = mix.get(name, 0) + c
    pairs = [r["conflicting_pairs"] for r in records  # None or a negative placeholder: not measured
             if isinstance(r.get("conflicting_pairs"), (int, float)) and r["conflicting_pairs"] >= 0]
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
    sys.exit(main())
