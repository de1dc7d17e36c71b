#!/usr/bin/env python
"""Train a Megatron-core GPT model with PartitionSel batch selection on tensor x data parallel ranks.

    torchrun --nproc_per_node 4 launch/train_megatron.py --tp 2 --pool P --steps 20 --output-dir runs/x
    DRY_RUN=1 DRY_RUN_TASKS=4 TRAIN_SCRIPT=launch/train_megatron.py bash launch/slurm.sbatch --tp 2 ...
    (CPU: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1, as tools/env.sh sets; gloo. GPU: NCCL, one rank per GPU.)

The world of W ranks is W / tp data-parallel replicas of one GPTModel (local layer spec, no
Transformer Engine; float32) split over tensor-parallel groups of ``--tp`` ranks. Every step:
the selection over the data-parallel group (``ds_partitionsel.megatron.MegatronSelector``:
sketches reduced over the TP group, the TP peers' agreement checked), forward/backward on this
replica's share of the batch, the gradients averaged over the data-parallel group, an AdamW
step. The ``"partitionsel"`` block and the batch, optimizer and clipping keys come from a
DeepSpeed-style JSON config (``--config``, default ``ds_configs/megatron.json``; ``zero_*``
and monitor keys are ignored). Pools are those of ``tools/build_pool.py`` (jsonl, HF datasets or
Megatron indexed datasets); the vocabulary is the pool's tokenizer's. Outputs as
``launch/train.py``: ``metrics.jsonl`` and ``summary.json`` in ``--output-dir``, plus
``ranks/rank<R>.jsonl`` (what each rank selected and trained on). ``--save-dir`` writes a
checkpoint (``latest``, ``<tag>/partitionsel_resume.json``, ``<tag>/tp<r>.pt`` per TP rank:
model, optimizer, selector state; at the end and every ``--save-interval`` steps); ``--resume``
continues one with the same pool, selection config and model shape.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the package, uninstalled

from ds_partitionsel.cli import (UsageError, add_run_flags, check_run_dirs, adamw_from_config, count_arg, guarded,  # noqa: E402
                                 max_token_id, rank_device, read_config, run_main, summarize, train_steps,
                                 write_summary)
from ds_partitionsel.config import ConfigError, split_deepspeed_config, train_batch_size  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "ds_configs", "megatron.json")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=count_arg("--tp", 1), default=1, help="tensor-parallel size (divides the world)")
    ap.add_argument("--pp", type=count_arg("--pp", 1), default=1, help="pipeline-parallel size (only 1 is supported)")
    ap.add_argument("--sequence-parallel", action="store_true", help="(not supported: refused)")
    ap.add_argument("--config", "--deepspeed_config", "--deepspeed-config", dest="config", default=DEFAULT_CONFIG,
                    help="JSON config: batch sizes, optimizer params, gradient_clipping and the partitionsel block "
                         "(default ds_configs/megatron.json)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the pool's)")
    ap.add_argument("--num-layers", type=count_arg("--num-layers", 1), default=2)
    ap.add_argument("--hidden-size", type=count_arg("--hidden-size", 1), default=64)
    ap.add_argument("--num-heads", type=count_arg("--num-heads", 1), default=4)
    ap.add_argument("--ffn-hidden-size", type=count_arg("--ffn-hidden-size", 1), default=None,
                    help="default 4 x hidden size")
    ap.add_argument("--seq-length", type=count_arg("--seq-length", 2), default=None,
                    help="positions of the model (default: the pool's max_length)")
    ap.add_argument("--save-dir", default=None,
                    help="save a checkpoint here at the end (and every --save-interval steps)")
    ap.add_argument("--save-interval", type=count_arg("--save-interval", 0), default=0,
                    help="also save every N steps (0: only at the end)")
    add_run_flags(ap, resume_help="resume from a --save-dir of an earlier run (its latest checkpoint) or one of "
                                  "its global_step<N> folders (pickles: load only checkpoints you trust)")
    return ap.parse_args(argv)


def load_config(args, dp: int):
    """``(DeepSpeed-style dict without the block, PartitionSelConfig, global batch)`` with the
    command line's overrides; the batch is micro x accumulation x the data-parallel size ``dp``."""
    raw = read_config(args.config, args, "--config")
    cfg, ps_cfg, _ = split_deepspeed_config(raw)
    from ds_partitionsel.megatron import check_selection_config

    check_selection_config(ps_cfg)
    for key in ("bf16", "fp16"):
        if (cfg.get(key) or {}).get("enabled"):
            raise ConfigError(f"{key} is enabled in {args.config}: train_megatron.py trains in float32; disable it")
    batch = train_batch_size(cfg, dp)
    if batch is None:
        raise ConfigError(f"{args.config} sets no train_micro_batch_size_per_gpu (or train_batch_size)")
    accumulation = int(cfg.get("gradient_accumulation_steps") or 1)
    micro = int(cfg.get("train_micro_batch_size_per_gpu") or batch // dp // accumulation)
    if micro < 1 or batch % (micro * dp):
        raise ConfigError(f"train_batch_size {batch} is not a multiple of micro batch {micro} x {dp} "
                          f"data-parallel ranks")
    return cfg, ps_cfg, batch, micro


def check_dirs(args):
    """Refuse, before anything is built, a run directory or checkpoint that is not this run's."""
    from ds_partitionsel.megatron_loop import CHECKPOINT_LATEST, checkpoint_folder

    check_run_dirs(args, latest_file=CHECKPOINT_LATEST, check_checkpoint=checkpoint_folder, save_flags=False)


def model_shape(args, vocab: int, seq_length: int) -> dict:
    """What a checkpoint's weights must match (besides the pool and the selection config)."""
    return {"tp": args.tp, "num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "num_heads": args.num_heads, "ffn_hidden_size": args.ffn_hidden_size or 4 * args.hidden_size,
            "seq_length": seq_length, "vocab_size": vocab}


def main(argv=None) -> int:
    """Train; returns the exit status (2: a user error, one line; 1: a failed step, one line)."""
    return run_main(parse_args(argv), lambda args: train(args, int(os.environ["WORLD_SIZE"])))


def train(args, world: int) -> int:
    from ds_partitionsel.extras import require
    from ds_partitionsel.megatron import check_gpt_shape, check_parallel_config

    # every argument and config error before a process group or a model exists
    require("megatron.core", "launch/train_megatron.py")
    dp = check_parallel_config(world, args.tp, args.pp, sequence_parallel=args.sequence_parallel)
    check_gpt_shape(tp=args.tp, hidden_size=args.hidden_size, num_heads=args.num_heads,
                    ffn_hidden_size=args.ffn_hidden_size)
    cfg, ps_cfg, batch_size, micro = load_config(args, dp)
    check_dirs(args)
    import torch

    from ds_partitionsel.config import check_pool_fit
    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.launch_env import init_distributed
    from ds_partitionsel.megatron import MegatronSelector, build_gpt, initialize_parallel
    from ds_partitionsel.megatron_loop import MegatronTrainer, check_checkpoint_shape
    from ds_partitionsel.pool_format import load_tokenizer, read_manifest
    from ds_partitionsel.records import MetricsSink

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    manifest = read_manifest(args.pool)
    try:
        tokenizer = load_tokenizer(args.tokenizer or manifest["tokenizer"]["name_or_path"])
        pool = CandidatePool(args.pool, "train", tokenizer=tokenizer)
    except ValueError as e:
        raise UsageError(str(e)) from None
    valid = CandidatePool(args.pool, "valid")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UsageError("the pool's tokenizer has neither a pad nor an eos token")
    vocab = len(tokenizer)
    top = max(max_token_id(args.pool, s) for s in ("train", "valid"))
    if top >= vocab:
        raise UsageError(f"pool {args.pool} holds token id {top}, beyond the tokenizer's vocabulary of {vocab}")
    longest = int(max(pool.lengths.max(), valid.lengths.max()))
    seq_length = args.seq_length or int(manifest.get("max_length") or longest)
    if seq_length < longest:
        raise UsageError(f"--seq-length {seq_length} is shorter than the pool's longest record ({longest} tokens)")
    check_pool_fit(ps_cfg, batch_size, dp, len(pool))
    shape = model_shape(args, vocab, seq_length)
    if args.resume:
        check_checkpoint_shape(args.resume, shape)
    device = rank_device()  # before NCCL starts
    init_distributed(timeout_s=ps_cfg.timeout_s)
    from ds_partitionsel.cli import check_ranks_agree

    check_ranks_agree(ps_cfg, ps_cfg.timeout_s)
    import torch.distributed as dist

    rank = dist.get_rank()
    layout = initialize_parallel(args.tp, args.pp, seed=ps_cfg.seed)
    model = build_gpt(vocab_size=vocab, tp=args.tp, num_layers=args.num_layers, hidden_size=args.hidden_size,
                      num_heads=args.num_heads, ffn_hidden_size=args.ffn_hidden_size, seq_length=seq_length,
                      seed=ps_cfg.seed, device=device)
    optimizer = adamw_from_config(model.parameters(), cfg, args)
    selector = MegatronSelector(model, ps_cfg, pool, valid, batch_size=batch_size, pad_token_id=pad, layout=layout)
    sink = MetricsSink(args.output_dir, rank=rank, resume=bool(args.resume))
    rank_log = None
    if args.output_dir:
        os.makedirs(os.path.join(args.output_dir, "ranks"), exist_ok=True)
        rank_log = open(os.path.join(args.output_dir, "ranks", f"rank{rank}.jsonl"), "a" if args.resume else "w")
    trainer = MegatronTrainer(model, optimizer, selector, micro_batch=micro, sink=sink, rank_log=rank_log,
                              clip=float(cfg.get("gradient_clipping") or 0.0), device=device)
    if args.resume:
        if rank == 0:
            print(f"resuming from {args.resume} (checkpoints are pickles: only load ones you trust)",
                  file=sys.stderr, flush=True)
        trainer.load(args.resume, shape, args.resume_allow_changes)
        if args.steps <= trainer.global_step:
            raise UsageError(f"--steps {args.steps} is not beyond the checkpoint's step {trainer.global_step}: "
                             f"nothing to train (--steps counts from the start of the run)")

    eval_start = guarded(f"evaluation at step {trainer.global_step}", trainer.evaluate) if args.eval_at_start else None
    t0 = time.perf_counter()

    from ds_partitionsel.cli import save_schedule, stop_note

    # every --save-interval steps, on SIGTERM/SIGUSR1 at the next step boundary (all ranks agree), at the end
    saves = save_schedule(args, lambda step: guarded(f"saving the checkpoint at step {step}",
                                                     lambda: trainer.save(args.save_dir, shape)), ps_cfg.timeout_s)
    records = train_steps(trainer.train_step, trainer.global_step, args.steps, rank,
                          f"{ps_cfg.method} tp{args.tp}xdp{dp}",
                          after_step=lambda: saves.after_step(trainer.global_step))
    stopped = saves.stopped_at is not None
    eval_loss = guarded(f"evaluation at step {trainer.global_step}", trainer.evaluate) \
        if args.eval_at_end and not stopped else None
    if args.save_dir:
        saves.final(trainer.global_step)
    stop_note(saves, rank, args.save_dir)
    if rank == 0:
        summary = summarize(records, eval_loss, time.perf_counter() - t0, selector)
        summary.update(eval_loss_start=eval_start, tensor_parallel=args.tp, data_parallel=dp, device=str(device))
        if stopped:
            summary["stopped_by_signal_after_step"] = saves.stopped_at
        write_summary(summary, args.output_dir)
    sink.close()
    if rank_log is not None:
        rank_log.close()
    from ds_partitionsel.collectives import Communicator
    from megatron.core import parallel_state

    guarded("the final barrier", lambda: Communicator(None, ps_cfg.timeout_s, "end of training").barrier("barrier"))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
