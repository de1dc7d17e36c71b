"""Run a function on several real CPU ranks from a test (torch.multiprocessing, a fork server, gloo).

Usage::

    from distributed_utils import run_ranks

    def _worker(rank, world_size, scale):      # module level: spawn pickles it by reference
        import torch.distributed as dist
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)
        return t.item() * scale                 # must be picklable

    def test_sum():
        assert run_ranks(_worker, 2, 10.0) == [10.0, 10.0]

Each rank gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free
``MASTER_PORT``, ``OMP_NUM_THREADS=1``, ``DS_ACCELERATOR=cpu``, and a process group
initialized with gloo (through ``deepspeed.init_distributed`` when ``deepspeed=True``, with the
JIT-compiled shm comm op disabled). The group is destroyed after the function returns.
A failure on any rank raises in the caller with that rank's traceback.
"""
from __future__ import annotations

import os
import queue
import traceback
from typing import Any, Callable, List

import torch.multiprocessing as mp

from ds_partitionsel.launch_env import free_port

__all__ = ["free_port", "run_ranks"]

# Ranks start from a fork server that has imported torch, DeepSpeed and transformers once: each
# rank is then a fork of a clean interpreter (no inherited process group, threads or CUDA state,
# as with spawn) without paying the imports again, which is most of a short test's CPU time.
_PRELOAD = ["torch", "torch.distributed", "deepspeed", "transformers", "ds_partitionsel"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX




def _rank_main(fn, rank, world_size, port, use_deepspeed, args, results):
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
    })
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if use_deepspeed:
            import deepspeed
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, deepspeed: bool = True,
              timeout: float = 300.0) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return the results by rank.

    ``fn`` must be defined at module level of an importable module, and its arguments and
    return value must be picklable (prefer numpy arrays or lists to large tensors).
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, deepspeed, args, results),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    outputs, errors = {}, {}
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"ranks did not finish within {timeout} s "
                                   f"(finished: {sorted(outputs) + sorted(errors)})") from None
            (outputs if ok else errors)[rank] = value
            if errors:  # one failed rank may leave the others waiting in a collective
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [outputs[r] for r in range(world_size)]
