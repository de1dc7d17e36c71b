"""``select``: PartitionSel and the paper's baselines behind one interface.

Every method takes per-candidate gradient features ``(n, p)``, domain ids ``(n,)``, the mean
validation gradient ``(p,)`` and per-domain budgets ``(D,)`` (``k = sum(budgets)``), and returns
a :class:`~ds_partitionsel.solver.Selection`. Domain-agnostic methods use only ``k``.

=================  ============================================================================
``partitionsel``   partition-matroid OMP on ``U(w)`` (nonnegative weights, per-domain budgets)
``random``         ``k`` uniformly at random from the pool (seeded ``generator``)
``full``           the whole pool (no selection)
``gradnorm``       top-``k`` gradient norms
``greats``         greedy on ``U`` with 0/1 weights (the GREATS utility), no budgets
``greats_domain``  GREATS run independently per domain under the same budgets
``iwd``            PartitionSel with ``K`` block-diagonal by domain (independent weighted domains)
``gradmatch``      ridge OMP matching the validation gradient (nonnegative), no budgets
=================  ============================================================================
"""
import math
from typing import Optional

import torch

from ds_partitionsel.solver import (FeatureRows, GramRows, LocalChooser, Selection, check_budget_fit,
                                    check_domains_budgets, check_finite, check_rule,
                                    check_temperature,
                                    greedy_select, partitionsel_terms, row_dots)

METHODS = ("partitionsel", "random", "full", "gradnorm", "greats", "greats_domain", "iwd",
           "gradmatch")

# method -> (use domain budgets, weighted refit, block-diagonal Gram)
GREEDY_METHODS = {
    "partitionsel": (True, True, False),
    "iwd": (True, True, True),
    "greats": (False, False, False),
    "greats_domain": (True, False, True),
    "gradmatch": (False, True, False),
}


def validate_inputs(method, features, domains, target, budgets, lr, ridge):
    """Boundary checks shared by the single-process and the distributed ``select``."""
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; valid: {', '.join(METHODS)}")
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a 2-D tensor (n, p), got "
                         f"{getattr(features, 'shape', type(features))}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if not isinstance(target, torch.Tensor) or target.dim() != 1 \
            or target.numel() != features.shape[1]:
        raise ValueError(f"target must be the mean validation gradient of shape "
                         f"({features.shape[1]},), got {tuple(getattr(target, 'shape', ()))}")
    check_finite("target", target)
    check_lr_ridge(lr, ridge)
    return check_domains_budgets(domains, budgets, features.shape[0])


def check_lr_ridge(lr, ridge) -> None:
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite learning rate, got {lr}")
    if not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")


def select(method: str, features: torch.Tensor, domains: torch.Tensor, target: torch.Tensor,
           budgets: torch.Tensor, *, lr: float = 1.0, ridge: float = 0.0,
           generator: Optional[torch.Generator] = None, rule: str = "greedy",
           nonneg: bool = True, drop_nonfinite: bool = False,
           allow_shortfall: bool = False, temperature: float = 1.0) -> Selection:
    """Select ``k = sum(budgets)`` candidates with ``method``.

    Parameters
    ----------
    method : one of :data:`METHODS`.
    features : (n, p) per-candidate gradient features ``g_i`` (unit norm by default upstream).
    domains : (n,) int64 domain ids in ``[0, D)``.
    target : (p,) mean validation gradient ``v``; scores are ``s = G v``.
    budgets : (D,) int64 per-domain budgets, e.g. from ``allocate_budgets``.
    lr : the learning rate ``eta`` of the utility (the schedule's current value).
    ridge : added to the diagonal of ``Q``.
    generator : seeded ``torch.Generator`` for ``random`` and ``rule="rrg"`` / ``"sample"``.
    rule, nonneg : passed to the OMP methods (see ``partition_omp``); ``rule="sample"`` draws
        each pick by Gumbel-max on the residuals (see ``greedy_select``).
    temperature : ``rule="sample"`` only: noise scale relative to the residuals' spread.
    drop_nonfinite : drop candidates whose features are not finite (counted in
        ``info["dropped"]``, their budget handed to the other domains) instead of raising.
    allow_shortfall : hand budget above a domain's size to other domains instead of raising.

    Returns
    -------
    Selection with global indices into ``features``.
    """
    domains, budgets = validate_inputs(method, features, domains, target, budgets, lr, ridge)
    rule = check_rule(rule, generator)
    temperature = check_temperature(temperature)
    n = features.shape[0]
    if n == 0:
        raise ValueError("empty pool: features has no rows")
    finite = torch.isfinite(features).all(dim=1)
    dropped = int((~finite).sum())
    keep = None
    if dropped:
        if not drop_nonfinite:
            raise ValueError(f"features of {dropped} candidate(s) contain NaN/Inf (rows "
                             f"{(~finite).nonzero().flatten()[:8].tolist()}...); pass "
                             f"drop_nonfinite=True to drop them")
        keep = finite.nonzero().flatten()
        features, domains = features[keep], domains[keep]
        allow_shortfall = True
    counts = torch.bincount(domains, minlength=budgets.numel())
    used, shortfall = check_budget_fit(budgets, counts, allow_shortfall)
    if method == "random" and not isinstance(generator, torch.Generator):
        raise ValueError("method 'random' needs a seeded torch.Generator, e.g. "
                         "generator=torch.Generator().manual_seed(seed)")
    result = run_method(method, features, domains, target, used, lr=lr, ridge=ridge,
                       generator=generator, rule=rule, nonneg=nonneg, temperature=temperature)
    result.shortfall = shortfall
    result.info["dropped"] = dropped
    if keep is not None:
        result.indices = keep[result.indices]
    return result


def run_method(method, features, domains, target, budgets, *, lr, ridge, generator, rule, nonneg,
              offset=0, chooser=None, temperature=1.0):
    k = int(budgets.sum())
    if method in GREEDY_METHODS:
        per_domain, weighted, block = GREEDY_METHODS[method]
        lin, terms_lr = None, lr
        if method == "gradmatch":  # match sum_i w_i g_i to v: a = G v, Q = G G^T + ridge I
            lin = row_dots(features.contiguous(), target.to(features.dtype))
            terms_lr = 1.0
        rows = FeatureRows(features, target, domains, lr=terms_lr, ridge=ridge, offset=offset,
                           block_diagonal=block, linear=lin, capacity=k,
                           budget_domains=None if per_domain else torch.zeros_like(domains))
        use = budgets if per_domain else torch.tensor([k], dtype=torch.int64)
        sel = greedy_select(rows, use, chooser or LocalChooser(),
                            nonneg=nonneg if weighted else True, rule=rule, generator=generator,
                            unit_weights=not weighted, method=method, temperature=temperature)
        sel.domain_counts = _pad(sel.domain_counts, budgets.numel())
        sel.budgets = budgets.clone()
        if block or method == "gradmatch":  # report U on the true PartitionSel terms
            # from the picked rows every rank holds (a rank's own features may not contain them)
            sel.utility = selection_utility(rows.selected_features(), target, torch.arange(sel.k),
                                            sel.weights, lr=lr, ridge=ridge)
        return sel
    if method == "full":
        idx = torch.arange(features.shape[0])
    elif method == "random":
        idx = torch.randperm(features.shape[0], generator=generator)[:k]
    else:  # gradnorm: top-k norms, ties to the lowest index
        norms = (features.double() ** 2).sum(1)
        idx = torch.argsort(-norms, stable=True)[:k]
    return unweighted_selection(method, idx, features, domains, target, budgets, lr, ridge)


def _pad(counts, n_dom):
    out = torch.zeros(n_dom, dtype=torch.int64)
    out[: counts.numel()] = counts
    return out


def selection_utility(features, target, indices, weights, *, lr, ridge=0.0) -> float:
    """The PartitionSel utility ``U(w)`` of a selection, in float64 on the selected rows.

    ``features`` (n, p), ``target`` (p,), ``indices`` (k,) rows, ``weights`` (k,).
    Every method's ``Selection.utility`` is this value, so methods compare on one scale.
    """
    g = features[indices].double()
    w = torch.as_tensor(weights, dtype=torch.float64)
    gram = g @ g.T
    a = lr * (g @ target.double()) + 0.5 * lr * lr * torch.diagonal(gram)
    q = lr * lr * gram + ridge * torch.eye(len(indices), dtype=torch.float64)
    return float(w @ a - 0.5 * w @ q @ w)


def select_gram(method: str, gram: torch.Tensor, scores: torch.Tensor, domains: torch.Tensor,
                budgets: torch.Tensor, *, lr: float = 1.0, ridge: float = 0.0,
                generator: Optional[torch.Generator] = None, rule: str = "greedy",
                nonneg: bool = True, allow_shortfall: bool = False,
                temperature: float = 1.0) -> Selection:
    """:func:`select` for the greedy methods from the Gram matrix ``K = G G^T`` (n, n) and the
    scores ``s = G v`` (n,) instead of the features ``G``: what
    :meth:`~ds_partitionsel.sketch.GradientSketcher.sketch_gram` streams without holding ``G``.

    The same problem as :func:`select` (``Q = lr^2 K + ridge I``, masked to the domains' blocks
    for ``iwd`` / ``greats_domain``; ``a = s, Q = K + ridge I`` for ``gradmatch``), solved by
    the same loop on the explicit ``Q``; the numbers are ``K``'s, so they agree with
    :func:`select` on ``G`` up to the rounding of ``K`` (not bit for bit). One process: the
    Gram of a pool sharded over ranks would need the other ranks' features.
    """
    if method not in GREEDY_METHODS:
        raise ValueError(f"method {method!r} has no Gram form here; the Gram methods are "
                         f"{', '.join(GREEDY_METHODS)}")
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (n, n) tensor, got {tuple(getattr(gram, 'shape', ()))}")
    n = gram.shape[0]
    if n == 0:
        raise ValueError("empty pool: gram has no rows")
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n,):
        raise ValueError(f"scores must have shape ({n},), got {tuple(getattr(scores, 'shape', ()))}")
    check_finite("gram", gram)
    check_finite("scores", scores)
    domains, budgets = check_domains_budgets(domains, budgets, n)
    rule = check_rule(rule, generator)
    temperature = check_temperature(temperature)
    check_lr_ridge(lr, ridge)
    counts = torch.bincount(domains, minlength=budgets.numel())
    used, shortfall = check_budget_fit(budgets, counts, allow_shortfall)
    per_domain, weighted, block = GREEDY_METHODS[method]
    gram, scores = gram.double(), scores.double()
    if method == "gradmatch":  # match sum_i w_i g_i to v
        linear = scores.clone()
        quadratic = gram + ridge * torch.eye(n, dtype=torch.float64, device=gram.device)
    else:
        linear, quadratic = partitionsel_terms(gram, scores, lr, ridge)
    if block:  # Q_ij = 0 across domains
        quadratic = quadratic * (domains[:, None] == domains[None, :]).to(quadratic.dtype)
    k = int(used.sum())
    rows = GramRows(linear, quadratic, domains if per_domain else torch.zeros_like(domains))
    sel = greedy_select(rows, used if per_domain else torch.tensor([k], dtype=torch.int64),
                        LocalChooser(), nonneg=nonneg if weighted else True, rule=rule,
                        generator=generator, unit_weights=not weighted, method=method,
                        temperature=temperature)
    sel.domain_counts = torch.bincount(domains[sel.indices], minlength=budgets.numel())
    sel.budgets, sel.shortfall = used.clone(), shortfall
    if block or method == "gradmatch":  # report U on the true PartitionSel terms
        idx = sel.indices
        a, q = partitionsel_terms(gram[idx][:, idx], scores[idx], lr, ridge)
        w = sel.weights.double()
        sel.utility = float(w @ a - 0.5 * w @ q @ w)
    sel.info["dropped"] = 0
    return sel


def unweighted_selection(method, indices, features, domains, target, budgets, lr, ridge):
    """A Selection with unit weights and its utility ``U(1_S)``."""
    w = torch.ones(len(indices), dtype=torch.float64)
    return Selection(
        indices=indices.to(torch.int64), weights=w,
        utility=selection_utility(features, target, indices, w, lr=lr, ridge=ridge),
        domain_counts=torch.bincount(domains[indices], minlength=budgets.numel()),
        budgets=budgets.clone(), shortfall=torch.zeros_like(budgets), method=method)
