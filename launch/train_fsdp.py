#!/usr/bin/env python
"""Train a Hugging Face causal LM with PartitionSel batch selection under PyTorch FSDP2 (or HSDP).

    torchrun --nproc_per_node 2 launch/train_fsdp.py --tiny llama --tokenizer T --pool P \
        --steps 20 --output-dir runs/x
    torchrun --nproc_per_node 8 launch/train_fsdp.py --model M --pool P --hsdp 2x4 ...   # replicate x shard
    (CPU: DS_ACCELERATOR=cpu OMP_NUM_THREADS=1, gloo. GPU: NCCL, one rank per GPU.)

The flags of ``launch/train.py``. Every transformer block and the root are ``fully_shard``-ed on
a 1-D mesh of all ranks (``--hsdp RxS``: a 2-D replicate x shard mesh); all of them are
data-parallel ranks of the selection. The batch, optimizer (AdamW), clipping and bf16 keys come
from a DeepSpeed-style JSON config (``--config``, default ``ds_configs/zero2.json``; ``zero_*``
and monitor keys are ignored); ``bf16.enabled`` trains with a bf16 ``MixedPrecisionPolicy``
(float32 reductions; sketches always float32). Writes ``metrics.jsonl`` and ``summary.json`` in
``--output-dir``; ``--save-dir`` a DCP checkpoint ``<save-dir>/global_step<N>`` (model, optimizer,
selector) with a ``latest`` file; ``--resume`` continues one with the same pool and selection config.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the package, uninstalled

from ds_partitionsel.cli import (UsageError, add_model_flags, add_run_flags, add_save_flags, build_model,  # noqa: E402
                                 check_ranks_agree, check_run_dirs, check_sketch_modules, adamw_from_config, rank_device,
                                 check_vocabulary, finish, guarded,
                                 load_tokenizer_and_pools, read_config, run_main, save_schedule, stop_note,
                                 summarize, train_steps, write_summary)
from ds_partitionsel.preemption import write_latest  # noqa: E402
from ds_partitionsel.config import ConfigError, split_deepspeed_config, train_batch_size  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "ds_configs", "zero2.json")
LATEST = "latest"


def _mesh_shape(text):
    try:
        replicate, shard = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected REPLICATExSHARD such as 2x4, got {text!r}") from None
    return replicate, shard


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(ap)
    ap.add_argument("--config", "--deepspeed_config", "--deepspeed-config", dest="config", default=DEFAULT_CONFIG,
                    help="JSON config: batch sizes, optimizer params, gradient_clipping, bf16 and the partitionsel "
                         "block (default ds_configs/zero2.json)")
    ap.add_argument("--hsdp", type=_mesh_shape, default=None, metavar="RxS",
                    help="HSDP: a replicate x shard mesh (default: FSDP over all ranks)")
    add_run_flags(ap, resume_help="resume from a --save-dir of an earlier run (its latest checkpoint) or one of "
                                  "its global_step<N> folders")
    add_save_flags(ap, what="a DCP checkpoint")
    return ap.parse_args(argv)


def load_config(args, world: int):
    """``(DeepSpeed-style dict without the block, PartitionSelConfig, global batch, micro batch)``."""
    raw = read_config(args.config, args, "--config")
    cfg, ps_cfg, _ = split_deepspeed_config(raw)
    if (cfg.get("fp16") or {}).get("enabled"):
        raise ConfigError(f"fp16 is enabled in {args.config}: train_fsdp.py trains in float32 or bf16 "
                          f"(bf16.enabled); disable fp16")
    batch = train_batch_size(cfg, world)
    if batch is None:
        raise ConfigError(f"{args.config} sets no train_micro_batch_size_per_gpu (or train_batch_size)")
    accumulation = int(cfg.get("gradient_accumulation_steps") or 1)
    micro = int(cfg.get("train_micro_batch_size_per_gpu") or batch // world // accumulation)
    if micro < 1 or batch % (micro * world):
        raise ConfigError(f"train_batch_size {batch} is not a multiple of micro batch {micro} x {world} ranks")
    return cfg, ps_cfg, batch, micro


def checkpoint_folder(path: str) -> str:
    """``PATH/<latest>`` for a --save-dir, or ``PATH`` itself when it is one checkpoint."""
    from ds_partitionsel.runs import RESUME_RECORD

    if os.path.isfile(os.path.join(path, LATEST)):
        with open(os.path.join(path, LATEST)) as fh:
            return os.path.join(path, fh.read().strip())
    if os.path.isfile(os.path.join(path, RESUME_RECORD)):
        return path
    raise UsageError(f"--resume {path} holds no checkpoint (neither a '{LATEST}' file nor {RESUME_RECORD}); "
                     f"pass the --save-dir of an earlier run or one of its global_step<N> folders")


def train(args, world: int) -> int:
    if args.lora:
        raise UsageError("--lora is not supported by train_fsdp.py (FSDP2 shards the whole model); drop it")
    if args.hsdp is not None and args.hsdp[0] * args.hsdp[1] != world:
        raise UsageError(f"--hsdp {args.hsdp[0]}x{args.hsdp[1]} does not cover the world of {world} ranks")
    cfg, ps_cfg, batch_size, micro = load_config(args, world)
    check_run_dirs(args, latest_file=LATEST, check_checkpoint=checkpoint_folder)
    import torch

    from ds_partitionsel.config import check_pool_fit
    from ds_partitionsel.fsdp import PartitionSelFSDP, data_parallel_mesh, shard_model
    from ds_partitionsel.launch_env import init_distributed

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(ps_cfg.seed)
    tokenizer, pool, valid = load_tokenizer_and_pools(args)
    check_pool_fit(ps_cfg, batch_size, world, len(pool))
    model = build_model(args, tokenizer)
    check_vocabulary(args.pool, ("train", "valid"), model)
    check_sketch_modules(model, ps_cfg)
    device = rank_device()  # before NCCL starts
    init_distributed(timeout_s=ps_cfg.timeout_s)
    check_ranks_agree(ps_cfg, ps_cfg.timeout_s)
    rank = torch.distributed.get_rank()
    mp = None
    if (cfg.get("bf16") or {}).get("enabled"):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = data_parallel_mesh(args.hsdp, device.type)
    model = shard_model(model.to(device), mesh, mp_policy=mp)
    optimizer = adamw_from_config(model.parameters(), cfg, args)
    trainer = PartitionSelFSDP(model, optimizer, ps_cfg, pool, valid, batch_size=batch_size, micro_batch=micro,
                               pad_token_id=tokenizer.pad_token_id, mesh=mesh,
                               clip=float(cfg.get("gradient_clipping") or 0.0), output_dir=args.output_dir,
                               resume=bool(args.resume))
    if args.resume:
        trainer.load_checkpoint(checkpoint_folder(args.resume), allow_changes=args.resume_allow_changes)
        if args.steps <= trainer.global_step:
            raise UsageError(f"--steps {args.steps} is not beyond the checkpoint's step {trainer.global_step}: "
                             f"nothing to train (--steps counts from the start of the run)")

    eval_start = guarded(f"evaluation at step {trainer.global_step}", trainer.evaluate) if args.eval_at_start else None
    t0 = time.perf_counter()
    shape = f"hsdp{args.hsdp[0]}x{args.hsdp[1]}" if args.hsdp else f"fsdp{world}"
    def save(step):
        tag = f"global_step{step}"

        def save_now():
            trainer.save_checkpoint(os.path.join(args.save_dir, tag))
            if rank == 0:  # after the resume record: a kill before this keeps the previous checkpoint
                write_latest(args.save_dir, tag)

        guarded(f"saving the checkpoint at step {step}", save_now)

    saves = save_schedule(args, save, ps_cfg.timeout_s)
    records = train_steps(trainer.train_step, trainer.global_step, args.steps, rank, f"{ps_cfg.method} {shape}",
                          after_step=lambda: saves.after_step(trainer.global_step))
    stopped = saves.stopped_at is not None
    eval_loss = guarded(f"evaluation at step {trainer.global_step}", trainer.evaluate) \
        if args.eval_at_end and not stopped else None
    if args.save_dir:
        saves.final(trainer.global_step)
    stop_note(saves, rank, args.save_dir)
    if rank == 0:
        summary = summarize(records, eval_loss, time.perf_counter() - t0, trainer)
        summary.update(eval_loss_start=eval_start, trainer="fsdp2", mesh=shape, device=str(device),
                       bf16=mp is not None)
        summary["run_id"] = trainer.run_id
        if stopped:
            summary["stopped_by_signal_after_step"] = saves.stopped_at
        write_summary(summary, args.output_dir)
    trainer.sink.close()
    return finish(ps_cfg.timeout_s)


def main(argv=None) -> int:
    """Train; returns the exit status (2: a user error, one line; 1: a failed step, one line)."""
    return run_main(parse_args(argv), lambda args: train(args, int(os.environ["WORLD_SIZE"])))


if __name__ == "__main__":
    sys.exit(main())
