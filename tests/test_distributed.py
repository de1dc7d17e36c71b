"""Distributed selection on real gloo ranks: bit-identity with the single-process solver,
agreement checks, dead and stuck ranks, and bytes per rank.

Spawning costs seconds per process, so each world size runs once (a module fixture) with every
case batched into it; the tests then assert on the collected results.
"""
import os
import sys

import pytest
import torch

from distributed_utils import free_port, run_ranks

from ds_partitionsel import allocate_budgets, select
from ds_partitionsel.distributed import CostModel

N, P, K, D = 60, 9, 12, 3

SPLITS = {  # rows per rank: even, uneven, and with empty shards
    1: [[N]],
    2: [[30, 30], [0, 60], [53, 7]],
    3: [[20, 20, 20], [25, 0, 35], [1, 58, 1]],
    4: [[15, 15, 15, 15], [0, 30, 0, 30], [50, 3, 7, 0]],
}
BASELINES = ("iwd", "greats", "gradmatch", "greats_domain", "random", "gradnorm", "full")


def _problem(dtype, variant="plain", seed=0):
    """A pool of N unit-norm rows in D domains. ``dup``: the second half repeats the first,
    so equal residuals sit on different ranks (ties must go to the lowest global index).
    ``nan``: three rows are not finite."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(N, P, generator=gen, dtype=torch.float64), dim=1)
    domains = torch.randint(0, D, (N,), generator=gen)
    if variant == "dup":
        feats[N // 2:] = feats[: N // 2]
        domains[N // 2:] = domains[: N // 2]
    feats = feats.to(dtype)
    if variant == "nan":
        feats[[2, 31, 58], 1] = float("nan")
    target = (0.3 * torch.randn(P, generator=gen, dtype=torch.float64)).to(dtype)
    budgets = allocate_budgets(torch.bincount(domains, minlength=D), K)
    return feats, domains, target, budgets


def _cases(world):
    """(split, method, mode, rule, dtype name, variant, extra kwargs) to run on ``world`` ranks."""
    cases = []
    for split in SPLITS[world]:
        for mode in ("replicated", "sharded"):
            for rule in ("greedy", "rrg"):
                for dtype in ("float32", "float64"):
                    cases.append((split, "partitionsel", mode, rule, dtype, "plain", {}))
                cases.append((split, "partitionsel", mode, rule, "float64", "dup", {}))
                cases.append((split, "partitionsel", mode, rule, "float32", "dup", {}))
    uneven = SPLITS[world][-1]
    for method in BASELINES:
        for mode in ("replicated", "sharded"):
            for rule in ("greedy", "rrg"):
                cases.append((uneven, method, mode, rule, "float32", "plain", {}))
    for split in SPLITS[world]:  # Gumbel sampling on the residuals: noise indexed by the pool
        for mode in ("replicated", "sharded"):
            cases.append((split, "partitionsel", mode, "sample", "float32", "plain", {"temperature": 0.5}))
            cases.append((split, "partitionsel", mode, "sample", "float64", "dup", {}))
    for mode in ("replicated", "sharded", "auto"):
        cases.append((uneven, "gradmatch", mode, "sample", "float32", "plain", {"temperature": 2.0}))
        cases.append((uneven, "partitionsel", mode, "sample", "float32", "nan",
                      {"drop_nonfinite": True}))
        cases.append((uneven, "partitionsel", mode, "greedy", "float32", "nan",
                      {"drop_nonfinite": True}))
        cases.append((uneven, "partitionsel", mode, "greedy", "float64", "plain",
                      {"nonneg": False, "ridge": 0.05}))
        cases.append((uneven, "gradmatch", mode, "rrg", "float64", "dup", {"ridge": 0.1}))
    return cases


def _run_cases(rank, world, cases):
    from ds_partitionsel import distributed

    out = []
    for split, method, mode, rule, dtype, variant, extra in cases:
        feats, domains, target, budgets = _problem(getattr(torch, dtype), variant)
        lo = sum(split[:rank])
        hi = lo + split[rank]
        sel = distributed.select(method, feats[lo:hi], domains[lo:hi], target, budgets, lr=0.5,
                                 mode=mode, rule=rule, generator=torch.Generator().manual_seed(7),
                                 step=11, timeout=30, **extra)
        out.append({"indices": sel.indices.numpy(), "weights": sel.weights.numpy(),
                    "utility": sel.utility, "domain_counts": sel.domain_counts.numpy(),
                    "shortfall": sel.shortfall.numpy(), "dropped": sel.info["dropped"],
                    "bytes_sent": sel.bytes_sent, "mode": sel.info["mode"],
                    "rounds": sel.info["rounds"]})
    out.append(_pool_moments_by_split(rank, world))
    return out


def _moments_problem():
    """Rows with a wide dynamic range (float32), the pool of the ``validation.shrink`` sums."""
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(N, P, generator=gen) * torch.logspace(-6, 3, P)
    feats[5, 2] = float("nan")
    return feats


def _pool_moments_by_split(rank, world):
    """``shrink.pool_moments`` on this rank's rows of every split of ``world`` (after the cases)."""
    from ds_partitionsel.collectives import Communicator
    from ds_partitionsel.shrink import pool_moments

    feats, out = _moments_problem(), {}
    for split in SPLITS[world]:
        lo = sum(split[:rank])
        mean, mean_sq = pool_moments(feats[lo:lo + split[rank]], N, Communicator(None, 30, "moments"))
        out[tuple(split)] = (mean.numpy(), mean_sq)
    return out


def _reference(case, threads):
    split, method, mode, rule, dtype, variant, extra = case
    feats, domains, target, budgets = _problem(getattr(torch, dtype), variant)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return select(method, feats, domains, target, budgets, lr=0.5, rule=rule,
                      generator=torch.Generator().manual_seed(7), **extra)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs():
    """world size -> per-rank lists of results of ``_cases(world)``, computed on first use."""
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = run_ranks(_run_cases, world, _cases(world), deepspeed=False)
        return cache[world]
    return get


@pytest.mark.parametrize("world", [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                   pytest.param(4, marks=pytest.mark.slow)])
def test_bit_identical_to_single_process(runs, world):
    results = runs(world)
    cases = _cases(world)
    for i, case in enumerate(cases):
        for threads in sorted({1, torch.get_num_threads()}):
            ref = _reference(case, threads)
            for rank in range(world):
                got = results[rank][i]
                where = f"world {world} rank {rank} case {case[:6]} threads {threads}"
                assert torch.equal(torch.from_numpy(got["indices"]), ref.indices), where
                assert torch.equal(torch.from_numpy(got["weights"]), ref.weights), where
                assert got["utility"] == ref.utility, where
                assert torch.equal(torch.from_numpy(got["domain_counts"]), ref.domain_counts), where
                assert torch.equal(torch.from_numpy(got["shortfall"]), ref.shortfall), where
                assert got["dropped"] == ref.info["dropped"], where
        # the mode that actually ran, and what it cost
        split, method, mode, rule = case[:4]
        for rank in range(world):
            got = results[rank][i]
            if mode != "auto":
                expected = "replicated" if method in ("random", "gradnorm", "full") else mode
                assert got["mode"] == expected, case[:4]
            if world == 1:
                assert got["bytes_sent"] == 0 and got["rounds"] == 0
            else:
                assert got["bytes_sent"] > 0 and got["rounds"] >= 3


@pytest.mark.parametrize("world", [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                   pytest.param(4, marks=pytest.mark.slow)])
def test_pool_moments_are_bit_identical_on_every_split(runs, world):
    """The pool sums of ``validation.shrink`` are exact (fixed point): every world size and
    split gives the single-process bits, and they agree with a plain float64 sum."""
    import numpy as np

    from ds_partitionsel.collectives import Communicator
    from ds_partitionsel.shrink import pool_moments

    feats = _moments_problem()
    ref_mean, ref_sq = pool_moments(feats, N, Communicator(None, 30, "moments"))
    plain = torch.nan_to_num(feats.double())
    assert torch.allclose(ref_mean, plain.mean(0), rtol=1e-12, atol=1e-12)
    assert ref_sq == pytest.approx(float((plain * plain).sum(1).mean()), rel=1e-12)
    for rank in range(world):
        got = runs(world)[rank][-1]
        assert sorted(got) == sorted(tuple(s) for s in SPLITS[world])
        for split, (mean, mean_sq) in got.items():
            assert np.array_equal(mean, ref_mean.numpy()) and mean_sq == ref_sq, (world, rank, split)


# MKL chooses its kernels (and so its rounding) by the CPU's instruction set; the selection may
# not depend on that choice. The variable is read when MKL loads, so each family runs the
# world-2 check in a fresh interpreter (the default family is the run above).
OTHER_KERNELS = [pytest.param("AVX2"), pytest.param("SSE4_2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family", OTHER_KERNELS)
def test_bit_identical_under_other_blas_kernels(family):
    import subprocess

    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS=family)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "test_bit_identical_to_single_process and 2", "-m", "not slow"],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, f"MKL_ENABLE_INSTRUCTIONS={family}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "1 passed" in proc.stdout, proc.stdout[-2000:]


def test_ties_across_ranks_go_to_the_lowest_global_index(runs):
    """The ``dup`` pool has every row twice (i and i + N/2, often on different ranks): the first
    pick, a tie between a row and its copy, goes to the row."""
    cases = _cases(2)
    checked = 0
    for i, case in enumerate(cases):
        if case[5] == "dup" and case[3] == "greedy" and case[1] == "partitionsel":
            idx = runs(2)[0][i]["indices"]
            assert idx[0] < N // 2, (case[:6], idx)
            checked += 1
    assert checked >= 6


# ----------------------------------------------------------------------- bytes per rank

POOLS = (64, 256, 1024)


def _bytes_by_pool(rank, world):
    from ds_partitionsel import distributed

    out = {}
    for mode in ("replicated", "sharded"):
        for rule in ("greedy", "rrg"):
            for n in POOLS:
                gen = torch.Generator().manual_seed(n)
                feats = torch.randn(n, 16, generator=gen)
                domains = torch.arange(n) % 4
                target = torch.randn(16, generator=gen)
                budgets = allocate_budgets(torch.bincount(domains), 16)
                lo, hi = rank * n // world, (rank + 1) * n // world
                sel = distributed.select("partitionsel", feats[lo:hi], domains[lo:hi], target,
                                         budgets, mode=mode, rule=rule,
                                         generator=torch.Generator().manual_seed(0))
                out[(mode, rule, n)] = (sel.bytes_sent, sel.info["bytes_received"])
    return out


def test_bytes_per_rank_replicated_grows_with_the_pool_sharded_does_not():
    results = run_ranks(_bytes_by_pool, 2, deepspeed=False)
    for rank, out in enumerate(results):
        for rule in ("greedy", "rrg"):
            rep = [out[("replicated", rule, n)] for n in POOLS]
            shd = [out[("sharded", rule, n)] for n in POOLS]
            # replicated: each rank sends its n/2 rows of 16 float32 + an int64 domain id
            growth = [b - a for (a, _), (b, _) in zip(rep, rep[1:])]
            assert growth == [(b - a) // 2 * (16 * 4 + 8) for a, b in zip(POOLS, POOLS[1:])], rep
            assert rep[-1][1] > 10 * rep[0][1] / 2  # received grows with n too
            assert len({sent for sent, _ in shd}) == 1, (rank, rule, shd)  # independent of n
            assert all(got <= sent for sent, got in shd), shd  # received: bounded by sent
            assert shd[0][0] < rep[-1][0]
    assert all(results[0][key][0] == results[1][key][0] for key in results[0])  # same on all ranks


# ----------------------------------------------------------------------- agreement checks

def _disagreements(rank, world):
    from ds_partitionsel import distributed

    feats, domains, target, budgets = _problem(torch.float32)
    lo, hi = rank * N // world, (rank + 1) * N // world
    shard = (feats[lo:hi], domains[lo:hi], target, budgets)
    errors = {}

    def attempt(name, fn):
        try:
            fn()
            errors[name] = None
        except Exception as exc:  # report type and message to the parent
            errors[name] = (type(exc).__name__, str(exc))

    # rrg with a generator in a different state on rank 1
    seed = 7 + (rank == 1)
    attempt("generator", lambda: distributed.select(
        "partitionsel", *shard, mode="sharded", rule="rrg", step=5,
        generator=torch.Generator().manual_seed(seed)))
    # a different lr on the last rank
    attempt("lr", lambda: distributed.select("partitionsel", *shard, lr=1.0 + (rank == world - 1),
                                             mode="replicated", step=6))
    # an invalid domain id on rank 0 only
    bad = domains[lo:hi].clone()
    if rank == 0:
        bad[0] = 99
    attempt("invalid", lambda: distributed.select("partitionsel", feats[lo:hi], bad, target,
                                                  budgets, mode="sharded", step=7))
    # a result that diverged after selection on rank 2
    sel = distributed.select("partitionsel", *shard, mode="sharded", step=8)
    if rank == 2:
        sel.indices = sel.indices.flip(0)
    attempt("result", lambda: distributed.check_agreement(sel, step=8))
    # and the same selection unchanged passes
    sel = distributed.select("partitionsel", *shard, mode="sharded", step=9)
    attempt("agree", lambda: distributed.check_agreement(sel, step=9))
    return errors


@pytest.mark.slow
def test_disagreement_raises_the_same_error_on_every_rank():
    results = run_ranks(_disagreements, 3, deepspeed=False)
    for name, step in (("generator", 5), ("lr", 6), ("result", 8)):
        errs = [r[name] for r in results]
        assert all(e is not None and e[0] == "SelectionDivergence" for e in errs), (name, errs)
        assert all(f"selection step {step}" in e[1] for e in errs), errs
    assert "different arguments" in results[0]["generator"][1]
    assert "different batches" in results[0]["result"][1]
    invalid = [r["invalid"] for r in results]
    assert all(e is not None and e[0] == "ValueError" for e in invalid), invalid
    assert "domain ids must lie in" in invalid[0][1]
    assert all("rank(s) [0] of 3 rejected their inputs" in e[1] for e in invalid[1:])
    assert all(r["agree"] is None for r in results)


# ----------------------------------------------------------------------- dead and stuck ranks

def _failing_rank(rank, world, port, how, results):
    """Rank ``world - 1`` dies (``exit``) or stalls (``stall``) at its 3rd pick of a sharded
    selection; every rank reports its error (or None) to ``results``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import datetime
    import time

    import torch.distributed as dist

    from ds_partitionsel import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=10))
    feats, domains, target, budgets = _problem(torch.float32)
    lo, hi = rank * N // world, (rank + 1) * N // world
    if rank == world - 1:
        picks = []

        def on_call(frame, event, arg):  # observe the chooser; act at its 3rd call
            if event == "call" and frame.f_code is distributed.ShardedChooser.choose.__code__:
                picks.append(1)
                if len(picks) == 3:
                    if how == "exit":
                        os._exit(1)
                    time.sleep(120)
        sys.setprofile(on_call)
    try:
        distributed.select("partitionsel", feats[lo:hi], domains[lo:hi], target, budgets,
                           mode="sharded", step=42, timeout=5)
    except Exception as exc:
        results.put((rank, type(exc).__name__, str(exc)))
        raise SystemExit(3)
    results.put((rank, None, None))


def _spawn_failing(world, how, bound):
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_failing_rank, args=(r, world, port, how, results))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        reports = {}
        for _ in range(world - 1):
            rank, kind, msg = results.get(timeout=bound)
            reports[rank] = (kind, msg)
        for p in procs[:-1]:
            p.join(timeout=bound)
        codes = [p.exitcode for p in procs[:-1]]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    return reports, codes, procs[-1].exitcode


def test_a_rank_that_dies_mid_selection_ends_the_others():
    reports, codes, dead = _spawn_failing(3, "exit", bound=60)
    assert dead == 1
    # both survivors raised and ended non-zero instead of hanging (3 from the raise, or a signal
    # when gloo's threads abort during interpreter teardown)
    assert all(code is not None and code != 0 for code in codes), codes
    for rank in (0, 1):
        kind, msg = reports[rank]
        assert kind == "CollectiveError" and "selection step 42" in msg, (rank, kind, msg)


@pytest.mark.slow
def test_a_stuck_rank_times_out_with_the_step_in_the_error():
    reports, codes, _ = _spawn_failing(2, "stall", bound=90)
    kind, msg = reports[0]
    assert kind == "CollectiveError", (kind, msg)
    assert "selection step 42" in msg and "timeout 5 s" in msg and "pick 3" in msg, msg
    assert codes[0] is not None and codes[0] != 0, codes


# ----------------------------------------------------------------------- cost model

def test_cost_model_prefers_sharded_for_large_pools_and_replicated_for_slow_links():
    shape = dict(n_max=1 << 17, p=4096, itemsize=4, k=256, world=8)
    mode, est = CostModel().choose(n_total=8 << 17, **shape)
    assert mode == "sharded"
    assert est["sharded"]["bytes_sent"] < est["replicated"]["bytes_sent"] / 100
    # a pool barely larger than the batch over a high-latency link: gathering it is cheaper
    mode, est = CostModel(latency_s=0.05).choose(n_total=8 * 40, n_max=40, p=64, itemsize=4,
                                                  k=256, world=8)
    assert mode == "replicated" and est["replicated"]["rounds"] == 2
    # rounds per step: one packed all-reduce + one broadcast per pick for float32, 3 for float64
    tiny = dict(n_total=8, n_max=1, p=4096, k=256, world=8)
    assert CostModel().estimate("sharded", itemsize=4, **tiny)["rounds"] == 2 * 256
    assert CostModel().estimate("sharded", itemsize=8, **tiny)["rounds"] == 3 * 256


def test_single_process_without_process_group_is_world_of_one():
    from ds_partitionsel import distributed

    feats, domains, target, budgets = _problem(torch.float64)
    ref = select("partitionsel", feats, domains, target, budgets, lr=0.5)
    for mode in ("replicated", "sharded", "auto"):
        sel = distributed.select("partitionsel", feats, domains, target, budgets, lr=0.5, mode=mode)
        assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.weights, ref.weights)
        assert sel.bytes_sent == 0 and sel.info["world_size"] == 1
    with pytest.raises(ValueError, match="unknown option"):
        distributed.select("partitionsel", feats, domains, target, budgets, rules="rrg")
    with pytest.raises(ValueError, match="unknown mode"):
        distributed.select("partitionsel", feats, domains, target, budgets, mode="ring")
    with pytest.raises(ValueError, match="timeout"):
        distributed.select("partitionsel", feats, domains, target, budgets, timeout=0)


# ----------------------------------------------------------------------- one collectives layer

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single",
               "barrier", "send", "recv", "isend", "irecv", "monitored_barrier"}


def test_only_the_collectives_layer_calls_torch_distributed_collectives():
    """Every collective goes through ``ds_partitionsel.collectives`` (device-aware, bounded by a
    timeout, errors naming the step, bytes counted): no other module of the package, launcher
    or tool calls one of ``torch.distributed`` / ``deepspeed.comm`` directly."""
    import ast

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders, scanned = [], 0
    for folder in ("ds_partitionsel", "launch", "tools"):
        for root, _, files in os.walk(os.path.join(repo, folder)):
            for name in files:
                path = os.path.join(root, name)
                if not name.endswith(".py") or path.endswith(os.path.join("ds_partitionsel", "collectives.py")):
                    continue
                scanned += 1
                tree = ast.parse(open(path).read(), path)
                for node in ast.walk(tree):  # calls and references (a collective passed as a callable)
                    if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES \
                            and isinstance(node.value, (ast.Name, ast.Attribute)):
                        owner = ast.unparse(node.value)
                        if owner in ("dist", "torch.distributed", "deepspeed.comm", "comm_module"):
                            offenders.append(f"{os.path.relpath(path, repo)}:{node.lineno} {owner}.{node.attr}")
    assert scanned > 20
    assert not offenders, "direct collectives outside ds_partitionsel/collectives.py:\n" + "\n".join(offenders)
