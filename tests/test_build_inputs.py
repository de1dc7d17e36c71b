"""tools/build_pool.py: races on --out, domain names the logs cannot hold, and inputs that used to
fail cryptically or pass silently (issue 26).

- Two builds to one --out, neither with --overwrite: exactly one claims it; the other fails and
  leaves the winner's pool as it is (the final claim is atomic, not only the check at the start).
- Domain names that map to one monitor file (``a/b`` and ``a_b``), names too long for a file
  name, control characters and the reserved ``mean`` are refused before anything is written.
- A UTF-8 byte-order mark is skipped; an Arrow IPC *file*, a compressed input, an input given
  twice (or --valid equal to --train) and a pool without a validation split are named; a full
  disk is called a full disk.

Real records (the demo data) and a tiny byte-level BPE (the corpus fixture of
test_build_bad_input), so every build runs in-process in about a second.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys

import pytest

from ds_partitionsel import pool_builder
from ds_partitionsel import pool_format as pf
from ds_partitionsel.data import CandidatePool
from real_pool import REPO
from test_build_bad_input import assert_refused, build_pool, corpus, run, tree_bytes, write_jsonl  # noqa: F401


def pool_records(out) -> list:
    """Every record of the train split as (token ids, loss mask, domain name)."""
    pool = CandidatePool(out, split="train")
    return [(pool[i]["input_ids"].tolist(), pool[i]["loss_mask"].tolist(), pool.domain_names[pool[i]["domain"]])
            for i in range(len(pool))]


# ----------------------------------------------------------------------------- two builds, one --out


def test_a_pool_that_appears_during_the_build_is_never_replaced(corpus, tmp_path, capsys, monkeypatch):
    """The issue's race, made deterministic: while build A runs (after its start check), build B
    writes a pool to the same --out. A must fail and leave B's pool as it is."""
    out = tmp_path / "p"
    original = pool_builder.check_vanished_domains
    calls = []

    def other_build_finishes_first(*a, **k):
        if not calls:  # only in build A: B (started here) runs the real check
            calls.append(1)
            assert run(corpus, out, "--max-length", 4096) == 0
        return original(*a, **k)

    monkeypatch.setattr(pool_builder, "check_vanished_domains", other_build_finishes_first)
    code = run(corpus, out, "--max-length", 4095)  # A: another pool (other length) to the same --out
    assert calls, "build A never reached its final stage"
    before = tree_bytes(out)
    err = capsys.readouterr().err
    assert code == 1, err
    assert f"--out {out} appeared while this build ran (another build to the same --out?)" in err
    assert "pass --overwrite to replace it" in err
    assert tree_bytes(out) == before and pf.read_manifest(out)["max_length"] == 4096  # B's pool, untouched
    assert not list(tmp_path.glob(".p.tmp-*")) and not list(tmp_path.glob(".p.old-*"))


def test_overwrite_still_replaces_a_pool_that_appeared(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    original = pool_builder.check_vanished_domains
    calls = []

    def other_build_finishes_first(*a, **k):
        if not calls:
            calls.append(1)
            assert run(corpus, out, "--max-length", 4096) == 0
        return original(*a, **k)

    monkeypatch.setattr(pool_builder, "check_vanished_domains", other_build_finishes_first)
    assert run(corpus, out, "--max-length", 4095, "--overwrite") == 0
    assert pf.read_manifest(out)["max_length"] == 4095
    assert not list(tmp_path.glob(".p.tmp-*")) and not list(tmp_path.glob(".p.old-*"))


def test_two_concurrent_build_processes_one_wins(corpus, tmp_path):
    """Two real processes started together on one --out: exactly one exits 0, the pool at --out is
    the winner's (told apart by --max-length), and the loser says why."""
    out = tmp_path / "p"
    # enough records that each build takes longer than the two processes' start-up skew, so both
    # usually pass the start check before either commits (the race of the issue)
    src = write_jsonl(tmp_path / "t.jsonl", corpus["records"]["train"] * 60)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    procs = {length: subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "build_pool.py"), "--tokenizer", str(corpus["tok"]), "--train",
         str(src), "--out", str(out), "--max-length", str(length), "--quiet"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for length in (4096, 4095)}
    results = {length: (p.wait(timeout=300), p.stderr.read()) for length, p in procs.items()}
    winners = [length for length, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    loser = next(length for length in results if length not in winners)
    assert results[loser][0] == 1
    assert "already exists" in results[loser][1] or "appeared while this build ran" in results[loser][1]
    assert pf.read_manifest(out)["max_length"] == winners[0]
    assert len(CandidatePool(out, split="train")) == 60 * len(corpus["records"]["train"])
    assert not list(tmp_path.glob(".p.tmp-*")) and not list(tmp_path.glob(".p.old-*"))


# ----------------------------------------------------------------------------- domain names


@pytest.mark.parametrize("names, message", [
    (("a/b", "a_b"), "domains 'a/b' and 'a_b' are both logged as 'a_b'"),
    (("x y", "x_y"), "domains 'x y' and 'x_y' are both logged as 'x_y'"),
    (("d" * 250, "ok"), "is 250 bytes long; at most 100 fit in a metric file name"),
    (("mean", "ok"), "domain name 'mean' is reserved"),
    (("tab\there", "ok"), "contains a control character"),
])
def test_domain_names_the_logs_cannot_hold_are_refused(corpus, tmp_path, capsys, names, message):
    recs = [dict(r, domain=names[i % 2]) for i, r in enumerate(corpus["records"]["train"])]
    src = write_jsonl(tmp_path / "t.jsonl", recs)
    out = tmp_path / "p"
    err = assert_refused(run(corpus, out, "--max-length", 4096, train=[src]), capsys, message, out)
    errors = [line for line in err.splitlines() if not line.startswith("warning: no validation split")]
    assert len(errors) == 1 and errors[0].startswith("error: domain names that cannot be logged:"), err


def test_domain_names_given_up_front_fail_before_tokenizing(corpus, tmp_path, capsys, monkeypatch):
    """--domains (and --megatron DOMAIN=) names are checked before any shard is built."""
    def no_shard(*a, **k):
        raise AssertionError("a shard was built")

    monkeypatch.setattr(pool_builder, "build_shard", no_shard)
    out = tmp_path / "p"
    assert_refused(run(corpus, out, "--domains", "code,math,molecules,a/b,a_b"), capsys,
                   "error: domain names that cannot be logged: domains 'a/b' and 'a_b' are both logged as 'a_b'", out)


def test_domain_name_rules_accept_ordinary_names():
    assert pf.domain_name_problems(["code", "math", "molecules", "web/en", "d" * 100]) == []
    assert pf.monitor_file_stem("a b/c") == "a_b_c"


# ----------------------------------------------------------------------------- input formats


def test_utf8_byte_order_mark_is_skipped(corpus, tmp_path):
    plain = tmp_path / "plain"
    assert run(corpus, plain, "--max-length", 4096) == 0
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + corpus["train"].read_bytes())
    out = tmp_path / "bom"
    assert run(corpus, out, "--max-length", 4096, train=[src]) == 0
    assert pool_records(out) == pool_records(plain)
    # and as the first line of a later shard nothing changes (a BOM only starts a file)
    assert run(corpus, tmp_path / "bom2", "--max-length", 4096, "--shard-docs", 5, train=[src]) == 0
    assert pool_records(tmp_path / "bom2") == pool_records(plain)


def test_arrow_ipc_file_format_is_named(corpus, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    recs = corpus["records"]["train"]
    table = pa.table({k: [r[k] for r in recs] for k in ("prompt", "response", "domain")})
    src = tmp_path / "t.arrow"
    with ipc.new_file(str(src), table.schema) as w:
        w.write_table(table)
    out = tmp_path / "p"
    err = assert_refused(run(corpus, out, "--max-length", 4096, train=[src]), capsys,
                         f"{src} is in the Arrow IPC file (random access) format; only the Arrow IPC stream format",
                         out)
    assert "Traceback" not in err
    # the stream format of the same table builds the same records as the jsonl file
    stream = tmp_path / "s.arrow"
    with ipc.new_stream(str(stream), table.schema) as w:
        w.write_table(table)
    assert run(corpus, tmp_path / "a", "--max-length", 4096, train=[stream]) == 0
    assert run(corpus, tmp_path / "j", "--max-length", 4096) == 0
    assert pool_records(tmp_path / "a") == pool_records(tmp_path / "j")


@pytest.mark.parametrize("name", ["t.jsonl.gz", "t.jsonl"])
def test_gzip_input_is_named(corpus, tmp_path, capsys, name):
    src = tmp_path / name
    src.write_bytes(gzip.compress(corpus["train"].read_bytes()))
    out = tmp_path / "p"
    err = assert_refused(run(corpus, out, "--max-length", 4096, train=[src]), capsys,
                         f"input {src} is gzip-compressed; inputs are read uncompressed: decompress it first "
                         f"(gunzip -k {src})", out)
    assert "encoding" not in err


def test_same_input_twice_and_valid_equal_to_train_warn(corpus, tmp_path, capsys):
    copy = tmp_path / "copy.jsonl"
    shutil.copy(corpus["train"], copy)
    assert run(corpus, tmp_path / "a", "--max-length", 4096, valid=[copy]) == 0
    err = capsys.readouterr().err
    assert f"warning: --valid {copy} has the same content" in err
    assert f"as --train {corpus['train']}: its records would be both trained on and held out" in err
    assert run(corpus, tmp_path / "b", "--max-length", 4096, train=[corpus["train"], copy],
               valid=[corpus["valid"]]) == 0
    err = capsys.readouterr().err
    assert f"warning: --train {copy} has the same content" in err and "counted twice" in err
    # distinct inputs: no warning
    assert run(corpus, tmp_path / "c", "--max-length", 4096, valid=[corpus["valid"]]) == 0
    assert "warning" not in capsys.readouterr().err


def test_pool_without_validation_split_warns(corpus, tmp_path, capsys):
    assert run(corpus, tmp_path / "p", "--max-length", 4096) == 0
    err = capsys.readouterr().err
    assert "warning: no validation split (neither --valid nor --valid-fraction): training needs held-out" in err
    assert sorted(pf.read_manifest(tmp_path / "p")["splits"]) == ["train"]


def test_record_shorter_than_two_tokens_is_refused(corpus, tmp_path, capsys):
    """A Megatron document holding only EOS would be a one-token candidate (loss 0)."""
    pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tok = corpus["tokenizer"]
    builder = IndexedDatasetBuilder(str(tmp_path / "e.bin"), dtype=DType.optimal_dtype(len(tok)))
    for ids in (tok.encode("some text here", add_special_tokens=False), [tok.eos_token_id]):
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(tmp_path / "e.idx"))
    out = tmp_path / "p"
    argv = ["--tokenizer", str(corpus["tok"]), "--megatron", f"prose={tmp_path / 'e'}", "--out", str(out),
            "--quiet", "--max-length", "64"]
    err = assert_refused(build_pool.main(argv), capsys, "a record of domain 'prose' holds 1 token(s), fewer than "
                         "the 2 a training target needs", out)
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real 48 KB tmpfs (needs root and mount rights; skipped where it cannot be mounted)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_called_a_full_disk(corpus, tmp_path, small_disk, capsys):
    big = write_jsonl(tmp_path / "big.jsonl", corpus["records"]["train"] * 40)
    out = small_disk / "p"
    err = assert_refused(run(corpus, out, "--max-length", 4096, train=[big]), capsys, "the disk is full", out)
    assert "free space on it or build to another file system (--out); nothing was written" in err
    assert "Traceback" not in err and os.listdir(small_disk) == []
