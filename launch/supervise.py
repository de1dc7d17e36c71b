#!/usr/bin/env python
"""Run a launcher command so that a signal to the job reaches every rank, and no rank outlives it.

    python launch/supervise.py deepspeed --num_gpus 2 launch/train.py ...
    python launch/supervise.py mpirun -n 2 python launch/train.py ...

Launchers do not all pass signals on: SIGINT to the ``deepspeed`` runner alone ends the runner
and leaves its ranks training. This wrapper (used by ``launch/run_local.sh``, ``mpirun.sh`` and
the dry run of ``slurm.sbatch``):

- starts the command in its own session and makes itself the child subreaper (Linux), so every
  process the launcher starts stays its descendant even when the launcher dies;
- on SIGINT, SIGTERM or SIGHUP sends the same signal to every descendant (every rank directly,
  not through the launcher), then SIGTERM after ``--grace`` seconds to what is still running (a
  rank blocked in a collective does not run Python signal handlers) and SIGKILL after as long
  again;
- when the launcher ends, for any reason, ends what it left behind the same way;
- exits with the launcher's status, or 128 + the signal number when it was signalled.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> list:
    """Pids of every live descendant of ``root`` (from /proc), children before grandchildren."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "(comm)": state, ppid, ...
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(0), []):
            out.append(pid)
            todo.append(pid)
    return out


def signal_all(sig) -> int:
    """Send ``sig`` to every descendant of this process; returns how many were signalled."""
    count = 0
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, sig)
            count += 1
        except ProcessLookupError:
            pass
    return count


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def wind_down(first_signal, grace: float) -> None:
    """``first_signal`` (None: skip) to every descendant, then SIGTERM, then SIGKILL, ``grace`` apart."""
    for sig in (first_signal, signal.SIGTERM, signal.SIGKILL):
        if sig is None:
            continue
        if not signal_all(sig):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            reap()
            if not descendants(os.getpid()):
                return
            time.sleep(0.1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grace", type=float, default=float(os.environ.get("PARTITIONSEL_KILL_GRACE", "5")),
                    help="seconds between the forwarded signal, SIGTERM and SIGKILL (default 5)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the launcher command line")
    args = ap.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        ap.error("give the launcher command to run")
    become_subreaper()
    received = []

    def on_signal(signum, frame):
        if not received:  # the first signal of the job: forward it, escalate in the main loop
            received.append(signum)
            print(f"[supervise] {signal.Signals(signum).name}: passing it to every rank", file=sys.stderr, flush=True)

    for sig in FORWARDED:
        signal.signal(sig, on_signal)
    try:
        child = subprocess.Popen(args.command, start_new_session=True)
    except OSError as e:
        print(f"error: cannot start {args.command[0]}: {e.strerror or e}", file=sys.stderr)
        return 127
    while child.poll() is None and not received:
        time.sleep(0.2)
    if received:
        wind_down(received[0], args.grace)
    else:
        wind_down(signal.SIGTERM, args.grace)  # the launcher ended: nothing of the job outlives it
    child.wait()
    reap()
    if received:
        return 128 + received[0]
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main())
