"""Seeded random projections that every rank rebuilds identically without communication.

A projection is a function of ``(seed, key)`` only, where ``key`` is a string such as a module
name. The key is hashed with a stable hash (BLAKE2b, never Python's salted ``hash()``), the
matrix is drawn on the CPU from a ``torch.Generator`` seeded with that hash, and then moved to
the requested device. The CPU generator makes the matrices identical on every rank, machine
and accelerator.

Both projections here are scaled so that inner products are preserved in expectation: for a
Gaussian matrix ``P`` of shape ``(d, k)`` with i.i.d. entries ``N(0, 1/k)``,
``E[P P^T] = I_d`` and therefore ``E[<P^T u, P^T v>] = <u, v>``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, Optional, Sequence, Tuple

import torch

__all__ = ["stable_seed", "gaussian_matrix", "BlockGaussianProjection"]


def stable_seed(seed: int, *keys: object) -> int:
    """A 63-bit generator seed derived from ``seed`` and ``keys``, the same in every process.

    >>> stable_seed(0, "model.layers.1.mlp.up_proj", "in") == stable_seed(0, "model.layers.1.mlp.up_proj", "in")
    True
    """
    text = "\x1f".join([str(int(seed))] + [str(k) for k in keys])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def gaussian_matrix(
    rows: int,
    cols: int,
    *,
    seed: int,
    key: Sequence[object],
    std: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A ``(rows, cols)`` matrix with i.i.d. ``N(0, std^2)`` entries, a function of ``(seed, key)``.

    Drawn in float32 on the CPU (bit-identical on every rank), then cast and moved.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stable_seed(seed, *key))
    out = torch.randn(rows, cols, generator=gen, dtype=torch.float32)
    out.mul_(std)
    return out.to(device=device, dtype=dtype)


class BlockGaussianProjection:
    """Dense Gaussian projection ``R: R^D -> R^p`` over a feature vector made of named blocks.

    The feature of one sample is the concatenation of blocks ``s_b`` of sizes ``D_b``
    (``D = sum_b D_b``); its projection is ``f = sum_b s_b R_b`` with ``R_b`` of shape
    ``(D_b, p)`` and entries ``N(0, 1/p)``, so ``E[<f_i, f_j>] = <s_i, s_j>``.

    ``R_b`` is generated in row chunks of ``chunk_rows`` rows, each seeded from
    ``(seed, block name, chunk index)``: the full ``D x p`` matrix is never needed at once, and a
    block's projection does not depend on which other blocks exist. Chunks are cached on their
    device while the cache stays under ``cache_bytes``; beyond that they are regenerated on
    every call (time for memory).

    Parameters
    ----------
    dim : int
        Output dimension ``p``.
    seed : int
        Base seed shared by all ranks.
    chunk_rows : int
        Rows of ``R_b`` generated at once (memory ``chunk_rows * p`` floats).
    cache_bytes : int
        Largest total size of cached chunks.
    """

    def __init__(self, dim: int, *, seed: int = 0, chunk_rows: int = 8192,
                 cache_bytes: int = 256 * 2**20):
        if int(dim) <= 0:
            raise ValueError(f"projection dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.seed = int(seed)
        self.chunk_rows = int(chunk_rows)
        self.cache_bytes = int(cache_bytes)
        self._cache: Dict[Tuple[str, int, str, torch.dtype], torch.Tensor] = {}
        self._cached_bytes = 0

    def _chunk(self, name: str, index: int, rows: int, device, dtype) -> torch.Tensor:
        cache_key = (name, index, str(device), dtype)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        chunk = gaussian_matrix(rows, self.dim, seed=self.seed, key=(name, "dim", index),
                                std=1.0 / math.sqrt(self.dim), device=device, dtype=dtype)
        nbytes = chunk.numel() * chunk.element_size()
        if self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[cache_key] = chunk
            self._cached_bytes += nbytes
        return chunk

    def project_block(self, name: str, block: torch.Tensor,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add ``block @ R_name`` to ``out`` (created when None) and return it.

        ``block``: ``(n, D_b)``; ``out``: ``(n, p)``.
        """
        n, width = block.shape
        if out is None:
            out = block.new_zeros(n, self.dim)
        for index, start in enumerate(range(0, width, self.chunk_rows)):
            stop = min(start + self.chunk_rows, width)
            r = self._chunk(name, index, stop - start, block.device, block.dtype)
            out.addmm_(block[:, start:stop], r)
        return out
