"""The one training step every loop shares: select -> train -> record.

    step = TrainStep(selector, sink, model=model, micro_batch=mb)
    record = step.run(lr_fn, train_on)        # a loop that drives its own optimizer

where ``train_on(selection)`` is the framework's part: for each ``(batch, weights)`` of
``step.micro_batches(selection)``, ``loss = step.loss(model, batch, weights)``, backward, and the
optimizer step (DeepSpeed's engine, FSDP2, Megatron's gradient all-reduce, a plain AdamW).
A loop that is driven by its framework (the Hugging Face Trainer pulls batches and calls the
loss) uses the phases directly: :meth:`TrainStep.begin` -> :meth:`TrainStep.micro_batches` ->
:meth:`TrainStep.loss` -> :meth:`TrainStep.finish`.

What the step does once, for every loop:

- the selection of step ``s`` (:meth:`Selector.select`) with the learning rate it trains with,
  the selected rows' features only on ``log_interval`` steps (conflicting pairs);
- the per-sequence loss (:mod:`ds_partitionsel.loss`; a loop whose model is called differently
  gives ``sequence_loss``), the plain mean or the mean weighted by the OMP weights
  (``use_weights``);
- the train loss averaged over the data-parallel ranks, the proxy's own step, the
  :class:`~ds_partitionsel.records.StepRecord` with its time split into the
  :class:`~ds_partitionsel.records.MetricsSink` (and any listener), the held-out evaluation every
  ``eval_interval`` steps;
- a failure as :class:`StepFailed`, one line naming the step and the rank (:func:`guarded`).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch

from ds_partitionsel.records import EvalRecord, StepRecord, step_record

__all__ = ["TrainStep", "StepFailed", "guarded"]


class StepFailed(Exception):
    """A training step (or evaluation, or checkpoint) failed after training started; the message
    names the step and the rank, the cause is chained."""


def guarded(what: str, fn: Callable):
    """``fn()``, with any failure but an interrupt raised as :class:`StepFailed` ``"<what> failed:
    <type>: <first line>"``."""
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except StepFailed:
        raise
    except Exception as e:  # noqa: BLE001 - reported as one line that names the step
        first = (str(e).strip().splitlines() or [""])[0]
        raise StepFailed(f"{what} failed: {type(e).__name__}: {first}") from e


class TrainStep:
    """select -> train -> record for one rank of a data-parallel job.

    Parameters
    ----------
    selector : a :class:`~ds_partitionsel.selector.Selector` (or a subclass: Megatron's); its
        ``global_step`` is the next step to select.
    sink : :class:`~ds_partitionsel.records.MetricsSink` or None (records are only returned).
    model : what the held-out evaluation runs (every ``eval_interval`` steps); None: no evaluation.
    micro_batch : sequences per forward (training and evaluation).
    sequence_loss : ``(model, batch, device) -> (loss (B,), count (B,))``; default the selector's.
    listeners : callables that see every emitted record too (e.g. a Trainer's log).
    """

    def __init__(self, selector, sink=None, *, model=None, micro_batch: int = 1,
                 sequence_loss: Optional[Callable] = None, listeners: Sequence[Callable] = ()):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.selector, self.cfg, self.sink = selector, selector.cfg, sink
        self.model, self.micro_batch = model, int(micro_batch)
        self.sequence_loss = sequence_loss or selector.sequence_loss
        self.listeners = list(listeners)
        self.selection = None  # the step in progress (between begin and finish)
        self._losses: list = []
        self._start = 0.0

    @property
    def global_step(self) -> int:
        return self.selector.global_step

    def logs_at(self, step: int) -> bool:
        """Whether ``step`` measures what needs the selected rows' features (conflicting pairs)."""
        return step % self.cfg.log_interval == 0

    # ------------------------------------------------------------------ the phases

    def begin(self, lr: float, step: Optional[int] = None):
        """Select the batch of ``step`` (default: the selector's next step) for learning rate
        ``lr``; starts the step's training clock. Returns the ``StepSelection``."""
        step = self.selector.global_step if step is None else int(step)
        selection = self.selector.select(step, lr, with_features=self.logs_at(step))
        self.selection, self._losses, self._start = selection, [], time.perf_counter()
        return selection

    def micro_batches(self, selection=None) -> Iterator[Tuple[dict, Optional[torch.Tensor]]]:
        """``(collated batch, weights (b,) or None)`` of this rank's share, ``micro_batch`` at a time."""
        selection = selection if selection is not None else self.selection
        ids = list(selection.my_records)
        weights = selection.train_weights(self.cfg.use_weights)
        pool, pad = self.selector.pool, self.selector.pad_token_id
        for s in range(0, len(ids), self.micro_batch):
            yield pool.collate(ids[s:s + self.micro_batch], pad), \
                (weights[s:s + self.micro_batch] if weights is not None else None)

    def micro_batch_count(self, selection=None) -> int:
        selection = selection if selection is not None else self.selection
        return -(-len(selection.my_records) // self.micro_batch)

    def loss(self, model, batch: dict, weights: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
        """The training loss of one micro batch (scalar, differentiable): the mean per-sequence
        loss, weighted by ``weights`` when given; counted into the step's train loss."""
        per_seq, _ = self.sequence_loss(model, batch, device)
        loss = (per_seq * weights.to(per_seq.device, per_seq.dtype)).mean() if weights is not None else per_seq.mean()
        self._losses.append(float(loss.detach()))
        return loss

    def finish(self, lr: float, train_loss: Optional[float] = None) -> StepRecord:
        """Close the step in progress: the train loss averaged over ranks (or ``train_loss``, for
        a loop whose framework computes the loss itself), the proxy's step, the record into the
        sink and listeners, the evaluation when due. Returns the record."""
        selection, selector = self.selection, self.selector
        if selection is None:
            raise RuntimeError("TrainStep.finish without begin: no step in progress")
        time_train = time.perf_counter() - self._start
        if train_loss is None:
            local = torch.tensor(sum(self._losses) / max(len(self._losses), 1), dtype=torch.float64)
            total = selector.comm(selection.step, "training").all_reduce(local, "sum", "all-reduce of the train loss")
            train_loss = float(total) / selector.world
        proxy_loss = selector.after_step(selection)
        record = step_record(selection, train_loss=train_loss, lr=lr,
                             pool_size=selector.pool_size, time_train=time_train,
                             log_conflicts=self.logs_at(selection.step), proxy_loss=proxy_loss)
        self.selection, self._losses = None, []
        self.emit(record)
        if not math.isfinite(train_loss):  # the record is logged (the divergence shows there); every
            # rank sees the same averaged loss, so every rank stops at this step
            raise StepFailed(f"training step {selection.step} on rank {selector.rank}: the train loss is "
                             f"{train_loss} (not finite): the model diverged; lower the learning rate (--lr) "
                             f"or clip gradients, and resume from a checkpoint before step {selection.step}")
        if self.cfg.eval_interval and self.model is not None and (selection.step + 1) % self.cfg.eval_interval == 0:
            self.evaluate(selection.step + 1)
        return record

    def run(self, lr: Callable[[], float], train_on: Callable) -> StepRecord:
        """One whole step for a loop that owns its optimizer: ``begin(lr())``, ``train_on(selection)``,
        ``finish(lr())`` (the rate after the optimizer step, as the scheduler reports it)."""
        selection = self.begin(lr())
        train_on(selection)
        return self.finish(lr())

    # ------------------------------------------------------------------ records

    def emit(self, record) -> None:
        if self.sink is not None:
            self.sink.emit(record)
        for listener in self.listeners:
            listener(record)

    @torch.no_grad()
    def evaluate(self, step: Optional[int] = None, model=None) -> dict:
        """Held-out loss per domain of ``model`` (default the step's) and their mean, as an
        :class:`EvalRecord` at ``step`` (default the selector's next step)."""
        step = self.selector.global_step if step is None else int(step)
        losses = self.selector.evaluate(model if model is not None else self.model, self.micro_batch, step)
        self.emit(EvalRecord(step=step, method=self.cfg.method, eval_loss=losses))
        return losses
