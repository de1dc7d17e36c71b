"""Process-group bring-up for the launchers we support: deepspeed, torchrun, mpirun, slurm.

Every launcher ends in the same five variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); this module fills them from the MPI or slurm variables when a launcher did not,
keeping the master address explicit (DeepSpeed's own MPI discovery would pick a non-loopback
interface from ``hostname -I``).
"""
import atexit
import datetime
import os
import socket
import time

_MPI_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_MPI_LOCAL = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


class LaunchError(Exception):
    """The process group could not start (a port in use, a master that never came up): one line
    naming the address and what to check."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (for MASTER_PORT of local launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _first(env, names):
    for name in names:
        if env.get(name) not in (None, ""):
            return env[name]
    return None


def map_launcher_env(master_addr: str = "127.0.0.1", master_port: str = "29500", env=None) -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from MPI or slurm variables.

    Variables already set win (the deepspeed launcher and torchrun set them). Returns the
    launcher that was recognized: "env", "mpi", "slurm" or "single".
    """
    env = os.environ if env is None else env
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        kind = "env"
    elif _first(env, _MPI_RANK) is not None and _first(env, _MPI_SIZE) is not None:
        rank = _first(env, _MPI_RANK)
        env["RANK"], env["WORLD_SIZE"] = rank, _first(env, _MPI_SIZE)
        env["LOCAL_RANK"] = _first(env, _MPI_LOCAL) or rank
        kind = "mpi"
    elif env.get("SLURM_PROCID") is not None and env.get("SLURM_NTASKS") is not None:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        kind = "slurm"
    else:
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
        kind = "single"
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", master_addr)
    if kind == "single" and "MASTER_PORT" not in env:
        # no other rank has to find this process: a free port, so two local runs do not collide
        env["MASTER_PORT"] = str(free_port(env["MASTER_ADDR"]) if env["MASTER_ADDR"] == "127.0.0.1" else master_port)
    env.setdefault("MASTER_PORT", str(master_port))
    return kind


def init_distributed(backend=None, timeout_s: float = 600.0) -> str:
    """Map the launcher's variables, then ``deepspeed.init_distributed`` on them.

    ``timeout_s`` bounds every collective of the job: the world group's, and also those of the
    groups created later (DeepSpeed's data-parallel group, ...), which ``torch.distributed.new_group``
    would otherwise give torch's default of 30 minutes; a stopped or dead rank then ends the others
    after ``timeout_s`` instead of blocking them. On CPU (``DS_ACCELERATOR=cpu``) the shm comm op
    is skipped (it would JIT-compile for a minute on a fresh machine); gloo is the backend.
    """
    import deepspeed
    import deepspeed.ops
    import torch
    from torch.distributed import distributed_c10d

    kind = map_launcher_env()
    accel = os.environ.get("DS_ACCELERATOR", "")
    if accel == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = backend or "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # new_group(timeout=None) reads these module defaults when each group is created
    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    except torch.distributed.DistError as e:
        raise LaunchError(_rendezvous_failure(e, timeout_s)) from None
    _guard_exit_once()
    return kind


def _rendezvous_failure(exc: Exception, timeout_s: float) -> str:
    """One line for a failed rendezvous (torch's message carries a C++ stack)."""
    text = str(exc)
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    rank = os.environ.get("RANK", "?")
    if "EADDRINUSE" in text or "address already in use" in text:
        return (f"MASTER_PORT {port} on {addr} is already in use (another run on this machine?); start this "
                f"run on a free port: MASTER_PORT=<port> for the scripts of launch/, --master_port for deepspeed "
                f"and torchrun")
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"rank {rank} could not reach the master at {addr}:{port} within {timeout_s:g} s "
                f"(partitionsel.timeout_s): rank 0 has not started, has died, or listens elsewhere; check "
                f"MASTER_ADDR and MASTER_PORT on every rank and rank 0's log")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"the process group could not start ({addr}:{port}, rank {rank}): {first}"


_EXIT_GUARDED = False
# How long the interpreter yields before it finalizes. The backend's worker threads need the GIL
# for microseconds; this only has to outlast a descheduled thread on a loaded machine.
EXIT_GRACE_S = 0.05


def _let_backend_threads_finish() -> None:
    """Yield the GIL once more before the interpreter finalizes.

    A gloo worker thread releases a finished collective (and its tensors, which needs the GIL)
    just after the caller's ``wait()`` returned. If the process exits first, that thread takes
    the GIL while the interpreter is finalizing, which ends the thread by unwinding through C++
    frames that do not allow it: the process aborts ("terminate called without an active
    exception", status 134) after it has already done its work. Sleeping here, before
    finalization, hands the GIL to any such thread; ``destroy_process_group`` alone is not enough
    when DeepSpeed or Megatron still hold the groups.
    """
    time.sleep(EXIT_GRACE_S)


def _guard_exit_once() -> None:
    global _EXIT_GUARDED
    if not _EXIT_GUARDED:
        atexit.register(_let_backend_threads_finish)
        _EXIT_GUARDED = True
