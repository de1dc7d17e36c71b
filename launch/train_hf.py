#!/usr/bin/env python
"""Train a Hugging Face causal LM with PartitionSel through ``transformers.Trainer`` and DeepSpeed.

The same flags and outputs as ``launch/train.py`` (which drives the DeepSpeed engine directly):

    torchrun --nproc_per_node 2 launch/train_hf.py --tiny llama --tokenizer T --pool P \
        --deepspeed_config ds_configs/zero2.json --steps 20 --output-dir runs/x
    deepspeed --num_gpus 2 launch/train_hf.py ...
    accelerate launch --multi_gpu --num_processes 2 launch/train_hf.py ...   # also on CPU (gloo)

The Trainer's arguments come from the DeepSpeed config (micro batch, accumulation, learning rate,
weight decay, gradient clipping, bf16/fp16), so the two entry points train the same way. Writes
``metrics.jsonl`` (one record per step) and ``summary.json`` into ``--output-dir``, with the
Trainer's ``checkpoint-N`` folder at the end; ``--resume DIR``
continues from such a folder (``--resume last``: the newest one in ``--output-dir``).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the package, uninstalled

from ds_partitionsel.cli import (StepFailed, UsageError, add_model_flags, add_run_flags, build_model,  # noqa: E402
                                 check_pool_dir, check_ranks_agree, check_sketch_modules, check_vocabulary,
                                 check_writable_dirs, count_arg, finish, load_config, load_tokenizer_and_pools,
                                 place_monitors, run_main, summarize, write_summary)
from ds_partitionsel.config import ConfigError  # noqa: E402
from ds_partitionsel.preemption import StopRequest, latest_complete_trainer_checkpoint  # noqa: E402
from ds_partitionsel.runs import (CheckpointError, ResumeMismatchError, RunDirError,  # noqa: E402
                                  check_run_dir, check_run_owner, read_resume_record)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(ap)
    ap.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True)
    add_run_flags(ap, resume_help="a checkpoint-N folder of an earlier run ('latest' or 'last': the newest "
                                  "complete one in --output-dir); pickles: load only checkpoints you trust")
    ap.add_argument("--save-interval", type=count_arg("--save-interval", 0), default=0,
                    help="save a checkpoint-N folder every N steps (always: at the end, and on SIGTERM/SIGUSR1 "
                         "at the next step boundary, then exit 0)")
    return ap.parse_args(argv)


def training_arguments(cfg: dict, args, ps_cfg):
    """``TrainingArguments`` that agree with the DeepSpeed config (HF checks every value it shares
    with it: a mismatch is an error)."""
    import transformers

    opt = (cfg.get("optimizer") or {}).get("params", {})
    lr = args.lr if args.lr is not None else opt.get("lr", 1e-4)
    kwargs = dict(
        output_dir=args.output_dir, deepspeed=cfg, max_steps=args.steps,
        per_device_train_batch_size=int(cfg.get("train_micro_batch_size_per_gpu", 1)),
        gradient_accumulation_steps=int(cfg.get("gradient_accumulation_steps", 1)),
        learning_rate=lr, weight_decay=opt.get("weight_decay", 0.0),
        max_grad_norm=cfg.get("gradient_clipping", 0.0) or 0.0,
        bf16=bool((cfg.get("bf16") or {}).get("enabled")), fp16=bool((cfg.get("fp16") or {}).get("enabled")),
        lr_scheduler_type="constant",  # as the engine without a "scheduler" block; DeepSpeed's wins if given
        save_strategy="steps", save_steps=args.save_interval or max(args.steps, 1), logging_steps=1,
        report_to=[], disable_tqdm=False, seed=ps_cfg.seed, data_seed=ps_cfg.seed,
        use_cpu=os.environ.get("DS_ACCELERATOR") == "cpu", dataloader_num_workers=0,
    )
    if "betas" in opt:
        kwargs["adam_beta1"], kwargs["adam_beta2"] = opt["betas"]
    if "eps" in opt:
        kwargs["adam_epsilon"] = opt["eps"]
    return transformers.TrainingArguments(**kwargs)


def train(args) -> int:
    if not args.output_dir:
        raise UsageError("--output-dir is required: the Trainer writes its checkpoints there")
    if args.steps == 0:
        raise UsageError("--steps 0 (evaluate only) is launch/train.py's: the Trainer trains at least one step; "
                         "run launch/train.py --steps 0 --eval-at-start for an evaluation, or pass --steps N > 0")
    cfg, ps_cfg = load_config(args.deepspeed_config, args)
    place_monitors(cfg, args.output_dir, args.deepspeed_config)
    check_writable_dirs(args)
    resume = args.resume
    if resume in ("last", "latest"):
        resume = latest_complete_trainer_checkpoint(args.output_dir)
        if resume is None:
            raise UsageError(f"--resume {args.resume}: no complete checkpoint-N folder in --output-dir "
                             f"{args.output_dir}; start without --resume, or pass the checkpoint folder")
    elif resume and not os.path.isdir(resume):
        raise UsageError(f"--resume {resume}: no such checkpoint folder")
    check_run_dir(args.output_dir, resume=bool(resume))
    if resume:  # plain JSON, before anything is built: a damaged record, and a log of another run, stop here
        folder = os.path.abspath(resume)
        saved = read_resume_record(os.path.dirname(folder), os.path.basename(folder)) or {}
        check_run_owner(args.output_dir, saved.get("run_id"), resume)
    check_pool_dir(args.pool)
    import torch

    from ds_partitionsel.hf import PartitionSelTrainer
    from ds_partitionsel.launch_env import init_distributed
    from ds_partitionsel.records import read_metrics

    # before the Trainer does it: our timeout for every collective, no shm-op compile on CPU
    init_distributed(timeout_s=ps_cfg.timeout_s)
    check_ranks_agree(ps_cfg, ps_cfg.timeout_s)
    torch.manual_seed(ps_cfg.seed)
    tokenizer, pool, valid = load_tokenizer_and_pools(args)
    model = build_model(args, tokenizer)
    check_vocabulary(args.pool, ("train", "valid"), model)
    check_sketch_modules(model, ps_cfg)
    if args.lr is not None and cfg.get("optimizer"):  # HF refuses a config whose lr differs from its own
        cfg["optimizer"].setdefault("params", {})["lr"] = args.lr
    targs = training_arguments(cfg, args, ps_cfg)
    trainer = PartitionSelTrainer(model=model, args=targs, processing_class=tokenizer, candidate_pool=pool,
                                  valid_pool=valid, resume_allow_changes=args.resume_allow_changes,
                                  stop_request=StopRequest().install())
    rank = targs.process_index
    if resume and rank == 0:
        print(f"resuming from {resume} (checkpoints are pickles: only load ones you trust)", file=sys.stderr)
    t0 = time.perf_counter()
    eval_start = None
    try:
        trainer.train(resume_from_checkpoint=resume)
        if args.eval_at_end and trainer.stopped_at is None:
            eval_loss = trainer.evaluate_domains()
        else:
            eval_loss = None
    except (ConfigError, ResumeMismatchError, RunDirError, CheckpointError, UsageError, StepFailed):
        raise
    except Exception as e:  # noqa: BLE001 - one line naming the step
        first = (str(e).strip().splitlines() or [""])[0]
        raise StepFailed(f"training step {trainer.state.global_step} on rank {rank} failed: "
                         f"{type(e).__name__}: {first}") from e
    if rank == 0:
        steps, _ = read_metrics(args.output_dir)
        summary = summarize([s.to_json() for s in steps], eval_loss, time.perf_counter() - t0, trainer.selector)
        summary["eval_loss_start"] = eval_start
        summary["trainer"] = "transformers.Trainer"
        summary["run_id"] = trainer.sink.run_id
        if trainer.stopped_at is not None:
            summary["stopped_by_signal_after_step"] = trainer.stopped_at
            print(f"stopped by a signal after step {trainer.stopped_at}: checkpoint saved in {args.output_dir}; "
                  f"continue with --resume latest", file=sys.stderr, flush=True)
        write_summary(summary, args.output_dir)
    return finish(ps_cfg.timeout_s)


def main(argv=None) -> int:
    """As ``launch/train.py``'s main (same flags, exit statuses and one-line errors)."""
    return run_main(parse_args(argv), train)


if __name__ == "__main__":
    sys.exit(main())
