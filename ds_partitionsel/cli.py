"""What the command lines of ``launch/`` share: flags, config reading, model building, monitors,
errors, summaries.

Every ``launch/train*.py`` is a thin command line over the package: it parses its flags (the
common ones from :func:`add_run_flags` / :func:`add_model_flags`), reads its JSON config with the
command line's overrides (:func:`read_config`), builds its loop, and runs under :func:`run_main`,
which turns a user error into one line on stderr (exit status 2) and a failed step into one line
naming the step and the rank (status 1).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, Callable, Optional

from ds_partitionsel.config import ConfigError, PartitionSelConfig, apply_override, check_deepspeed_config
from ds_partitionsel.loop import StepFailed, guarded
from ds_partitionsel.runs import CheckpointError, ResumeMismatchError, RunDirError

__all__ = ["UsageError", "StepFailed", "guarded", "count_arg", "positive_float", "add_model_flags", "add_run_flags",
           "add_save_flags", "check_ranks_agree", "check_sketch_modules", "check_writable", "check_writable_dirs",
           "check_save_flags", "save_schedule", "stop_note", "read_config", "load_config", "place_monitors",
           "check_pool_dir", "max_token_id", "check_vocabulary", "build_model", "load_tokenizer_and_pools",
           "run_main", "train_steps", "finish", "check_run_dirs", "adamw_from_config", "rank_device", "summarize", "write_summary", "run_command", "report_run",
           "MONITORS"]

MONITORS = ("csv_monitor", "tensorboard")  # DeepSpeed monitors that write files under output_path


class UsageError(Exception):
    """A bad command line or input file: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------- flags

def count_arg(kind: str, minimum: int):
    """argparse type: an integer >= ``minimum`` (the error names ``kind``)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{kind} must be >= {minimum}, got {value}")
        return value
    return parse


def positive_float(text):
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    """``--model`` | ``--tiny``, ``--tokenizer``, ``--num-layers``, ``--lora`` (a Hugging Face causal LM)."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face model folder")
    src.add_argument("--tiny", choices=["llama", "qwen2"], help="tiny model built from a config (tests)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the model folder, or the pool's)")
    ap.add_argument("--num-layers", type=count_arg("--num-layers", 1), default=None,
                    help="keep only the first N transformer blocks")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters (rank 16) on the last 3 blocks")


def add_run_flags(ap: argparse.ArgumentParser, *, resume_help: str) -> None:
    """The flags of every training command line: pool, steps, learning rate, selection overrides,
    output directory, resume, evaluation."""
    ap.add_argument("--pool", required=True, help="pool directory from tools/build_pool.py")
    ap.add_argument("--steps", type=count_arg("--steps", 0), default=10,
                    help="train until this many steps (counted from the start of the run; 0: evaluate only)")
    ap.add_argument("--lr", type=positive_float, default=None, help="override the optimizer learning rate")
    ap.add_argument("--method", default=None, help="override partitionsel.method")
    ap.add_argument("--seed", type=count_arg("--seed", 0), default=None,
                    help="override partitionsel.seed (and the model init)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a partitionsel key with a value of its type, e.g. --set pool_factor=4 "
                         "--set sketch.mode=kron --set use_weights=false "
                         "--set 'budget.minority_domains=[\"code\"]'")
    ap.add_argument("--output-dir", default=None,
                    help="this run's directory: metrics.jsonl, summary.json (and the monitors' files); "
                         "a directory that already holds another run's log is refused")
    ap.add_argument("--resume", default=None, help=resume_help)
    ap.add_argument("--resume-allow-changes", action="store_true",
                    help="resume even if the pool or the selection config differ from the checkpoint's")
    ap.add_argument("--eval-at-start", action="store_true", help="held-out loss per domain before the first step")
    ap.add_argument("--eval-at-end", action="store_true", help="held-out loss per domain after the last step")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def add_save_flags(ap: argparse.ArgumentParser, *, what: str) -> None:
    """``--save-dir`` and ``--save-interval`` (the end of the run, every N steps, and on SIGTERM /
    SIGUSR1 at the next step boundary: :mod:`ds_partitionsel.preemption`)."""
    ap.add_argument("--save-dir", default=None,
                    help=f"save {what} here at the end, every --save-interval steps, and on SIGTERM/SIGUSR1 "
                         f"(at the next step boundary, then exit 0)")
    ap.add_argument("--save-interval", type=count_arg("--save-interval", 0), default=0,
                    help="also save every N steps (0: only at the end and on a stop signal); needs --save-dir")


def check_save_flags(args) -> None:
    """``--save-interval`` needs ``--save-dir``; ``--resume latest`` means the latest complete
    checkpoint of ``--save-dir``."""
    if args.save_interval and not args.save_dir:
        raise UsageError(f"--save-interval {args.save_interval} needs --save-dir (where to save)")
    if args.resume == "latest" and not args.save_dir:
        raise UsageError("--resume latest continues the checkpoints of --save-dir: pass --save-dir")


def check_sketch_modules(model, ps_cfg: PartitionSelConfig) -> None:
    """Refuse, right after the model is built (before DeepSpeed / FSDP wrap it and before any
    step), a ``partitionsel.sketch.modules`` that selects no ``nn.Linear`` of it: a
    ``ConfigError`` that lists the names there are. Forward-only head modes and a proxy scorer
    sketch other modules; they are checked where they are built."""
    sk = ps_cfg.sketch
    if sk.mode in ("head", "head_kron") or sk.proxy_model is not None or sk.proxy_config is not None:
        return
    from ds_partitionsel.sketch import resolve_modules

    try:
        resolve_modules(model, sk.modules)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"partitionsel.sketch.modules: {e}. Choose modules this model has (e.g. --set "
                          f"sketch.modules=2 for the last 2 blocks, or 'all_linear')") from None


def check_ranks_agree(ps_cfg: PartitionSelConfig, timeout_s: float) -> None:
    """Refuse, at the start (right after the process group is up), ranks started with different
    ``partitionsel`` configs (another ``--seed``, ``--set`` or config file on one rank): they would
    select different batches and fail later with a misleading message. A ``ConfigError`` on every
    rank, naming the seeds when they differ."""
    import hashlib

    import torch

    from ds_partitionsel.collectives import Communicator

    comm = Communicator(None, timeout_s, "the config check at the start")
    if comm.world == 1:
        return
    text = json.dumps(ps_cfg.to_dict(), sort_keys=True, default=str)
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:7], "big")  # fits in int64
    rows = comm.all_gather(torch.tensor([digest, int(ps_cfg.seed)], dtype=torch.int64),
                           "all-gather of each rank's config hash")
    hashes, seeds = [int(r[0]) for r in rows], [int(r[1]) for r in rows]
    if len(set(hashes)) > 1:
        others = [r for r, h in enumerate(hashes) if h != hashes[0]]
        seed_note = f" (partitionsel.seed by rank: {seeds})" if len(set(seeds)) > 1 else ""
        raise ConfigError(f"the partitionsel config differs between ranks{seed_note}: rank(s) {others} disagree "
                          f"with rank 0; start every rank with the same config file, --seed, --method and --set")


def check_writable(path: Optional[str], flag: str) -> None:
    """Refuse, before anything is built, a ``flag`` directory this process cannot write (read-only
    file system, no permission, a file in the way): found after hours of training otherwise. The
    probe is a real file created (and removed) in ``path`` or, when it does not exist yet, in its
    nearest existing parent (where it will be created)."""
    import errno
    import tempfile

    if not path:
        return
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise UsageError(f"{flag} {path} is a file, not a directory: choose a directory")
    probe_dir = target
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.path.isdir(probe_dir):
        raise UsageError(f"{flag} {path}: {probe_dir} is a file, so the directory cannot be created; choose "
                         f"another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = {errno.EROFS: "a read-only file system", errno.EACCES: "no permission to write there",
               errno.EPERM: "no permission to write there", errno.ENOSPC: "the disk is full",
               errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or str(e))
        where = "" if probe_dir == target else f" (its parent {probe_dir}, where it would be created)"
        raise UsageError(f"{flag} {path} is not writable{where}: {why}; choose a writable directory") from None


def check_writable_dirs(args) -> None:
    """:func:`check_writable` for ``--output-dir`` and ``--save-dir`` (those a script has)."""
    check_writable(getattr(args, "output_dir", None), "--output-dir")
    check_writable(getattr(args, "save_dir", None), "--save-dir")


def save_schedule(args, save, timeout_s, stoppable: bool = True):
    """The run's :class:`~ds_partitionsel.preemption.SaveSchedule`; with a ``--save-dir`` (and
    ``stoppable``), SIGTERM/SIGUSR1 save at the next step boundary instead of killing the run."""
    from ds_partitionsel.preemption import SaveSchedule, StopRequest

    stop = StopRequest().install() if (args.save_dir and stoppable) else None
    return SaveSchedule(save, args.save_interval if args.save_dir else 0, stop, timeout_s)


def stop_note(schedule, rank: int, save_dir: Optional[str]) -> None:
    """Say on rank 0 that a stop signal ended the run and how to continue it."""
    if schedule.stopped_at is not None and rank == 0:
        print(f"stopped by a signal after step {schedule.stopped_at}: checkpoint saved in {save_dir}; "
              f"continue with --resume latest --save-dir {save_dir}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- configs

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


def load_config(path, args, flag: str = "--deepspeed_config"):
    """The DeepSpeed config with the command line's overrides applied; the ``partitionsel`` block
    validated (:class:`ConfigError` names the key). Returns ``(config dict, PartitionSelConfig)``."""
    cfg = read_config(path, args, flag)
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


# ----------------------------------------------------------------------------- pool, tokenizer, model

def adamw_from_config(params, cfg: dict, args):
    """``torch.optim.AdamW`` with the DeepSpeed config's optimizer params (weight decay, betas,
    eps) and lr ``--lr``, else the config's, else 1e-4: for the loops that own their optimizer."""
    import torch

    opt = (cfg.get("optimizer") or {}).get("params", {})
    lr = args.lr if args.lr is not None else float(opt.get("lr", 1e-4))
    return torch.optim.AdamW(params, lr=lr, weight_decay=float(opt.get("weight_decay", 0.0)),
                             betas=tuple(opt.get("betas", (0.9, 0.999))), eps=float(opt.get("eps", 1e-8)))


def rank_device():
    """This rank's device: its GPU (``LOCAL_RANK``), made current before NCCL starts, when CUDA
    is there and ``DS_ACCELERATOR`` is not ``cpu``; else the CPU."""
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # one GPU per rank
        return device
    return torch.device("cpu")


def check_run_dirs(args, *, latest_file: str, check_checkpoint: Callable[[str], None],
                   save_flags: bool = True) -> None:
    """Refuse, before anything is built, a run directory or checkpoint that is not this run's:
    unwritable directories, an ``--output-dir`` that holds another run's log, a ``--resume``
    that ``check_checkpoint`` refuses, a ``--save-dir`` whose ``latest_file`` says it holds
    another run's checkpoints, a pool that is not one. ``save_flags``: the script takes
    :func:`add_save_flags`' flags (then ``--resume latest`` means the ``--save-dir``)."""
    from ds_partitionsel.runs import check_run_dir

    if save_flags:
        check_save_flags(args)
    check_writable_dirs(args)
    if save_flags and args.resume == "latest":
        args.resume = args.save_dir
    if args.output_dir:
        check_run_dir(args.output_dir, resume=bool(args.resume))
    if args.resume:
        check_checkpoint(args.resume)
    if args.save_dir and os.path.isfile(os.path.join(args.save_dir, latest_file)) and \
            not (args.resume and os.path.samefile(args.save_dir, args.resume)):
        raise UsageError(f"--save-dir {args.save_dir} already holds checkpoints of another run; choose a "
                         f"new directory (or --resume from it to continue that run)")
    check_pool_dir(args.pool)


def check_pool_dir(pool_dir: str) -> None:
    if not os.path.isfile(os.path.join(pool_dir, "manifest.json")):
        raise UsageError(f"--pool {pool_dir} is not a candidate pool (no manifest.json); build one with "
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


def load_tokenizer_and_pools(args):
    """``(tokenizer, train pool, valid pool)`` of ``--pool`` with ``--tokenizer`` (default: the
    model folder, else the pool's own); another tokenizer than the pool's is a :class:`UsageError`."""
    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.pool_format import load_tokenizer, read_manifest

    tok_path = args.tokenizer or getattr(args, "model", None) or read_manifest(args.pool)["tokenizer"]["name_or_path"]
    try:
        tokenizer = load_tokenizer(tok_path)
        pool = CandidatePool(args.pool, "train", tokenizer=tokenizer)
    except ValueError as e:  # an unreadable tokenizer, or another tokenizer than the pool's
        raise UsageError(str(e)) from None
    return tokenizer, pool, CandidatePool(args.pool, "valid")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _decoder_blocks(model):
    """``(owner, attribute)`` of a Llama-style model's list of decoder blocks
    (``model.model.layers``), or None for another layout (GPT-2's ``transformer.h``, ...)."""
    import torch

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return (inner, "layers") if isinstance(layers, torch.nn.ModuleList) else None


def build_model(args, tokenizer, dtype=None):
    """The Hugging Face causal LM of ``--model`` / ``--tiny`` (float32 unless ``dtype``), cut to
    ``--num-layers`` blocks, with LoRA adapters under ``--lora``."""
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
                                                                      dtype=dtype or torch.float32)
        except (OSError, ValueError) as e:
            raise UsageError(f"could not load a causal LM from --model {args.model}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if args.num_layers:
            blocks = _decoder_blocks(model)
            if blocks is None:
                raise UsageError(f"--num-layers cannot cut {args.model} ({model.config.model_type}): its decoder "
                                 f"blocks are not at model.model.layers (Llama, Qwen2, Mistral, ...); drop "
                                 f"--num-layers, or use a model of one of those families")
            owner, name = blocks
            layers = getattr(owner, name)
            if not 0 < args.num_layers <= len(layers):
                raise UsageError(f"--num-layers must be in 1..{len(layers)} for {args.model}, got {args.num_layers}")
            setattr(owner, name, layers[: args.num_layers])
            model.config.num_hidden_layers = args.num_layers
    if getattr(args, "lora", False):
        from ds_partitionsel.extras import require

        peft = require("peft", "--lora")
        present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)}
        missing = [m for m in LORA_TARGETS if m not in present]
        if missing or _decoder_blocks(model) is None:
            raise UsageError(f"--lora adapts the Linear layers {', '.join(LORA_TARGETS)} of a Llama-style model; "
                             f"{getattr(args, 'model', None) or args.tiny} ({model.config.model_type}) has no "
                             f"{', '.join(missing) or 'decoder blocks at model.model.layers'}; drop --lora "
                             f"(full fine-tuning) or use a Llama, Qwen2 or Mistral model")
        n = model.config.num_hidden_layers
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                               target_modules=list(LORA_TARGETS),
                               layers_to_transform=list(range(max(0, n - 3), n)))
        model = peft.get_peft_model(model, lora)
    return model


# ----------------------------------------------------------------------------- running and ending

def run_main(args, train_fn: Callable[..., int], *train_args) -> int:
    """``train_fn(args, *train_args)`` in the launcher's environment; returns the exit status. A
    user error is one line on stderr (status 2), a failed step one line naming the step and rank
    (status 1); no traceback for either."""
    from ds_partitionsel.launch_env import LaunchError, map_launcher_env
    from ds_partitionsel.pool_format import PoolFormatError

    map_launcher_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"[rank {rank}] " if world > 1 else ""
    try:
        return train_fn(args, *train_args)
    except (UsageError, ConfigError, PoolFormatError, RunDirError, ResumeMismatchError, CheckpointError,
            LaunchError, ImportError) as e:
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 2
    except StepFailed as e:
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{where}interrupted", file=sys.stderr, flush=True)
        return 130


def train_steps(step_fn: Callable[[], dict], first: int, last: int, rank: int, desc: str,
                after_step: Optional[Callable[[], None]] = None) -> list:
    """Run ``step_fn`` (one step, its record as JSON) for steps ``first..last-1`` with a progress
    bar on rank 0; each failure a :class:`StepFailed` naming the step and rank. Returns the records."""
    from tqdm import tqdm

    records = []
    bar = tqdm(range(first, last), desc=desc, disable=rank != 0)
    for step in bar:
        rec = guarded(f"training step {step} on rank {rank}", step_fn)
        records.append(rec)
        cp = rec.get("conflicting_pairs")
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", cp=cp if cp is not None and cp >= 0 else "-")
        if after_step is not None and after_step():
            break  # a stop signal: the checkpoint of this step is saved
    return records


def finish(timeout_s: float) -> int:
    """End a run on every rank: wait for the others (rank 0 writes the summary last), then leave
    the process group. A rank that exits while the backend's threads still run can abort
    ("terminate called without an active exception")."""
    import torch

    from ds_partitionsel.collectives import Communicator

    guarded("the final barrier", lambda: Communicator(None, timeout_s, "end of training").barrier("barrier"))
    torch.distributed.destroy_process_group()
    return 0


def summarize(records, eval_loss, seconds, engine):
    """The run's summary: method, sizes, first/last loss, selected mix, mean conflicting pairs."""
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


def write_summary(summary: dict, output_dir: Optional[str]) -> None:
    """Print the summary and write ``output_dir/summary.json`` (rank 0 calls it) as strict JSON:
    a non-finite loss is the string "NaN" / "Infinity" (:mod:`ds_partitionsel.records`), never a
    bare NaN that JSON readers reject."""
    from ds_partitionsel.records import dumps, write_json

    print(dumps(summary, indent=2))
    if output_dir:
        write_json(os.path.join(output_dir, "summary.json"), summary)


# ----------------------------------------------------------------------------- demos

def run_command(cmd, cwd: str, **kwargs) -> None:
    """Run a step of a demo (echoed first); a failure raises ``CalledProcessError``."""
    import subprocess

    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd, **kwargs)


def report_run(repo: str, out: str, title: str, batch_detail: str) -> dict:
    """Plot the run in ``out`` (``tools/analyze_run.py`` of ``repo``) and print its summary:
    held-out loss per domain before -> after, the selected mix. ``batch_detail`` is formatted
    with the summary."""
    run_command([sys.executable, "tools/analyze_run.py", out, "--out", os.path.join(out, "report")], cwd=repo)
    from ds_partitionsel.records import loads

    with open(os.path.join(repo, out, "summary.json")) as fh:
        summary = loads(fh.read())
    print(f"\n=== {title} summary ===")
    print(f"method {summary['method']}, {summary['steps']} steps, {summary['world_size']} ranks, "
          f"batch {summary['batch_size']} " + batch_detail.format(**summary))
    start, end = summary["eval_loss_start"], summary["eval_loss"]
    print("held-out loss per domain, before -> after training:")
    for name in end:
        print(f"  {name:>10}: {start[name]:.4f} -> {end[name]:.4f}")
    print(f"selected domain mix: {summary['selected_domain_mix']}")
    print(f"plots and summary table: {os.path.join(out, 'report')}")
    return summary


def runs_with_baseline(method: str, baseline: str, out: str) -> Dict[str, str]:
    """``{method: out}``, plus ``{baseline: out_<baseline>}`` unless ``baseline`` is ``none`` or
    the method itself: the run folders of a demo and of its same-seed baseline."""
    runs = {method: out}
    if baseline not in ("none", method):
        runs[baseline] = f"{out}_{baseline}"
    return runs


def compare_runs(repo: str, runs: Dict[str, str], out: str) -> dict:
    """Held-out loss of runs trained on the same seed (``{method: run dir}``, the first one the
    reference), side by side: ``<out>/compare.png`` (the mean held-out loss of each, and each
    other run minus the reference at every evaluation) and ``<out>/compare.json``; printed as a
    table of the final held-out loss per domain. Returns the JSON."""
    from ds_partitionsel.records import read_metrics, write_json

    curves = {}
    for method, path in runs.items():
        _, evals = read_metrics(os.path.join(repo, path))
        curves[method] = {e.step: e.eval_loss for e in evals}
    names = list(runs)
    ref = names[0]
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    if not steps:
        raise ValueError(f"the runs {names} share no evaluation step; evaluate them at the same steps")
    last = steps[-1]
    domains = list(curves[ref][last])
    result = {"steps": steps, "reference": ref,
              "mean": {m: [curves[m][s]["mean"] for s in steps] for m in names},
              "final": {m: curves[m][last] for m in names},
              "final_minus_reference": {m: {d: curves[m][last][d] - curves[ref][last][d] for d in domains}
                                        for m in names[1:]}}
    os.makedirs(os.path.join(repo, out), exist_ok=True)
    write_json(os.path.join(repo, out, "compare.json"), result)
    print(f"\nheld-out loss after {last} steps, same seed, same pools ({ref} is the reference):")
    print(f"  {'domain':>10}  " + "  ".join(f"{m:>12}" for m in names) + "".join(
        f"  {m + ' - ' + ref:>24}" for m in names[1:]))
    for d in domains:
        print(f"  {d:>10}  " + "  ".join(f"{curves[m][last][d]:12.4f}" for m in names) + "".join(
            f"  {curves[m][last][d] - curves[ref][last][d]:+24.4f}" for m in names[1:]))
    try:
        from ds_partitionsel.extras import require

        require("matplotlib", "the demo's comparison plot").use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # the table above is the result; the plot is a convenience
        print(f"no plot: {e}")
        return result
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in names:
        axes[0].plot(steps, result["mean"][m], marker="o", label=m)
    axes[0].set(xlabel="step", ylabel="held-out loss (mean over domains)", title="held-out loss, same seed")
    axes[0].legend()
    for m in names[1:]:
        diff = [a - b for a, b in zip(result["mean"][m], result["mean"][ref])]
        axes[1].plot(steps, diff, marker="o", label=f"{m} - {ref}")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(xlabel="step", ylabel="difference", title=f"above 0: {ref} lower (one seed)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(repo, out, "compare.png"), dpi=110)
    plt.close(fig)
    print(f"comparison plot: {os.path.join(out, 'compare.png')}")
    return result
