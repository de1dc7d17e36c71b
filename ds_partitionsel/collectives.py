"""Bounded, byte-counted, device-aware collectives: the only place that calls
``torch.distributed`` collectives.

:class:`Communicator` wraps a ``torch.distributed`` process group with the few collectives the
package needs (all-reduce, list all-gather, broadcast) for the selection and for the training
loop around it (validation target, train loss, evaluation, metrics), each of which

- runs asynchronously and waits at most ``timeout`` seconds, so a dead or stuck rank ends the
  step with a :class:`CollectiveError` naming the step and the collective instead of a hang;
- moves its buffer to the backend's device (CUDA for NCCL, CPU for gloo) and back, so callers
  pass tensors wherever they live;
- counts the bytes this rank hands to it (``bytes_sent``), the bytes that reach this rank from
  the others (``bytes_received``) and the number of collective rounds (``rounds``).

Only operations that gloo and NCCL both provide are used: SUM/MIN/MAX all-reduces on int64 and
float64, the list form of ``all_gather`` with equal shapes on every rank, and ``broadcast``.
With a world of one (or no initialized process group) every collective is the identity and
nothing is counted.

Byte accounting (the payload model, independent of the backend's algorithm): ``bytes_sent``
adds the size ``m`` of the buffer this rank passes in: an all-reduce of ``m`` bytes, this rank's
own (padded) ``m``-byte chunk of an all-gather, and the ``m`` bytes of a broadcast on every rank
(tree and pipelined broadcasts have every rank but the leaves forward it). So ``bytes_sent`` is
the same on every rank. ``bytes_received`` adds ``m`` for an all-reduce, ``(world-1)*m`` for an
all-gather and ``m`` for a broadcast on every rank but its source.
"""
import datetime
import time
from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = ["CollectiveError", "Communicator", "backend_device"]


def backend_device(backend: str) -> torch.device:
    """The device a backend's collectives take: CUDA for NCCL, the CPU for gloo and MPI."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class CollectiveError(RuntimeError):
    """A collective failed or timed out (a rank died, is stuck, or diverged)."""


class Communicator:
    """A process group with timeouts, step-named errors and byte counters.

    Parameters
    ----------
    group : process group, or None for the default (world) group. Without an initialized
        default group the communicator is a world of one.
    timeout : seconds each collective may take before :class:`CollectiveError`; None waits as
        long as the process group's own timeout (``init_process_group(timeout=...)``).
    context : prefix of error messages, e.g. ``"selection step 12"``.
    """

    def __init__(self, group=None, timeout: Optional[float] = None, context: str = "collective"):
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout}")
        self.group = group
        self.timeout = timeout
        self.context = context
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rounds = 0
        self.seconds = 0.0  # waiting in collectives (includes waiting for slower ranks)
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
            backend = str(dist.get_backend(group))
        else:
            if group is not None:
                raise ValueError("a process group was given but torch.distributed is not "
                                 "initialized; call init_process_group first")
            self.rank, self.world, backend = 0, 1, "none"
        self.backend = backend
        self.device = backend_device(backend)

    # ----------------------------------------------------------------------- plumbing

    def _wait(self, what: str, work) -> None:
        start = time.monotonic()
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
            self.seconds += time.monotonic() - start
        except Exception as exc:  # gloo raises RuntimeError; keep the original as the cause
            waited = time.monotonic() - start
            limit = f"timeout {self.timeout:g} s" if self.timeout is not None else \
                "the process group's timeout"
            raise CollectiveError(
                f"{self.context}: {what} failed on rank {self.rank} of {self.world} after "
                f"{waited:.1f} s ({limit}): {exc}. Another rank has probably died, is stuck, or "
                f"called a different collective; its log has the cause. This process group is "
                f"no longer usable: end the job.") from exc

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous() if t.device == self.device else t.to(self.device).contiguous()

    # ----------------------------------------------------------------------- collectives

    def all_reduce(self, t: torch.Tensor, op: str, what: str) -> torch.Tensor:
        """Elementwise ``op`` in {"sum", "min", "max"} over ranks; returns a new tensor."""
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        if self.world == 1:
            return t.clone()
        buf = self._on_device(t.clone())
        self._wait(what, dist.all_reduce(buf, op=ops[op], group=self.group, async_op=True))
        nbytes = buf.numel() * buf.element_size()
        self.bytes_sent += nbytes
        self.bytes_received += nbytes
        self.rounds += 1
        return buf.to(t.device)

    def all_gather(self, t: torch.Tensor, what: str) -> List[torch.Tensor]:
        """Every rank's ``t`` (same shape and dtype on every rank), in rank order."""
        if self.world == 1:
            return [t.clone()]
        buf = self._on_device(t)
        out = [torch.empty_like(buf) for _ in range(self.world)]
        self._wait(what, dist.all_gather(out, buf, group=self.group, async_op=True))
        nbytes = buf.numel() * buf.element_size()
        self.bytes_sent += nbytes
        self.bytes_received += (self.world - 1) * nbytes
        self.rounds += 1
        return [o.to(t.device) for o in out]

    def all_gather_rows(self, t: torch.Tensor, counts: List[int], what: str) -> torch.Tensor:
        """Concatenate every rank's rows ``t`` (counts[r], ...) in rank order.

        Shards may differ in length (including zero): each is padded to ``max(counts)`` rows,
        which is what goes over the wire.
        """
        if self.world == 1:
            return t.clone()
        longest = max(counts)
        padded = t.new_zeros((longest,) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = self.all_gather(padded, what)
        return torch.cat([part[:c] for part, c in zip(parts, counts)])

    def broadcast(self, t: Optional[torch.Tensor], src: int, shape, dtype, what: str) -> torch.Tensor:
        """Rank ``src``'s tensor ``t`` on every rank (``t`` is ignored elsewhere)."""
        if self.world == 1:
            return t.clone()
        if self.rank == src:
            buf = self._on_device(t.to(dtype))
        else:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
        self._wait(what, dist.broadcast(buf, src=self._global_rank(src), group=self.group,
                                        async_op=True))
        nbytes = buf.numel() * buf.element_size()
        self.bytes_sent += nbytes
        if self.rank != src:
            self.bytes_received += nbytes
        self.rounds += 1
        return buf.cpu()

    def barrier(self, what: str) -> None:
        """Wait until every rank gets here (an all-reduce of one int64, so it is bounded too)."""
        self.all_reduce(torch.zeros(1, dtype=torch.int64), "sum", what)
