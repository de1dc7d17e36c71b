"""Survive preemption: save at the next step boundary when the job is told to stop.

A scheduler ends a job with a signal: slurm sends SIGTERM at preemption or at the time limit
(and, when asked with ``#SBATCH --signal=B:USR1@120``, SIGUSR1 that many seconds before).
:class:`StopRequest` turns SIGTERM / SIGUSR1 into a flag instead of an exit; the training loop
asks :meth:`StopRequest.agreed` at every step boundary. The signal may reach only some ranks, or
reach them at different steps, so the flag is all-reduced (max) through the
:class:`~ds_partitionsel.collectives.Communicator`: every rank sees the same answer at the same
step, saves the same checkpoint and exits. One small all-reduce per step.

Checkpoints are complete when their resume record is written (after the framework saved every
rank's files): :func:`latest_complete_tag` / :func:`latest_complete_trainer_checkpoint` find the
newest such one, so a job killed while saving resumes from the checkpoint before.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional

import torch

__all__ = ["StopRequest", "SaveSchedule", "STOP_SIGNALS", "save_due", "latest_complete_tag", "write_latest",
           "latest_complete_trainer_checkpoint"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RESUME_RECORD = "partitionsel_resume.json"  # as ds_partitionsel.runs (imported lazily there)


class StopRequest:
    """SIGTERM / SIGUSR1 -> a flag that the ranks agree on at a step boundary.

    ``install()`` replaces the handlers of :data:`STOP_SIGNALS` (main thread only); ``restore()``
    puts the old ones back. ``signal_name`` is the first signal received on this rank.
    """

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._old = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            print(f"{self.signal_name} received: saving a checkpoint at the end of this step, then exiting",
                  file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        """Whether this rank received a stop signal."""
        return self.signal_name is not None

    def agreed(self, step: int, timeout_s: Optional[float] = None) -> bool:
        """Whether any rank received a stop signal (a collective: every rank calls it after the
        same step)."""
        from ds_partitionsel.collectives import Communicator

        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        comm = Communicator(None, timeout_s, f"the stop check after step {step}")
        return bool(int(comm.all_reduce(flag, "max", "all-reduce of the stop flag")[0]))


def save_due(steps_done: int, interval: int) -> bool:
    """Whether a periodic save is due after ``steps_done`` steps (``interval`` 0: never)."""
    return bool(interval) and steps_done > 0 and steps_done % interval == 0


def write_latest(save_dir, tag: str) -> None:
    """Point ``save_dir/latest`` at ``tag`` atomically (rank 0, after the resume record)."""
    path = Path(save_dir) / "latest"
    tmp = path.with_name(f".latest.{os.getpid()}.tmp")
    tmp.write_text(str(tag), encoding="utf-8")
    os.replace(tmp, path)


def _step_of(name: str) -> Optional[int]:
    m = re.fullmatch(r"(?:global_step|checkpoint-)(\d+)", name)
    return int(m.group(1)) if m else None


def latest_complete_tag(save_dir) -> Optional[str]:
    """The newest tag folder of ``save_dir`` (``global_stepN``) that holds a resume record, i.e.
    one whose save finished; None when there is none."""
    best = None
    for entry in Path(save_dir).iterdir() if Path(save_dir).is_dir() else ():
        step = _step_of(entry.name)
        if step is not None and entry.name.startswith("global_step") and (entry / RESUME_RECORD).is_file():
            if best is None or step > best[0]:
                best = (step, entry.name)
    return best[1] if best else None


def latest_complete_trainer_checkpoint(output_dir) -> Optional[str]:
    """The newest ``checkpoint-N`` folder of a Trainer's ``output_dir`` whose save finished (it
    holds the Trainer's state and the resume record); None when there is none."""
    best = None
    for entry in Path(output_dir).iterdir() if Path(output_dir).is_dir() else ():
        step = _step_of(entry.name)
        if step is not None and entry.name.startswith("checkpoint-") and \
                (entry / RESUME_RECORD).is_file() and (entry / "trainer_state.json").is_file():
            if best is None or step > best[0]:
                best = (step, str(entry))
    return best[1] if best else None


class SaveSchedule:
    """When a loop saves: every ``interval`` steps, at the step boundary where the ranks agree on
    a stop signal, and at the end; never twice at one step.

    ``save(step)`` saves the checkpoint of ``step`` steps done (a collective: every rank calls it).
    ``stop`` None: signals keep their default action (no handler installed).
    """

    def __init__(self, save, interval: int = 0, stop: Optional[StopRequest] = None,
                 timeout_s: Optional[float] = None):
        self.save, self.interval, self.stop, self.timeout_s = save, int(interval), stop, timeout_s
        self.saved_at: Optional[int] = None
        self.stopped_at: Optional[int] = None

    def _save(self, steps_done: int) -> None:
        if self.saved_at != steps_done:
            self.save(steps_done)
            self.saved_at = steps_done

    def after_step(self, steps_done: int) -> bool:
        """Save when due; True when the loop must stop now (a stop signal, saved)."""
        if save_due(steps_done, self.interval):
            self._save(steps_done)
        if self.stop is not None and self.stop.agreed(steps_done, self.timeout_s):
            self._save(steps_done)
            self.stopped_at = steps_done
            return True
        return False

    def final(self, steps_done: int) -> None:
        """The save at the end of the run (skipped when this step is saved already)."""
        self._save(steps_done)
