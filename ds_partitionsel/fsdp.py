"""PartitionSel for a model sharded with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``),
HSDP included: :class:`PartitionSelFSDP`, the FSDP2 shell of :class:`~ds_partitionsel.loop.TrainStep`.

    mesh = data_parallel_mesh()                    # (shard,); data_parallel_mesh((2, 4)): HSDP
    shard_model(model, mesh, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    trainer = PartitionSelFSDP(model, optimizer, cfg, pool, valid, batch_size=8, micro_batch=2,
                               pad_token_id=tok.pad_token_id, mesh=mesh, output_dir="runs/x")
    for _ in range(steps):
        trainer.train_step()                                   # pool -> sketch -> select -> train
    trainer.save_checkpoint("ckpt/step_100")                   # DCP: model, optimizer, selector

Every rank of the mesh (shard x replicate) is a data-parallel rank: the selection runs over all of
them (identical everywhere) and each trains on its share. Sketches come from hooks on the linears
of the sharded model: inside a block's forward FSDP2 has gathered the block's weights, so a
hook sees this rank's activations and output gradients of the whole layer and no parameter is
gathered for the sketch (``autograd.grad`` to the layer outputs writes no ``.grad``, so no
gradient is reduced). Every rank runs the same number of sketch and evaluation forwards (FSDP2's
all-gathers are collective). Under a bf16 ``MixedPrecisionPolicy`` the model computes in bf16;
sketches are accumulated in float32 (the sketcher casts activations and output gradients).

Checkpoints are ``torch.distributed.checkpoint`` (DCP) folders: the sharded model and optimizer
state (``get_state_dict`` / ``set_state_dict``) and the selector's state, a DCP ``Stateful``
(:class:`SelectorState`) that any DCP checkpoint of the job can carry; ``partitionsel_resume.json``
beside them is checked before anything is loaded (same pool, same selection config).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from ds_partitionsel.config import ConfigError, PartitionSelConfig
from ds_partitionsel.loop import TrainStep
from ds_partitionsel.records import MetricsSink
from ds_partitionsel.runs import (RESUME_RECORD, check_resume, check_run_dir, read_resume_record, resume_record,
                                  write_resume_record)
from ds_partitionsel.selector import Selector

logger = logging.getLogger("ds_partitionsel")

__all__ = ["PartitionSelFSDP", "SelectorState", "TrainState", "data_parallel_mesh", "shard_model",
           "check_root_keeps_parameters"]


def data_parallel_mesh(shape=None, device_type: Optional[str] = None):
    """The device mesh of a data-parallel job over the whole world: ``("shard",)`` of all W ranks
    (``shape`` None: FSDP), or HSDP's 2-D ``("replicate", "shard")`` of ``shape = (replicate,
    shard)`` with ``replicate x shard == W``. ``device_type`` default: ``"cuda"`` when the backend
    is NCCL, else ``"cpu"``."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if device_type is None:
        device_type = "cuda" if str(dist.get_backend()) == "nccl" else "cpu"
    if shape is None:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2 or min(shape) < 1 or shape[0] * shape[1] != world:
        raise ConfigError(f"HSDP mesh shape {shape} must be (replicate, shard), both >= 1, with "
                          f"replicate x shard = the world of {world} ranks")
    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))


def shard_model(model, mesh, mp_policy=None, reshard_after_forward: bool = True):
    """``fully_shard`` every transformer block of a Hugging Face causal LM (resharding after
    forward as ``reshard_after_forward`` says), then the root (the embeddings, the final norm and
    the head), on ``mesh`` (1-D: FSDP, 2-D: HSDP). Returns the model (sharded in place).

    The root keeps its parameters gathered from forward to backward (FSDP2's default for a root):
    the sketch's backward starts at the head's input, not at the root's output, so FSDP2's
    pre-backward unshard of the root never runs, and a resharded root would leave the final
    norm's saved weight freed (:func:`check_root_keeps_parameters`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ds_partitionsel.sketch import transformer_blocks

    mp_policy = mp_policy or MixedPrecisionPolicy()
    _, blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy)
    return model


def check_root_keeps_parameters(model) -> None:
    """Refuse a root sharded with ``reshard_after_forward=True`` (see :func:`shard_model`)."""
    get_state = getattr(model, "_get_fsdp_state", None)
    if get_state is None:
        raise ConfigError(f"{type(model).__name__} is not sharded with torch.distributed.fsdp.fully_shard; "
                          f"shard it first (ds_partitionsel.fsdp.shard_model)")
    group = getattr(get_state(), "_fsdp_param_group", None)
    if group is not None and getattr(group, "post_forward_mesh_info", None) is not None:
        raise ConfigError("the root module was sharded with reshard_after_forward=True: the sketches' backward "
                          "needs the root's parameters (final norm, head) kept after forward; fully_shard the "
                          "root with reshard_after_forward=False (the default), e.g. through shard_model")


class SelectorState(Stateful):
    """The selection's part of a checkpoint as a DCP ``Stateful``: the next step to select and the
    selector's own state (a trained proxy). The rest of the selection is a function of the step."""

    def __init__(self, selector: Selector):
        self.selector = selector

    def state_dict(self) -> dict:
        return {"global_step": int(self.selector.global_step), "selector": self.selector.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.selector.load_state_dict(state_dict.get("selector") or {})
        self.selector.global_step = int(state_dict["global_step"])


class TrainState(Stateful):
    """Model and optimizer (sharded, through ``torch.distributed.checkpoint.state_dict``) and the
    selector: what :meth:`PartitionSelFSDP.save_checkpoint` hands to DCP."""

    def __init__(self, model, optimizer, selector: Selector):
        self.model, self.optimizer, self.selection = model, optimizer, SelectorState(selector)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state, "selection": self.selection.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])
        self.selection.load_state_dict(state_dict["selection"])


class PartitionSelFSDP:
    """The training loop of an FSDP2 (or HSDP) sharded model with PartitionSel batches.

    Parameters
    ----------
    model : a causal LM sharded with ``fully_shard`` (:func:`shard_model`) on ``mesh``.
    optimizer : over ``model.parameters()`` (the sharded DTensors); the shell steps it.
    cfg : the ``"partitionsel"`` block (dict or ``PartitionSelConfig``).
    pool, valid_pool : ``CandidatePool`` of the training and the held-out split.
    batch_size : the global batch ``k``: ``micro_batch`` x accumulation x data-parallel ranks.
    micro_batch : sequences per forward; this rank's share is trained in ``share / micro_batch``
        micro batches, the gradients reduced once, at the last.
    mesh : the job's ``DeviceMesh`` (every rank of it is a data-parallel rank); it must span the
        world unless ``group`` (the process group of exactly those ranks) is given.
    clip : clip the gradient norm of the whole model to this (0: no clipping).
    output_dir, resume : rank 0 writes ``metrics.jsonl`` there (a resume continues it).
    """

    def __init__(self, model, optimizer, cfg, pool, valid_pool, *, batch_size: int, micro_batch: int,
                 pad_token_id: int, mesh=None, group=None, clip: float = 0.0, output_dir: Optional[str] = None,
                 resume: bool = False):
        cfg = cfg if isinstance(cfg, PartitionSelConfig) else PartitionSelConfig.from_dict(cfg)
        if pad_token_id is None:
            raise ConfigError("no pad token id: set tokenizer.pad_token (e.g. to its eos token) or pass pad_token_id=")
        if mesh is not None and group is None and mesh.size() != dist.get_world_size():
            raise ConfigError(f"the mesh spans {mesh.size()} of {dist.get_world_size()} ranks: pass group= (the "
                              f"process group of the mesh's data-parallel ranks) for the selection")
        if cfg.sketch.precondition != "none":
            raise ConfigError(f"partitionsel.sketch.precondition {cfg.sketch.precondition!r} is not supported by the "
                              f"FSDP2 loop (DTensor optimizer state); it works with the DeepSpeed engine "
                              f"(ds_partitionsel.engine) and the HF Trainer: use 'none' here")
        check_root_keeps_parameters(model)
        world = dist.get_world_size(group)
        if micro_batch < 1 or batch_size % (micro_batch * world):
            raise ConfigError(f"batch_size {batch_size} is not a multiple of micro_batch {micro_batch} x "
                              f"{world} data-parallel ranks")
        if output_dir:
            check_run_dir(output_dir, resume=resume)
        self.model, self.optimizer, self.cfg, self.mesh, self.clip = model, optimizer, cfg, mesh, float(clip)
        self.batch_size, self.micro_batch = int(batch_size), int(micro_batch)
        self.selector = Selector(model, cfg, pool, valid_pool, batch_size=batch_size, pad_token_id=pad_token_id,
                                 group=group)
        self.sink = MetricsSink(output_dir, rank=dist.get_rank(), resume=resume)
        self.step_runner = TrainStep(self.selector, self.sink, model=model, micro_batch=micro_batch)
        self.pool, self.valid_pool, self.pool_size = pool, valid_pool, self.selector.pool_size
        self.rank, self.world = self.selector.rank, self.selector.world

    @property
    def global_step(self) -> int:
        """Steps trained so far: the next step to select."""
        return self.selector.global_step

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ the step

    def train_step(self) -> dict:
        """One optimizer step on a selected batch; returns this step's record (as JSON)."""
        return self.step_runner.run(self.lr, self._train_on).to_json()

    def _train_on(self, selection) -> None:
        """Forward/backward of this rank's share in micro batches (the mean over them, as
        DeepSpeed's accumulation); FSDP2 reduces the gradients (mean over the mesh) at the last
        micro batch only; clipping by the whole model's norm; the optimizer step."""
        model, runner = self.model, self.step_runner
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = runner.micro_batch_count(selection)
        device = self.selector.device
        for i, (batch, weights) in enumerate(runner.micro_batches(selection)):
            model.set_requires_gradient_sync(i == n - 1)
            (runner.loss(model, batch, weights, device) / n).backward()
        model.set_requires_gradient_sync(True)
        if self.clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], self.clip)
        self.optimizer.step()

    def evaluate(self) -> dict:
        """Held-out loss per domain (mean per-sequence loss) and their mean, into the sink."""
        return self.step_runner.evaluate()

    # ------------------------------------------------------------------ checkpoints

    @property
    def run_id(self):
        """This run's id (rank 0 with an output directory; None elsewhere)."""
        return self.sink.run_id

    def save_checkpoint(self, folder: str) -> str:
        """A DCP checkpoint of model, optimizer and selector in ``folder`` (every rank writes its
        shards), with ``partitionsel_resume.json`` (rank 0) for the resume check."""
        import torch.distributed.checkpoint as dcp

        os.makedirs(folder, exist_ok=True)
        dcp.save({"train": TrainState(self.model, self.optimizer, self.selector)}, checkpoint_id=folder)
        if self.rank == 0:
            write_resume_record(folder, resume_record(self))
        from ds_partitionsel.collectives import Communicator

        Communicator(None, self.cfg.timeout_s, "checkpoint").barrier("barrier after the checkpoint")
        return folder

    def load_checkpoint(self, folder: str, allow_changes: bool = False) -> None:
        """Resume from a DCP checkpoint of the same pool and selection config (compared, from its
        JSON record, before anything is loaded); the selection continues at its step."""
        import torch.distributed.checkpoint as dcp

        saved = read_resume_record(os.path.dirname(os.path.abspath(folder)), os.path.basename(os.path.abspath(folder)))
        if saved is None:
            raise ValueError(f"{folder} holds no {RESUME_RECORD}: it is not a checkpoint of PartitionSelFSDP")
        diffs = check_resume(saved, resume_record(self), folder, allow_changes)
        if diffs:
            logger.warning("resuming %s with changes (allowed): %s", folder, "; ".join(diffs))
        self.sink.adopt_run_id(saved.get("run_id"), folder)  # this log must be the checkpoint's run's
        dcp.load({"train": TrainState(self.model, self.optimizer, self.selector)}, checkpoint_id=folder)
