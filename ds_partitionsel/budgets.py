"""Per-domain budgets of the partition matroid ``|S ∩ domain_j| <= b_j``, ``sum_j b_j = k``.

All rules use exact integer arithmetic so that every rank, on any world size, computes the
same budgets from the same domain counts.
"""
from fractions import Fraction
from typing import Optional, Sequence

import torch

STRATEGIES = ("proportional", "uniform", "fractions", "minority_full", "validation", "curriculum")


def _as_counts(domain_counts) -> list:
    counts = [int(c) for c in torch.as_tensor(domain_counts).reshape(-1).tolist()]
    if not counts:
        raise ValueError("domain_counts is empty: pass one count per domain, e.g. [120, 80, 56]")
    if any(c < 0 for c in counts):
        raise ValueError(f"domain_counts must be non-negative, got {counts}")
    return counts


def allocate_budgets(domain_counts, k: int, strategy: str = "proportional", *,
                     fractions: Optional[Sequence[float]] = None,
                     minority_domains: Optional[Sequence[int]] = None,
                     target_counts: Optional[Sequence[int]] = None,
                     gains: Optional[Sequence[float]] = None,
                     floor: float = 0.0, lam: float = 0.5, rounding: str = "largest_remainder",
                     draw: Optional[int] = None) -> torch.Tensor:
    """Split a batch of ``k`` picks into per-domain budgets ``b`` with ``sum(b) == k``.

    Parameters
    ----------
    domain_counts : (D,) int
        Candidates of each domain in the pool, ``n_j``.
    k : int
        Batch size to select, ``1 <= k <= sum(n_j)``.
    strategy : {"proportional", "uniform", "fractions", "minority_full"}
        - ``proportional`` (the paper's rule): ``b_j = floor(n_j * k / N)``; the ``k - sum(b)``
          leftover units go +1 each to distinct domains present in the pool, in ascending
          order of ``(b_j, j)``, in a single pass.
        - ``uniform``: ``k / D_present`` each (domains with candidates), remainder as above.
        - ``fractions``: quota ``f_j * k`` for the given ``fractions`` (sum to 1), floored, the
          remainder to the largest fractional parts (ties to the lower domain id).
        - ``minority_full``: every candidate of ``minority_domains``, the rest proportional.
        - ``validation``: follow the validation set. Shares
          ``s_j = floor * n_j/N + (1 - floor) * t_j/T`` with ``t`` = ``target_counts`` (the
          held-out anchors' expected domain counts), apportioned by largest remainder.
          ``floor`` is the coverage floor: every domain keeps at least that fraction of its
          proportional share (``floor = 1`` is ``proportional``).
        - ``curriculum`` (the official code's curriculum-aware rule): raw
          ``c_j = k/D - (k/lam) * z_j`` with ``z`` the standardized ``gains`` (per-domain EMA of
          the relative change of the domain's alignment with the validation target), clipped to
          ``[0, n_j]``; shares ``s_j = floor * n_j/N + (1 - floor) * c_j / sum(c)``, apportioned.
        Budgets are never above ``n_j``: any excess is handed on by :func:`rebalance_budgets`.
    rounding : how ``fractions``, ``validation`` and ``curriculum`` turn quotas into integers.
        ``largest_remainder``: floors, then +1 to the largest fractional parts (ties to the lower
        id), the same every step, so a domain whose quota stays below about half a slot may never
        get one. ``stochastic``: floors, then systematic sampling of the leftover units over the
        fractional parts at the offset ``draw / 2**53`` (``draw``: an int in ``[0, 2**53)``, the
        same on every rank, e.g. drawn from the step's seed): each domain's expected budget is
        exactly its quota.
        Every rule is exact rational arithmetic on the inputs (floats enter as their exact
        binary value), so every rank computes the same budgets.

    Returns
    -------
    budgets : (D,) int64 tensor, summing to ``k``.
    """
    counts = _as_counts(domain_counts)
    total = sum(counts)
    k = int(k)
    if k <= 0:
        raise ValueError(f"k must be a positive batch size, got {k}")
    if total == 0:
        raise ValueError("the pool is empty: every domain count is 0")
    if k > total:
        raise ValueError(f"cannot select k={k} from a pool of {total} candidates; "
                         f"lower the batch size or enlarge the pool")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown budget strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    present = [j for j, c in enumerate(counts) if c > 0]

    if strategy == "proportional":
        budgets = _proportional(counts, k)
    elif strategy == "uniform":
        budgets = [0] * len(counts)
        for j in present:
            budgets[j] = k // len(present)
        _leftover_smallest_first(budgets, counts, k)
    elif strategy == "fractions":
        if fractions is None or len(fractions) != len(counts):
            raise ValueError(f"strategy 'fractions' needs one fraction per domain ({len(counts)}), "
                             f"got {fractions!r}")
        fr = [Fraction(float(f)) for f in fractions]
        if any(f < 0 for f in fr) or sum(fr) == 0:
            raise ValueError(f"fractions must be non-negative and not all zero, got {list(fractions)}")
        budgets = _apportion(fr, k, rounding, draw)
    elif strategy in ("validation", "curriculum"):
        fl = Fraction(float(floor))
        if not 0 <= fl <= 1:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        if strategy == "validation":
            wanted = _target_shares(target_counts, counts)
        else:
            wanted = _curriculum_shares(gains, counts, k, lam)
        prop = [Fraction(c, total) for c in counts]
        budgets = _apportion([fl * p + (1 - fl) * w for p, w in zip(prop, wanted)], k, rounding, draw)
    else:  # minority_full
        listed = sorted(set(int(j) for j in (minority_domains or ())))
        if not listed or any(j < 0 or j >= len(counts) for j in listed):
            raise ValueError(f"strategy 'minority_full' needs minority_domains as ids in "
                             f"[0, {len(counts)}), got {minority_domains!r}")
        taken = sum(counts[j] for j in listed)
        if taken > k:
            raise ValueError(f"minority_domains {listed} hold {taken} candidates, more than k={k}")
        rest = [0 if j in listed else c for j, c in enumerate(counts)]
        budgets = _proportional(rest, k - taken) if k > taken else [0] * len(counts)
        for j in listed:
            budgets[j] = counts[j]
    eligible = [f > 0 for f in fr] if strategy == "fractions" else None
    budgets, _ = rebalance_budgets(budgets, counts, total=k, eligible=eligible)
    return torch.tensor(budgets, dtype=torch.int64)


def _largest_remainder(weights: list, k: int) -> list:
    """Apportion ``k`` units by non-negative rational ``weights`` (any scale): floors of the
    quotas, then +1 to the largest remainders, ties to the lower domain id."""
    scale = sum(weights)
    quotas = [w * k / scale for w in weights]
    budgets = [int(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda j: (-(quotas[j] - budgets[j]), j))
    for j in order[: k - sum(budgets)]:
        budgets[j] += 1
    return budgets


ROUNDINGS = ("largest_remainder", "stochastic")


def _apportion(weights: list, k: int, rounding: str, draw: Optional[int]) -> list:
    if rounding == "largest_remainder":
        return _largest_remainder(weights, k)
    if rounding != "stochastic":
        raise ValueError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDINGS)}")
    if draw is None or not 0 <= int(draw) < 2 ** 53:
        raise ValueError(f"rounding 'stochastic' needs draw, an int in [0, 2**53) shared by every rank, got {draw!r}")
    return _systematic(weights, k, Fraction(int(draw), 2 ** 53))


def _systematic(weights: list, k: int, offset: Fraction) -> list:
    """Floors of the quotas ``w_j k / sum(w)``, plus one unit for each point ``offset + i``
    (``i = 0, 1, ...``) that falls in domain j's stretch of the cumulated fractional parts:
    ``E[b_j]`` is exactly the quota (systematic sampling)."""
    scale = sum(weights)
    quotas = [w * k / scale for w in weights]
    budgets = [int(q) for q in quotas]
    start = Fraction(0)
    for j, q in enumerate(quotas):
        end = start + (q - budgets[j])
        # points offset + i in [start, end): at most one, as the stretch is shorter than 1
        first = offset + max(0, -((offset - start) // 1))  # the first point >= start
        if first < end:
            budgets[j] += 1
        start = end
    return budgets


def _target_shares(target_counts, counts: list) -> list:
    """``t_j / T`` over the domains the pool holds (a target domain absent from the pool is
    dropped; with no target domain present, the pool's own mix)."""
    if target_counts is None:
        raise ValueError("strategy 'validation' needs target_counts: the validation set's count of "
                         "each domain, e.g. [40, 8, 2]")
    target = _as_counts(target_counts)
    if len(target) != len(counts):
        raise ValueError(f"target_counts has {len(target)} entries for {len(counts)} domains")
    target = [t if c > 0 else 0 for t, c in zip(target, counts)]
    if sum(target) == 0:
        target = counts
    return [Fraction(t, sum(target)) for t in target]


def _curriculum_shares(gains, counts: list, k: int, lam: float) -> list:
    """``c_j / sum(c)`` with ``c_j = clip(k/D - (k/lam) z_j, 0, n_j)`` over present domains."""
    if gains is None or len(gains) != len(counts):
        raise ValueError(f"strategy 'curriculum' needs one gain per domain ({len(counts)}), got {gains!r}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    present = [j for j, c in enumerate(counts) if c > 0]
    g = [Fraction(float(gains[j])) for j in present]
    mean = sum(g) / len(g)
    var = sum((x - mean) ** 2 for x in g) / len(g)
    # sqrt is the one irrational step: a float of an exact rational, then exact again
    std = Fraction(float(var) ** 0.5) if var > 0 else Fraction(0)
    raw = [Fraction(0)] * len(counts)
    for j, x in zip(present, g):
        z = (x - mean) / std if std > 0 else Fraction(0)
        c = Fraction(k, len(present)) - Fraction(k) / Fraction(float(lam)) * z
        raw[j] = min(max(c, Fraction(0)), Fraction(counts[j]))
    if sum(raw) == 0:
        return [Fraction(c, sum(counts)) for c in counts]
    return [r / sum(raw) for r in raw]


def _proportional(counts: list, k: int) -> list:
    total = sum(counts)
    if total == 0:
        return [0] * len(counts)
    budgets = [c * k // total for c in counts]
    _leftover_smallest_first(budgets, counts, k)
    return budgets


def _leftover_smallest_first(budgets: list, counts: list, k: int) -> None:
    """+1 to distinct present domains in ascending ``(b_j, j)``, one pass (the paper's rule)."""
    leftover = k - sum(budgets)
    order = sorted((b, j) for j, b in enumerate(budgets) if counts[j] > budgets[j])
    for _, j in order[:leftover]:
        budgets[j] += 1


def rebalance_budgets(budgets, domain_counts, total: Optional[int] = None, eligible: Optional[Sequence[bool]] = None):
    """Cap budgets at the available candidates and hand the excess to the other domains.

    A domain whose budget exceeds its feasible candidates keeps ``n_j``; each leftover unit goes
    to the domain with spare candidates that is furthest behind, smallest ``(b_j, j)`` first.
    Deterministic, so every rank hands the same units to the same domains.

    ``total`` (default ``sum(budgets)``) is the sum the result must reach.
    ``eligible`` (default: every domain): the domains that take leftover units first (for
    ``fractions``: those with a fraction above 0); the others only once these have no
    candidates left, since the batch must be full.

    Returns ``(budgets, shortfall)``: two lists of D ints; ``shortfall[j]`` is how many units
    domain j could not use.
    """
    counts = _as_counts(domain_counts)
    budgets = [int(b) for b in torch.as_tensor(budgets).reshape(-1).tolist()]
    if len(budgets) != len(counts):
        raise ValueError(f"{len(budgets)} budgets for {len(counts)} domains")
    shortfall = [max(b - c, 0) for b, c in zip(budgets, counts)]
    capped = [min(b, c) for b, c in zip(budgets, counts)]
    total = sum(budgets) if total is None else int(total)
    leftover = total - sum(capped)
    if total > sum(counts):
        raise ValueError(f"budgets sum to {total} but the pool holds only {sum(counts)} "
                         f"candidates; lower the batch size or enlarge the pool")
    first = [True] * len(counts) if eligible is None else [bool(e) for e in eligible]
    while leftover:
        spare = [j for j in range(len(counts)) if capped[j] < counts[j]]
        preferred = [j for j in spare if first[j]] or spare
        _, j = min((capped[j], j) for j in preferred)
        capped[j] += 1
        leftover -= 1
    return capped, shortfall
