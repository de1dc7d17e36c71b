"""Tampered or hand-made pools, and the Python API's boundaries (issue 26).

Reading a pool: a shard whose domain table was reordered is refused on open (the per-domain
record counts of the split no longer match the manifest) and, where the counts happen to agree,
still changes the pool fingerprint a resume compares; a shard ``dir`` leaving the pool, a domain
listed twice, an object-dtype array, a shard entry without ``dir`` and records under two tokens
are clear ``PoolFormatError``s; a tokenizer folder with custom code is never run.

API: float/bool indices, a float batch size, a negative step, a pad id past the vocabulary and a
validation split of another pool are refused where they enter, never truncated or accepted.

Real pools: the demo records tokenized with a tiny byte-level BPE (the corpus fixture of
test_build_bad_input), built by tools/build_pool.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_partitionsel import pool_format as pf
from ds_partitionsel.config import ConfigError, PartitionSelConfig
from ds_partitionsel.data import CandidatePool, PoolFormatError
from ds_partitionsel.runs import pool_fingerprint
from ds_partitionsel.sampler import PoolSampler
from real_pool import REPO
from test_build_bad_input import corpus, run, write_jsonl  # noqa: F401


@pytest.fixture(scope="module")
def pools(corpus, tmp_path_factory):
    """``balanced``: train records alternate code/math, 4 per shard (2 of each) -> every shard's
    table is [code, math] with equal counts; ``sharded``: the demo records (code, math,
    molecules; unequal counts per shard) in shards of 5; both with a validation split."""
    root = tmp_path_factory.mktemp("pools")
    recs = corpus["records"]["train"]
    code = [r for r in recs if r["domain"] == "code"]
    math_ = [r for r in recs if r["domain"] == "math"]
    balanced = write_jsonl(root / "balanced.jsonl", [r for pair in zip(code, math_) for r in pair])
    valid = write_jsonl(root / "valid.jsonl", [r for r in corpus["records"]["valid"] if r["domain"] != "molecules"])
    out = {}
    assert run(corpus, root / "balanced", "--max-length", 4096, "--shard-docs", 4, train=[balanced],
               valid=[valid]) == 0
    out["balanced"] = root / "balanced"
    assert run(corpus, root / "sharded", "--max-length", 4096, "--shard-docs", 5, valid=[corpus["valid"]]) == 0
    out["sharded"] = root / "sharded"
    return out


@pytest.fixture
def copy_of(pools, tmp_path):
    def make(name):
        dst = tmp_path / name
        shutil.copytree(pools[name], dst)
        return dst
    return make


def edit_manifest(pool: Path, change) -> None:
    manifest = json.loads((pool / pf.MANIFEST).read_text())
    change(manifest)
    (pool / pf.MANIFEST).write_text(json.dumps(manifest, indent=1))


def replace_array(pool: Path, split: str, shard: int, name: str, array, allow_pickle=False) -> None:
    """Write ``array`` as shard ``shard``'s ``name`` and record it in the manifest as the builder
    would (size, hash, dtype, shape): only the content is wrong, not the bookkeeping."""
    manifest = json.loads((pool / pf.MANIFEST).read_text())
    entry = manifest["splits"][split]["shards"][shard]
    path = pool / split / entry["dir"] / name
    np.save(path, array, allow_pickle=allow_pickle)
    entry["files"][name] = {"dtype": np.asarray(array).dtype.str, "shape": list(np.shape(array)),
                            "bytes": os.path.getsize(path), "sha256": pf.sha256_file(path)}
    (pool / pf.MANIFEST).write_text(json.dumps(manifest, indent=1))


# ----------------------------------------------------------------------------- item 6: domain tables


def test_reordered_shard_domain_table_is_refused_on_open(copy_of):
    pool = copy_of("sharded")
    shards = pf.read_manifest(pool)["splits"]["train"]["shards"]
    k = next(i for i, s in enumerate(shards) if len(s["domains"]) >= 2)
    arrays = pf.open_shard(pool, pf.read_manifest(pool), dict(shards[k], dir=f"train/{shards[k]['dir']}"))
    counts = np.bincount(np.asarray(arrays["domains"]), minlength=len(shards[k]["domains"]))
    assert counts[0] != counts[1]  # so that swapping the first two names changes the split's counts
    first, second = shards[k]["domains"][:2]

    def swap(m):
        table = m["splits"]["train"]["shards"][k]["domains"]
        table[0], table[1] = table[1], table[0]

    edit_manifest(pool, swap)
    for verify in (False, True):
        with pytest.raises(PoolFormatError) as e:
            CandidatePool(pool, split="train", verify=verify)
        assert f"split 'train': per-domain record counts disagree with the manifest ({first!r}:" in str(e.value)
        assert "a shard's domain table or domains.npy was changed" in str(e.value)
    assert len(CandidatePool(pool, split="valid")) > 0  # the untouched split still opens


def test_reordered_table_with_equal_counts_changes_the_fingerprint(pools, copy_of):
    """Counts cannot see a swap of two domains with equal counts: the fingerprint (which a resume
    compares) must."""
    original = CandidatePool(pools["balanced"], split="train")
    pool = copy_of("balanced")
    assert pf.read_manifest(pool)["splits"]["train"]["shards"][0]["domains"] == ["code", "math"]
    edit_manifest(pool, lambda m: m["splits"]["train"]["shards"][0].update(domains=["math", "code"]))
    tampered = CandidatePool(pool, split="train")
    assert tampered.domain_counts().tolist() == original.domain_counts().tolist()
    assert tampered.domains.tolist() != original.domains.tolist()  # records relabelled ...
    assert pool_fingerprint(tampered) != pool_fingerprint(original)  # ... and the identity says so
    assert pool_fingerprint(CandidatePool(pools["balanced"], split="train")) == pool_fingerprint(original)


# ----------------------------------------------------------------------------- poor: pool files


def test_shard_dir_leaving_the_pool_is_refused(copy_of, tmp_path):
    pool = copy_of("sharded")
    outside = tmp_path / "elsewhere"
    shutil.copytree(pool / "train" / "shard-00000", outside)  # valid arrays, outside the pool
    edit_manifest(pool, lambda m: m["splits"]["train"]["shards"][0].update(dir="../../elsewhere"))
    with pytest.raises(PoolFormatError, match=r"'dir' '\.\./\.\./elsewhere' leaves the split folder"):
        CandidatePool(pool, split="train")
    # the same through a symbolic link inside the pool
    pool2 = copy_of("balanced")
    shard = pool2 / "train" / "shard-00000"
    shutil.rmtree(shard)
    shard.symlink_to(outside)
    with pytest.raises(PoolFormatError, match="outside the pool"):
        CandidatePool(pool2, split="train")


def test_domain_listed_twice(copy_of):
    pool = copy_of("sharded")
    edit_manifest(pool, lambda m: m.update(domains=m["domains"] + [m["domains"][0]]))
    with pytest.raises(PoolFormatError, match=r"'domains' lists \['code'\] more than once"):
        CandidatePool(pool, split="train")
    pool = copy_of("balanced")
    edit_manifest(pool, lambda m: m["splits"]["train"]["shards"][1].update(domains=["code", "code"]))
    with pytest.raises(PoolFormatError, match=r"shard 1: its domain table lists \['code'\] more than once"):
        CandidatePool(pool, split="train")


def test_object_array_is_a_format_error_not_a_traceback(copy_of):
    pool = copy_of("sharded")
    n = pf.read_manifest(pool)["splits"]["train"]["shards"][0]["num_records"]
    replace_array(pool, "train", 0, "domains.npy", np.array([0] * n, dtype=object), allow_pickle=True)
    with pytest.raises(PoolFormatError, match="is not a plain .npy array .*never pickled objects"):
        CandidatePool(pool, split="train")
    # a plain array of the wrong type is named too
    pool = copy_of("balanced")
    n = pf.read_manifest(pool)["splits"]["train"]["shards"][0]["num_records"]
    replace_array(pool, "train", 0, "domains.npy", np.zeros(n, dtype=np.float64))
    with pytest.raises(PoolFormatError, match="holds float64 values, expected int32"):
        CandidatePool(pool, split="train")


@pytest.mark.parametrize("key", ["dir", "files", "domains", "num_records"])
def test_shard_entry_without_a_key(copy_of, key):
    pool = copy_of("sharded")
    edit_manifest(pool, lambda m: m["splits"]["train"]["shards"][2].pop(key))
    with pytest.raises(PoolFormatError, match=f"manifest split 'train', shard 2 has no valid '{key}'"):
        CandidatePool(pool, split="train")


def test_records_under_two_tokens_are_refused_on_open(copy_of):
    pool = copy_of("sharded")
    manifest = pf.read_manifest(pool)
    offsets = np.load(pool / "train" / "shard-00000" / "offsets.npy").copy()
    offsets[1] = offsets[0]  # record 0 now holds no token (record 1 takes its tokens)
    replace_array(pool, "train", 0, "offsets.npy", offsets)
    assert manifest["splits"]["train"]["shards"][0]["num_records"] == len(offsets) - 1
    with pytest.raises(PoolFormatError, match="record 0 holds 0 token.*fewer than the 2 a training target needs"):
        CandidatePool(pool, split="train")


def test_tokenizer_with_custom_code_is_never_run(corpus, tmp_path):
    """A tokenizer folder whose config asks for custom code: transformers would ask 'run the custom
    code? [y/N]' on stdin; load_tokenizer must not ask, and must not run it even when stdin says y."""
    tok = tmp_path / "tok"
    shutil.copytree(corpus["tok"], tok)
    marker = tmp_path / "custom_code_ran"
    (tok / "custom_tok.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["custom_tok.CustomTokenizer", "custom_tok.CustomTokenizer"]}
    cfg["tokenizer_class"] = "CustomTokenizer"  # no class of transformers: only the custom code has it
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    code = ("import sys\nfrom ds_partitionsel.pool_format import load_tokenizer\n"
            f"try:\n    load_tokenizer({str(tok)!r})\nexcept ValueError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], input="y\ny\n", capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    assert not marker.exists()
    assert proc.stdout.startswith(f"refused: could not load a tokenizer from {str(tok)!r}"), proc.stdout
    assert "custom code" in proc.stdout


# ----------------------------------------------------------------------------- poor: the API


def test_indices_must_be_integers(pools):
    pool = CandidatePool(pools["sharded"], split="train")
    assert pool[np.int64(1)]["input_ids"].tolist() == pool[1]["input_ids"].tolist()
    assert pool[torch.tensor(2)]["domain"] == pool[2]["domain"]
    for bad in (1.7, 1.0, True, torch.tensor(1.0), np.float32(2)):
        with pytest.raises(TypeError, match="a pool index must be an integer"):
            pool[bad]
    with pytest.raises(TypeError, match="a pool index must be an integer, got 0.5"):
        pool.collate([0, 0.5], pad_token_id=0)
    with pytest.raises(TypeError, match="a pool index must be an integer"):
        pool.collate(torch.tensor([0.0, 1.0]), pad_token_id=0)
    assert pool.collate(torch.tensor([0, 1]), pad_token_id=0)["input_ids"].shape[0] == 2


def test_negative_step_and_float_sizes(pools):
    from ds_partitionsel.sampler import as_int

    sampler = PoolSampler(24, 8, seed=1)
    with pytest.raises(ValueError, match="step must be >= 0 .* got -1"):
        sampler.pool(-1)
    with pytest.raises(TypeError, match="step must be an integer, got 1.5"):
        sampler.pool(1.5)
    with pytest.raises(TypeError, match="pool_size must be an integer, got 8.0"):
        PoolSampler(24, 8.0, seed=1)
    assert sampler.pool(np.int64(2)).tolist() == sampler.pool(2).tolist()
    assert as_int(torch.tensor([3]), "x") == 3


def test_pad_id_beyond_the_vocabulary(pools):
    from ds_partitionsel.data import check_pad_id

    pool = CandidatePool(pools["sharded"], split="train")
    vocab = pool.manifest["tokenizer"]["vocab_size"]
    with pytest.raises(ValueError, match=f"pad_token_id {vocab} is outside the vocabulary .*ids 0..{vocab - 1}"):
        pool.collate([0, 1], pad_token_id=vocab)
    with pytest.raises(ValueError, match="pad_token_id -1 is outside the vocabulary"):
        pool.collate([0, 1], pad_token_id=-1)
    with pytest.raises(TypeError, match="pad_token_id must be an integer"):
        check_pad_id(pool, 1.5)
    assert pool.collate([0, 1], pad_token_id=vocab - 1)["input_ids"].shape[0] == 2


def tiny_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096))


def test_selector_boundary(pools, corpus, tmp_path):
    """Selector refuses a validation split of another pool (other domains; other tokenizer), a float
    batch size and a pad id past the vocabulary, before anything is sketched."""
    from ds_partitionsel.data import check_same_pool
    from ds_partitionsel.selector import Selector

    train = CandidatePool(pools["sharded"], split="train")
    valid = CandidatePool(pools["sharded"], split="valid")
    vocab = train.manifest["tokenizer"]["vocab_size"]
    model, cfg = tiny_model(vocab), PartitionSelConfig.from_dict({"pool_factor": 2})
    pad = corpus["tokenizer"].pad_token_id
    sel = Selector(model, cfg, train, valid, batch_size=4, pad_token_id=pad)
    assert sel.batch_size == 4 and sel.plan(0).batch_size == 4
    with pytest.raises(ValueError, match="step must be >= 0"):
        sel.plan(-1)
    with pytest.raises(TypeError, match="batch_size must be an integer, got 4.0"):
        Selector(model, cfg, train, valid, batch_size=4.0, pad_token_id=pad)
    with pytest.raises(ValueError, match=f"pad_token_id {vocab + 5} is outside the vocabulary"):
        Selector(model, cfg, train, valid, batch_size=4, pad_token_id=vocab + 5)
    # another pool's validation split: other domains (code, math only)
    other = CandidatePool(pools["balanced"], split="valid")
    with pytest.raises(ConfigError, match=r"has domains \['code', 'math'\], the training split .* has "
                                          r"\['code', 'math', 'molecules'\]"):
        Selector(model, cfg, train, other, batch_size=4, pad_token_id=pad)
    # same domains, another tokenizer: a copy of the pool whose manifest names another fingerprint
    foreign = tmp_path / "foreign"
    shutil.copytree(pools["sharded"], foreign)
    edit_manifest(foreign, lambda m: m["tokenizer"].update(fingerprint_sha256="0" * 64, name_or_path="other-tok"))
    with pytest.raises(ConfigError, match="was built with tokenizer 'other-tok' .*token ids would mean other tokens"):
        Selector(model, cfg, train, CandidatePool(foreign, split="valid"), batch_size=4, pad_token_id=pad)
    check_same_pool(train, valid)  # the pool's own splits pass
