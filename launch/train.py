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
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package, uninstalled

from ds_partitionsel.cli import (UsageError, add_model_flags, add_run_flags, add_save_flags, build_model,  # noqa: E402
                                 check_ranks_agree, check_run_dirs, check_sketch_modules,
                                 check_vocabulary, finish, guarded, load_config,
                                 load_tokenizer_and_pools, place_monitors, run_main, save_schedule, stop_note,
                                 summarize, train_steps, write_summary)
from ds_partitionsel.preemption import latest_complete_tag  # noqa: E402
from ds_partitionsel.runs import check_run_owner, read_resume_record  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(ap)
    ap.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True)
    add_run_flags(ap, resume_help="resume from the latest complete checkpoint of a --save-dir ('latest': of this "
                                  "run's --save-dir; a pickle: load only checkpoints you trust); its pool and "
                                  "selection config must match this run's")
    add_save_flags(ap, what="a DeepSpeed checkpoint")
    return ap.parse_args(argv)


def check_deepspeed_checkpoint(path: str, output_dir) -> None:
    """``--resume`` must hold a DeepSpeed checkpoint whose resume record reads, of a run whose
    log is not another run's (plain JSON, before anything is built)."""
    if not os.path.isdir(path):
        raise UsageError(f"--resume {path}: no such checkpoint directory")
    if latest_complete_tag(path) is None and not os.path.isfile(os.path.join(path, "latest")):
        raise UsageError(f"--resume {path} holds no DeepSpeed checkpoint (no 'latest' file); "
                         f"pass the --save-dir of an earlier run")
    saved = read_resume_record(path, latest_complete_tag(path)) or {}
    check_run_owner(output_dir, saved.get("run_id"), path)


def train(args) -> int:
    cfg, ps_cfg = load_config(args.deepspeed_config, args)  # every config error before anything is built
    place_monitors(cfg, args.output_dir, args.deepspeed_config)
    check_run_dirs(args, latest_file="latest",
                   check_checkpoint=lambda path: check_deepspeed_checkpoint(path, args.output_dir))
    import torch

    from ds_partitionsel.engine import initialize
    from ds_partitionsel.launch_env import init_distributed

    # every collective of the job (DeepSpeed's included) waits at most partitionsel.timeout_s;
    # the ranks' configs are compared before any model is built
    init_distributed(timeout_s=ps_cfg.timeout_s)
    check_ranks_agree(ps_cfg, ps_cfg.timeout_s)
    torch.manual_seed(ps_cfg.seed)
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer, pool, valid = load_tokenizer_and_pools(args)
    model = build_model(args, tokenizer)
    check_vocabulary(args.pool, ("train", "valid"), model)
    check_sketch_modules(model, ps_cfg)
    if args.lr is not None:
        cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
    optimizer = None
    if "optimizer" not in cfg or cfg["optimizer"].get("type") is None:
        lr = args.lr if args.lr is not None else 1e-4
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        cfg.pop("optimizer", None)

    rank = torch.distributed.get_rank()
    engine, _, _, _ = initialize(model, cfg, pool, valid, optimizer=optimizer, tokenizer=tokenizer,
                                 output_dir=args.output_dir, resume=bool(args.resume))
    if args.resume:
        if rank == 0:
            print(f"resuming from {args.resume} (checkpoints are pickles: only load ones you trust)",
                  file=sys.stderr, flush=True)
        engine.load_checkpoint(args.resume, tag=latest_complete_tag(args.resume),
                               allow_changes=args.resume_allow_changes)
        if args.steps <= engine.global_step:
            raise UsageError(f"--steps {args.steps} is not beyond the checkpoint's step {engine.global_step}: "
                             f"nothing to train (--steps counts from the start of the run)")

    eval_start = guarded(f"evaluation at step {engine.global_step}", engine.evaluate) if args.eval_at_start else None
    t0 = time.perf_counter()
    saves = save_schedule(args, lambda step: guarded(f"saving the checkpoint at step {step}",
                                                     lambda: engine.save_checkpoint(args.save_dir)), ps_cfg.timeout_s)
    records = train_steps(engine.train_step, engine.global_step, args.steps, rank, engine.cfg.method,
                          after_step=lambda: saves.after_step(engine.global_step))
    stopped = saves.stopped_at is not None
    eval_loss = guarded(f"evaluation at step {engine.global_step}", engine.evaluate) \
        if args.eval_at_end and not stopped else None
    if args.save_dir:
        saves.final(engine.global_step)
    stop_note(saves, rank, args.save_dir)
    if rank == 0:
        summary = summarize(records, eval_loss, time.perf_counter() - t0, engine)
        summary["eval_loss_start"] = eval_start
        summary["run_id"] = engine.run_id
        if stopped:
            summary["stopped_by_signal_after_step"] = saves.stopped_at
        write_summary(summary, args.output_dir)
    return finish(ps_cfg.timeout_s)


def main(argv=None) -> int:
    """Train; returns the exit status (2: a user error, one line; 1: a failed step, one line)."""
    return run_main(parse_args(argv), train)


if __name__ == "__main__":
    sys.exit(main())
