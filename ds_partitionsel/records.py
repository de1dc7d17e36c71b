"""Typed metric records, the one sink that writes them and the one reader that reads them.

A run's ``metrics.jsonl`` holds one JSON object per line, of two kinds:

- :class:`StepRecord` (``"kind": "step"``): one per training step: the selection (per-domain
  counts, utility, selected record ids, conflicting pairs when measured), the training loss and
  learning rate, the time split and the bytes the selection sent.
- :class:`EvalRecord` (``"kind": "eval"``): held-out loss per domain (and their mean) after
  ``step`` steps.

Every training loop (the DeepSpeed engine, the Hugging Face Trainer) writes through
:class:`MetricsSink`; every tool reads through :func:`read_metrics`, which also accepts the logs of
older runs (no ``kind`` key; ``conflicting_pairs: -1`` meaning "not measured").
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["StepRecord", "EvalRecord", "MetricsSink", "read_metrics", "monitor_events", "step_record"]


@dataclass(frozen=True)
class StepRecord:
    step: int
    method: str
    train_loss: float
    lr: float
    pool_size: int
    batch_size: int
    domain_counts: Dict[str, int]
    utility: float
    dropped: int
    bytes_sent: int
    mode: str
    time_s: Dict[str, float]
    selected: List[int] = field(default_factory=list)  # record ids; kept logs may leave them out
    conflicting_pairs: Optional[int] = None  # None: not measured this step (or no features)
    proxy_loss: Optional[float] = None
    kind: str = field(default="step", init=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class EvalRecord:
    step: int
    method: str
    eval_loss: Dict[str, float]
    kind: str = field(default="eval", init=False)

    def to_json(self) -> dict:
        return asdict(self)


def step_record(selection, *, train_loss: float, lr: float, pool_size: int, time_train: float,
                log_conflicts: bool, proxy_loss: Optional[float] = None) -> StepRecord:
    """The :class:`StepRecord` of a :class:`~ds_partitionsel.selector.StepSelection` and its training."""
    t = selection.timings
    return StepRecord(
        step=selection.step, method=selection.method, train_loss=float(train_loss), lr=float(lr),
        pool_size=pool_size, batch_size=selection.k, domain_counts=dict(selection.domain_counts),
        selected=[int(i) for i in selection.record_ids.tolist()], utility=selection.utility,
        dropped=selection.dropped, bytes_sent=selection.bytes_sent, mode=selection.mode,
        time_s={"sketch": t.sketch + t.anchors, "anchors": t.anchors, "solve": t.solve, "comm": t.comm,
                "select": t.total - t.sketch - t.anchors, "train": time_train,
                "total": t.total + time_train},
        conflicting_pairs=selection.conflicting_pairs() if log_conflicts else None,
        proxy_loss=proxy_loss)


def monitor_events(record) -> List[Tuple[str, float, int]]:
    """``(name, value, step)`` scalars of a record, for DeepSpeed's monitor or a Trainer's log."""
    events = []
    step = record.step
    if isinstance(record, StepRecord):
        for key in ("train_loss", "utility", "conflicting_pairs", "bytes_sent", "proxy_loss"):
            value = getattr(record, key)
            if value is not None:
                events.append((f"partitionsel/{key}", float(value), step))
        for name, value in record.domain_counts.items():
            events.append((f"partitionsel/selected/{name}", float(value), step))
        for name, value in record.time_s.items():
            events.append((f"partitionsel/time_{name}", float(value), step))
    else:
        for name, value in record.eval_loss.items():
            events.append((f"partitionsel/eval_loss/{name}", float(value), step))
    return events


class MetricsSink:
    """Writes records to ``output_dir/metrics.jsonl`` (rank 0 only; the directory belongs to
    this run, see :func:`ds_partitionsel.runs.open_metrics_log`) and to a DeepSpeed monitor."""

    def __init__(self, output_dir: Optional[str], *, rank: int, monitor=None, resume: bool = False):
        from ds_partitionsel.runs import open_metrics_log

        self.rank = rank
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self._log = open_metrics_log(output_dir, resume=resume) if output_dir and rank == 0 else None

    def emit(self, record) -> None:
        if self.rank != 0:
            return
        if self.monitor is not None:
            self.monitor.write_events(monitor_events(record))
        if self._log is not None:
            self._log.write(json.dumps(record.to_json()) + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def read_metrics(path) -> Tuple[List[StepRecord], List[EvalRecord]]:
    """Step and eval records of a run (``path``: its ``metrics.jsonl`` or its directory).

    Raises ValueError naming the file and line of a line that is not a record."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    steps, evals = [], []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                kind = raw.pop("kind", "eval" if "eval_loss" in raw else "step")
                if kind == "eval":
                    evals.append(EvalRecord(**raw))
                else:
                    if raw.get("conflicting_pairs") == -1:  # older logs: -1 meant "not measured"
                        raw["conflicting_pairs"] = None
                    steps.append(StepRecord(**raw))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a metrics record ({e})") from None
    return steps, evals

