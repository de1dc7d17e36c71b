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

Non-finite numbers. JSON has no NaN or infinity, so a diverged run's loss is written as the
string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (:func:`dumps`; the names JavaScript and
Python's ``float()`` read), never as a bare ``NaN``; :func:`read_metrics` (and :func:`loads`)
turn these strings back into floats, and also read the bare ``NaN`` of older logs. ``null``
keeps its meaning of "not measured". ``summary.json`` files are written the same way
(:func:`write_json`).

Torn lines. A run killed (or out of disk) while writing leaves its last line without a
newline. A resumed run cuts such a fragment off before appending (:class:`MetricsSink` says so;
a complete record that only lacks its newline is kept), and :func:`read_metrics` skips a torn
last line with a warning instead of failing.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["StepRecord", "EvalRecord", "MetricsSink", "read_metrics", "monitor_events", "step_record",
           "dumps", "loads", "write_json", "is_finite_number"]

NONFINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def json_safe(obj):
    """``obj`` with every non-finite float replaced by its name (``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``); dict keys and every other value unchanged."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def restore_nonfinite(obj):
    """Inverse of :func:`json_safe`: the names of non-finite floats (as values) become floats."""
    if isinstance(obj, str) and obj in NONFINITE_NAMES:
        return NONFINITE_NAMES[obj]
    if isinstance(obj, dict):
        return {k: restore_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_nonfinite(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON (no bare NaN/Infinity) with non-finite floats written as their names."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def loads(text: str):
    """Parse what :func:`dumps` (or an older writer, with bare NaN) wrote, non-finite floats restored."""
    return restore_nonfinite(json.loads(text))


def write_json(path, obj, indent: int = 2) -> None:
    """Write ``obj`` as strict JSON (see :func:`dumps`) to ``path``."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(dumps(obj, indent=indent) + "\n")


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    budgets: Optional[Dict[str, int]] = None  # the per-domain budgets the batch was selected under
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
        proxy_loss=proxy_loss, budgets=dict(zip(selection.domain_counts, selection.plan.budgets.tolist())))


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
        self.torn_bytes_dropped = repair_torn_tail(self._log) if self._log is not None else 0
        self.output_dir, self.run_id = output_dir, None  # the run id: rank 0 with a log only
        if self._log is not None:
            from ds_partitionsel.runs import new_run_id, read_run_id, write_run_id

            self.run_id = read_run_id(output_dir) if resume else None
            if self.run_id is None and not resume:
                self.run_id = new_run_id()
                write_run_id(output_dir, self.run_id)

    def adopt_run_id(self, saved_run_id: Optional[str], checkpoint) -> None:
        """On resume: the log continues the checkpoint's run (``saved_run_id``; None: an older
        checkpoint without one, then a new id). A log of another run raises ``RunDirError``."""
        if self._log is None:
            return
        from ds_partitionsel.runs import check_run_owner, new_run_id, write_run_id

        check_run_owner(self.output_dir, saved_run_id, checkpoint)
        run_id = saved_run_id or self.run_id or new_run_id()
        if run_id != self.run_id:
            self.run_id = run_id
            write_run_id(self.output_dir, run_id)

    def emit(self, record) -> None:
        if self.rank != 0:
            return
        if self.monitor is not None:
            self.monitor.write_events(monitor_events(record))
        if self._log is not None:
            self._log.write(dumps(record.to_json()) + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def repair_torn_tail(fh) -> int:
    """Make the log behind ``fh`` (opened for appending, locked) end with a whole line.

    A last line without its newline is the fragment of an interrupted write: it is cut off (and
    reported on stderr) so the next record starts on a line of its own; a complete record that
    only lacks its newline gets the newline. Returns the number of bytes dropped.
    """
    fh.flush()
    size = os.fstat(fh.fileno()).st_size
    if size == 0:
        return 0
    with open(fh.name, "rb") as reader:
        reader.seek(max(0, size - (1 << 20)))
        tail = reader.read()
        if tail.endswith(b"\n"):
            return 0
        cut = tail.rfind(b"\n")
        if cut < 0 and size > len(tail):  # a last line over 1 MB: find its start from the beginning
            reader.seek(0)
            whole = reader.read()
            cut, tail = whole.rfind(b"\n"), whole
        fragment = tail[cut + 1:]
    try:
        complete = isinstance(json.loads(fragment.decode("utf-8")), dict)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        complete = False
    if complete:
        fh.write("\n")
        fh.flush()
        return 0
    os.ftruncate(fh.fileno(), size - len(fragment))
    print(f"warning: {fh.name} ended in a torn record (the last {len(fragment)} bytes, without a newline: a run "
          f"stopped while writing it); dropped that one record before appending", file=sys.stderr, flush=True)
    return len(fragment)


def read_metrics(path) -> Tuple[List[StepRecord], List[EvalRecord]]:
    """Step and eval records of a run (``path``: its ``metrics.jsonl`` or its directory).

    Non-finite numbers come back as floats (see the module doc). A torn last line (no newline,
    not a record) is skipped with a warning. Raises ValueError naming the file and line of any
    other line that is not a record."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    steps, evals = [], []
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if number == len(lines) and not line.endswith("\n"):
            try:
                json.loads(line)
            except ValueError:
                warnings.warn(f"{path}:{number}: a torn last line (a run stopped while writing it) was skipped")
                continue
        try:
            raw = loads(line)
            kind = raw.pop("kind", "eval" if "eval_loss" in raw else "step")
            if kind == "eval":
                evals.append(EvalRecord(**raw))
            else:
                if raw.get("conflicting_pairs") == -1:  # older logs: -1 meant "not measured"
                    raw["conflicting_pairs"] = None
                steps.append(StepRecord(**raw))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{number}: not a metrics record ({e})") from None
    return steps, evals

