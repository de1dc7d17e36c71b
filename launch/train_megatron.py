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
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from train import (StepFailed, UsageError, _count, _guarded, _positive_float, max_token_id, read_config,  # noqa: E402
                   summarize)

from ds_partitionsel.config import ConfigError, split_deepspeed_config, train_batch_size  # noqa: E402
from ds_partitionsel.runs import ResumeMismatchError, RunDirError, check_run_dir  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "ds_configs", "megatron.json")
CHECKPOINT_LATEST = "latest"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", required=True, help="pool directory from tools/build_pool.py")
    ap.add_argument("--tp", type=_count("--tp", 1), default=1, help="tensor-parallel size (divides the world)")
    ap.add_argument("--pp", type=_count("--pp", 1), default=1, help="pipeline-parallel size (only 1 is supported)")
    ap.add_argument("--sequence-parallel", action="store_true", help="(not supported: refused)")
    ap.add_argument("--config", "--deepspeed_config", "--deepspeed-config", dest="config", default=DEFAULT_CONFIG,
                    help="JSON config: batch sizes, optimizer params, gradient_clipping and the partitionsel block "
                         "(default ds_configs/megatron.json)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the pool's)")
    ap.add_argument("--num-layers", type=_count("--num-layers", 1), default=2)
    ap.add_argument("--hidden-size", type=_count("--hidden-size", 1), default=64)
    ap.add_argument("--num-heads", type=_count("--num-heads", 1), default=4)
    ap.add_argument("--ffn-hidden-size", type=_count("--ffn-hidden-size", 1), default=None,
                    help="default 4 x hidden size")
    ap.add_argument("--seq-length", type=_count("--seq-length", 2), default=None,
                    help="positions of the model (default: the pool's max_length)")
    ap.add_argument("--steps", type=_count("--steps", 0), default=10,
                    help="train until this many steps (counted from the start of the run; 0: evaluate only)")
    ap.add_argument("--lr", type=_positive_float, default=None, help="override the optimizer learning rate")
    ap.add_argument("--method", default=None, help="override partitionsel.method")
    ap.add_argument("--seed", type=_count("--seed", 0), default=None,
                    help="override partitionsel.seed (and the model init)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a partitionsel key, e.g. --set pool_factor=4 --set sketch.mode=exact")
    ap.add_argument("--output-dir", default=None, help="this run's directory: metrics.jsonl, summary.json, ranks/")
    ap.add_argument("--save-dir", default=None,
                    help="save a checkpoint here at the end (and every --save-interval steps)")
    ap.add_argument("--save-interval", type=_count("--save-interval", 0), default=0,
                    help="also save every N steps (0: only at the end)")
    ap.add_argument("--resume", default=None,
                    help="resume from a --save-dir of an earlier run (its latest checkpoint) or one of its "
                         "global_step<N> folders (pickles: load only checkpoints you trust)")
    ap.add_argument("--resume-allow-changes", action="store_true",
                    help="resume even if the pool or the selection config differ from the checkpoint's")
    ap.add_argument("--eval-at-start", action="store_true", help="held-out loss per domain before the first step")
    ap.add_argument("--eval-at-end", action="store_true", help="held-out loss per domain after the last step")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
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
    if args.output_dir:
        check_run_dir(args.output_dir, resume=bool(args.resume))
    if args.resume:
        checkpoint_folder(args.resume)
    if args.save_dir and os.path.isfile(os.path.join(args.save_dir, CHECKPOINT_LATEST)) and \
            not (args.resume and os.path.samefile(args.save_dir, args.resume)):
        raise UsageError(f"--save-dir {args.save_dir} already holds checkpoints of another run; choose a new "
                         f"directory (or --resume from it to continue that run)")
    if not os.path.isfile(os.path.join(args.pool, "manifest.json")):
        raise UsageError(f"--pool {args.pool} is not a candidate pool (no manifest.json); build one with "
                         f"python tools/build_pool.py")


def checkpoint_folder(path: str) -> str:
    """The checkpoint folder that ``--resume PATH`` names: ``PATH/<latest>`` for a --save-dir, or
    ``PATH`` itself when it is one checkpoint (``global_step<N>``)."""
    from ds_partitionsel.runs import RESUME_RECORD

    latest = os.path.join(path, CHECKPOINT_LATEST)
    if os.path.isfile(latest):
        with open(latest) as fh:
            return os.path.join(path, fh.read().strip())
    if os.path.isfile(os.path.join(path, RESUME_RECORD)):
        return path
    raise UsageError(f"--resume {path} holds no checkpoint (neither a '{CHECKPOINT_LATEST}' file nor "
                     f"{RESUME_RECORD}); pass the --save-dir of an earlier run or one of its global_step<N> folders")


def check_checkpoint_shape(path: str, shape: dict) -> dict:
    """The checkpoint's resume record (plain JSON, read before anything is unpickled), if its
    model has this run's shape (:func:`model_shape`); else :class:`UsageError` naming each difference."""
    from ds_partitionsel.runs import read_resume_record

    folder = checkpoint_folder(path)
    saved = read_resume_record(os.path.dirname(folder), os.path.basename(folder))
    if saved is None:
        raise UsageError(f"--resume {path}: {folder} has no partitionsel_resume.json; it is not a checkpoint "
                         f"of launch/train_megatron.py")
    theirs = saved.get("megatron") or {}
    diffs = [f"{k}: {theirs.get(k)} -> {v}" for k, v in shape.items() if theirs.get(k) != v]
    if diffs:
        raise UsageError(f"--resume {path}: the checkpoint's model differs from this run's ({'; '.join(diffs)}); "
                         f"resume with the same --tp and model-size flags")
    return saved


def model_shape(args, vocab: int, seq_length: int) -> dict:
    """What a checkpoint's weights must match (besides the pool and the selection config)."""
    return {"tp": args.tp, "num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "num_heads": args.num_heads, "ffn_hidden_size": args.ffn_hidden_size or 4 * args.hidden_size,
            "seq_length": seq_length, "vocab_size": vocab}


def main(argv=None) -> int:
    """Train; returns the exit status (2: a user error, one line; 1: a failed step, one line)."""
    args = parse_args(argv)
    from ds_partitionsel.launch_env import map_launcher_env
    from ds_partitionsel.pool_format import PoolFormatError

    map_launcher_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"[rank {rank}] " if world > 1 else ""
    try:
        return train(args, world)
    except (UsageError, ConfigError, PoolFormatError, RunDirError, ResumeMismatchError, ImportError) as e:
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 2
    except StepFailed as e:
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{where}interrupted", file=sys.stderr, flush=True)
        return 130


class MegatronTrainer:
    """The loop around :class:`~ds_partitionsel.megatron.MegatronSelector` for one rank."""

    def __init__(self, model, optimizer, selector, *, micro_batch: int, clip: float, sink, rank_log, device):
        self.model, self.optimizer, self.selector = model, optimizer, selector
        self.micro_batch, self.clip, self.sink, self.rank_log, self.device = micro_batch, clip, sink, rank_log, device
        self.cfg = selector.cfg
        self.layout = selector.layout
        import torch.distributed as dist

        self.rank = dist.get_rank()

    @property
    def global_step(self) -> int:
        return self.selector.global_step

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self) -> dict:
        import torch

        from ds_partitionsel.megatron import megatron_sequence_loss
        from ds_partitionsel.records import EvalRecord, step_record

        step, log_interval = self.global_step, self.cfg.log_interval
        selection = self.selector.select(step, self.lr(), with_features=step % log_interval == 0)
        start = time.perf_counter()
        ids = list(selection.my_records)
        weights = selection.train_weights(self.cfg.use_weights)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        chunks = range(0, len(ids), self.micro_batch)
        local = 0.0
        for s in chunks:
            batch = self.selector.pool.collate(ids[s:s + self.micro_batch], self.selector.pad_token_id)
            per_seq, _ = megatron_sequence_loss(self.model, batch, self.device)
            if weights is not None:
                per_seq = per_seq * weights[s:s + self.micro_batch].to(per_seq.device)
            loss = per_seq.mean()
            (loss / len(chunks)).backward()  # the mean over this rank's share, as DeepSpeed's accumulation
            local += float(loss.detach()) / len(chunks)
        self.average_gradients(step)
        if self.clip:
            self.clip_gradients(step)
        self.optimizer.step()
        comm = self.selector.comm(step, "training")
        train_loss = float(comm.all_reduce(torch.tensor(local, dtype=torch.float64), "sum",
                                           "all-reduce of the train loss")) / self.layout.dp
        record = step_record(selection, train_loss=train_loss, lr=self.lr(), pool_size=self.selector.pool_size,
                             time_train=time.perf_counter() - start, log_conflicts=step % log_interval == 0)
        self.sink.emit(record)
        if self.rank_log is not None:
            line = {"step": step, "rank": self.rank, "tp_rank": self.layout.tp_rank, "dp_rank": self.layout.dp_rank,
                    "selected": [int(i) for i in selection.record_ids.tolist()],
                    "my_records": list(selection.my_records)}
            self.rank_log.write(json.dumps(line) + "\n")
            self.rank_log.flush()
        if self.cfg.eval_interval and self.global_step % self.cfg.eval_interval == 0:
            self.sink.emit(EvalRecord(step=self.global_step, method=self.cfg.method, eval_loss=self.evaluate()))
        return record.to_json()

    def average_gradients(self, step: int) -> None:
        """Mean of every gradient over the data-parallel group: one flat all-reduce. (TP peers need
        none: Megatron's layers already reduce the TP regions, and replicated parameters get the
        same gradient on every TP peer.)"""
        import torch

        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        comm = self.selector.comm(step, "training")
        flat = comm.all_reduce(flat, "sum", "all-reduce of the gradients") / self.layout.dp
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def clip_gradients(self, step: int) -> None:
        """Clip to ``gradient_clipping`` by the norm of the whole model: the squares of TP-sharded
        parameters summed over the TP group, the replicated ones counted once."""
        import torch

        from ds_partitionsel.collectives import Communicator

        sharded = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for p in self.model.parameters():
            if p.grad is None:
                continue
            sq = p.grad.detach().double().pow(2).sum().cpu()
            if getattr(p, "tensor_model_parallel", False):
                sharded += sq
            else:
                replicated += sq
        comm = Communicator(self.layout.tp_group, self.cfg.timeout_s, f"training step {step}")
        total = comm.all_reduce(sharded, "sum", "all-reduce of the gradient norm over the TP group") + replicated
        norm = float(total.sqrt())
        if norm > self.clip:
            scale = self.clip / (norm + 1e-6)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)

    def evaluate(self) -> dict:
        return self.selector.evaluate(self.model, self.micro_batch, self.global_step)

    # ------------------------------------------------------------------ checkpoints

    def save(self, save_dir: str, shape: dict) -> str:
        """``latest``, ``<tag>/partitionsel_resume.json`` (rank 0) and ``<tag>/tp<r>.pt`` (the first
        data-parallel replica: the others hold the same weights)."""
        import torch

        from ds_partitionsel.collectives import Communicator
        from ds_partitionsel.runs import resume_record, write_resume_record

        tag = f"global_step{self.global_step}"
        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        if self.layout.dp_rank == 0:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "selector": self.selector.state_dict(), "global_step": self.global_step, "shape": shape}
            path = os.path.join(folder, f"tp{self.layout.tp_rank}.pt")
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        Communicator(None, self.cfg.timeout_s, "checkpoint").barrier("barrier after the checkpoint shards")
        import torch.distributed as dist

        if dist.get_rank() == 0:
            record = resume_record(self.selector)
            record["megatron"] = shape
            write_resume_record(folder, record)
            with open(os.path.join(save_dir, CHECKPOINT_LATEST), "w") as fh:
                fh.write(tag)
        return folder

    def load(self, load_dir: str, shape: dict, allow_changes: bool) -> None:
        """Check the checkpoint's pool, selection config and model shape, then load this TP rank's
        shard (model, optimizer, selector state) and the step."""
        import torch

        from ds_partitionsel.runs import check_resume, resume_record

        folder = checkpoint_folder(load_dir)
        saved = check_checkpoint_shape(load_dir, shape)
        check_resume(saved, resume_record(self.selector), folder, allow_changes)
        path = os.path.join(folder, f"tp{self.layout.tp_rank}.pt")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.selector.load_state_dict(state["selector"])
        self.selector.global_step = int(state["global_step"])


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
    from ds_partitionsel.pool_format import load_tokenizer, read_manifest
    from ds_partitionsel.records import EvalRecord, MetricsSink

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
    opt = (cfg.get("optimizer") or {}).get("params", {})
    lr = args.lr if args.lr is not None else float(opt.get("lr", 1e-4))

    device = torch.device("cpu")
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # before NCCL starts: one GPU per rank
    init_distributed(timeout_s=ps_cfg.timeout_s)
    import torch.distributed as dist

    rank = dist.get_rank()
    layout = initialize_parallel(args.tp, args.pp, seed=ps_cfg.seed)
    model = build_gpt(vocab_size=vocab, tp=args.tp, num_layers=args.num_layers, hidden_size=args.hidden_size,
                      num_heads=args.num_heads, ffn_hidden_size=args.ffn_hidden_size, seq_length=seq_length,
                      seed=ps_cfg.seed, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=float(opt.get("weight_decay", 0.0)),
                                  betas=tuple(opt.get("betas", (0.9, 0.999))), eps=float(opt.get("eps", 1e-8)))
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

    def evaluate():
        losses = trainer.evaluate()
        sink.emit(EvalRecord(step=trainer.global_step, method=ps_cfg.method, eval_loss=losses))
        return losses

    eval_start = _guarded(f"evaluation at step {trainer.global_step}", evaluate) if args.eval_at_start else None
    t0 = time.perf_counter()
    records = []
    from tqdm import tqdm

    bar = tqdm(range(trainer.global_step, args.steps), desc=f"{ps_cfg.method} tp{args.tp}xdp{dp}", disable=rank != 0)
    for step in bar:
        rec = _guarded(f"training step {step} on rank {rank}", trainer.train_step)
        records.append(rec)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}")
        if args.save_dir and args.save_interval and trainer.global_step % args.save_interval == 0:
            _guarded(f"saving the checkpoint at step {trainer.global_step}", lambda: trainer.save(args.save_dir, shape))
    eval_loss = _guarded(f"evaluation at step {trainer.global_step}", evaluate) if args.eval_at_end else None
    if args.save_dir and not (args.save_interval and trainer.global_step % args.save_interval == 0):
        _guarded(f"saving the checkpoint at step {trainer.global_step}", lambda: trainer.save(args.save_dir, shape))
    if rank == 0:
        summary = summarize(records, eval_loss, time.perf_counter() - t0, selector)
        summary.update(eval_loss_start=eval_start, tensor_parallel=args.tp, data_parallel=dp, device=str(device))
        print(json.dumps(summary, indent=2))
        if args.output_dir:
            with open(os.path.join(args.output_dir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
    sink.close()
    if rank_log is not None:
        rank_log.close()
    from ds_partitionsel.collectives import Communicator
    from megatron.core import parallel_state

    _guarded("the final barrier", lambda: Communicator(None, ps_cfg.timeout_s, "end of training").barrier("barrier"))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
