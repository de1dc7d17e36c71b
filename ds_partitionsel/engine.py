"""The DeepSpeed integration: ``initialize`` and an engine whose ``train_step`` is one step of

    selection = Selector.select(step, lr)      pool -> this rank's shard -> sketches -> target
                                               -> distributed selection -> this rank's share
    forward/backward/step (DeepSpeed) on selection.my_records, then one StepRecord

The step itself lives in :mod:`ds_partitionsel.loop` (framework-neutral); this module is the
shell around it for a ``DeepSpeedEngine`` (who steps the optimizer, the monitor), plus
checkpoints that carry the selector's state.
"""
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

from ds_partitionsel.config import (ConfigError, PartitionSelConfig, check_deepspeed_config, check_pool_fit,
                                    split_deepspeed_config, train_batch_size)
from ds_partitionsel.loop import TrainStep
from ds_partitionsel.records import MetricsSink
from ds_partitionsel.preemption import write_latest
from ds_partitionsel.runs import check_resume, check_run_dir, read_resume_record, resume_record, write_resume_record
from ds_partitionsel.selector import Selector, check_pools

logger = logging.getLogger("ds_partitionsel")

CLIENT_STATE_KEY = "partitionsel"
SELECTOR_STATE_KEY = "partitionsel_selector"  # a trained proxy's weights and optimizer


def initialize(model, config, pool, valid_pool, *, optimizer=None, model_parameters=None,
               lr_scheduler=None, pad_token_id: Optional[int] = None, tokenizer=None,
               output_dir: Optional[str] = None, resume: bool = False, args=None, **deepspeed_kwargs):
    """Like ``deepspeed.initialize``, plus the candidate pool and the validation split.

    Parameters
    ----------
    model : torch.nn.Module, a Hugging Face causal LM (optionally peft-wrapped).
    config : dict or path of a DeepSpeed JSON config with an optional ``"partitionsel"`` block
        (see :mod:`ds_partitionsel.config`).
    pool : ``CandidatePool`` of the training split. valid_pool : ``CandidatePool`` held out.
    optimizer, model_parameters, lr_scheduler, args : passed to ``deepspeed.initialize``.
    pad_token_id : padding id; taken from ``tokenizer.pad_token_id`` when not given.
    output_dir : where rank 0 writes ``metrics.jsonl`` (None: no JSONL log). A directory whose
        log already holds records is refused unless ``resume`` (see :mod:`ds_partitionsel.runs`).
    resume : this run continues a checkpoint (``load_checkpoint`` next): continue its log.

    Every config error (the ``"partitionsel"`` block, the batch and pool sizes) is raised here,
    before DeepSpeed builds an engine.

    Returns
    -------
    (engine, optimizer, None, lr_scheduler) as ``deepspeed.initialize`` does, with ``engine``
    a :class:`PartitionSelEngine`.
    """
    import deepspeed

    ds_config, cfg, _ = split_deepspeed_config(config)
    check_deepspeed_config(ds_config, dist.get_world_size() if dist.is_initialized() else 1)
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        raise ConfigError("no pad token id: the tokenizer has no pad_token; set tokenizer.pad_token "
                          "(e.g. to its eos token) or pass pad_token_id=")
    check_pools(pool, valid_pool, cfg)
    world = dist.get_world_size() if dist.is_initialized() else 1
    batch_size = train_batch_size(ds_config, world)
    if batch_size is not None:
        check_pool_fit(cfg, batch_size, world, len(pool))
    if output_dir:
        check_run_dir(output_dir, resume=resume)
    if model_parameters is None and optimizer is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        lr_scheduler=lr_scheduler, config=ds_config, **deepspeed_kwargs)
    wrapped = PartitionSelEngine(engine, cfg, pool, valid_pool, pad_token_id, output_dir=output_dir,
                                 resume=resume)
    return wrapped, optimizer, None, lr_scheduler


class PartitionSelEngine:
    """A ``DeepSpeedEngine`` whose :meth:`train_step` selects its own batch.

    Attributes not defined here are looked up on the wrapped DeepSpeed engine (``module``,
    ``optimizer``, ``get_lr``, ``monitor``, ...); the selection's own (``pool``, ``sampler``,
    ``sketcher``, ``pool_size``, ``rank``, ``world``, ...) on its :class:`Selector`.
    """

    def __init__(self, engine, cfg: PartitionSelConfig, pool, valid_pool, pad_token_id: int,
                 output_dir: Optional[str] = None, resume: bool = False):
        self.engine, self.cfg = engine, cfg
        self.micro_batch = engine.train_micro_batch_size_per_gpu()
        self.grad_accum = engine.gradient_accumulation_steps()
        self.batch_size = engine.train_batch_size()  # k: micro x accumulation x world
        world = dist.get_world_size() if dist.is_initialized() else 1
        if self.batch_size != self.micro_batch * self.grad_accum * world:
            raise ConfigError(f"train_batch_size {self.batch_size} != micro batch {self.micro_batch} x "
                              f"gradient accumulation {self.grad_accum} x world {world}")
        self.selector = Selector(engine.module, cfg, pool, valid_pool, batch_size=self.batch_size,
                                 pad_token_id=pad_token_id)
        self.selector.set_optimizer(engine.optimizer)  # sketch.precondition "adam" reads its second moments
        self.sink = MetricsSink(output_dir, rank=self.selector.rank, monitor=getattr(engine, "monitor", None),
                                resume=resume)
        self.step_runner = TrainStep(self.selector, self.sink, model=engine.module, micro_batch=self.micro_batch)

    def __getattr__(self, name):
        selector = self.__dict__.get("selector")
        if selector is not None and name in _SELECTOR_VIEWS:
            return getattr(selector, name)
        return getattr(self.__dict__["engine"], name)

    @property
    def run_id(self) -> Optional[str]:
        """The id of this run (rank 0 with an output directory; None elsewhere): in its run
        directory and its checkpoints' resume records."""
        return self.sink.run_id

    @property
    def global_step(self) -> int:
        """Steps trained so far: the next step to select."""
        return self.selector.global_step

    @global_step.setter
    def global_step(self, value: int) -> None:
        self.selector.global_step = int(value)

    # ------------------------------------------------------------------ the step

    def train_step(self) -> dict:
        """One optimizer step on a selected batch; returns this step's record (as JSON)."""
        return self.step_runner.run(self._lr, self._train_on).to_json()

    def _lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _train_on(self, selection) -> None:
        """Forward/backward/step through DeepSpeed on this rank's share, in micro batches
        (DeepSpeed accumulates and steps at the boundary)."""
        self.engine.train()
        for batch, weights in self.step_runner.micro_batches(selection):
            self.engine.backward(self.step_runner.loss(self.engine, batch, weights, self.selector.device))
            self.engine.step()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss per domain (mean of per-sequence mean NLL) and their mean."""
        return self.step_runner.evaluate()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, save_dir, tag=None, client_state=None, **kwargs):
        """DeepSpeed's checkpoint plus what a resume must match (:func:`ds_partitionsel.runs.resume_record`),
        in the client state and as ``<save_dir>/<tag>/partitionsel_resume.json``."""
        record = resume_record(self)
        state = dict(client_state or {})
        state[CLIENT_STATE_KEY] = record
        selector_state = self.selector.state_dict()
        if selector_state:
            state[SELECTOR_STATE_KEY] = selector_state
        tag = f"global_step{self.engine.global_steps}" if tag is None else tag  # DeepSpeed's default tag
        save_latest = kwargs.pop("save_latest", True)
        out = self.engine.save_checkpoint(save_dir, tag=tag, client_state=state, save_latest=False, **kwargs)
        if self.rank == 0:  # a rank that resumes before this file exists checks the client state instead
            write_resume_record(os.path.join(save_dir, str(tag)), record)
            if save_latest:  # only now is the checkpoint complete: a kill before this keeps the previous one
                write_latest(save_dir, str(tag))
        return out

    def load_checkpoint(self, load_dir, tag=None, allow_changes: bool = False, **kwargs):
        """Resume from a checkpoint of the same pool and selection config.

        The checkpoint's JSON record is compared before DeepSpeed loads anything; a different
        pool (by fingerprint) or selection config raises :class:`~ds_partitionsel.runs.ResumeMismatchError`
        naming every difference, unless ``allow_changes`` (then they are logged). Checkpoints
        are pickles: load only checkpoints from a trusted source.
        """
        current = resume_record(self)
        early = read_resume_record(load_dir, tag)
        if early is not None:
            check_resume(early, current, load_dir, allow_changes)
            self.sink.adopt_run_id(early.get("run_id"), load_dir)  # this log must be the checkpoint's run's
        path, client_state = self.engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint found in {load_dir} (tag {tag!r})")
        state = (client_state or {}).get(CLIENT_STATE_KEY)
        if state is None:
            raise ValueError(f"checkpoint {path} has no '{CLIENT_STATE_KEY}' client state: it was not "
                             f"saved by a PartitionSelEngine")
        diffs = check_resume(state, current, path, allow_changes)
        if early is None:
            self.sink.adopt_run_id(state.get("run_id"), path)
        if diffs:
            logger.warning("resuming %s with changes (allowed): %s", path, "; ".join(diffs))
        self.selector.load_state_dict(client_state.get(SELECTOR_STATE_KEY, {}))
        self.global_step = int(state["global_step"])
        return path, client_state


# what the engine shows of its selector
_SELECTOR_VIEWS = ("pool", "valid_pool", "pool_size", "sampler", "sketcher", "proxy", "rank", "world",
                   "pad_token_id", "device")
