"""Selection that can follow the validation set: budget rules, Gumbel sampling on the OMP
residuals, the EMA target. Each rule against an independent computation."""
import math
import random

import pytest
import torch

from ds_partitionsel.budgets import allocate_budgets
from ds_partitionsel.config import ConfigError, PartitionSelConfig
from ds_partitionsel.selection import select
from ds_partitionsel.solver import spread, spread_from, spread_moments
from real_pool import build_real_pool


# ----------------------------------------------------------------------------- budgets

def _reference_validation(counts, target, k, floor_num, floor_den):
    """Integer-only reference of the ``validation`` rule: shares over one common denominator,
    floors + largest remainders (ties to the lower id), capped at n_j, leftovers to the
    furthest-behind domain with spare candidates."""
    n_total = sum(counts)
    target = [t if c > 0 else 0 for t, c in zip(target, counts)]
    if sum(target) == 0:
        target = list(counts)
    t_total = sum(target)
    # s_j * (den * N * T) = num * n_j * T + (den - num) * t_j * N
    weights = [floor_num * c * t_total + (floor_den - floor_num) * t * n_total for c, t in zip(counts, target)]
    scale = sum(weights)
    quotas = [(w * k) // scale for w in weights]
    remainders = [(w * k) % scale for w in weights]
    order = sorted(range(len(counts)), key=lambda j: (-remainders[j], j))
    for j in order[: k - sum(quotas)]:
        quotas[j] += 1
    capped = [min(b, c) for b, c in zip(quotas, counts)]
    while sum(capped) < k:
        _, j = min((b, j) for j, b in enumerate(capped) if capped[j] < counts[j])
        capped[j] += 1
    return capped


@pytest.mark.parametrize("seed", range(40))
def test_validation_budgets_equal_an_integer_reference(seed):
    rng = random.Random(seed)
    d = rng.randint(2, 6)
    counts = [rng.choice([0, 1, 3, 10, 40, rng.randint(0, 200)]) for _ in range(d)]
    if sum(counts) == 0:
        counts[0] = 5
    target = [rng.choice([0, 1, 5, 80, rng.randint(0, 50)]) for _ in range(d)]
    k = rng.randint(1, sum(counts))
    floor_num, floor_den = rng.choice([(0, 4), (1, 4), (1, 2), (4, 4), (1, 10), (3, 8)])
    got = allocate_budgets(counts, k, "validation", target_counts=target, floor=floor_num / floor_den)
    assert got.tolist() == _reference_validation(counts, target, k, floor_num, floor_den), (counts, target, k)
    assert int(got.sum()) == k and all(0 <= b <= c for b, c in zip(got.tolist(), counts))


def test_validation_budgets_follow_the_target_and_keep_the_floor():
    counts = [96, 24, 8]          # the pool: 75% / 19% / 6%
    target = [10, 10, 80]         # the validation set asks for the third domain
    got = allocate_budgets(counts, 16, "validation", target_counts=target, floor=0.25).tolist()
    assert got[2] == 8            # all 8 candidates of the asked-for domain (its share is 62%)
    prop = allocate_budgets(counts, 16, "proportional").tolist()
    assert got[2] > prop[2]
    # with the floor every domain keeps at least a quarter of its proportional quota
    assert all(b >= math.floor(0.25 * c * 16 / sum(counts)) for b, c in zip(got, counts))
    # a target that matches the pool gives proportional quotas (largest remainder)
    assert allocate_budgets(counts, 16, "validation", target_counts=counts, floor=0.25).tolist() == [12, 3, 1]
    # floor 1: the pool's own mix, whatever the target
    assert allocate_budgets(counts, 16, "validation", target_counts=target, floor=1.0).tolist() == [12, 3, 1]


def _reference_systematic(quotas, u):
    """Floors, then a unit for each point u + i inside a domain's stretch of the cumulated
    fractional parts (floating point; quotas chosen so that no point sits on a boundary)."""
    out, start = [], 0.0
    for q in quotas:
        frac = q - math.floor(q)
        end = start + frac
        hits = sum(1 for i in range(-1, len(quotas) + 2) if start <= u + i < end)
        out.append(math.floor(q) + hits)
        start = end
    return out


def test_stochastic_rounding_is_unbiased_and_seeded():
    counts, target = [100, 20, 8], [100, 20, 8]
    # largest remainder at a batch of 4: the smallest domain's quota (0.25 + ...) never wins a slot
    lr = allocate_budgets(counts, 4, "validation", target_counts=target, floor=0.25)
    assert lr.tolist()[2] == 0
    rng = random.Random(0)
    total = [0, 0, 0]
    n = 3000
    for _ in range(n):
        draw = rng.randrange(2 ** 53)
        b = allocate_budgets(counts, 4, "validation", target_counts=target, floor=0.25,
                             rounding="stochastic", draw=draw).tolist()
        assert sum(b) == 4
        quotas = [4 * c / 128 for c in counts]
        assert b == _reference_systematic(quotas, draw / 2 ** 53)
        total = [t + x for t, x in zip(total, b)]
    for t, c in zip(total, counts):
        assert abs(t / n - 4 * c / 128) < 0.03, (total, counts)
    with pytest.raises(ValueError, match="needs draw"):
        allocate_budgets(counts, 4, "validation", target_counts=target, rounding="stochastic")


def test_selector_stochastic_rounding_draws_per_step(tiny):
    a = _selector(tiny, {"budget": {"rounding": "stochastic"}})
    b = _selector(tiny, {"budget": {"rounding": "stochastic"}})
    plans = [a.plan(s).budgets for s in range(6)]
    assert all(torch.equal(p, b.plan(s).budgets) for s, p in enumerate(plans))  # seeded by the step
    assert all(int(p.sum()) == 4 for p in plans)


def test_zero_fractions_get_no_slot_while_the_others_have_candidates(caplog):
    # quotas 6.4 / 1.6 / 0 of 8; domain 0 holds 1 candidate: its 5 spare slots go to domain 1
    # (fraction 0.2), never to domain 2 (fraction 0), though domain 2 is furthest behind
    assert allocate_budgets([1, 10, 10], 8, "fractions", fractions=[0.8, 0.2, 0.0]).tolist() == [1, 7, 0]
    # the batch must be full: only when the others run out does a zero-fraction domain fill it
    assert allocate_budgets([1, 2, 10], 8, "fractions", fractions=[0.5, 0.5, 0.0]).tolist() == [1, 2, 5]
    # other strategies hand spare slots to whoever is furthest behind, as before
    assert allocate_budgets([1, 10, 10], 8, "minority_full", minority_domains=[0]).tolist() == [1, 4, 3]


def test_forced_zero_fraction_slots_are_logged_and_every_record_holds_its_budgets(tiny, caplog):
    import logging

    from ds_partitionsel.records import step_record

    # a pool of one batch: domain 0 (a third of the data) cannot fill a batch of 4 alone
    sel = _selector(tiny, {"pool_factor": 1, "budget": {"strategy": "fractions", "fractions": [1.0, 0.0, 0.0]}})
    plan = sel.plan(0)
    assert plan.budgets.tolist()[1:] != [0, 0]
    with caplog.at_level(logging.WARNING, logger="ds_partitionsel"):
        selection = sel.select(0, lr=1e-3)
    assert "budget.fractions" in caplog.text and "fewer than the batch" in caplog.text
    record = step_record(selection, train_loss=1.0, lr=1e-3, pool_size=sel.pool_size, time_train=0.0,
                         log_conflicts=False).to_json()
    assert list(record["budgets"].values()) == plan.budgets.tolist()
    assert list(record["budgets"]) == list(record["domain_counts"])


def test_curriculum_budgets_against_a_float_reference():
    counts = [64, 64, 64, 64]
    # equal gains: uniform budgets
    assert allocate_budgets(counts, 16, "curriculum", gains=[0.1] * 4, floor=0.0).tolist() == [4, 4, 4, 4]
    gains = [0.3, -0.1, 0.0, 0.2]
    mean = sum(gains) / 4
    std = math.sqrt(sum((g - mean) ** 2 for g in gains) / 4)
    raw = [min(max(16 / 4 - (16 / 2.0) * (g - mean) / std, 0.0), 64) for g in gains]
    shares = [r / sum(raw) for r in raw]
    quotas = [s * 16 for s in shares]
    got = allocate_budgets(counts, 16, "curriculum", gains=gains, floor=0.0, lam=2.0).tolist()
    assert sum(got) == 16 and all(abs(b - q) < 1 for b, q in zip(got, quotas)), (got, quotas)
    assert got[1] == max(got)  # the official rule gives the lowest gain the largest budget
    with pytest.raises(ValueError, match="one gain per domain"):
        allocate_budgets(counts, 16, "curriculum", gains=[0.1])
    with pytest.raises(ValueError, match="target_counts"):
        allocate_budgets(counts, 16, "validation")


# ----------------------------------------------------------------------------- Gumbel sampling

def _problem(n=96, p=12, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n, p, generator=gen), dim=1)
    domains = torch.randint(0, d, (n,), generator=gen)
    target = torch.randn(p, generator=gen)
    budgets = allocate_budgets(torch.bincount(domains, minlength=d), 12)
    return feats, domains, target, budgets


def test_sample_rule_is_the_greedy_at_low_temperature_and_keeps_budgets():
    feats, domains, target, budgets = _problem()
    greedy = select("partitionsel", feats, domains, target, budgets, lr=0.5)
    cold = select("partitionsel", feats, domains, target, budgets, lr=0.5, rule="sample", temperature=1e-9,
                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(cold.indices, greedy.indices) and torch.equal(cold.weights, greedy.weights)
    for t in (0.3, 1.0, 30.0):
        sel = select("partitionsel", feats, domains, target, budgets, lr=0.5, rule="sample", temperature=t,
                     generator=torch.Generator().manual_seed(3))
        assert torch.equal(sel.domain_counts, budgets) and len(set(sel.indices.tolist())) == 12


def test_sample_rule_same_seed_same_picks_and_temperature_is_scale_free():
    feats, domains, target, budgets = _problem(seed=1)
    runs = [select("partitionsel", feats, domains, target, budgets, lr=0.5, rule="sample",
                   generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0].indices, runs[1].indices)
    assert not torch.equal(runs[0].indices, runs[2].indices)
    # scaling the residuals (another learning rate, another feature scale) changes nothing
    # where the residuals scale linearly: gradmatch's a = G v and Q = G G^T
    base = select("gradmatch", feats, domains, target, budgets, rule="sample",
                  generator=torch.Generator().manual_seed(5))
    scaled = select("gradmatch", feats, domains, 8.0 * target, budgets, rule="sample",
                    generator=torch.Generator().manual_seed(5))
    assert torch.equal(base.indices, scaled.indices)


def test_hot_sampling_approaches_uniform_within_budgets():
    feats, domains, target, budgets = _problem(n=48, seed=2)
    hits = torch.zeros(48)
    trials = 300
    for s in range(trials):
        sel = select("partitionsel", feats, domains, target, budgets, lr=0.5, rule="sample", temperature=1e6,
                     generator=torch.Generator().manual_seed(s))
        hits[sel.indices] += 1
    for j in range(3):
        members = (domains == j).nonzero().flatten()
        expected = trials * int(budgets[j]) / members.numel()
        # every candidate of a domain is drawn at about the same rate (within 5 sigma)
        sigma = math.sqrt(expected)
        assert (hits[members] - expected).abs().max() < 5 * sigma + 1, (j, hits[members], expected)


def test_spread_is_exact_in_any_order_and_split():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1001, generator=gen, dtype=torch.float64) * 3 + 1
    x[17] = -math.inf
    s = spread(x)
    finite = x[torch.isfinite(x)]
    assert s == pytest.approx(float(finite.std(unbiased=False)), rel=1e-5)
    perm = x[torch.randperm(x.numel(), generator=gen)]
    assert spread(perm) == s
    scale = float(finite.abs().max())
    halves = spread_moments(x[:400], scale) + spread_moments(x[400:], scale)
    assert spread_from(scale, halves) == s


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("block, message", [
    ({"rule": "sample", "temperature": 0}, "temperature must be a finite number > 0"),
    ({"temperature": "hot"}, "temperature must be"),
    ({"budget": {"floor": 1.5}}, r"budget.floor must be a number in \[0, 1\]"),
    ({"budget": {"curriculum_beta": 1.0}}, "curriculum_beta must be a number in"),
    ({"budget": {"curriculum_lambda": -1}}, "curriculum_lambda must be a finite number > 0"),
    ({"validation": {"ema": 1.0}}, r"validation.ema must be a number in \[0, 1\)"),
    ({"budget": {"rounding": "nearest"}}, "budget.rounding = 'nearest' is not valid; choose one of: largest_remainder"),
])
def test_new_keys_refuse_bad_values(block, message):
    with pytest.raises(ConfigError, match=message):
        PartitionSelConfig.from_dict(block)


def test_defaults_follow_the_validation_set_and_sample():
    cfg = PartitionSelConfig.from_dict({})
    assert (cfg.budget.strategy, cfg.rule) == ("validation", "sample")


# ----------------------------------------------------------------------------- the selector

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_partitionsel.data import CandidatePool

    real = build_real_pool(tmp_path_factory.mktemp("q") / "real", per_domain=24, valid_per_domain=12, max_length=200)
    pool, valid = CandidatePool(real["pool"], "train"), CandidatePool(real["pool"], "valid")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    return model, pool, valid


def _selector(tiny, block, valid=None):
    from ds_partitionsel.selector import Selector

    model, pool, default_valid = tiny
    cfg = PartitionSelConfig.from_dict(dict({"validation": {"anchors": 4}, "pool_factor": 4,
                                             "sketch": {"modules": 1}}, **block))
    return Selector(model, cfg, pool, valid or default_valid, batch_size=4, pad_token_id=0)


def test_ema_target_is_the_moving_average_and_resumes(tiny):
    plain = _selector(tiny, {})
    ema = _selector(tiny, {"validation": {"anchors": 4, "ema": 0.75}})
    fresh = [plain.validation_target(s).double() for s in range(3)]
    expected = fresh[0]
    assert torch.allclose(ema.validation_target(0).double(), expected)
    for s in (1, 2):
        expected = 0.75 * expected + 0.25 * fresh[s]
        assert torch.allclose(ema.validation_target(s).double(), expected, atol=1e-6)
    # a selector resumed from the state at step 2 continues with the same targets and picks
    resumed = _selector(tiny, {"validation": {"anchors": 4, "ema": 0.75}})
    resumed.load_state_dict(ema.state_dict())
    a, b = ema.select(3, 1e-3, with_features=False), resumed.select(3, 1e-3, with_features=False)
    assert torch.equal(a.record_ids, b.record_ids)
    assert torch.equal(ema._target, resumed._target)


def test_validation_budgets_follow_the_anchor_view(tiny):
    model, pool, valid = tiny
    names = pool.domain_names
    counts = valid.domain_counts().tolist()
    sel = _selector(tiny, {})
    assert sel.target_counts() == counts
    per_domain = _selector(tiny, {"validation": {"anchors": 4, "mix": "per_domain"}})
    assert per_domain.target_counts() == [1 if c else 0 for c in counts]
    plan = sel.plan(0)
    pool_counts = torch.bincount(pool.domains[plan.pool_ids], minlength=len(names))
    expect = allocate_budgets(pool_counts, 4, "validation", target_counts=counts, floor=0.25)
    assert torch.equal(plan.budgets, expect)


def test_curriculum_gains_travel_in_the_state(tiny):
    a = _selector(tiny, {"budget": {"strategy": "curriculum"}})
    for s in range(3):
        a.select(s, 1e-3, with_features=False)
    state = a.state_dict()
    assert len(state["gains"]) == len(tiny[1].domain_names) and any(g != 0 for g in state["gains"])
    b = _selector(tiny, {"budget": {"strategy": "curriculum"}})
    b.load_state_dict(state)
    assert torch.equal(a.plan(3).budgets, b.plan(3).budgets)
    assert torch.equal(a.select(3, 1e-3, with_features=False).record_ids,
                       b.select(3, 1e-3, with_features=False).record_ids)


def test_a_diverged_model_is_named_not_blamed_on_budgets():
    from ds_partitionsel import distributed

    features = torch.randn(12, 8, dtype=torch.float64)
    features[:9] = float("nan")  # 3 finite candidates left for a batch of 4
    domains = torch.tensor([0, 1, 2] * 4)
    with pytest.raises(ValueError, match="9 of 12 candidates are not finite.*probably diverged"):
        distributed.select("partitionsel", features, domains, torch.randn(8, dtype=torch.float64),
                           torch.tensor([2, 1, 1]), lr=1e-3, drop_nonfinite=True, step=7,
                           generator=torch.Generator().manual_seed(0), rule="sample")


# ----------------------------------------------------------------------------- validation.shrink

def _reference_shrink(anchors, weights, pool):
    """Positive-part James-Stein in numpy: the anchors' weighted mean shrunk toward the pool's
    mean by the share of their squared distance that its noise does not explain."""
    import numpy as np

    a = (np.asarray(weights)[:, None] * anchors).sum(0)
    c = pool.mean(0)
    n = len(pool)
    sigma2 = ((pool - c) ** 2).sum(1).sum() / (n - 1)
    noise = sigma2 * ((np.asarray(weights) ** 2).sum() + 1 / n)
    dist2 = ((a - c) ** 2).sum()
    lam = max(0.0, 1 - noise / dist2)
    return c + lam * (a - c), lam


@pytest.mark.parametrize("shift", [0.0, 0.3, 3.0])
def test_shrink_target_equals_a_numpy_reference(shift):
    from ds_partitionsel.collectives import Communicator
    from ds_partitionsel.shrink import pool_moments, shrink_target

    gen = torch.Generator().manual_seed(11)
    pool = torch.randn(200, 24, generator=gen, dtype=torch.float64) + 0.5
    anchors = torch.randn(16, 24, generator=gen, dtype=torch.float64) + 0.5 + shift * torch.linspace(-1, 1, 24)
    weights = [1 / 16] * 16
    mean, mean_sq = pool_moments(pool, 200, Communicator())
    got, lam = shrink_target((anchors * (1 / 16)).sum(0), mean, mean_sq, 200, sum(w * w for w in weights))
    want, want_lam = _reference_shrink(anchors.numpy(), weights, pool.numpy())
    assert lam == pytest.approx(want_lam, abs=1e-9)
    assert torch.allclose(got, torch.from_numpy(want), atol=1e-9)
    # the same distribution: mostly noise, little kept; a real shift: nearly all kept
    assert {0.0: lam < 0.5, 0.3: 0.3 < lam < 1, 3.0: lam > 0.95}[shift], lam


def test_selector_shrinks_toward_its_pool_and_selects_the_same_twice(tiny):
    import numpy as np

    model, pool, valid = tiny
    a = _selector(tiny, {"validation": {"anchors": 4, "shrink": True}})
    b = _selector(tiny, {"validation": {"anchors": 4, "shrink": True}})
    plain = _selector(tiny, {})
    for step in (0, 1):
        first = a.select(step, 1e-3, with_features=False)
        # independent: the pool's sketches and the anchors' target of the plain selector
        feats = plain.sketch_records(pool, plain.plan(step).pool_ids.tolist()).double().numpy()
        ids, weights, divisor = plain.anchor_draw(step)
        anchors = plain.sketch_records(valid, ids).double().numpy()
        _, lam = _reference_shrink(anchors, [w / divisor for w in weights], feats)
        assert a.last_shrink == pytest.approx(lam, abs=1e-6) and 0 <= a.last_shrink <= 1
        assert torch.equal(first.record_ids, b.select(step, 1e-3, with_features=False).record_ids)
        assert np.isfinite(a.last_shrink)


def test_shrink_refuses_preconditioned_candidates():
    with pytest.raises(ConfigError, match="validation.shrink.*sketch.precondition 'adam'"):
        PartitionSelConfig.from_dict({"validation": {"shrink": True}, "sketch": {"precondition": "adam"}})
    with pytest.raises(ConfigError, match="validation.shrink must be true or false"):
        PartitionSelConfig.from_dict({"validation": {"shrink": "yes"}})
