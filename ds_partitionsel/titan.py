"""PartitionSel as a torchtitan data loader: :class:`PartitionSelDataLoader`.

torchtitan (0.3.0) builds its data loader from the job config, ``config.dataloader.build(
dp_world_size=, dp_rank=, tokenizer=, seq_len=, local_batch_size=, ...)``, iterates it for
``(input_dict, labels)`` micro batches (``gradient_accumulation_steps`` of them per optimizer
step) and checkpoints it as a DCP ``Stateful``. This loader is such a component:

    from ds_partitionsel.titan import PartitionSelDataLoader
    dataloader = PartitionSelDataLoader.Config(dataset_path="pools/mix",
                                               partitionsel={"pool_factor": 8, "seed": 1234},
                                               gradient_accumulation_steps=1)
    ...                                   # the trainer builds it; then, once the model exists:
    trainer.dataloader.attach(trainer.model_parts[0], lr=lambda: trainer.lr_schedulers.schedulers[0].get_last_lr()[0])

Each optimizer step's micro batches are this data-parallel rank's share of a PartitionSel batch
of ``local_batch_size x gradient_accumulation_steps x dp_world_size`` sequences, selected (the
same on every rank) with the model as it is after the previous step: the loader selects step
``s + 1`` when the trainer asks for its first micro batch, after step ``s``'s optimizer step.
``input`` is the sequence without its last token and ``labels`` the next tokens, ``-100`` where
no label is trained (padding, and prompt tokens of SFT pools), as torchtitan's cross-entropy
expects. The model is sketched through :class:`LogitsView` (torchtitan's decoders return the
logits tensor itself); torchtitan trains its own token-mean loss, so ``use_weights`` is refused
and the step records carry no train loss (torchtitan logs it). Its checkpoints carry the
selector: the step to select next and the selector's own state.

torchtitan is optional and imported here only: ``pip install torchtitan`` (0.3.0 pins
``datasets<4.8``; this module does not use ``datasets``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional, Union

import torch.distributed as dist
from torch import nn

from ds_partitionsel.config import ConfigError, PartitionSelConfig
from ds_partitionsel.extras import require

_dataloader = require("torchtitan.components.dataloader", "ds_partitionsel.titan")

__all__ = ["PartitionSelDataLoader", "LogitsView", "titan_batch"]

IGNORE_INDEX = -100  # torchtitan's cross-entropy ignore index


class LogitsView(nn.Module):
    """A causal LM called as Hugging Face ones are, ``view(input_ids=..., attention_mask=...)
    .logits``, for a model that maps ``tokens (B, T)`` to ``logits (B, T, V)`` (torchtitan's
    decoders); a model that already returns ``.logits`` passes through. Right padding needs no
    mask under causal attention: padded positions come after every label of their row."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask=None, **_):
        out = self.inner(input_ids)
        return out if hasattr(out, "logits") else SimpleNamespace(logits=out)


def titan_batch(batch: dict) -> tuple:
    """``({"input": tokens (B, T-1)}, labels (B, T-1))`` of a collated pool batch: labels are
    the next tokens where ``batch["labels"]`` trains them, else ``-100``."""
    return {"input": batch["input_ids"][:, :-1]}, batch["labels"][:, 1:].clone()


def _sequence_loss(model, batch, device=None):
    from ds_partitionsel.loss import per_sequence_loss

    return per_sequence_loss(model, batch, device)


class PartitionSelDataLoader(_dataloader.BaseDataLoader):
    """torchtitan data loader whose batches are PartitionSel selections (see the module doc)."""

    @dataclass(kw_only=True, slots=True)
    class Config(_dataloader.BaseDataLoader.Config):
        dataset: str = "partitionsel"
        """Informational: the pool is ``dataset_path``."""

        partitionsel: dict = field(default_factory=dict)
        """The ``"partitionsel"`` block (``[dataloader.partitionsel]`` in TOML)."""

        gradient_accumulation_steps: int = 1
        """Micro batches per optimizer step: the trainer's ``gradient_accumulation_steps``."""

        pad_token_id: Optional[int] = None
        """Padding id; default the tokenizer's pad (or eos) id."""

    def __init__(self, config: "PartitionSelDataLoader.Config", *, dp_world_size: int, dp_rank: int,
                 local_batch_size: int, seq_len: Optional[int] = None, tokenizer=None, group=None, **_):
        from ds_partitionsel.data import CandidatePool

        if not config.dataset_path:
            raise ConfigError("PartitionSelDataLoader needs dataloader.dataset_path: a candidate pool directory "
                              "from tools/build_pool.py")
        self.cfg = PartitionSelConfig.from_dict(config.partitionsel)
        if self.cfg.use_weights:
            raise ConfigError("partitionsel.use_weights is not supported under torchtitan (it trains its own "
                              "token-mean loss); remove it")
        if config.gradient_accumulation_steps < 1 or local_batch_size < 1:
            raise ConfigError(f"gradient_accumulation_steps ({config.gradient_accumulation_steps}) and "
                              f"local_batch_size ({local_batch_size}) must be >= 1")
        self.pool = CandidatePool(config.dataset_path, "train")
        self.valid_pool = CandidatePool(config.dataset_path, "valid")
        longest = int(self.pool.lengths.max())
        if seq_len is not None and longest - 1 > seq_len:
            raise ConfigError(f"the pool's longest record has {longest} tokens, more than training.seq_len "
                              f"{seq_len} + 1: raise seq_len or rebuild the pool with --max-length {seq_len + 1}")
        pad = config.pad_token_id
        if pad is None and tokenizer is not None:
            pad = getattr(tokenizer, "pad_id", None)
            pad = pad if pad is not None and pad >= 0 else getattr(tokenizer, "eos_id", None)
        if pad is None:
            raise ConfigError("no padding id: set dataloader.pad_token_id")
        self.pad_token_id = int(pad)
        self.dp_rank, self.dp_world_size, self.group = int(dp_rank), int(dp_world_size), group
        self.micro_batch = int(local_batch_size)
        self.batch_size = self.micro_batch * config.gradient_accumulation_steps * self.dp_world_size
        self.selector = self.step_runner = None
        self._pending_state: Optional[dict] = None
        self._lr: Union[float, Callable[[], float]] = 0.0

    # ------------------------------------------------------------------ wiring

    def attach(self, model: nn.Module, lr: Union[float, Callable[[], float]] = 1e-4, sink=None) -> None:
        """Give the loader the model it selects for (after the trainer parallelized it) and the
        learning rate of each step (a number or a callable: the utility's eta)."""
        from ds_partitionsel.loop import TrainStep
        from ds_partitionsel.selector import Selector

        group = self.group
        if self.cfg.sketch.precondition != "none":
            raise ConfigError(f"partitionsel.sketch.precondition {self.cfg.sketch.precondition!r} is not supported "
                              f"by the TorchTitan loader (DTensor optimizer state); it works with the DeepSpeed "
                              f"engine (ds_partitionsel.engine) and the HF Trainer: use 'none' here")
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        if world != self.dp_world_size:
            raise ConfigError(f"the selection's process group has {world} ranks, the trainer's data-parallel "
                              f"world {self.dp_world_size}: pass group= (the data-parallel group) to the loader")
        self.selector = Selector(LogitsView(model), self.cfg, self.pool, self.valid_pool,
                                 batch_size=self.batch_size, pad_token_id=self.pad_token_id, group=group)
        self.step_runner = TrainStep(self.selector, sink, micro_batch=self.micro_batch, sequence_loss=_sequence_loss)
        self._lr = lr
        if self._pending_state is not None:
            self._apply(self._pending_state)
            self._pending_state = None

    def _current_lr(self) -> float:
        return float(self._lr() if callable(self._lr) else self._lr)

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        if self.step_runner is None:
            raise RuntimeError("PartitionSelDataLoader.attach(model, lr) was not called: the selection needs "
                               "the model being trained")
        runner = self.step_runner
        while True:
            if runner.selection is not None:  # the previous step has been trained (optimizer stepped)
                runner.finish(self._current_lr(), train_loss=math.nan)
            runner.begin(self._current_lr())
            for batch, _ in runner.micro_batches():
                yield titan_batch(batch)

    # ------------------------------------------------------------------ checkpoints (DCP Stateful)

    def state_dict(self) -> dict:
        """The next step to select and the selector's state; the same on every rank."""
        if self.selector is None:
            return dict(self._pending_state or {"global_step": 0, "selector": {}})
        return {"global_step": int(self.selector.global_step), "selector": self.selector.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:  # torchtitan hands an empty state to a loader that saved none
            return
        if self.selector is None:
            self._pending_state = dict(state_dict)
        else:
            self._apply(state_dict)

    def _apply(self, state: dict) -> None:
        self.selector.load_state_dict(state.get("selector") or {})
        self.selector.global_step = int(state["global_step"])
        self.step_runner.selection = None  # a resumed loader starts at a step boundary


# ----------------------------------------------------------------------------- torchtitan's Trainer

def trainer_class():
    """``PartitionSelTitanTrainer``: torchtitan's ``Trainer`` that attaches its model and learning
    rate to a :class:`PartitionSelDataLoader` once the model is parallelized (pure data
    parallelism: the selection runs over the whole world). Built on first use: torchtitan's
    trainer module needs an accelerator stack to import."""
    global _TRAINER
    if _TRAINER is None:
        from dataclasses import dataclass as _dataclass

        trainer_module = require("torchtitan.trainer", "ds_partitionsel.titan.trainer_class")

        class PartitionSelTitanTrainer(trainer_module.Trainer):
            @_dataclass(kw_only=True, slots=True)
            class Config(trainer_module.Trainer.Config):
                pass

            def __init__(self, config):
                super().__init__(config)
                if isinstance(self.dataloader, PartitionSelDataLoader):
                    optimizer = self.optimizers.optimizers[0]
                    self.dataloader.attach(self.model_parts[0], lr=lambda: float(optimizer.param_groups[0]["lr"]))

        _TRAINER = PartitionSelTitanTrainer
    return _TRAINER


_TRAINER = None


def partitionsel_llama3_debugmodel():
    """A torchtitan job config (``--module ds_partitionsel.titan --config partitionsel_llama3_debugmodel``):
    torchtitan's Llama 3 debug model and settings, batches from :class:`PartitionSelDataLoader`
    (``--dataloader.dataset_path POOL``; the block from ``PARTITIONSEL_BLOCK``, a JSON object, when set).
    torchtitan's decoders keep their blocks in an ``nn.ModuleDict``: the sketch hooks the last
    block's linears by name (``sketch.modules`` regex)."""
    import json
    import os

    registry = require("torchtitan.models.llama3.config_registry", "partitionsel_llama3_debugmodel")
    base = registry.llama3_debugmodel()
    fields = {name: getattr(base, name) for name in base.__dataclass_fields__ if not name.startswith("_")}
    block = json.loads(os.environ.get("PARTITIONSEL_BLOCK", "{}")) or {
        "pool_factor": 4, "seed": 1234, "sketch": {"modules": r"^layers\.\d+\.feed_forward\.w2$", "mode": "exact"},
        "validation": {"anchors": 4}}
    fields["dataloader"] = PartitionSelDataLoader.Config(partitionsel=block, gradient_accumulation_steps=1)
    fields["validator"] = type(base.validator)(enable=False) if hasattr(base.validator, "enable") else base.validator
    return trainer_class().Config(**fields)
