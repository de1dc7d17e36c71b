"""Candidate pool: build (tools/build_pool.py, one process) and read (ds_partitionsel.data).

These tests need no downloads: they train a tiny byte-level BPE tokenizer on the test records
and save it as a real Hugging Face tokenizer folder. Tests with the real SmolLM2 tokenizer run
when ``.cache/models/smollm2-135m`` exists (python tools/fetch_demo_data.py --model-only).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_partitionsel import pool_format as pf
from ds_partitionsel.data import CandidatePool, PoolFormatError
from real_pool import load_tool

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / ".cache" / "models" / "smollm2-135m"
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<eos>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


build_pool = load_tool("build_pool")


def make_records(n: int, seed: int = 0) -> list:
    """Deterministic prompt/response records over three domains, some long enough to be cut."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "sum", "mol", "ring", "def", "return", "x", "ü", "→", "42"]
    out = []
    for i in range(n):
        domain = ("math", "molecules", "code")[i % 3]
        if domain == "math":
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            prompt, response = f"What is {a} + {b}?", f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"
        elif domain == "molecules":
            smiles = "".join(rng.choice("CNOc1()=") for _ in range(rng.randint(3, 30)))
            prompt, response = f"Name the compound {smiles}.", " ".join(rng.choice(words) for _ in range(5))
        else:
            body = " ".join(rng.choice(words) for _ in range(rng.randint(2, 60)))
            prompt, response = f"def f{i}(x):\n    '''{body}'''", f"    return x + {i}\n"
        out.append({"prompt": prompt, "response": response, "domain": domain, "id": i})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def make_tiny_tokenizer(out_dir: Path, texts: list, chat: bool = True) -> Path:
    """Train a byte-level BPE (vocab 400) on ``texts`` and save it as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Records, their jsonl files and two tiny tokenizers (with and without chat template)."""
    root = tmp_path_factory.mktemp("corpus")
    records = make_records(60)
    texts = [r["prompt"] + "\n" + r["response"] for r in records]
    return {
        "root": root,
        "records": records,
        "train": write_jsonl(root / "train.jsonl", records[:48]),
        "valid": write_jsonl(root / "valid.jsonl", records[48:]),
        "chat_tok": make_tiny_tokenizer(root / "tok_chat", texts, chat=True),
        "plain_tok": make_tiny_tokenizer(root / "tok_plain", texts, chat=False),
    }


def build(tok, train, out, *extra, valid=None, max_length=64) -> int:
    argv = ["--tokenizer", str(tok), "--train", *map(str, train), "--out", str(out),
            "--max-length", str(max_length), "--quiet", *extra]
    if valid:
        argv += ["--valid", *map(str, valid)]
    return build_pool.main(argv)


@pytest.fixture(scope="module")
def chat_pool(corpus):
    out = corpus["root"] / "pool_chat"
    assert build(corpus["chat_tok"], [corpus["train"]], out, valid=[corpus["valid"]]) == 0
    return out


# ----------------------------------------------------------------------------- exact content


def expected_chat(tok, rec, max_length):
    """The documented rule: encode(head) + encode(rest of the rendered conversation)."""
    user = [{"role": "user", "content": rec["prompt"]}]
    head_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(user + [{"role": "assistant", "content": rec["response"]}], tokenize=False)
    assert full_text.startswith(head_text)
    head = tok.encode(head_text, add_special_tokens=False)
    body = tok.encode(full_text[len(head_text):], add_special_tokens=False)
    # with this template the boundary is a special token, so this is also the one-piece encoding
    assert head + body == list(tok.apply_chat_template(
        user + [{"role": "assistant", "content": rec["response"]}], tokenize=True, return_dict=False))
    full, mask = head + body, [False] * len(head) + [True] * len(body)
    return full[:max_length], mask[:max_length], len(full) > max_length


def test_reader_returns_exact_tokens_and_masks_chat(corpus, chat_pool):
    tok = pf.load_tokenizer(corpus["chat_tok"])
    n_cut = n_dropped = 0
    for split, recs in (("train", corpus["records"][:48]), ("valid", corpus["records"][48:])):
        pool = CandidatePool(chat_pool, split=split, tokenizer=corpus["chat_tok"], verify=True)
        expected = [(rec, *expected_chat(tok, rec, 64)) for rec in recs]
        kept = [e for e in expected if any(e[2])]  # records cut before their response are dropped
        assert pool.manifest["splits"][split]["dropped_no_response_after_truncation"] == len(expected) - len(kept)
        n_dropped += len(expected) - len(kept)
        assert len(pool) == len(kept)
        names = pool.domain_names
        assert names == ["code", "math", "molecules"]
        for i, (rec, ids, mask, cut) in enumerate(kept):
            item = pool[i]
            assert item["input_ids"].dtype == torch.int64 and item["loss_mask"].dtype == torch.bool
            assert item["input_ids"].tolist() == ids
            assert item["loss_mask"].tolist() == mask
            assert names[item["domain"]] == rec["domain"]
            assert bool(pool.truncated[i]) == cut
            n_cut += cut
            if not cut:  # the trained tokens are exactly the response and the end-of-turn token
                trained = tok.decode(item["input_ids"][item["loss_mask"]].tolist())
                assert trained == rec["response"] + "<eos>"
        assert pool.domains.dtype == torch.int64 and pool.domains.shape == (len(kept),)
    assert n_cut > 0 and n_dropped > 0, "test data should exercise truncation and dropping"


def test_plain_template_masks_prompt_and_appends_eos(corpus, tmp_path):
    out = tmp_path / "pool"
    assert build(corpus["plain_tok"], [corpus["train"]], out, max_length=512) == 0
    tok = pf.load_tokenizer(corpus["plain_tok"])
    pool = CandidatePool(out, tokenizer=tok)
    assert pool.manifest["template"] == "plain"
    for i, rec in enumerate(corpus["records"][:48]):
        head = tok.encode(rec["prompt"] + "\n")
        body = tok.encode(rec["response"], add_special_tokens=False) + [tok.eos_token_id]
        assert pool[i]["input_ids"].tolist() == head + body
        assert pool[i]["loss_mask"].tolist() == [False] * len(head) + [True] * len(body)
    assert not pool.truncated.any()


def test_collate_pads_right_and_masks_labels(chat_pool):
    pool = CandidatePool(chat_pool)
    idx = [5, 0, 17, 5]
    batch = pool.collate(idx, pad_token_id=0)
    lens = [len(pool[i]["input_ids"]) for i in idx]
    B, T = len(idx), max(lens)
    assert batch["input_ids"].shape == (B, T) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.bool
    assert batch["labels"].dtype == torch.int64 and batch["domains"].dtype == torch.int64
    for row, i in enumerate(idx):
        item, n = pool[i], lens[row]
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == 0).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)
        assert torch.equal(batch["loss_mask"][row, :n], item["loss_mask"]) and not batch["loss_mask"][row, n:].any()
        want = torch.where(item["loss_mask"], item["input_ids"], torch.full_like(item["input_ids"], -100))
        assert torch.equal(batch["labels"][row, :n], want) and (batch["labels"][row, n:] == -100).all()
        assert batch["domains"][row] == item["domain"]
    # tensors and negative indices are accepted
    assert torch.equal(pool.collate(torch.tensor([-1]), 0)["input_ids"][0], pool[len(pool) - 1]["input_ids"])


def test_domain_counts_and_manifest(corpus, chat_pool):
    pool = CandidatePool(chat_pool)
    counts = pool.domain_counts()
    assert counts.dtype == torch.int64
    kept = [pool.domain_names[pool[i]["domain"]] for i in range(len(pool))]
    want = [kept.count(d) for d in pool.domain_names]
    assert sum(want) > 0 and min(want) > 0
    assert counts.tolist() == want
    m = pool.manifest
    assert m["format"] == pf.FORMAT_NAME and m["format_version"] == pf.FORMAT_VERSION
    assert m["max_length"] == 64 and m["template"] == "chat"
    train = m["splits"]["train"]
    assert {d: c["records"] for d, c in train["per_domain"].items()} == dict(zip(pool.domain_names, want))
    assert sum(c["truncated"] for c in train["per_domain"].values()) == int(pool.truncated.sum())
    assert train["num_tokens"] == int(pool.lengths.sum())
    assert train["sources"][0]["sha256"] == pf.sha256_file(corpus["train"])
    assert m["tokenizer"]["fingerprint_sha256"] == pf.tokenizer_fingerprint(pf.load_tokenizer(corpus["chat_tok"]))
    with pytest.raises(IndexError):
        pool[len(pool)]


def test_domain_order_option_fixes_ids(corpus, tmp_path):
    out = tmp_path / "pool"
    assert build(corpus["chat_tok"], [corpus["train"]], out, "--domains", "math,molecules,code",
                 max_length=512) == 0
    pool = CandidatePool(out)
    assert pool.domain_names == ["math", "molecules", "code"]
    assert [pool.domain_names[pool[i]["domain"]] for i in range(3)] == ["math", "molecules", "code"]
    bad = tmp_path / "pool2"
    assert build(corpus["chat_tok"], [corpus["train"]], bad, "--domains", "math,code") == 1
    assert not bad.exists()


def test_hf_dataset_input_matches_jsonl(corpus, tmp_path):
    import datasets

    ds_dir = tmp_path / "ds"
    datasets.Dataset.from_list(corpus["records"][:48]).save_to_disk(str(ds_dir))
    a, b = tmp_path / "from_jsonl", tmp_path / "from_hf"
    assert build(corpus["chat_tok"], [corpus["train"]], a) == 0
    assert build(corpus["chat_tok"], [ds_dir], b) == 0
    for name in pf.ARRAY_FILES:
        assert (a / "train" / name).read_bytes() == (b / "train" / name).read_bytes()
    assert CandidatePool(b).manifest["splits"]["train"]["sources"][0]["kind"] == "hf"


# ----------------------------------------------------------------------------- reader validation


def test_reader_refuses_other_tokenizer(corpus, chat_pool):
    with pytest.raises(ValueError, match="was built with tokenizer"):
        CandidatePool(chat_pool, tokenizer=corpus["plain_tok"])
    with pytest.raises(ValueError, match="does not exist"):
        CandidatePool(chat_pool, tokenizer=corpus["root"] / "no_such_tokenizer")
    # the same tokenizer object (not a path) is accepted
    assert len(CandidatePool(chat_pool, tokenizer=pf.load_tokenizer(corpus["chat_tok"]))) == len(CandidatePool(chat_pool))


def copy_pool(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_reader_validates_files(chat_pool, tmp_path):
    with pytest.raises(PoolFormatError, match="no split 'test'"):
        CandidatePool(chat_pool, split="test")
    with pytest.raises(PoolFormatError, match="not a candidate pool"):
        CandidatePool(tmp_path)

    p = copy_pool(chat_pool, tmp_path / "missing")
    (p / "train" / "offsets.npy").unlink()
    with pytest.raises(PoolFormatError, match="offsets.npy is missing"):
        CandidatePool(p)

    p = copy_pool(chat_pool, tmp_path / "short")
    data = (p / "train" / "tokens.npy").read_bytes()
    (p / "train" / "tokens.npy").write_bytes(data[:-6])
    with pytest.raises(PoolFormatError, match="bytes, the manifest says"):
        CandidatePool(p)

    p = copy_pool(chat_pool, tmp_path / "flipped")
    arr = np.load(p / "train" / "loss_mask.npy")
    arr[3] = ~arr[3]
    np.save(p / "train" / "loss_mask.npy", arr, allow_pickle=False)
    assert len(CandidatePool(p)) == len(CandidatePool(chat_pool))  # same size: only a hash check can see it
    with pytest.raises(PoolFormatError, match="SHA-256"):
        CandidatePool(p, verify=True)

    p = copy_pool(chat_pool, tmp_path / "version")
    m = json.loads((p / "manifest.json").read_text())
    m["format_version"] = 99
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PoolFormatError, match="format_version 99"):
        CandidatePool(p)


def test_npy_files_load_without_pickle(chat_pool):
    for split in ("train", "valid"):
        for name in pf.ARRAY_FILES:
            arr = np.load(chat_pool / split / name, allow_pickle=False)
            assert arr.dtype != object


# ----------------------------------------------------------------------------- real tokenizer


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(),
                    reason="SmolLM2 not converted: run python tools/fetch_demo_data.py --model-only")
def test_smollm2_chat_template_masks(corpus, tmp_path):
    out = tmp_path / "pool"
    assert build(SMOLLM2, [corpus["train"]], out, max_length=4096) == 0
    tok = pf.load_tokenizer(SMOLLM2)
    pool = CandidatePool(out, tokenizer=SMOLLM2)
    assert pool.manifest["template"] == "chat" and pool.manifest["tokenizer"]["vocab_size"] == 49152
    assert np.load(out / "train" / "tokens.npy", mmap_mode="r").dtype == np.uint16
    for i, rec in enumerate(corpus["records"][:48]):
        item = pool[i]
        assert tok.decode(item["input_ids"][item["loss_mask"]].tolist()) == rec["response"] + "<|im_end|>\n"
        prompt_text = tok.decode(item["input_ids"][~item["loss_mask"]].tolist())
        assert prompt_text.endswith(f"<|im_start|>user\n{rec['prompt']}<|im_end|>\n<|im_start|>assistant\n")
