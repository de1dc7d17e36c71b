"""Shrinking the validation target toward the pool's mean sketch (``validation.shrink``).

The target ``a`` is the mean sketch of a few anchors: an estimate of the validation gradient
with sampling noise of its own. The pool's mean sketch ``c`` estimates the gradient of the
training distribution from many more samples. When the validation set asks for nothing the pool
lacks (the two distributions match), ``a - c`` is noise, and matching ``a`` means matching that
noise: no better, in expectation, than a random batch. The positive-part James-Stein estimate
keeps of the difference only the part that stands above its noise::

    D      = ||a - c||^2
    noise  = sigma^2 * (sum_a w_a^2 + 1/N)      sigma^2: the pool's per-sample variance (trace)
    lambda = max(0, 1 - noise / D)
    target = c + lambda * (a - c)

``sum_a w_a^2`` is the anchors' weight of the target's variance (``1/A`` for ``A`` equally
weighted anchors; times ``(1 - beta) / (1 + beta)`` under an EMA of factor ``beta``). With
``lambda = 0`` the selection matches the pool's own mean gradient (a coreset of the pool, the
lowest-variance estimate of the training gradient at hand); with ``lambda = 1`` it matches the
anchors as before. Nothing is tuned: ``lambda`` follows the step's own statistics.

Determinism: the pool's sums are accumulated in fixed point (int64) after one MAX all-reduce
fixes the scale, so they are exact and do not depend on how the pool is split over ranks: every
world size computes the same ``c`` and ``sigma^2`` bit for bit.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch


def _exponent(max_abs: float, rows: int) -> int:
    """The largest power-of-two scale ``e`` with ``max_abs * 2^e`` exact in float64 and a sum
    of ``rows`` such values inside int64."""
    if not max_abs > 0:
        return 0
    return int(math.floor(min(52 - math.log2(max_abs), 62 - math.log2(max_abs * max(rows, 1)))))


def pool_moments(features: torch.Tensor, rows: int, comm) -> Tuple[torch.Tensor, float]:
    """Mean row ``(p,)`` float64 and mean squared row norm of the global pool whose ``rows``
    rows are split over the ranks of ``comm`` (this rank holds ``features``). One MAX
    all-reduce of two numbers and one SUM all-reduce of ``p + 1`` int64, bit-identical on every
    world size. Non-finite entries count as 0."""
    f = torch.nan_to_num(features.detach().to("cpu", torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    sq = (f * f).sum(1)
    local = torch.tensor([float(f.abs().max()) if f.numel() else 0.0, float(sq.max()) if sq.numel() else 0.0],
                         dtype=torch.float64)
    top = comm.all_reduce(local, "max", "all-reduce of the pool's largest sketch entries")
    e1, e2 = _exponent(float(top[0]), rows), _exponent(float(top[1]), rows)
    ints = torch.cat([torch.round(f * 2.0 ** e1).to(torch.int64).sum(0),
                      torch.round(sq * 2.0 ** e2).to(torch.int64).sum().reshape(1)])
    total = comm.all_reduce(ints, "sum", "all-reduce of the pool's sketch sums")
    n = max(rows, 1)
    mean = total[:-1].to(torch.float64) / (2.0 ** e1) / n
    mean_sq = float(total[-1].item()) / (2.0 ** e2) / n
    return mean, mean_sq


def shrink_target(target: torch.Tensor, mean: torch.Tensor, mean_sq: float, rows: int,
                  anchor_weight: float) -> Tuple[torch.Tensor, float]:
    """``(c + lambda (a - c), lambda)`` for the target ``a``, the pool mean ``c`` and mean squared
    norm ``mean_sq`` over ``rows`` candidates; ``anchor_weight`` = ``sum_a w_a^2`` of the
    target's anchors. ``lambda`` is rounded to 12 digits (the selection must not hang on the last
    bits of a float)."""
    a = torch.nan_to_num(target.detach().to("cpu", torch.float64))
    d = a - mean
    dist2 = float(d @ d)
    n = max(rows, 1)
    sigma2 = max(mean_sq - float(mean @ mean), 0.0) * (n / (n - 1) if n > 1 else 1.0)
    noise = sigma2 * (anchor_weight + 1.0 / n)
    lam = 0.0 if dist2 <= 0.0 else round(max(0.0, 1.0 - noise / dist2), 12)
    return (mean + lam * d).to(target.dtype).to(target.device), lam
