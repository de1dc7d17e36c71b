#!/usr/bin/env python
"""Run a launcher command so that a signal to the job reaches every rank, and no rank outlives it.

    python launch/supervise.py deepspeed --num_gpus 2 launch/train.py ...
    python launch/supervise.py mpirun -n 2 python launch/train.py ...

Launchers do not all pass signals on: SIGINT to the ``deepspeed`` runner alone ends the runner
and leaves its ranks training. This wrapper (used by ``launch/run_local.sh``, ``mpirun.sh`` and
the dry run of ``slurm.sbatch``):

- starts the command in its own session and makes itself the child subreaper (Linux), so every
  process the launcher starts stays its descendant even when the launcher dies;
- on SIGINT, SIGTERM, SIGHUP or SIGUSR1 sends the same signal to every descendant (every rank
  directly, not through the launcher). SIGTERM and SIGUSR1 ask the ranks to save at the next step
  boundary and stop (``--save-dir``): they get ``--save-grace`` seconds for that; SIGINT and SIGHUP
  get ``--grace``. Then SIGTERM to what is still running (a rank blocked in a collective does not
  run Python signal handlers) and SIGKILL after ``--grace`` more;
- when the launcher ends, for any reason, ends what it left behind the same way;
- exits with the launcher's status when the job ended by itself within the first grace period
  (0 after a save on SIGTERM/SIGUSR1), else 128 + the signal number.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
SAVE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # the ranks save at the next step boundary, then stop


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


RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def ranks() -> list:
    """The descendants that are ranks: a launcher gave them a rank variable this process lacks
    (the launchers themselves have none)."""
    mine = {name: os.environ.get(name) for name in RANK_VARIABLES}
    out = []
    for pid in descendants(os.getpid()):
        env = _environ(pid)
        if any(name in env and env[name] != mine[name] for name in RANK_VARIABLES):
            out.append(pid)
    return out


def signal_all(sig, pids=None) -> int:
    """Send ``sig`` to ``pids`` (default: every descendant of this process); returns how many
    were signalled."""
    count = 0
    for pid in descendants(os.getpid()) if pids is None else pids:
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


def wind_down(first_signal, grace: float, first_grace: float = None) -> bool:
    """``first_signal`` to every descendant, then SIGTERM, then SIGKILL: ``first_grace`` (default
    ``grace``) after the first, ``grace`` after the others. True when the job ended within the
    first grace period, by itself."""
    stages = [(first_signal, grace if first_grace is None else first_grace),
              (signal.SIGTERM, grace), (signal.SIGKILL, grace)]
    for stage, (sig, wait_s) in enumerate(stages):
        # a save signal goes to the ranks alone: a launcher would end them (deepspeed's kills its
        # ranks 30 s after SIGTERM; SIGUSR1 ends a launcher that does not handle it)
        targets = (ranks() or None) if stage == 0 and sig in SAVE_SIGNALS else None
        if not signal_all(sig, targets):
            return stage == 0
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            reap()
            if not descendants(os.getpid()):
                return stage == 0
            time.sleep(0.1)
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grace", type=float, default=float(os.environ.get("PARTITIONSEL_KILL_GRACE", "5")),
                    help="seconds between the forwarded signal, SIGTERM and SIGKILL (default 5)")
    ap.add_argument("--save-grace", type=float, default=float(os.environ.get("PARTITIONSEL_SAVE_GRACE", "300")),
                    help="seconds the ranks get to save and stop after SIGTERM or SIGUSR1 before SIGTERM again "
                         "and SIGKILL (default 300)")
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
    by_itself = False
    if received:
        first_grace = args.save_grace if received[0] in SAVE_SIGNALS else args.grace
        by_itself = wind_down(received[0], args.grace, first_grace)
    else:
        wind_down(signal.SIGTERM, args.grace)  # the launcher ended: nothing of the job outlives it
    child.wait()
    reap()
    if received and not (by_itself and received[0] in SAVE_SIGNALS):
        return 128 + received[0]
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main())
