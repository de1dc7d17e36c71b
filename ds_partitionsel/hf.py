"""PartitionSel for the Hugging Face Trainer: :class:`PartitionSelTrainer`.

    from ds_partitionsel.hf import PartitionSelTrainer

    args = TrainingArguments(output_dir="runs/x", deepspeed="ds_configs/zero2.json",   # has a
                             per_device_train_batch_size=2, max_steps=100, ...)        # "partitionsel" block
    trainer = PartitionSelTrainer(model=model, args=args, processing_class=tokenizer,
                                  candidate_pool=CandidatePool("pools/mix", "train", tokenizer=tokenizer),
                                  valid_pool=CandidatePool("pools/mix", "valid"))
    trainer.train()                        # or trainer.train(resume_from_checkpoint=True)

Each optimizer step's batch is chosen by the same :class:`~ds_partitionsel.selector.Selector` as
the DeepSpeed engine's: the training "dataloader" yields, for global step ``s``, this rank's
share of the selection made with the model as it is after step ``s - 1`` and the learning rate
of step ``s``. The loss is the per-sequence mean (:mod:`ds_partitionsel.loss`), weighted by the
OMP weights when ``use_weights``. So, for the same seed, pool, model and DeepSpeed config, the
Trainer selects exactly what ``ds_partitionsel.engine`` selects.

The ``"partitionsel"`` block comes from ``TrainingArguments(deepspeed=...)`` (a path or a dict) or
from ``partitionsel=`` (then DeepSpeed is optional: plain DDP works too). The batch is
``per_device_train_batch_size x gradient_accumulation_steps x world``, and ``max_steps`` must be
set. Checkpoints: the Trainer's own ``checkpoint-N`` folders also hold ``partitionsel_resume.json``;
a resume starts selecting at the checkpoint's step (the selection is a function of the step, so
nothing is skipped or replayed) and refuses another pool or selection config, as the engine does.
Metrics: one :class:`~ds_partitionsel.records.StepRecord` per step into
``output_dir/metrics.jsonl`` and, as ``partitionsel/...`` scalars, into the Trainer's logs (its
tensorboard / wandb callbacks see them).
"""
from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace
from typing import Optional

import torch
import transformers

from ds_partitionsel.config import ConfigError, PartitionSelConfig, split_deepspeed_config
from ds_partitionsel.loop import TrainStep
from ds_partitionsel.preemption import latest_complete_trainer_checkpoint
from ds_partitionsel.records import MetricsSink, monitor_events
from ds_partitionsel.runs import RESUME_RECORD, check_resume, read_resume_record, resume_record
from ds_partitionsel.selector import Selector, check_pools, pool_size_for

logger = logging.getLogger("ds_partitionsel")

__all__ = ["PartitionSelTrainer"]

SELECTOR_STATE = "partitionsel_selector.pt"  # in a checkpoint-N folder: a trained proxy's state


def _block_from(partitionsel, deepspeed) -> PartitionSelConfig:
    if partitionsel is not None:
        if isinstance(partitionsel, PartitionSelConfig):
            return partitionsel
        return PartitionSelConfig.from_dict(partitionsel)
    if deepspeed is None:
        present = False
    else:
        _, block, present = split_deepspeed_config(deepspeed)
    if not present:
        raise ConfigError("PartitionSelTrainer needs a 'partitionsel' block: put it into the DeepSpeed "
                          "config of TrainingArguments(deepspeed=...), or pass partitionsel={...}")
    return block


class SelectedBatches:
    """The Trainer's training "dataloader": this rank's micro batches of the selected batch of
    each step, from ``trainer.state.global_step`` on (a resume starts where it stopped)."""

    def __init__(self, trainer: "PartitionSelTrainer"):
        self.trainer = trainer

    def __len__(self) -> int:  # one "epoch" is the whole run: the Trainer counts steps with it
        args = self.trainer.args
        return args.max_steps * args.gradient_accumulation_steps

    def __iter__(self):
        tr = self.trainer
        if tr.selector is None:  # the model is prepared by now (DeepSpeed engine, ZeRO-3 hooks)
            tr.selector = tr._build_selector()
            # sketch.precondition "adam": under DeepSpeed the Trainer's optimizer wraps the engine's
            tr.selector.set_optimizer(tr.optimizer)
            tr.step_runner = TrainStep(tr.selector, tr.sink, model=tr.model,
                                       micro_batch=tr.args.per_device_train_batch_size, listeners=[tr._log_record])
            if tr._resume_from:
                path = os.path.join(tr._resume_from, SELECTOR_STATE)
                state = torch.load(path, weights_only=True) if os.path.isfile(path) else {}
                tr.selector.load_state_dict(state)
        step_runner = tr.step_runner
        step = tr.state.global_step
        while True:
            step_runner.begin(tr.current_lr(), step)
            for batch, weights in step_runner.micro_batches():
                item = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                        "labels": batch["labels"]}
                if weights is not None:
                    item["ps_weights"] = weights
                yield item
            step += 1


class _PartitionSelCallback(transformers.TrainerCallback):
    """Writes each step's record and evaluation, and the resume record of each checkpoint."""

    def __init__(self, trainer: "PartitionSelTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        tr = self.trainer
        tr._finish_step()
        # a stop signal (on any rank): every rank saves this step's checkpoint and stops
        if tr.stop_request is not None and tr.stop_request.agreed(state.global_step, tr.ps_config.timeout_s):
            control.should_save = True
            control.should_training_stop = True
            tr.stopped_at = state.global_step
        return control

    def on_save(self, args, state, control, **kwargs):
        tr = self.trainer
        if tr.selector is not None and tr.selector.rank == 0:
            folder = os.path.join(args.output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                record = resume_record(tr.selector)
                record["run_id"] = tr.sink.run_id if tr.sink is not None else None
                with open(os.path.join(folder, RESUME_RECORD), "w") as fh:
                    json.dump(record, fh, indent=1)
                state = tr.selector.state_dict()
                if state:  # tensors only: loaded back with torch.load(weights_only=True)
                    torch.save(state, os.path.join(folder, SELECTOR_STATE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.sink is not None:
            self.trainer.sink.close()


class PartitionSelTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose every optimizer step trains on a PartitionSel batch.

    Parameters (beyond the Trainer's; ``train_dataset`` is not used)
    ----------
    candidate_pool, valid_pool : ``CandidatePool`` of the training and the held-out split.
    partitionsel : the ``"partitionsel"`` block (dict or ``PartitionSelConfig``); default: the
        block of ``args.deepspeed``.
    pad_token_id : default ``processing_class.pad_token_id``.
    resume_allow_changes : resume even if the pool or the selection config changed.
    stop_request : a :class:`~ds_partitionsel.preemption.StopRequest` (installed): after the step
        where any rank received SIGTERM/SIGUSR1, every rank saves a checkpoint and training stops
        (``stopped_at`` is that step).
    """

    def __init__(self, *args, candidate_pool, valid_pool, partitionsel=None,
                 pad_token_id: Optional[int] = None, resume_allow_changes: bool = False,
                 stop_request=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ps_config = _block_from(partitionsel, self.args.deepspeed)
        ds = getattr(self.args, "hf_deepspeed_config", None)
        if ds is not None:  # DeepSpeed must not see the block (HF would try to fill its "auto" values)
            ds.config.pop("partitionsel", None)
        check_pools(candidate_pool, valid_pool, self.ps_config)
        if self.args.max_steps is None or self.args.max_steps <= 0:
            raise ConfigError("PartitionSelTrainer needs TrainingArguments(max_steps=N > 0): every step "
                              "draws a new pool, there are no epochs")
        if pad_token_id is None:
            pad_token_id = getattr(self.processing_class, "pad_token_id", None)
        if pad_token_id is None:
            raise ConfigError("no pad token id: pass a tokenizer with a pad_token as processing_class, "
                              "or pad_token_id=")
        self.candidate_pool, self.valid_pool = candidate_pool, valid_pool
        self.pad_token_id = int(pad_token_id)
        self.resume_allow_changes = resume_allow_changes
        # The selection is a function of the step: a resume starts at the checkpoint's step and
        # must not replay (run selections for) the steps it skips.
        self.args.ignore_data_skip = True
        self.model_accepts_loss_kwargs = False  # our loss is the per-sequence mean
        self.selector: Optional[Selector] = None
        self.sink: Optional[MetricsSink] = None
        self.step_runner: Optional[TrainStep] = None
        self._ps_logs = {}
        self._resume_from = None
        self.stop_request, self.stopped_at = stop_request, None
        self.add_callback(_PartitionSelCallback(self))

    # ------------------------------------------------------------------ data

    @property
    def batch_size(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size

    def get_train_dataloader(self):
        return SelectedBatches(self)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_complete_trainer_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint-N folder in {self.args.output_dir} to resume from")
        saved = self._check_resume(resume_from_checkpoint) if resume_from_checkpoint else None
        rank = self.args.process_index
        self.sink = MetricsSink(self.args.output_dir, rank=rank, resume=bool(resume_from_checkpoint))
        if saved is not None:  # this log must be the checkpoint's run's
            self.sink.adopt_run_id(saved.get("run_id"), resume_from_checkpoint)
        self._resume_from = resume_from_checkpoint
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _check_resume(self, folder) -> dict:
        path = os.path.join(folder, RESUME_RECORD)
        if not os.path.isfile(path):
            raise ValueError(f"{folder} holds no {RESUME_RECORD}: it is not a checkpoint of a PartitionSelTrainer")
        saved = read_resume_record(os.path.dirname(os.path.abspath(folder)), os.path.basename(os.path.abspath(folder)))
        here = SimpleNamespace(global_step=saved.get("global_step"), cfg=self.ps_config,
                               pool_size=pool_size_for(self.ps_config, self.batch_size),
                               batch_size=self.batch_size, pool=self.candidate_pool, valid_pool=self.valid_pool)
        diffs = check_resume(saved, resume_record(here), folder, self.resume_allow_changes)
        if diffs:
            logger.warning("resuming %s with changes (allowed): %s", folder, "; ".join(diffs))
        return saved

    def _build_selector(self) -> Selector:
        return Selector(self.model, self.ps_config, self.candidate_pool, self.valid_pool,
                        batch_size=self.batch_size, pad_token_id=self.pad_token_id)

    def _inner_training_loop(self, *args, **kwargs):
        self.selector = self.step_runner = None  # built at the first batch, once the model is prepared
        return super()._inner_training_loop(*args, **kwargs)

    # ------------------------------------------------------------------ loss and step records

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("ps_weights", None)
        loss = self.step_runner.loss(model, inputs, weights)
        return (loss, None) if return_outputs else loss

    def _finish_step(self) -> None:
        if self.step_runner is not None and self.step_runner.selection is not None:
            self.step_runner.finish(self.current_lr())

    def evaluate_domains(self) -> dict:
        """Held-out loss per domain (PartitionSel's evaluation), logged as ``partitionsel/eval_loss/*``."""
        return self.step_runner.evaluate(self.state.global_step, model=self.model)

    def _log_record(self, record) -> None:
        self._ps_logs.update({name: value for name, value, _ in monitor_events(record)})

    def log(self, logs, *args, **kwargs):
        logs = dict(logs)
        logs.update(self._ps_logs)
        self._ps_logs = {}
        return super().log(logs, *args, **kwargs)

