"""The single-process solver: correctness against oracles, budgets, determinism, bad input."""
import itertools
import json
import os

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp_gram

from ds_partitionsel import (METHODS, allocate_budgets, conflicting_pairs, partition_omp,
                             partitionsel_terms, select)


def _random_problem(n, p, n_dom, seed, lr=0.5):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n, p, generator=gen, dtype=torch.float64), dim=1)
    target = torch.randn(p, generator=gen, dtype=torch.float64) / p ** 0.5
    domains = torch.randint(0, n_dom, (n,), generator=gen)
    domains[:n_dom] = torch.arange(n_dom)  # every domain present
    linear, quadratic = partitionsel_terms(feats @ feats.T, feats @ target, lr)
    return feats, target, domains, linear, quadratic


# ----------------------------------------------------------------------- oracle: scikit-learn

@pytest.mark.parametrize("seed", range(40))
def test_signed_single_domain_matches_sklearn_orthogonal_mp_gram(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 80, (1,), generator=gen))
    p = int(torch.randint(n, n + 60, (1,), generator=gen))
    X = torch.randn(p, n, generator=gen, dtype=torch.float64)
    y = torch.randn(p, generator=gen, dtype=torch.float64)
    ridge = [0.0, 0.1][seed % 2]
    k = int(torch.randint(1, max(2, n // 2), (1,), generator=gen))
    gram = X.T @ X + ridge * torch.eye(n, dtype=torch.float64)
    xy = X.T @ y
    ref = orthogonal_mp_gram(gram.numpy(), xy.numpy(), n_nonzero_coefs=k)
    sel = partition_omp(xy, gram, torch.zeros(n, dtype=torch.int64), torch.tensor([k]), nonneg=False)
    assert sorted(sel.indices.tolist()) == np.flatnonzero(ref).tolist()
    np.testing.assert_allclose(sel.weights.numpy(), ref[sel.indices.numpy()], rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------- oracle: brute force

def _best_weights(a, Q):
    """Exact max of U(w) = a.w - 1/2 w'Qw over w >= 0 (Q positive definite), by supports."""
    m = len(a)
    best, best_w = 0.0, np.zeros(m)
    for r in range(1, m + 1):
        for T in itertools.combinations(range(m), r):
            T = list(T)
            wT = np.linalg.solve(Q[np.ix_(T, T)], a[T])
            if (wT > 0).all():
                w = np.zeros(m)
                w[T] = wT
                u = a @ w - 0.5 * w @ Q @ w
                if u > best:
                    best, best_w = u, w
    return best, best_w


def _bases(domains, budgets):
    per_dom = [np.flatnonzero(domains == j) for j in range(len(budgets))]
    for combo in itertools.product(*[itertools.combinations(ix, int(b)) for ix, b in zip(per_dom, budgets)]):
        yield [i for part in combo for i in part]


RATIOS = []


@pytest.mark.parametrize("seed", range(30))
def test_greedy_against_brute_force_over_every_feasible_set(seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    n = int(torch.randint(6, 15, (1,), generator=gen))
    n_dom = int(torch.randint(2, 5, (1,), generator=gen))
    feats, target, domains, linear, quadratic = _random_problem(n, 24, n_dom, 1000 + seed,
                                                                lr=[0.1, 1.0, 3.0][seed % 3])
    k = int(torch.randint(2, min(6, n) + 1, (1,), generator=gen))
    budgets = allocate_budgets(torch.bincount(domains, minlength=n_dom), k)
    sel = partition_omp(linear, quadratic, domains, budgets)

    S = sel.indices.numpy()
    dom = domains.numpy()
    a, Q = linear.numpy(), quadratic.numpy()
    # feasible: distinct picks, every budget met exactly
    assert len(set(S.tolist())) == k
    assert np.bincount(dom[S], minlength=n_dom).tolist() == budgets.tolist()
    # the weights are the exact optimum of U on the chosen set (KKT), and utility matches
    w = sel.weights.numpy()
    grad = a[S] - Q[np.ix_(S, S)] @ w
    assert (w >= 0).all()
    assert np.all(np.abs(grad[w > 0]) < 1e-9)
    assert np.all(grad[w == 0] < 1e-9)
    f_chosen, _ = _best_weights(a[S], Q[np.ix_(S, S)])
    assert sel.utility == pytest.approx(f_chosen, rel=1e-9, abs=1e-12)
    # greedy against the best feasible set
    optimum = max(_best_weights(a[B], Q[np.ix_(B, B)])[0] for B in _bases(dom, budgets.numpy()))
    assert sel.utility <= optimum + 1e-9
    ratio = sel.utility / optimum if optimum > 0 else 1.0
    RATIOS.append(ratio)
    assert ratio > 0.5, f"greedy reached only {ratio:.3f} of the optimum"
    out = os.environ.get("DS_PARTITIONSEL_RATIO_LOG")
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps({"seed": seed, "n": n, "k": k, "domains": n_dom, "ratio": ratio}) + "\n")


def test_nonneg_refit_drops_weights_that_turn_negative():
    # two nearly parallel candidates: adding the second pushes the first weight to zero
    g = torch.tensor([[1.0, 0.0], [0.98, 0.199], [0.0, 1.0]], dtype=torch.float64)
    g = torch.nn.functional.normalize(g, dim=1)
    target = torch.tensor([1.0, 0.3], dtype=torch.float64)
    linear, quad = partitionsel_terms(g @ g.T, g @ target, lr=1.0)
    sel = partition_omp(linear, quad, torch.zeros(3, dtype=torch.int64), torch.tensor([3]))
    w = sel.weights.numpy()
    S = sel.indices.numpy()
    grad = linear.numpy()[S] - quad.numpy()[np.ix_(S, S)] @ w
    assert (w >= 0).all() and np.all(grad < 1e-9) and np.all(np.abs(grad[w > 0]) < 1e-9)
    f, _ = _best_weights(linear.numpy()[S], quad.numpy()[np.ix_(S, S)])
    assert sel.utility == pytest.approx(f, rel=1e-12)


# ----------------------------------------------------------------------- budgets, determinism

def test_budgets_met_exactly_and_selection_is_deterministic():
    feats, target, domains, linear, quadratic = _random_problem(300, 64, 5, 7)
    budgets = allocate_budgets(torch.bincount(domains, minlength=5), 40)
    a = partition_omp(linear, quadratic, domains, budgets)
    b = partition_omp(linear.clone(), quadratic.clone(), domains.clone(), budgets.clone())
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert a.domain_counts.tolist() == budgets.tolist()
    assert torch.bincount(domains[a.indices], minlength=5).tolist() == budgets.tolist()


def test_rrg_same_seed_same_selection_different_seed_differs():
    feats, target, domains, linear, quadratic = _random_problem(300, 64, 3, 8)
    budgets = allocate_budgets(torch.bincount(domains, minlength=3), 32)
    runs = [partition_omp(linear, quadratic, domains, budgets, rule="rrg",
                          generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0].indices, runs[1].indices)
    assert torch.equal(runs[0].weights, runs[1].weights)
    assert not torch.equal(runs[0].indices, runs[2].indices)
    for r in runs:
        assert r.domain_counts.tolist() == budgets.tolist()


def test_rrg_picks_uniformly_from_the_per_domain_top_remaining_shortlist():
    """The official code's rule: each pick is uniform over the union of every domain's top-rem_j
    feasible candidates by residual. With orthogonal unit candidates (Q = I) a pick leaves the
    other residuals alone, so the first pick is uniform over the initial shortlist and the final
    set is always the per-domain top-b_j, whatever the seed; only the order varies."""
    a = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.2, 0.05, 0.7, 0.6, 0.5, 0.4, 0.35, 0.25], dtype=torch.float64)
    domains = torch.tensor([0] * 6 + [1] * 6)
    budgets = torch.tensor([2, 1])
    shortlist = {0, 2, 6}  # top-2 of domain 0 (0.9, 0.8) and top-1 of domain 1 (0.7)
    first = {}
    trials = 1500
    for seed in range(trials):
        sel = partition_omp(a, torch.eye(12, dtype=torch.float64), domains, budgets, rule="rrg",
                            generator=torch.Generator().manual_seed(seed))
        assert set(sel.indices.tolist()) == shortlist
        first[int(sel.indices[0])] = first.get(int(sel.indices[0]), 0) + 1
    assert set(first) == shortlist
    # uniform: each share within 4 standard errors of 1/3
    se = (1 / 3 * 2 / 3 / trials) ** 0.5
    assert all(abs(c / trials - 1 / 3) < 4 * se for c in first.values()), first
    greedy = partition_omp(a, torch.eye(12, dtype=torch.float64), domains, budgets)
    assert greedy.indices.tolist() == [0, 2, 6]  # greedy: the same set in residual order


def test_ties_go_to_the_lowest_index():
    g = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4, dtype=torch.float64)
    target = torch.tensor([1.0, 1.0], dtype=torch.float64)
    sel = select("partitionsel", g, torch.zeros(8, dtype=torch.int64), target, torch.tensor([2]))
    assert sel.indices.tolist() == [0, 4]


def test_select_features_path_equals_gram_path():
    feats, target, domains, linear, quadratic = _random_problem(200, 32, 4, 9, lr=0.7)
    budgets = allocate_budgets(torch.bincount(domains, minlength=4), 24)
    via_gram = partition_omp(linear, quadratic, domains, budgets)
    via_features = select("partitionsel", feats, domains, target, budgets, lr=0.7)
    assert torch.equal(via_gram.indices, via_features.indices)
    torch.testing.assert_close(via_gram.weights, via_features.weights, rtol=1e-9, atol=1e-12)
    assert via_features.utility == pytest.approx(via_gram.utility, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_a_valid_selection(method):
    feats, target, domains, _, _ = _random_problem(120, 16, 3, 10)
    feats = feats.float()
    budgets = allocate_budgets(torch.bincount(domains, minlength=3), 20)
    sel = select(method, feats, domains, target.float(), budgets, lr=0.3,
                 generator=torch.Generator().manual_seed(0))
    k = 120 if method == "full" else 20
    assert sel.indices.numel() == k == sel.weights.numel()
    assert len(set(sel.indices.tolist())) == k
    assert sel.domain_counts.tolist() == torch.bincount(domains[sel.indices], minlength=3).tolist()
    if method in ("partitionsel", "iwd", "greats_domain"):
        assert sel.domain_counts.tolist() == budgets.tolist()
    if method in ("partitionsel", "iwd", "gradmatch"):
        assert (sel.weights >= 0).all()
    assert np.isfinite(sel.utility)


def test_partitionsel_beats_domain_agnostic_and_per_domain_baselines_on_its_utility():
    feats, target, domains, _, _ = _random_problem(400, 32, 4, 11)
    budgets = allocate_budgets(torch.bincount(domains, minlength=4), 32)
    util = {m: select(m, feats, domains, target, budgets, lr=0.5).utility
            for m in ("partitionsel", "iwd", "greats_domain")}
    assert util["partitionsel"] >= util["iwd"]
    assert util["partitionsel"] >= util["greats_domain"]


def test_drop_nonfinite_rows_hands_their_budget_on():
    feats, target, domains, _, _ = _random_problem(60, 8, 2, 12)
    budgets = torch.tensor([20, 10])
    bad = (domains == 0).nonzero().flatten()[: int((domains == 0).sum()) - 15]
    feats[bad] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        select("partitionsel", feats, domains, target, budgets)
    sel = select("partitionsel", feats, domains, target, budgets, drop_nonfinite=True)
    assert sel.info["dropped"] == len(bad)
    assert not set(sel.indices.tolist()) & set(bad.tolist())
    assert sel.shortfall.tolist() == [5, 0]
    assert sel.domain_counts.tolist() == [15, 15]


# ----------------------------------------------------------------------- allocate_budgets

def test_proportional_budgets_follow_the_paper_rule():
    # floor(n_j*k/N) = [3, 2, 0]; leftover 1 goes to the smallest (b_j, j): domain 2
    assert allocate_budgets([50, 40, 10], 6).tolist() == [3, 2, 1]
    # single pass in ascending (b_j, j): leftover 2 -> domains 2 then 1
    assert allocate_budgets([70, 20, 10], 7).tolist() == [4, 2, 1]
    assert allocate_budgets([3, 0, 5], 8).tolist() == [3, 0, 5]


def test_budget_strategies_sum_to_k_and_never_exceed_counts():
    counts = [2, 30, 9, 1]
    for strategy, kw in [("proportional", {}), ("uniform", {}),
                         ("fractions", {"fractions": [0.4, 0.2, 0.2, 0.2]}),
                         ("minority_full", {"minority_domains": [0, 3]})]:
        for k in (1, 5, 17, 42):
            if strategy == "minority_full" and k < 3:
                with pytest.raises(ValueError, match="more than k"):
                    allocate_budgets(counts, k, strategy, **kw)
                continue
            b = allocate_budgets(counts, k, strategy, **kw)
            assert int(b.sum()) == k, (strategy, k)
            assert all(x <= c for x, c in zip(b.tolist(), counts)), (strategy, k, b)
    assert allocate_budgets(counts, 10, "minority_full", minority_domains=[0, 3]).tolist()[::3] == [2, 1]
    assert allocate_budgets([10, 10, 10], 10, "fractions", fractions=[0.5, 0.25, 0.25]).tolist() == [5, 3, 2]


@pytest.mark.parametrize("args, message", [
    (([10, 10], 0), "positive batch size"),
    (([10, 10], 21), "cannot select k=21"),
    (([0, 0], 1), "pool is empty"),
    (([10, -1], 3), "non-negative"),
    (([10, 10], 3, "nope"), "unknown budget strategy"),
    (([10, 10], 3, "fractions"), "one fraction per domain"),
])
def test_allocate_budgets_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        allocate_budgets(*args)


# ----------------------------------------------------------------------- bad input

def _ok():
    _, _, domains, linear, quadratic = _random_problem(12, 16, 2, 13)
    return linear, quadratic, domains, torch.tensor([2, 2])


@pytest.mark.parametrize("mutate, message", [
    (lambda l, q, d, b: (l, q[:, :-1], d, b), "square"),
    (lambda l, q, d, b: (l, q + torch.triu(torch.ones_like(q), 1), d, b), "symmetric"),
    (lambda l, q, d, b: (l.index_fill(0, torch.tensor([3]), float("nan")), q, d, b), "linear contains 1 NaN"),
    (lambda l, q, d, b: (l, q.index_fill(0, torch.tensor([0]), float("inf")), d, b), "quadratic contains"),
    (lambda l, q, d, b: (l[:-1], q, d, b), "linear has n=11"),
    (lambda l, q, d, b: (l, q, d[:-1], b), "domains has length 11"),
    (lambda l, q, d, b: (l, q, d.index_fill(0, torch.tensor([0]), 5), b), r"domain ids must lie in \[0, 2\)"),
    (lambda l, q, d, b: (l, q, d, torch.tensor([3, -1])), "non-negative"),
    (lambda l, q, d, b: (l, q, d, torch.tensor([int((d == 0).sum()) + 1, 0])), "exceed domain sizes"),
    (lambda l, q, d, b: (l, q, d, torch.tensor([10, 10])), "more than the n=12"),
    (lambda l, q, d, b: (l[:0], q[:0, :0], d[:0], b), "empty pool"),
    (lambda l, q, d, b: (l, q, d, torch.tensor([0, 0])), "k=0"),
    (lambda l, q, d, b: (l, q, d.float(), b), "integer"),
])
def test_partition_omp_rejects_bad_input(mutate, message):
    with pytest.raises(ValueError, match=message):
        partition_omp(*mutate(*_ok()))


def test_bad_rule_and_missing_generator():
    args = _ok()
    with pytest.raises(ValueError, match="unknown rule"):
        partition_omp(*args, rule="best")
    with pytest.raises(ValueError, match="seeded torch.Generator"):
        partition_omp(*args, rule="rrg")


def test_select_rejects_bad_input():
    feats, target, domains, _, _ = _random_problem(20, 8, 2, 14)
    budgets = torch.tensor([2, 2])
    with pytest.raises(ValueError, match="unknown selection method"):
        select("best", feats, domains, target, budgets)
    with pytest.raises(ValueError, match=r"target must be .* shape \(8,\)"):
        select("partitionsel", feats, domains, target[:4], budgets)
    with pytest.raises(ValueError, match="learning rate"):
        select("partitionsel", feats, domains, target, budgets, lr=0.0)
    with pytest.raises(ValueError, match="needs a seeded torch.Generator"):
        select("random", feats, domains, target, budgets)


def test_conflicting_pairs_counts_negative_inner_products():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0], [-0.5, -0.5]])
    # pairs: (0,1)<0, (0,2)=0, (0,3)<0, (1,2)>0, (1,3)>0, (2,3)<0
    assert conflicting_pairs(g, torch.tensor([0, 1, 2, 3])) == 3
    assert conflicting_pairs(g, torch.tensor([1, 2])) == 0
    with pytest.raises(ValueError, match="indices must lie"):
        conflicting_pairs(g, torch.tensor([4]))


@pytest.mark.parametrize("seed", range(5))
def test_kkt_holds_when_more_picks_than_dimensions(seed):
    # p=3 < k: Q_SS is singular without a ridge; the refit slides along null directions
    feats, target, domains, _, _ = _random_problem(40, 3, 2, 2000 + seed)
    linear, quadratic = partitionsel_terms(feats @ feats.T, feats @ target, 1.0, ridge=1e-3)
    budgets = torch.tensor([6, 6])
    sel = partition_omp(linear, quadratic, domains, budgets)
    S, w = sel.indices.numpy(), sel.weights.numpy()
    grad = linear.numpy()[S] - quadratic.numpy()[np.ix_(S, S)] @ w
    assert (w >= 0).all() and np.all(grad < 1e-8) and np.all(np.abs(grad[w > 0]) < 1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 9, 1024, 40000])
def test_row_dots_of_a_row_do_not_depend_on_the_other_rows(dtype, p):
    """What makes shards reproduce the single-process selection: a row's value is the same
    whether it is computed alone, in a slice, or in the whole matrix, at any thread count."""
    from ds_partitionsel.solver import row_dots

    n = 300 if p < 40000 else 9
    gen = torch.Generator().manual_seed(p)
    rows = torch.randn(n, p, generator=gen, dtype=dtype)
    vec = torch.randn(p, generator=gen, dtype=dtype)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            full, norms = row_dots(rows, vec), row_dots(rows, None)
            for lo, hi in [(0, 1), (n - 1, n), (3, 7), (2, n), (0, n // 2 + 1)]:
                assert torch.equal(row_dots(rows[lo:hi], vec), full[lo:hi]), (threads, lo, hi)
                assert torch.equal(row_dots(rows[lo:hi], None), norms[lo:hi]), (threads, lo, hi)
    finally:
        torch.set_num_threads(before)
    ref = rows.double() @ vec.double()
    assert torch.allclose(full.double(), ref, rtol=1e-4 if dtype == torch.float32 else 1e-12,
                          atol=1e-3 if dtype == torch.float32 else 1e-9)


def _held(quadratic, picks, lo=0, hi=None):
    from ds_partitionsel.solver import ResidualProduct

    hi = quadratic.shape[0] if hi is None else hi
    held = ResidualProduct(torch.diagonal(quadratic)[lo:hi], len(picks))
    for j in picks:
        held.append(quadratic[lo:hi, j], float(quadratic[j, j]))
    return held


@pytest.mark.parametrize("k", [1, 7, 300])
def test_residual_product_is_exact_sums_the_same_for_any_row_split_and_thread_count(k):
    """The O(n k) product of a pick: every row's value is the same bits whether its rows are
    held alone, in a shard, or all together, at any thread count (the sums BLAS sees are exact,
    so no blocking or instruction set can change them); and it is as accurate as float64."""
    gen = torch.Generator().manual_seed(k)
    n = 400
    feats = torch.randn(n, 64, generator=gen, dtype=torch.float64) * torch.rand(n, 1, generator=gen, dtype=torch.float64) * 3
    quadratic = feats @ feats.T
    picks = torch.randperm(n, generator=gen)[:k].tolist()
    w = (torch.rand(k, generator=gen, dtype=torch.float64) - 0.3).numpy() * 10.0 ** float(torch.randint(-6, 6, (1,), generator=gen))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            full = _held(quadratic, picks).product(w)
            outs.append(full)
            for lo, hi in [(0, 1), (n - 1, n), (3, 7), (2, n), (0, n // 2 + 1)]:
                assert torch.equal(_held(quadratic, picks, lo, hi).product(w), full[lo:hi]), (threads, lo, hi)
        assert torch.equal(outs[0], outs[1])
    finally:
        torch.set_num_threads(before)
    ref = quadratic[:, picks] @ torch.from_numpy(w)
    bound = quadratic.diagonal().sqrt() * (quadratic.diagonal()[picks].sqrt() * torch.from_numpy(np.abs(w))).sum()
    assert ((outs[0] - ref).abs() <= 1e-7 * bound + 1e-300).all()
    assert torch.allclose(outs[0], ref, rtol=1e-6, atol=1e-6 * float(bound.max()))


def test_residual_product_widens_rows_where_the_quadratic_is_not_psd():
    """|Q_ij| > sqrt(Q_ii Q_jj) (not PSD): the row's scale grows; values stay close, and a
    row's value still does not depend on the other rows."""
    gen = torch.Generator().manual_seed(3)
    n = 50
    quadratic = torch.randn(n, n, generator=gen, dtype=torch.float64)
    quadratic = (quadratic + quadratic.T) / 2
    quadratic.diagonal().copy_(torch.rand(n, generator=gen, dtype=torch.float64) * 1e-3)  # tiny diagonal
    picks = [4, 9, 17, 30]
    w = np.array([0.5, -1.0, 2.0, 0.25])
    full = _held(quadratic, picks).product(w)
    assert torch.allclose(full, quadratic[:, picks] @ torch.from_numpy(w), rtol=1e-6, atol=1e-7)
    assert torch.equal(_held(quadratic, picks, 10, 33).product(w), full[10:33])


@pytest.mark.parametrize("nonneg", [True, False])
def test_tensor_path_of_the_loop_gives_the_bits_of_the_numpy_path(monkeypatch, nonneg):
    """Off the CPU the loop runs on tensors; on the CPU through numpy views. Both do the same
    arithmetic in the same order: forcing the tensor path here must not change one bit."""
    import ds_partitionsel.solver as solver

    feats, target, domains, linear, quadratic = _random_problem(300, 40, 4, 5)
    budgets = allocate_budgets(torch.bincount(domains, minlength=4), 40)
    host = partition_omp(linear, quadratic, domains, budgets, nonneg=nonneg)
    host_f = select("partitionsel", feats.float(), domains, target.float(), budgets)
    monkeypatch.setattr(solver, "HOST_VIEWS", False)
    tensor = partition_omp(linear, quadratic, domains, budgets, nonneg=nonneg)
    tensor_f = select("partitionsel", feats.float(), domains, target.float(), budgets)
    for a, b in ((host, tensor), (host_f, tensor_f)):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
        assert a.utility == b.utility


def test_select_gram_equals_select_on_the_gram_and_refuses_bad_input():
    """select_gram on K = G G^T and s = G v picks what select picks on G (float64 features:
    the two differ only in rounding), and refuses what it cannot use, naming it."""
    from ds_partitionsel import select, select_gram

    feats, target, domains, _, _ = _random_problem(120, 30, 3, 2)
    budgets = allocate_budgets(torch.bincount(domains, minlength=3), 12)
    gram, scores = feats @ feats.T, feats @ target
    for method in ("partitionsel", "iwd", "greats", "greats_domain"):
        a = select(method, feats, domains, target, budgets, lr=0.3)
        b = select_gram(method, gram, scores, domains, budgets, lr=0.3)
        assert torch.equal(a.indices, b.indices), method
        assert torch.allclose(a.weights, b.weights, rtol=1e-9, atol=1e-12)
        assert torch.equal(a.domain_counts, b.domain_counts) and a.utility == pytest.approx(b.utility, rel=1e-9)
    bad_gram = gram.clone()
    bad_gram[3, 4] = float("nan")
    for args, match in (((gram[:, :5], scores), "square"), ((gram, scores[:7]), r"scores must have shape \(120,\)"),
                        ((bad_gram, scores), "gram contains 1 NaN/Inf")):
        with pytest.raises(ValueError, match=match):
            select_gram("partitionsel", *args, domains, budgets)
    with pytest.raises(ValueError, match="'gradnorm' has no Gram form"):
        select_gram("gradnorm", gram, scores, domains, budgets)
    with pytest.raises(ValueError, match="lr must be a positive"):
        select_gram("partitionsel", gram, scores, domains, budgets, lr=0.0)
