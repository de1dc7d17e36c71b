"""Partition-matroid orthogonal matching pursuit: the numerical core of PartitionSel.

Problem (docs/DESIGN.md, "The algorithm")::

    maximize   U(w) = <w, a> - 1/2 w^T Q w
    subject to supp(w) ⊆ S,  |S ∩ domain_j| <= b_j  (a partition matroid),  w >= 0

with ``a = lr*s + 1/2 lr^2 diag(K)`` and ``Q = lr^2 K + ridge*I`` for PartitionSel, where
``s_i = <g_i, v>`` are validation scores and ``K = G G^T`` is the gradient Gram matrix.

The greedy (OMP) picks, among feasible candidates (not selected, domain budget left), the largest
residual ``r = a - Q w`` (``|r|`` in the signed variant), then refits ``w`` on ``S`` exactly:
an incremental Cholesky factor of ``Q_SS`` (signed) or of ``Q_PP`` on the passive set of an
active-set nonnegative refit warm-started from the previous weights (``nonneg``). Nothing is ever
re-solved from scratch: a pick costs ``O(n*|S|)`` for the residual plus ``O(|S|^2)`` for the refit.

Layout: the public functions validate once and dispatch; :func:`greedy_select` is the loop,
written against a :class:`CandidateRows` (the candidate rows this process holds) and a
:class:`Chooser` (how the next pick is agreed on), so that the distributed layer runs the very
same loop with collectives plugged in. The loop is deterministic: the same inputs give the
same picks and bit-identical weights.

References: Pati, Rezaiifar & Krishnaprasad (1993) for OMP; Lawson & Hanson (1974) for the
active-set nonnegative least squares; the PartitionSel paper (ICML 2026) for the utility.
"""
import math
from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np
import torch
from scipy.linalg.lapack import dtrtrs

from ds_partitionsel.budgets import allocate_budgets, rebalance_budgets

__all__ = ["Selection", "partition_omp", "partitionsel_terms", "allocate_budgets",
           "rebalance_budgets", "greedy_select", "CandidateRows", "GramRows", "FeatureRows",
           "Chooser", "LocalChooser", "RULES", "row_dots", "check_finite", "check_domains_budgets",
           "check_budget_fit", "check_rule", "check_temperature", "gumbel_noise", "spread", "spread_moments", "spread_from", "max_abs_finite", "rrg_shortlist", "rrg_pick", "top_per_domain"]

RULES = ("greedy", "rrg", "sample")

# On the CPU the per-pick work goes through numpy views of the same memory (a fraction of the
# tensor call overhead, the same arithmetic in the same order); off it, tensor ops. Tests turn
# the views off to run the device path on the CPU and compare the bits.
HOST_VIEWS = True


def _host_views(t: torch.Tensor) -> bool:
    return HOST_VIEWS and t.device.type == "cpu"


@dataclass
class Selection:
    """The result of a selection.

    indices : (k,) int64, global candidate indices in pick order.
    weights : (k,) float, aligned with ``indices`` (1.0 for unweighted methods).
    utility : U(w) at the final weights, a float.
    domain_counts : (D,) int64, selected candidates per domain.
    budgets : (D,) int64, the budgets actually used (after any shortfall was handed on).
    shortfall : (D,) int64, budget units a domain could not use and handed to others.
    """
    indices: torch.Tensor
    weights: torch.Tensor
    utility: float
    domain_counts: torch.Tensor
    budgets: torch.Tensor
    shortfall: torch.Tensor
    method: str = "partitionsel"
    bytes_sent: int = 0
    info: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.indices.numel())


# --------------------------------------------------------------------------- validation

def check_finite(name: str, t: torch.Tensor) -> None:
    # One sum first: NaN/Inf anywhere makes it non-finite, and a finite sum proves every entry
    # finite (an overflowing sum of finite entries only sends us to the entrywise check).
    if t.is_floating_point() and not math.isfinite(float(t.sum())) \
            and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); drop or repair those candidates "
                         f"before selection")


def _check_symmetric(quadratic: torch.Tensor, rows: int = 64) -> None:
    """Spot-check ``Q == Q^T`` on up to ``rows`` evenly spaced rows: O(rows * n), not O(n^2)
    (a full check costs more than the whole solve for small k; the solver reads rows only).
    Tolerance: ``|Q_ij - Q_ji| <= 1.1e-5 max |Q_i.|`` over the sampled rows."""
    n = quadratic.shape[0]
    r = min(rows, n)
    # evenly spaced, distinct (spacing >= 1), first and last row included
    idx = np.arange(r, dtype=np.int64) * (n - 1) // max(r - 1, 1)
    if _host_views(quadratic):  # numpy: a fraction of the tensor indexing overhead
        q = quadratic.detach().numpy()
        a = q[idx]
        diff = a - np.take(q, idx, axis=1).T  # take: a fraction of q[:, idx]'s time
        worst = max(float(diff.max()), -float(diff.min()))
        scale = max(float(a.max()), -float(a.min()))
    else:
        sel = torch.from_numpy(idx).to(quadratic.device)
        a = quadratic.index_select(0, sel)
        worst = float((a - quadratic.index_select(1, sel).T).abs().max())
        scale = float(a.abs().max())
    if worst > 1.1e-5 * scale:
        raise ValueError("quadratic must be symmetric (Q == Q^T); symmetrize it, e.g. (Q + Q.T) / 2")


def check_domains_budgets(domains: torch.Tensor, budgets: torch.Tensor, n: int):
    if not isinstance(domains, torch.Tensor) or domains.dim() != 1:
        raise ValueError(f"domains must be a 1-D integer tensor of length n={n}, got "
                         f"{getattr(domains, 'shape', type(domains))}")
    if domains.is_floating_point() or domains.dtype == torch.bool:
        raise ValueError(f"domains must be integer ids, got dtype {domains.dtype}")
    if domains.numel() != n:
        raise ValueError(f"domains has length {domains.numel()} but there are n={n} candidates")
    if not isinstance(budgets, torch.Tensor) or budgets.dim() != 1 or budgets.numel() == 0:
        raise ValueError(f"budgets must be a non-empty 1-D integer tensor (one per domain), got "
                         f"{getattr(budgets, 'shape', type(budgets))}")
    if budgets.is_floating_point():
        raise ValueError(f"budgets must be integers, got dtype {budgets.dtype}")
    n_dom = budgets.numel()
    if n:
        low, high = (int(x) for x in torch.aminmax(domains))
        if low < 0 or high >= n_dom:
            raise ValueError(f"domain ids must lie in [0, {n_dom}) to match the {n_dom} budgets, "
                             f"got range [{low}, {high}]")
    listed = budgets.tolist()
    if min(listed) < 0:
        raise ValueError(f"budgets must be non-negative, got {listed}")
    k = sum(listed)
    if k == 0:
        raise ValueError("budgets sum to k=0: nothing to select; give at least one domain a "
                         "positive budget")
    return domains.to(torch.int64), budgets.to(torch.int64)


def check_budget_fit(budgets: torch.Tensor, counts: torch.Tensor, allow_shortfall: bool):
    listed, have = budgets.tolist(), counts.tolist()
    k, n = sum(listed), sum(have)
    if k > n:
        raise ValueError(f"budgets sum to k={k}, more than the n={n} candidates in the pool")
    over = [j for j, (b, c) in enumerate(zip(listed, have)) if b > c]
    if not over:  # every budget fits: nothing to hand on
        return budgets.clone(), torch.zeros(budgets.numel(), dtype=torch.int64)
    if not allow_shortfall:
        detail = ", ".join(f"domain {j}: budget {int(budgets[j])} > {int(counts[j])} candidates"
                           for j in over)
        raise ValueError(f"budgets exceed domain sizes ({detail}); lower them, or pass "
                         f"allow_shortfall=True to hand the excess to the other domains")
    capped, shortfall = rebalance_budgets(budgets, counts)
    return (torch.tensor(capped, dtype=torch.int64), torch.tensor(shortfall, dtype=torch.int64))


# --------------------------------------------------------------------------- public API

def partitionsel_terms(gram: torch.Tensor, scores: torch.Tensor, lr: float, ridge: float = 0.0):
    """The PartitionSel quadratic utility terms.

    Returns ``(linear, quadratic)`` with ``linear = lr*scores + 1/2 lr^2 diag(gram)`` (n,) and
    ``quadratic = lr^2 gram + ridge*I`` (n, n). For 0/1 weights ``U`` is the GREATS utility
    ``lr*sum_S s_i - lr^2 sum_{i<j in S} K_ij``; ``diag(gram)`` keeps the weights bounded.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square (n, n), got {tuple(gram.shape)}")
    if scores.dim() != 1 or scores.numel() != gram.shape[0]:
        raise ValueError(f"scores must have shape ({gram.shape[0]},), got {tuple(scores.shape)}")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite learning rate, got {lr}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    linear = lr * scores + 0.5 * lr * lr * torch.diagonal(gram)
    quadratic = lr * lr * gram
    if ridge:
        quadratic = quadratic + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return linear, quadratic


def partition_omp(linear: torch.Tensor, quadratic: torch.Tensor, domains: torch.Tensor,
                  budgets: torch.Tensor, *, nonneg: bool = True, rule: str = "greedy",
                  generator: Optional[torch.Generator] = None,
                  allow_shortfall: bool = False) -> Selection:
    """Greedy OMP under a partition matroid.

    Maximizes ``U(w) = w·linear - 1/2 w^T quadratic w`` over ``supp(w) ⊆ S`` with
    ``|S ∩ domain_j| <= budgets[j]`` and ``w >= 0`` when ``nonneg``; picks exactly
    ``k = sum(budgets)`` candidates.

    Parameters
    ----------
    linear : (n,) float tensor, ``a``.
    quadratic : (n, n) symmetric positive semi-definite float tensor, ``Q``.
    domains : (n,) int64 tensor of domain ids in ``[0, D)``.
    budgets : (D,) int64 tensor of per-domain budgets.
    nonneg : pick by ``r_i`` and refit with ``w >= 0`` (PartitionSel); ``False`` picks by
        ``|r_i|`` with an unconstrained refit (classic OMP; with one domain, ``linear = X^T y``
        and ``quadratic = X^T X`` this is scikit-learn's ``orthogonal_mp_gram``).
    rule : ``"greedy"`` (argmax residual, ties to the lowest index) or ``"rrg"`` (residual random
        greedy: a uniform pick from the union of per-domain top-``remaining_j`` shortlists).
    generator : seeded ``torch.Generator``, required by ``rule="rrg"``.
    allow_shortfall : a budget above its domain's size is an error unless this is set; then the
        excess is handed to the other domains (see ``rebalance_budgets``) and reported.

    Returns
    -------
    Selection
    """
    if not isinstance(linear, torch.Tensor) or linear.dim() != 1:
        raise ValueError(f"linear must be a 1-D tensor (n,), got {getattr(linear, 'shape', type(linear))}")
    n = linear.numel()
    if n == 0:
        raise ValueError("empty pool: linear has no candidates")
    if not isinstance(quadratic, torch.Tensor) or quadratic.dim() != 2 \
            or quadratic.shape[0] != quadratic.shape[1]:
        raise ValueError(f"quadratic must be a square (n, n) tensor, got "
                         f"{tuple(getattr(quadratic, 'shape', ()))}")
    if quadratic.shape[0] != n:
        raise ValueError(f"quadratic is {tuple(quadratic.shape)} but linear has n={n} entries")
    check_finite("linear", linear)
    check_finite("quadratic", quadratic)
    _check_symmetric(quadratic)
    domains, budgets = check_domains_budgets(domains, budgets, n)
    rule = check_rule(rule, generator)
    counts = torch.bincount(domains, minlength=budgets.numel())
    used, shortfall = check_budget_fit(budgets, counts, allow_shortfall)
    dtype = torch.promote_types(linear.dtype, quadratic.dtype)
    rows = GramRows(linear.to(dtype), quadratic.to(dtype), domains)
    return greedy_select(rows, used, LocalChooser(), nonneg=nonneg, rule=rule,
                         generator=generator, shortfall=shortfall)


def check_rule(rule: str, generator) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
    if rule in ("rrg", "sample") and not isinstance(generator, torch.Generator):
        raise ValueError(f"rule={rule!r} needs a seeded torch.Generator shared by all ranks, e.g. "
                         "generator=torch.Generator().manual_seed(seed)")
    return rule


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def gumbel_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) float64 standard Gumbel draws ``-log(-log(u))`` from ``generator``.

    The logs are Python's (one libm call per draw), not a vectorized kernel whose last bit may
    depend on the instruction set: every machine draws the same noise."""
    u = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
    tiny = 2.0 ** -60
    return torch.tensor([-math.log(-math.log(min(max(x, tiny), 1.0 - 2.0 ** -53))) for x in u],
                        dtype=torch.float64)


_SPREAD_BITS = 20  # fixed-point resolution of spread(): 2**-20 of the largest |value|


def max_abs_finite(values: torch.Tensor) -> float:
    """``max |v|`` over the finite entries of ``values`` (0.0 when none); exact."""
    finite = values[torch.isfinite(values)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def spread_moments(values: torch.Tensor, scale: float) -> torch.Tensor:
    """int64 ``[count, sum q, sum q^2]`` of the finite ``values`` in fixed point,
    ``q = round(v / scale * 2**20)``: integer sums are exact in any order, so shards summed
    by an all-reduce give the single-process moments bit for bit."""
    finite = values[torch.isfinite(values)].double()
    if not finite.numel() or scale <= 0:
        return torch.zeros(3, dtype=torch.int64)
    q = torch.round(finite / scale * 2.0 ** _SPREAD_BITS).to(torch.int64)
    return torch.stack([torch.tensor(q.numel()), q.sum(), (q * q).sum()])


def spread_from(scale: float, moments: torch.Tensor) -> float:
    """The standard deviation that :func:`spread_moments` describes."""
    count, s1, s2 = (int(x) for x in moments.tolist())
    if count < 2:
        return 0.0
    var = (s2 * count - s1 * s1) / (count * count)  # exact integers until this division
    return scale * 2.0 ** -_SPREAD_BITS * math.sqrt(max(var, 0.0))


def spread(values: torch.Tensor) -> float:
    """Standard deviation of the finite entries of ``values`` (1-D) at a resolution of
    ``2**-20`` of their largest magnitude; the same bits for the same values on any machine,
    in any order and any split over ranks."""
    scale = max_abs_finite(values)
    return spread_from(scale, spread_moments(values, scale))


# --------------------------------------------------------------------------- candidate rows

class CandidateRows:
    """The candidate rows this process holds: ``linear`` (n,), ``domains`` (n,), columns of Q.

    ``offset`` is the global index of local row 0 (rank-major order across ranks).
    Subclasses define how a pick's data (its ``Pick``) is formed and how ``Q[rows, j]`` is
    computed from it, using only kernels whose per-row results do not depend on how the rows
    are sliced, so that shards reproduce the single-process numbers bit for bit.
    """
    linear: torch.Tensor
    domains: torch.Tensor
    offset: int = 0

    def __len__(self) -> int:
        return self.linear.numel()

    def pick_payload(self, local: int) -> torch.Tensor:
        """Everything other ranks need about local row ``local``, as one 1-D tensor."""
        raise NotImplementedError

    def column(self, payload: torch.Tensor, index: int) -> torch.Tensor:
        """``Q[rows, index]`` (n,) for the pick described by ``payload``."""
        raise NotImplementedError

    def pick_terms(self, payload: torch.Tensor, selected: np.ndarray):
        """``(a_j, Q[S, j] (m,), Q_jj, domain_j)`` for the pick, from replicated data only;
        ``selected`` (m,) int64 holds the global indices of ``S``."""
        raise NotImplementedError

    def diagonal(self) -> torch.Tensor:
        """``diag(Q)`` over the local rows (n,)."""
        raise NotImplementedError

    def data_domains(self, pick_domains: list) -> list:
        """The data domain of each pick so far, given their budget domains ``pick_domains``
        (they differ only for rows that run domain-agnostic methods under one budget)."""
        return pick_domains


class GramRows(CandidateRows):
    """Rows of an explicit ``(n, n)`` quadratic (single process)."""

    def __init__(self, linear, quadratic, domains, offset: int = 0):
        self.linear, self.quadratic, self.domains, self.offset = linear, quadratic, domains, offset
        # numpy views of the same memory on the CPU: a pick reads a few entries, and tensor
        # indexing costs more than the reading
        self._host = ((linear.detach().numpy(), quadratic.detach().numpy(), domains.numpy())
                      if _host_views(quadratic) else None)

    def pick_payload(self, local):
        return torch.from_numpy(np.array([float(local + self.offset)]))

    def column(self, payload, index):
        if self._host is not None:
            return torch.from_numpy(self._host[1][index - self.offset])
        return self.quadratic[index - self.offset]

    def pick_terms(self, payload, selected):
        j = int(payload.item() if payload.numel() == 1 else payload[0]) - self.offset
        sel = np.asarray(selected, dtype=np.int64)
        if self._host is not None:
            return self.host_terms(j, sel)[:4]
        if self.offset:
            sel = sel - self.offset
        row = self.quadratic[j]
        return (float(self.linear[j]), row[torch.from_numpy(sel).to(row.device)].double().cpu().numpy(),
                float(row[j]), int(self.domains[j]))

    def host_terms(self, local: int, picked: np.ndarray):
        """:meth:`pick_terms` and :meth:`column` of local row ``local`` on the CPU, read from
        the numpy views without a payload: ``(a_j, Q[S, j], Q_jj, domain_j, Q[rows, j])`` with
        ``picked`` the global indices of ``S``."""
        linear, quadratic, domains = self._host
        row = quadratic[local]
        q_sel = row.take(picked - self.offset if self.offset else picked)
        return (float(linear[local]), q_sel.astype(np.float64, copy=False), float(row[local]),
                int(domains[local]), row)

    def diagonal(self):
        return torch.diagonal(self.quadratic)


class FeatureRows(CandidateRows):
    """Rows given by gradient features: ``Q_ij = lr^2 <g_i, g_j> + ridge*[i==j]``.

    ``features`` (n, p) stay row-major; every per-row quantity (scores, squared norms, the
    column ``Q[rows, j]``) comes from :func:`row_dots`, whose result for a row does not depend
    on which other rows share the call. With ``block_diagonal`` (the ``iwd`` /
    ``greats_domain`` baselines) ``Q_ij = 0`` across domains. The selected rows ``G_S`` are kept
    (k, p) on every rank to form ``Q[S, j]``.
    """

    def __init__(self, features, target, domains, *, lr=1.0, ridge=0.0, offset=0,
                 block_diagonal=False, linear=None, capacity=0, budget_domains=None):
        self.features = features.contiguous()  # (n, p)
        # ``domains`` index the budgets; ``true_domains`` are the data domains (they differ
        # for domain-agnostic methods, which run with one budget).
        self.true_domains = domains
        self.domains = domains if budget_domains is None else budget_domains
        self.offset, self.lr, self.ridge = offset, float(lr), float(ridge)
        self.block_diagonal = block_diagonal
        p = self.features.shape[1]
        self.sqnorm = row_dots(self.features, None)  # (n,) ||g_i||^2
        if linear is None:
            scores = row_dots(self.features, target.to(features.dtype))
            linear = self.lr * scores + (0.5 * self.lr * self.lr) * self.sqnorm
        self.linear = linear
        self._selected_rows = torch.empty(max(capacity, 1), p, dtype=features.dtype,
                                          device=features.device)
        self._selected_dom = []  # true domains of the picks, in order
        self._m = 0

    @property
    def payload_numel(self) -> int:
        """Length of a :meth:`pick_payload` tensor (4 + p), also known where no row is held."""
        return 4 + self.features.shape[1]

    def selected_features(self) -> torch.Tensor:
        """The picked rows ``G_S`` (m, p) in pick order; replicated on every rank."""
        return self._selected_rows[: self._m]

    def pick_payload(self, local):
        g = self.features[local].double()
        head = torch.tensor([float(local + self.offset), float(self.linear[local]),
                             float(self.domains[local]), float(self.true_domains[local])],
                            dtype=torch.float64)
        return torch.cat([head, g.cpu()])

    def _unpack(self, payload):
        index, a_j, dom, true_dom = int(payload[0]), float(payload[1]), int(payload[2]), int(payload[3])
        g = payload[4:].to(self.features.dtype).to(self.features.device)
        return index, a_j, dom, true_dom, g

    def column(self, payload, index):
        _, _, _, true_dom, g = self._unpack(payload)
        col = (self.lr * self.lr) * row_dots(self.features, g)
        if self.block_diagonal:
            col = col * (self.true_domains == true_dom).to(col.dtype)
        local = index - self.offset
        if self.ridge and 0 <= local < len(self):
            col[local] = col[local] + self.ridge
        return col

    def pick_terms(self, payload, selected):
        index, a_j, dom, true_dom, g = self._unpack(payload)
        m = self._m
        if m >= self._selected_rows.shape[0]:
            grown = torch.empty(2 * m, g.numel(), dtype=g.dtype, device=g.device)
            grown[:m] = self._selected_rows[:m]
            self._selected_rows = grown
        self._selected_rows[m] = g
        self._selected_dom.append(true_dom)
        self._m = m + 1
        q = (self.lr * self.lr) * row_dots(self._selected_rows[: m + 1], g)  # Q[S + j, j]
        q_sel = q[:m]
        if self.block_diagonal and m:
            q_sel = q_sel * torch.tensor(self._selected_dom[:m], device=g.device).eq(true_dom).to(g.dtype)
        q_jj = float(q[m]) + self.ridge
        return a_j, q_sel.double().cpu().numpy(), q_jj, dom

    def diagonal(self):
        return (self.lr * self.lr) * self.sqnorm + self.ridge

    def data_domains(self, pick_domains):
        return list(self._selected_dom)


# --------------------------------------------------------------------------- the row kernel

# Rows per call of the reduction: 256 KiB of float32 products, so the temporary stays in L2.
_ROW_DOTS_ELEMENTS = 1 << 16


def row_dots(rows: torch.Tensor, vec: Optional[torch.Tensor]) -> torch.Tensor:
    """``out[i] = <rows[i], vec>`` (``||rows[i]||^2`` when ``vec`` is None), shape (n,).

    rows : (n, p); vec : (p,). The value for a row depends only on that row, ``vec`` and ``p``,
    never on ``n`` or on the row's position: this is what makes a shard of the pool reproduce
    the single-process numbers bit for bit. BLAS products (``G @ v``, ``v @ G^T``) do not have
    that property: MKL's blocking, and so its rounding, depends on the row count and on the
    instruction set it picks at run time (AVX-512, AVX2, SSE4.2). Here every row is an
    elementwise product followed by ATen's per-row sum, which reduces each row with the same
    code whatever the other rows are. A single-row sum is the one exception ATen makes (it may
    split one long row across threads), so a lone row is computed as part of two.
    """
    n, p = rows.shape
    out = torch.empty(n, dtype=rows.dtype, device=rows.device)
    step = max(2, _ROW_DOTS_ELEMENTS // max(p, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = rows[lo:hi] if hi - lo > 1 else rows[lo:hi].expand(2, p)
        prod = block * (block if vec is None else vec)
        out[lo:hi] = prod.sum(1)[: hi - lo]
    return out


# --------------------------------------------------------------------------- the residual kernel

def _pow2_scale(diag: torch.Tensor) -> torch.Tensor:
    """``s = 2^e >= sqrt(max(diag, 0))`` elementwise, a power of two (1 where ``diag`` is 0)."""
    if _host_views(diag):  # the same numbers (sqrt is exactly rounded, frexp exact)
        _, exp = np.frexp(np.sqrt(np.maximum(diag.detach().numpy().astype(np.float64), 0.0)))
        return torch.from_numpy(np.ldexp(1.0, exp))
    root = torch.sqrt(torch.clamp(diag.double(), min=0.0))
    _, exp = torch.frexp(root)  # root = m 2^e with m in [0.5, 1), so root < 2^e
    return torch.ldexp(torch.ones_like(root), exp)


def _split_bits(k: int) -> tuple:
    """``(bc, bv)``: fixed-point bits of the held ``C`` entries and of each of the two pieces of
    ``v``, such that ``(bc + 1) + bv + ceil(log2 k) <= 53`` (every partial sum exact in float64)
    and ``2 bv >= bc`` (the two pieces of ``v`` are as precise as ``C``)."""
    log_k = max(1, math.ceil(math.log2(max(k, 2))))
    bc = (2 * (52 - log_k)) // 3
    if bc < 8:
        raise ValueError(f"k={k} picks is too many for the exact residual kernel (at most 2^30)")
    return bc, 52 - bc - log_k


class ResidualProduct:
    """The held columns ``Q[rows, S]`` and their product with the weights, ``Q[rows, S] w`` (n,),
    at BLAS speed and bit-identical whatever the BLAS kernel, thread count or row slicing.

    The product is the O(n |S|) part of a pick, so it must run as a BLAS matrix product; but a
    BLAS product's rounding depends on its blocking (row count, threads) and on the instruction
    set MKL dispatches to at run time (SSE4.2, AVX2, AVX-512). So BLAS is only ever given sums
    that are exact:

    - each held entry is scaled by powers of two to ``C_ij = Q_ij / (s_i s_j)`` with
      ``s_i = 2^ceil(log2 sqrt(Q_ii))`` (so ``|C_ij| <= 1`` for a positive semi-definite ``Q``)
      and held as the integer ``round(C_ij 2^bc)`` of at most ``bc + 1`` bits; rows whose
      entries exceed 2 (``Q`` not PSD there) get a larger ``s_i``;
    - ``v_j = s_j w_j`` is rounded, per call, to the integer ``V_j = round(v_j 2^(2 bv - e))``
      (``2^e > max |v|``, so ``|V| <= 2^(2 bv)``), handed to BLAS as its two halves
      ``V 2^-bv = I + F`` (``I`` an integer, ``F`` on the grid ``2^-bv``, both of at most ``bv``
      bits), with ``(bc + 1) + bv + ceil(log2 k) <= 53`` (:func:`_split_bits`).

    Every product of a held integer and a half is then a multiple of a unit common to the
    whole sum and below ``2^53 / k`` of it, and so is every partial sum over ``S``: float64
    holds all of them exactly, so the ``(2, |S|) x (|S|, n)`` product does not depend on the
    order of summation, FMA, blocking or the other rows in the call. The two halves' products
    are added elementwise (the one rounding) and scaled back by powers of two, row by row.

    Accuracy: ``|error_i| <= about 2^-bc s_i sum_j s_j |w_j|`` (``bc`` = 28 for k = 512, 26 for
    k = 4096), i.e. relative 1e-8 of the bound ``sum_j |Q_ij w_j|`` can reach; the residual
    only ranks candidates, the refit that sets the weights is exact float64.

    Memory: one float64 ``(k, n)`` array.

    diag : (n,) ``diag(Q)`` of the held rows; k : the number of picks.
    """

    def __init__(self, diag: torch.Tensor, k: int):
        self.n, self.k = diag.numel(), int(k)
        self.bc, self.bv = _split_bits(self.k)
        self.col_scale = np.zeros(self.k)  # s_j of the picks, replicated
        self._pieces = np.zeros((2, self.k))  # the halves I and F of V 2^-bv
        self.t = 0
        scale = _pow2_scale(diag)  # (n,) s_i, powers of two: the products below are exact
        if _host_views(diag):
            # On the CPU the product runs through numpy views of the same memory: the sums are
            # exact, so any BLAS gives the same bits, and numpy's per-call overhead is lower.
            s = scale.numpy()
            host = (np.empty((self.k, self.n)), 2.0 ** self.bc / s, s * 2.0 ** -self.bc)
            self._host = host
            self.held, self.row_unit, self.row_out = (torch.from_numpy(a) for a in host)
        else:
            self._host = None
            self.row_unit = torch.reciprocal(scale) * 2.0 ** self.bc  # 2^bc / s_i
            self.row_out = scale * 2.0 ** -self.bc  # s_i 2^-bc: the integers back to Q's scale
            self.held = torch.empty(self.k, self.n, dtype=torch.float64, device=diag.device)

    def append(self, column, q_jj: float) -> None:
        """Hold ``Q[rows, j]`` (n,) of the next pick ``j``, whose ``Q_jj`` is ``q_jj``
        (a tensor; on the CPU also a numpy array)."""
        _, e_j = math.frexp(math.sqrt(max(q_jj, 0.0)))  # s_j = 2^e_j, as _pow2_scale
        limit = 2.0 ** (self.bc + 1)
        # C_ij 2^bc = Q_ij 2^bc / (s_i s_j), every factor a power of two: exact
        if self._host is not None:  # the same steps through numpy views (lower call overhead)
            out = self._host[0][self.t]
            if isinstance(column, torch.Tensor):
                column = column.detach().numpy()
            np.multiply(column, self._host[1], out=out)
            out *= 2.0 ** -e_j
            if self.n and np.maximum.reduce(np.abs(out)) > limit:
                self._widen(self.held[self.t])  # Q is not PSD on some rows (|C| > 2)
            np.rint(out, out=out)
        else:
            row = self.held[self.t]
            torch.mul(column, self.row_unit, out=row).mul_(2.0 ** -e_j)
            if row.numel() and float(torch.linalg.vector_norm(row, math.inf)) > limit:
                self._widen(row)  # Q is not PSD on some rows (|C| > 2)
            row.round_()
        self.col_scale[self.t] = 2.0 ** e_j
        self.t += 1

    def _widen(self, row: torch.Tensor) -> None:
        """Raise ``s_i`` of the rows whose new entry ``row`` (``C 2^bc``) exceeds ``2^(bc+1)``
        and re-round what they hold; row-local, so every process does the same."""
        over = row.abs() > 2.0 ** (self.bc + 1)
        _, exp = torch.frexp(row.abs() * 2.0 ** -self.bc)
        factor = torch.where(over, torch.ldexp(torch.ones_like(row), exp), torch.ones_like(row))
        self.row_unit.div_(factor)
        self.row_out.mul_(factor)
        row.div_(factor)
        self.held[:self.t].div_(factor).round_()

    def product(self, w: np.ndarray) -> torch.Tensor:
        """``sum_j Q[rows, S_j] w_j`` (n,) float64 for the first ``t = len(w)`` held picks."""
        if self._host is not None:
            return torch.from_numpy(self.product_host(w))
        pieces = self._split(w)
        if pieces is None:
            return torch.zeros(self.n, dtype=torch.float64, device=self.held.device)
        exact = torch.mm(torch.from_numpy(pieces).to(self.held.device, non_blocking=True),
                         self.held[:len(w)])
        return exact[0].add_(exact[1]).mul_(self.row_out)

    def product_host(self, w: np.ndarray) -> np.ndarray:
        """:meth:`product` as a numpy array, for rows held on the CPU (numpy views, same bits)."""
        pieces = self._split(w)
        if pieces is None:
            return np.zeros(self.n)
        exact = pieces @ self._host[0][:len(w)]  # (2, n), every entry exact whatever the BLAS
        out = exact[0]
        out += exact[1]  # the one rounding, elementwise
        out *= self._host[2]
        return out

    def _split(self, w: np.ndarray):
        """The halves ``(I, F) 2^(e - bv)`` (2, t) of ``V = round(v 2^(2 bv - e))``, ``v = s_j w_j``
        (``2^e > max |v|``), or None when ``w`` is all zeros."""
        t = len(w)
        pieces = self._pieces[:, :t]
        v = np.multiply(w, self.col_scale[:t], out=pieces[1])
        top = float(np.maximum.reduce(np.abs(v))) if t else 0.0
        if top == 0.0:
            return None
        _, e = math.frexp(top)
        v *= 2.0 ** (2 * self.bv - e)  # |v| < 2^(2 bv), exact
        np.rint(v, out=v)  # V (rint: round half to even, as round)
        v *= 2.0 ** -self.bv  # exact
        np.modf(v, out=(pieces[1], pieces[0]))  # F (grid 2^-bv), I (integer): both exact
        pieces *= 2.0 ** (e - self.bv)  # powers of two: the sums stay exact
        return pieces


# --------------------------------------------------------------------------- choosers

class Chooser(Protocol):
    """How the processes holding the candidate rows agree on the next pick.

    ``choose(values, feasible, rows, remaining, rule, generator) -> (payload, global_index)``:
    ``values`` (n,) are this process's residuals, ``-inf`` where ``feasible`` (n,) is False;
    ``remaining`` (D,) the budgets left; the payload is the picked row's
    :meth:`CandidateRows.pick_payload`, the same on every process. ``bytes_sent`` counts what
    agreeing cost this process.
    """
    bytes_sent: int

    def choose(self, values: torch.Tensor, feasible: torch.Tensor, rows: "CandidateRows",
               remaining: torch.Tensor, rule: str, generator: Optional[torch.Generator]) -> tuple: ...


class LocalChooser:
    """Agrees on the next pick within one process; the distributed layer supplies another.

    ``choose(values, feasible, rows, remaining, rule, generator)`` returns the pick's payload
    (``rows.pick_payload``) and its global index. ``values`` (n,) are already ``-inf`` where
    ``feasible`` (n,) is False. Subclasses may count ``bytes_sent``.
    """
    bytes_sent = 0

    def pool_rows(self, rows: "CandidateRows") -> int:
        """Rows of the whole pool (all processes)."""
        return len(rows) + rows.offset

    def spread(self, values: torch.Tensor) -> float:
        """:func:`spread` of the pool's ``values`` (this process holds them all)."""
        return spread(values)

    def choose(self, values, feasible, rows, remaining, rule, generator):
        if rule == "greedy":  # -inf where infeasible; the first max: the lowest index
            local = int(values.numpy().argmax() if _host_views(values) else torch.argmax(values))
        else:
            cand_vals, cand_idx, cand_dom = rrg_shortlist(values, feasible, rows.domains, remaining)
            local = int(rrg_pick(cand_vals, cand_idx, cand_dom, remaining, generator))
        return rows.pick_payload(local), local + rows.offset


def rrg_shortlist(values, feasible, domains, remaining):
    """Per-domain top-``remaining_j`` feasible candidates of ``values``, ties to the lowest index.

    Returns ``(values, local_indices, domains)`` of the shortlisted candidates. Every rank can
    shortlist its own rows; the union of all ranks' shortlists contains the global shortlist.
    """
    idx = feasible.nonzero().flatten()  # ascending, as top_per_domain needs
    return top_per_domain(values[idx], idx, domains[idx], remaining)


def top_per_domain(values, indices, domains, remaining):
    """Keep the ``remaining[j]`` largest ``values`` of each domain ``j``; ties to the lowest index.

    ``indices`` must be ascending. Returns ``(values, indices, domains)`` of the kept candidates,
    ordered by decreasing value.
    """
    order = torch.argsort(-values, stable=True)
    values, indices, domains = values[order], indices[order], domains[order]
    keep = torch.zeros_like(indices, dtype=torch.bool)
    for j in domains.unique().tolist():
        keep[(domains == j).nonzero().flatten()[: int(remaining[j])]] = True
    return values[keep], indices[keep], domains[keep]


def rrg_pick(values, indices, domains, remaining, generator) -> int:
    """Residual random greedy: a uniform pick from the union of per-domain top-``rem_j`` lists.

    ``values``, ``indices`` (global, unique) and ``domains`` may be a superset of the shortlists
    (e.g. the union of per-rank shortlists); the global shortlists are formed here, ordered by
    index, and one is drawn with ``generator``. The result does not depend on the input order.
    """
    order = torch.argsort(indices)  # canonical order, whatever order the ranks sent
    _, kept, _ = top_per_domain(values[order], indices[order], domains[order], remaining)
    shortlist = torch.sort(kept).values
    draw = int(torch.randint(shortlist.numel(), (1,), generator=generator))
    return int(shortlist[draw])


# --------------------------------------------------------------------------- refits

class _CholeskyFactor:
    """Lower Cholesky factor ``L`` of ``Q_PP`` grown and shrunk one variable at a time.

    ``add`` appends a row in ``O(m^2)``; ``remove`` deletes a variable with Givens rotations
    in ``O(m^2)``; ``solve(b)`` solves ``Q_PP x = b`` with two triangular solves.
    """

    def __init__(self, capacity: int):
        # Fortran order: the leading block L[:m, :m] goes to LAPACK without a transposing copy
        self.L = np.zeros((capacity, capacity), order="F")
        self.m = 0

    def add(self, q_cross: np.ndarray, q_diag: float) -> bool:
        """Append a variable with ``Q[P, new] = q_cross`` and ``Q[new, new] = q_diag``.

        Returns False (and leaves the factor unchanged) when the new column is numerically
        dependent on the current ones.
        """
        m = self.m
        if m:
            v = _forward(self.L[:m, :m], q_cross)
            d = q_diag - float(v @ v)
        else:
            v, d = None, q_diag
        if not d > 1e-10 * max(q_diag, 1e-300):
            return False
        if m:
            self.L[m, :m] = v
        self.L[m, m] = math.sqrt(d)
        self.m = m + 1
        return True

    def remove(self, pos: int) -> None:
        m = self.m
        L = self.L
        # Drop row pos; the block below it becomes upper Hessenberg; rotate it back.
        L[pos:m - 1, :m] = L[pos + 1:m, :m]
        for c in range(pos, m - 1):
            a, b = L[c, c], L[c, c + 1]
            r = math.hypot(a, b)
            cs, sn = (a / r, b / r) if r else (1.0, 0.0)
            col_c = L[c:m - 1, c].copy()
            col_n = L[c:m - 1, c + 1].copy()
            L[c:m - 1, c] = cs * col_c + sn * col_n
            L[c:m - 1, c + 1] = -sn * col_c + cs * col_n
            if L[c, c] < 0:
                L[c:m - 1, c] *= -1
        L[m - 1, :m] = 0.0
        L[:m, m - 1] = 0.0
        self.m = m - 1

    def solve(self, b: np.ndarray) -> np.ndarray:
        m = self.m
        return _backward(self.L[:m, :m], _forward(self.L[:m, :m], b))


def _forward(L, b):
    """Solve ``L x = b`` (LAPACK trtrs directly: the solver calls this per pick)."""
    x, info = dtrtrs(L, b, lower=1, trans=0)
    return x


def _backward(L, b):
    """Solve ``L^T x = b``."""
    x, info = dtrtrs(L, b, lower=1, trans=1)
    return x


class _Refit:
    """Exact refit of ``w`` on the selected set ``S`` after each pick (replicated state).

    Holds ``a_S`` (k,), ``Q_SS`` (k, k) and ``w`` (k,) in float64. ``nonneg=False``:
    ``w_S = Q_SS^{-1} a_S`` through one growing Cholesky factor. ``nonneg=True``: the
    Lawson-Hanson active-set method on ``min 1/2 w^T Q w - a^T w, w >= 0``, warm-started from the
    previous weights, with the Cholesky factor of the passive set updated incrementally.
    ``unit=True`` (GREATS): every weight is 1, no refit.
    """

    def __init__(self, k: int, nonneg: bool, unit: bool = False):
        self.a = np.zeros(k)
        self.Q = np.zeros((k, k))
        self.w = np.zeros(k)
        self.z = np.zeros(k)  # signed refit: the forward solution L z = a_S, grown per pick
        self.m = 0
        self.nonneg, self.unit = nonneg, unit
        self.factor = _CholeskyFactor(k)
        self.passive = []  # positions in S, in factor order
        self.degenerate = 0

    def add(self, a_j: float, q_sel: np.ndarray, q_jj: float) -> None:
        m = self.m
        self.a[m] = a_j
        self.Q[m, :m] = q_sel
        self.Q[:m, m] = q_sel
        self.Q[m, m] = q_jj
        self.m = m + 1
        if self.unit:
            self.w[m] = 1.0
        elif not self.nonneg:
            P = self.passive
            every = len(P) == m  # no dependent pick so far: P = 0..m-1, slices instead of lists
            if self.factor.add(q_sel if every else q_sel[P], q_jj):
                P.append(m)
                if every:
                    # L z = a_S grows by one entry (L's new row), then one backward solve
                    L, z = self.factor.L, self.z
                    z[m] = (a_j - float(L[m, :m] @ z[:m])) / L[m, m]
                    self.w[:m + 1] = _backward(L[:m + 1, :m + 1], z[:m + 1])
                else:
                    self.w[P] = self.factor.solve(self.a[P])
            else:
                self.degenerate += 1
        else:
            self._nonneg_refit()

    def _nonneg_refit(self) -> None:
        m, a, Q, w = self.m, self.a, self.Q, self.w
        tol = 1e-10 * (1.0 + float(np.abs(a[:m]).max()))
        blocked = set()
        P = self.passive
        for _ in range(4 * m + 10):
            grad = a[:m] - Q[:m, :m] @ w[:m]
            grad[P] = -np.inf
            grad[list(blocked)] = -np.inf
            t = int(np.argmax(grad))
            if not grad[t] > tol:
                return
            if not self._enter(t):
                blocked.add(t)  # no bounded improvement through t: keep it at zero
                self.degenerate += 1
                continue
            while P:
                z = self.factor.solve(a[P])
                if (z > 0).all():
                    w[P] = z
                    break
                # Step from w towards z until the first passive weight hits zero; drop it.
                wp = w[P]
                neg = z <= 0
                steps = np.where(neg, wp / np.where(neg, wp - z, 1.0), np.inf)
                alpha = float(steps.min())
                w[P] = wp + alpha * (z - wp)
                drop = {int(np.argmin(steps))}
                drop.update(i for i in range(len(P)) if neg[i] and w[P[i]] <= 1e-15 * (1 + abs(wp[i])))
                self._leave(sorted(drop, reverse=True))
            if t not in P:
                blocked.add(t)

    def _enter(self, t: int) -> bool:
        """Make ``t`` passive. When ``Q[t]`` depends on the passive columns, first slide along
        the null direction ``d = (-Q_PP^{-1} Q_Pt, 1)`` (``Q d = 0``, ascent ``grad_t > 0``)
        until a passive weight hits zero, drop it, and retry."""
        P, w, Q = self.passive, self.w, self.Q
        for _ in range(len(P) + 1):
            if self.factor.add(Q[P, t], Q[t, t]):
                P.append(t)
                return True
            if not P:
                return False
            d = -self.factor.solve(Q[P, t])
            neg = d < 0
            if not neg.any():
                return False  # U grows without bound along d: only a ridge would bound it
            steps = np.where(neg, w[P] / np.where(neg, -d, 1.0), np.inf)
            i = int(np.argmin(steps))
            w[P] = w[P] + steps[i] * d
            w[t] += steps[i]
            w[P[i]] = 0.0
            self._leave([i])
        return False

    def _leave(self, positions) -> None:
        """Drop passive variables at factor ``positions`` (descending), their weights to 0."""
        for i in positions:
            self.w[self.passive[i]] = 0.0
            self.factor.remove(i)
            self.passive.pop(i)

    @property
    def weights(self) -> np.ndarray:
        return self.w[: self.m].copy()

    def utility(self) -> float:
        m, w = self.m, self.w[: self.m]
        return float(w @ self.a[:m] - 0.5 * w @ self.Q[:m, :m] @ w)


# --------------------------------------------------------------------------- the loop

def greedy_select(rows: CandidateRows, budgets: torch.Tensor, chooser: Chooser, *, nonneg: bool = True,
                  rule: str = "greedy", generator: Optional[torch.Generator] = None,
                  unit_weights: bool = False, shortfall: Optional[torch.Tensor] = None,
                  method: str = "partitionsel", temperature: float = 1.0) -> Selection:
    """The OMP loop over validated inputs; exactly ``sum(budgets)`` picks.

    ``rule="sample"`` replaces the argmax by a Gumbel-max draw per pick: the pick maximizes
    ``r_i / (temperature * sigma) + gumbel_i`` over feasible candidates, where ``sigma`` is the
    spread (std) of the step's first residuals over the whole pool and ``gumbel`` is one
    standard Gumbel draw per candidate and step (Gumbel-top-k on the OMP residuals). Scaling by
    ``sigma`` makes ``temperature`` mean the same under any learning rate or feature scale;
    ``temperature -> 0`` is the greedy, large values approach uniform sampling within budgets.

    Per pick: residual over the held rows (``r = a - Q[:, S] w``; for ``unit_weights`` the
    GREATS marginal gain ``a - 1/2 diag(Q) - Q[:, S] 1``), the chooser agrees on the best
    feasible candidate (a collective in the distributed layer), every process forms
    ``Q[:, j]`` for its rows and updates the small replicated refit identically.
    """
    n = len(rows)
    left = budgets.tolist()  # the budgets left, as Python ints for the loop's checks
    k = sum(left)
    remaining = budgets.clone()
    dtype = rows.linear.dtype
    # numpy views of the loop's vectors on the CPU (same memory, same arithmetic, a fraction
    # of the tensor call overhead); the sampling rule keeps tensors throughout
    use_host = rule != "sample" and _host_views(rows.linear)
    if use_host:
        dom_np = rows.domains.numpy()
        feasible_np = np.asarray(left)[dom_np] > 0
        # 0 where a candidate is feasible, -inf where it is selected or its budget is spent
        penalty_np = np.where(feasible_np, 0.0, -math.inf).astype(rows.linear.detach().numpy().dtype)
        feasible, penalty = torch.from_numpy(feasible_np), torch.from_numpy(penalty_np)
    else:
        penalty = torch.zeros(n, dtype=dtype, device=rows.linear.device)
        feasible = remaining[rows.domains] > 0
        penalty[~feasible] = -math.inf
    fast_choice = type(chooser) is LocalChooser and rule == "greedy"
    held = ResidualProduct(rows.diagonal(), k)  # Q[rows, S], exact-sum products
    refit = _Refit(k, nonneg, unit=unit_weights)
    picked = np.zeros(k, dtype=np.int64)  # global indices, in pick order
    pick_dom = []
    base = rows.linear - 0.5 * rows.diagonal() if unit_weights else rows.linear
    noise, inv_tau = None, 0.0
    if rule == "sample":  # Gumbel-top-k: the noise indexes the whole pool, so shards agree
        total = chooser.pool_rows(rows)
        noise = gumbel_noise(total, generator)[rows.offset: rows.offset + n].to(base.device)
        first = base.abs() if not nonneg and not unit_weights else base
        sigma = chooser.spread(torch.where(feasible, first.double(), -math.inf))
        inv_tau = 1.0 / (temperature * sigma) if sigma > 0 else 0.0
        rule = "greedy"  # the chooser takes the argmax of the perturbed values
    # penalty, feasible, remaining, the residual buffer, base, domains
    host = (penalty.numpy(), feasible.numpy(), remaining.numpy(), np.empty(n, dtype=penalty.numpy().dtype),
            base.detach().numpy(), rows.domains.numpy()) if use_host else None
    gram_host = host is not None and isinstance(rows, GramRows) and rows._host is not None
    for t in range(k):
        if host is not None:  # the same arithmetic through numpy views: lower call overhead
            vals = host[3]
            if t == 0:
                vals[:] = host[4]
            else:
                np.subtract(host[4], held.product_host(refit.w[:t]).astype(vals.dtype, copy=False), out=vals)
            if not nonneg and not unit_weights:
                np.abs(vals, out=vals)
            vals += host[0]  # infeasible -> -inf
            values = None if fast_choice else torch.from_numpy(vals)
        else:
            values = base if t == 0 else base - held.product(refit.w[:t]).to(dtype)
            if not nonneg and not unit_weights:
                values = values.abs()
            if noise is not None:
                values = values.double() * inv_tau + noise
            values = values + penalty  # infeasible -> -inf
        if host is not None and fast_choice:  # LocalChooser's greedy rule, without the tensors
            local = int(vals.argmax())
            index = local + rows.offset
            if gram_host:  # the row is at hand: no payload to form and read back
                a_j, q_sel, q_jj, dom, column = rows.host_terms(local, picked[:t])
            else:
                payload = rows.pick_payload(local)
                a_j, q_sel, q_jj, dom = rows.pick_terms(payload, picked[:t])
                column = rows.column(payload, index)
        else:
            payload, index = chooser.choose(values, feasible, rows, remaining, rule, generator)
            a_j, q_sel, q_jj, dom = rows.pick_terms(payload, picked[:t])
            column = rows.column(payload, index)
        held.append(column, q_jj)
        picked[t] = index
        local = index - rows.offset
        if 0 <= local < n:
            if host is not None:  # numpy views of the same memory: cheaper than tensor indexing
                host[0][local], host[1][local] = -math.inf, False
            else:
                penalty[local] = -math.inf
                feasible[local] = False
        pick_dom.append(dom)
        if host is not None:
            host[2][dom] -= 1
        else:
            remaining[dom] -= 1
        left[dom] -= 1
        if left[dom] == 0:
            if host is not None:
                spent = host[5] == dom
                host[0][spent], host[1][spent] = -math.inf, False
            else:
                spent = rows.domains == dom
                penalty[spent] = -math.inf
                feasible[spent] = False
        refit.add(a_j, q_sel, q_jj)

    data_dom = rows.data_domains(pick_dom)
    n_dom = max(budgets.numel(), max(data_dom) + 1 if data_dom else 0)
    return Selection(
        indices=torch.from_numpy(picked),
        weights=torch.from_numpy(refit.weights),
        utility=refit.utility(),
        domain_counts=torch.from_numpy(np.bincount(np.asarray(data_dom, dtype=np.int64),
                                                   minlength=n_dom)),
        budgets=budgets.clone(),
        shortfall=shortfall if shortfall is not None else torch.zeros(n_dom, dtype=torch.int64),
        method=method,
        bytes_sent=int(getattr(chooser, "bytes_sent", 0)),
        info={"degenerate": refit.degenerate},
    )
