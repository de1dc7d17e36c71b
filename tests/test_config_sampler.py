"""The partitionsel config block, the stateless pool sampler and the owner-first assignment."""
import pytest
import torch

from ds_partitionsel.config import ConfigError, PartitionSelConfig
from ds_partitionsel.launch_env import map_launcher_env
from ds_partitionsel.sampler import PoolSampler, assign_owner_first, shard_bounds


def test_defaults():
    cfg = PartitionSelConfig.from_dict({})
    # budgets that follow the validation set, Gumbel sampling on the residuals (docs/RESULTS.md)
    assert cfg.method == "partitionsel" and cfg.budget.strategy == "validation" and cfg.budget.floor == 0.25
    assert cfg.rule == "sample" and cfg.temperature == 3.0 and cfg.validation.ema == 0.0
    assert cfg.use_weights is False and cfg.sketch.modules == 3 and cfg.sketch.normalize is True
    assert cfg.pool_factor == 8


def test_nested_blocks_are_typed():
    cfg = PartitionSelConfig.from_dict({"sketch": {"mode": "kron", "dim": 256}, "rule": "rrg"})
    assert cfg.sketch.mode == "kron" and cfg.sketch.dim == 256 and cfg.rule == "rrg"
    assert cfg.to_dict()["sketch"]["dim"] == 256


@pytest.mark.parametrize("block, message", [
    ({"methd": "random"}, r"unknown key\(s\) 'methd' in partitionsel; valid keys: .*method"),
    ({"sketch": {"mdoe": "kron"}}, r"unknown key\(s\) 'mdoe' in partitionsel.sketch; valid keys: .*mode"),
    ({"method": "best"}, "partitionsel.method = 'best' is not valid; choose one of: partitionsel"),
    ({"mode": "fast"}, "partitionsel.mode"),
    ({"pool_factor": 0}, "pool_factor must be a positive integer"),
    ({"validation": {"anchors": -1}}, "validation.anchors"),
    ({"budget": {"strategy": "fractions"}}, "needs partitionsel.budget.fractions"),
    ({"sketch": "kron"}, "partitionsel.sketch must be a JSON object"),
    ({"ridge": -1.0}, "ridge"),
])
def test_bad_config_is_rejected_with_a_message_that_names_the_key(block, message):
    with pytest.raises(ConfigError, match=message):
        PartitionSelConfig.from_dict(block)


def test_values_keep_their_json_types_and_overrides_parse_with_the_key_type():
    from ds_partitionsel.config import apply_override, config_differences

    block = {}
    for item in ["use_weights=False", "nonneg=true", "seed=9", "sketch.mode=kron", "sketch.kron_dims=[4, 8]",
                 'budget.minority_domains=["code"]', "budget.strategy=minority_full", "ridge=0.5"]:
        apply_override(block, item)
    cfg = PartitionSelConfig.from_dict(block)
    assert cfg.use_weights is False and cfg.nonneg is True and cfg.seed == 9 and cfg.ridge == 0.5
    assert cfg.sketch.mode == "kron" and cfg.sketch.kron_dims == [4, 8]
    assert cfg.budget.minority_domains == ["code"]
    # the resume comparison names dotted keys and ignores logging / timeout keys
    other = PartitionSelConfig.from_dict({**block, "seed": 10, "timeout_s": 5.0, "eval_interval": 3})
    assert config_differences(cfg.to_dict(), other.to_dict()) == ["seed: 9 -> 10"]


def test_sketch_proxy_and_head_chunk_keys_are_typed():
    from pathlib import Path

    cfg = PartitionSelConfig.from_dict({"sketch": {"proxy_model": Path("/models/small"), "proxy_layers": 2,
                                                   "proxy_train": True, "proxy_lr": 0.01, "head_chunk": 64}})
    assert cfg.sketch.proxy_model == "/models/small" and cfg.sketch.head_chunk == 64
    assert PartitionSelConfig.from_dict({}).sketch.head_chunk == "auto"
    for block, message in [({"head_chunk": 0}, "sketch.head_chunk must be"), ({"proxy_lr": -1.0}, "proxy_lr"),
                           ({"proxy_train": "yes"}, "proxy_train must be true or false"),
                           ({"proxy_layers": 1.5}, "proxy_layers")]:
        with pytest.raises(ConfigError, match=message):
            PartitionSelConfig.from_dict({"sketch": block})


def test_pools_are_a_function_of_seed_and_step_only():
    a, b = PoolSampler(1000, 64, seed=3), PoolSampler(1000, 64, seed=3)
    steps = [0, 5, 15, 16, 40, 7]
    pools_a = [a.pool(s) for s in steps]
    pools_b = [b.pool(s) for s in reversed(steps)][::-1]  # other order: same pools (stateless)
    for x, y in zip(pools_a, pools_b):
        assert torch.equal(x, y)
    # one epoch covers distinct records; the next epoch is a new permutation
    epoch0 = torch.cat([a.pool(s) for s in range(a.steps_per_epoch)])
    assert epoch0.unique().numel() == epoch0.numel() == 64 * (1000 // 64)
    assert not torch.equal(a.pool(0), a.pool(a.steps_per_epoch))
    assert not torch.equal(a.pool(0), PoolSampler(1000, 64, seed=4).pool(0))


def test_pool_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="fewer than one pool"):
        PoolSampler(10, 64, seed=0)


def test_shards_are_contiguous_and_balanced():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_owner_first_assignment_keeps_owned_samples_and_balances():
    bounds = shard_bounds(16, 2)  # rank 0 owns 0..7, rank 1 owns 8..15
    shares = assign_owner_first([1, 2, 3, 4, 5, 9], bounds, per_rank=3)
    assert shares == [[1, 2, 3], [9, 4, 5]]
    for world in (1, 2, 4):
        sel = list(range(0, 32, 2))
        shares = assign_owner_first(sel, shard_bounds(32, world), 16 // world)
        assert sorted(sum(shares, [])) == sel
        assert all(len(s) == 16 // world for s in shares)
    with pytest.raises(ValueError, match="cannot be split"):
        assign_owner_first([1, 2, 3], bounds, per_rank=2)


@pytest.mark.parametrize("env, kind, expect", [
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, "mpi", ("1", "2", "1")),
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"}, "mpi", ("3", "4", "1")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, "slurm", ("5", "8", "1")),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, "env", ("0", "2", "0")),
    ({}, "single", ("0", "1", "0")),
])
def test_launcher_variables_map_to_torch_distributed_on_loopback(env, kind, expect):
    env = dict(env)
    assert map_launcher_env(env=env) == kind
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == expect
    assert env["MASTER_ADDR"] == "127.0.0.1"


def test_lockstep_chunks_pad_every_rank_to_the_same_forwards():
    from ds_partitionsel.sampler import lockstep_chunks

    assert list(lockstep_chunks([5, 6, 7], 5, 2, 9)) == [([5, 6], 2), ([7, 9], 1), ([9], 0)]
    assert list(lockstep_chunks([], 3, 2, 0)) == [([0, 0], 0), ([0], 0)]
    assert list(lockstep_chunks([1, 2], 2, 4, 0)) == [([1, 2], 2)]
