"""The Megatron-core loop: :class:`MegatronTrainer`, the shell of :class:`~ds_partitionsel.loop.TrainStep`
for a ``GPTModel`` on tensor x data parallel ranks (``launch/train_megatron.py`` is its command line).

What the shell does beyond the shared step: the gradients averaged over the data-parallel group
(one flat all-reduce), clipping by the whole model's norm (TP-sharded parameters summed over the
TP group), the AdamW step, a per-rank log of what each rank selected and trained on, and
checkpoints (``latest``, ``<tag>/partitionsel_resume.json``, ``<tag>/tp<r>.pt`` per TP rank).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from ds_partitionsel.cli import UsageError
from ds_partitionsel.collectives import Communicator
from ds_partitionsel.loop import TrainStep
from ds_partitionsel.runs import (RESUME_RECORD, check_resume, read_resume_record, resume_record,
                                  write_resume_record)

__all__ = ["MegatronTrainer", "CHECKPOINT_LATEST", "checkpoint_folder", "check_checkpoint_shape"]

CHECKPOINT_LATEST = "latest"


def checkpoint_folder(path: str) -> str:
    """The checkpoint folder that ``--resume PATH`` names: ``PATH/<latest>`` for a --save-dir, or
    ``PATH`` itself when it is one checkpoint (``global_step<N>``)."""
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
    model has this run's shape (``{"tp", "num_layers", ...}``); else :class:`UsageError` naming
    each difference."""
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


class MegatronTrainer:
    """The loop around :class:`~ds_partitionsel.megatron.MegatronSelector` for one rank.

    model : the rank's ``GPTModel`` shard; optimizer : over its parameters; micro_batch : sequences
    per forward; clip : ``gradient_clipping`` (0: none); sink : ``MetricsSink``; rank_log : open
    file for ``ranks/rank<R>.jsonl`` or None; device : where the model lives.
    """

    def __init__(self, model, optimizer, selector, *, micro_batch: int, clip: float, sink, rank_log, device):
        self.model, self.optimizer, self.selector = model, optimizer, selector
        self.micro_batch, self.clip, self.sink, self.rank_log, self.device = micro_batch, clip, sink, rank_log, device
        self.cfg = selector.cfg
        self.layout = selector.layout
        self.rank = dist.get_rank()
        self.step_runner = TrainStep(selector, sink, model=model, micro_batch=micro_batch)

    @property
    def global_step(self) -> int:
        return self.selector.global_step

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self) -> dict:
        record = self.step_runner.run(self.lr, self._train_on)
        if self.rank_log is not None:
            line = {"step": record.step, "rank": self.rank, "tp_rank": self.layout.tp_rank,
                    "dp_rank": self.layout.dp_rank, "selected": list(record.selected),
                    "my_records": list(self._my_records)}
            self.rank_log.write(json.dumps(line) + "\n")
            self.rank_log.flush()
        return record.to_json()

    def _train_on(self, selection) -> None:
        """Forward/backward of this rank's share (the mean over its micro batches, as DeepSpeed's
        accumulation), the DP gradient mean, clipping, the optimizer step."""
        self._my_records = selection.my_records
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = self.step_runner.micro_batch_count(selection)
        for batch, weights in self.step_runner.micro_batches(selection):
            (self.step_runner.loss(self.model, batch, weights, self.device) / n).backward()
        self.average_gradients(selection.step)
        if self.clip:
            self.clip_gradients(selection.step)
        self.optimizer.step()

    def average_gradients(self, step: int) -> None:
        """Mean of every gradient over the data-parallel group: one flat all-reduce. (TP peers need
        none: Megatron's layers already reduce the TP regions, and replicated parameters get the
        same gradient on every TP peer.)"""
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
        """Held-out loss per domain at the current step (an ``EvalRecord`` into the sink)."""
        return self.step_runner.evaluate()

    # ------------------------------------------------------------------ checkpoints

    def save(self, save_dir: str, shape: dict) -> str:
        """``latest``, ``<tag>/partitionsel_resume.json`` (rank 0) and ``<tag>/tp<r>.pt`` (the first
        data-parallel replica: the others hold the same weights)."""
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
        folder = checkpoint_folder(load_dir)
        saved = check_checkpoint_shape(load_dir, shape)
        check_resume(saved, resume_record(self.selector), folder, allow_changes)
        path = os.path.join(folder, f"tp{self.layout.tp_rank}.pt")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.selector.load_state_dict(state["selector"])
        self.selector.global_step = int(state["global_step"])
