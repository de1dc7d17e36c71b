"""Which candidates each step sees, and which selected samples each rank trains on.

Stateless by design: the global pool of step ``t`` is a function of ``(seed, epoch, t)`` alone,
so a resumed run, or a run on another world size, sees exactly the same pools.
"""
import hashlib
import numbers
from typing import List, Sequence, Tuple

import numpy as np
import torch


INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def as_int(value, what: str) -> int:
    """``value`` as an ``int``: an int, a numpy integer or a one-element integer tensor/array.

    Raises ``TypeError`` naming ``what`` for a bool, a float (even ``2.0``) or anything else, so
    that a wrong value is never silently truncated (``int(2.7) == 2``).
    """
    if isinstance(value, np.ndarray) and value.size == 1 and np.issubdtype(value.dtype, np.integer):
        return int(value.item())
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype in INTEGER_DTYPES:
        return int(value.item())
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__}"
                    f"{', dtype ' + str(value.dtype) if hasattr(value, 'dtype') else ''}); pass an int")


def derived_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


class PoolSampler:
    """The global candidate pool of every step.

    Each epoch is a fresh permutation of the ``num_records`` training records (seeded by
    ``(seed, epoch)``), cut into ``num_records // pool_size`` consecutive pools; the tail that does
    not fill a pool is skipped that epoch (it comes first in no particular later epoch).
    """

    def __init__(self, num_records: int, pool_size: int, seed: int):
        pool_size = as_int(pool_size, "pool_size")
        if pool_size <= 0:
            raise ValueError(f"pool_size must be positive, got {pool_size}")
        if num_records < pool_size:
            raise ValueError(f"the training split holds {num_records} records, fewer than one pool "
                             f"of {pool_size}; lower pool_factor / the batch size or add data")
        self.num_records, self.pool_size, self.seed = num_records, pool_size, seed
        self.steps_per_epoch = num_records // pool_size
        self._perm_epoch, self._perm = None, None

    def pool(self, step: int) -> torch.Tensor:
        """Global record ids of step ``step``'s pool, ``(pool_size,)`` int64."""
        step = as_int(step, "step")
        if step < 0:
            raise ValueError(f"step must be >= 0 (steps count from 0), got {step}")
        epoch, t = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.num_records, generator=generator("pool", self.seed, epoch))
            self._perm_epoch = epoch
        return self._perm[t * self.pool_size:(t + 1) * self.pool_size].clone()


def shard_bounds(n: int, world: int) -> List[Tuple[int, int]]:
    """Contiguous rank-major shards of ``n`` items: sizes differ by at most one."""
    base, extra = divmod(n, world)
    bounds, start = [], 0
    for r in range(world):
        size = base + (1 if r < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


def assign_owner_first(selected: Sequence[int], bounds: List[Tuple[int, int]], per_rank: int) -> List[List[int]]:
    """Split ``selected`` pool positions into ``per_rank`` for each rank, owners first.

    A rank keeps the selected positions inside its own shard (lowest first) up to ``per_rank``;
    surplus positions go, in ascending order, to ranks short of their share, in rank order.
    Deterministic, so every rank computes the same assignment with no communication.
    """
    selected = sorted(int(s) for s in selected)
    if len(selected) != per_rank * len(bounds):
        raise ValueError(f"{len(selected)} selected samples cannot be split into {len(bounds)} ranks "
                         f"x {per_rank}")
    shares, spare = [], []
    for lo, hi in bounds:
        own = [s for s in selected if lo <= s < hi]
        shares.append(own[:per_rank])
        spare.extend(own[per_rank:])
    spare.sort()
    for share in shares:
        need = per_rank - len(share)
        share.extend(spare[:need])
        del spare[:need]
    return shares


def lockstep_chunks(ids: Sequence[int], rows: int, size: int, filler: int):
    """Split ``ids`` into chunks of ``size``, padded with ``filler`` to ``rows`` ids in total.

    Yields ``(chunk, n_real)``: the first ``n_real`` ids of each chunk are real. Every rank that
    calls it with the same ``rows`` runs the same number of forwards of the same sizes, which
    ZeRO-3 needs (its parameter gathers are collective).
    """
    for start in range(0, rows, size):
        chunk = list(ids[start:start + size])
        yield chunk + [filler] * (min(size, rows - start) - len(chunk)), len(chunk)
