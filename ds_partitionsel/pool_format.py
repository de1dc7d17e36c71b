"""The on-disk candidate pool format, shared by the builder (tools/build_pool.py) and the reader
(:mod:`ds_partitionsel.data`).

A pool directory::

    POOL/
      manifest.json            format name and version, tokenizer, max length, domains, per split:
                               record/token counts per domain, truncation counts, file sizes and
                               SHA-256 of every array file
      train/tokens.npy         (T,)   uint16 or uint32   token ids of all records, concatenated
      train/loss_mask.npy      (T,)   bool               True = response token trained on
      train/offsets.npy        (N+1,) int64              record i is tokens[offsets[i]:offsets[i+1]]
      train/domains.npy        (N,)   int32              domain id, an index into manifest["domains"]
      train/truncated.npy      (N,)   bool               record i was cut to max_length
      valid/...                the same for every other split

Arrays are ``.npy`` files written with ``np.save(..., allow_pickle=False)`` and read memory-mapped
with ``allow_pickle=False``; the manifest is JSON. Nothing in the format uses pickle.

This module also holds the two pure kernels that decide what goes into a pool:
:func:`tokenize_example` (prompt/response -> ids and loss mask) and
:func:`tokenizer_fingerprint` (what "the same tokenizer" means).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT_NAME = "ds_partitionsel.pool"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# name -> (dtype or None for "token dtype", one entry per token (True) or per record (False))
ARRAY_FILES = {
    "tokens.npy": (None, "token"),
    "loss_mask.npy": (np.bool_, "token"),
    "offsets.npy": (np.int64, "offset"),
    "domains.npy": (np.int32, "record"),
    "truncated.npy": (np.bool_, "record"),
}


class PoolFormatError(ValueError):
    """A pool directory is missing files, has inconsistent sizes, or has an unknown format."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a vocabulary of ``vocab_size`` tokens."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path):
    """Load a Hugging Face tokenizer from a local folder (never from the hub).

    Raises ``ValueError`` naming the path when it does not exist or holds no tokenizer.
    """
    from transformers import AutoTokenizer

    path = Path(str(name_or_path)).expanduser()
    if not path.exists():
        raise ValueError(
            f"tokenizer path {str(name_or_path)!r} does not exist. Pass a local folder with tokenizer "
            f"files, e.g. .cache/models/smollm2-135m (python tools/fetch_demo_data.py --model-only)."
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises several types (OSError, ValueError, KeyError)
        raise ValueError(f"could not load a tokenizer from {str(path)!r}: {type(e).__name__}: {e}") from e


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what determines a tokenizer's output: model (vocab, merges, normalizer,
    pre-tokenizer), added/special tokens and chat template. Independent of file layout, so the
    same tokenizer saved twice, or loaded in another process, has the same fingerprint.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = json.loads(backend.to_str())
    else:  # slow (python) tokenizers: the vocabulary is what we can see
        body = sorted(tokenizer.get_vocab().items())
    content = {
        "backend": body,
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenizer_info(tokenizer, name_or_path) -> dict:
    """The manifest's ``tokenizer`` block."""
    return {
        "name_or_path": str(name_or_path),
        "class": type(tokenizer).__name__,
        "fingerprint_sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _ids(encoded) -> list:
    # apply_chat_template returns a list of ids or (transformers >= 5) a BatchEncoding.
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def tokenize_example(tokenizer, prompt: str, response: str, use_chat_template: bool):
    """Token ids and loss mask of one prompt/response pair.

    With a chat template: the template is rendered (as text) for ``[user: prompt]`` with the
    generation prompt (``head``) and for ``[user: prompt, assistant: response]`` (``full``).
    ``ids = encode(head) + encode(full[len(head):])``, both without added special tokens (the
    template writes them), and the mask is False on the head and True on the rest, which holds
    the response and the end-of-turn tokens. Encoding the two parts separately keeps the
    boundary exactly where generation starts at inference (a merge such as ``"\n" + "    "``
    across it would otherwise train on part of the template), and the prompt ids are exactly
    those the model sees when asked to generate. Templates whose ``full`` rendering does not
    start with ``head`` fall back to the common prefix of the two tokenizations.

    Without one: ``encode(prompt + "\n")`` (special tokens such as BOS added as the tokenizer
    does) followed by ``encode(response)`` and EOS when the tokenizer has one.

    Returns ``(ids, mask)``: lists of equal length, ``mask[t]`` True when token t is trained on.
    """
    if use_chat_template:
        user = [{"role": "user", "content": prompt}]
        both = user + [{"role": "assistant", "content": response}]
        head_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(both, tokenize=False)
        if full_text.startswith(head_text):
            head = tokenizer.encode(head_text, add_special_tokens=False)
            body = tokenizer.encode(full_text[len(head_text):], add_special_tokens=False)
            return head + body, [False] * len(head) + [True] * len(body)
        full = _ids(tokenizer.apply_chat_template(both, tokenize=True, return_dict=False))
        head = _ids(tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False))
        n_prompt = 0
        for a, b in zip(head, full):
            if a != b:
                break
            n_prompt += 1
        return full, [False] * n_prompt + [True] * (len(full) - n_prompt)
    head = tokenizer.encode(prompt + "\n", add_special_tokens=True)
    body = tokenizer.encode(response, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        body = body + [tokenizer.eos_token_id]
    return head + body, [False] * len(head) + [True] * len(body)


# ----------------------------------------------------------------------------- files


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_array(path, array: np.ndarray) -> dict:
    """``np.save`` without pickle; returns the manifest entry (dtype, shape, bytes, sha256)."""
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)
    return {"dtype": np.dtype(array.dtype).str, "shape": list(array.shape),
            "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def read_manifest(pool_dir) -> dict:
    """Load and check ``pool_dir/manifest.json`` (format name and version, required keys)."""
    pool_dir = Path(pool_dir)
    path = pool_dir / MANIFEST
    if not path.is_file():
        hint = " (it is not a directory)" if not pool_dir.is_dir() else ""
        raise PoolFormatError(
            f"{path} not found{hint}: {str(pool_dir)!r} is not a candidate pool. Build one with "
            f"python tools/build_pool.py --tokenizer TOK --train DATA.jsonl --out {pool_dir}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PoolFormatError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT_NAME:
        raise PoolFormatError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PoolFormatError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported by this "
            f"ds_partitionsel (reads version {FORMAT_VERSION}); rebuild the pool with this version's "
            f"tools/build_pool.py")
    for key in ("tokenizer", "max_length", "domains", "splits"):
        if key not in manifest:
            raise PoolFormatError(f"{path}: missing key {key!r}")
    return manifest


def open_split_arrays(pool_dir, manifest: dict, split: str, verify: bool = False) -> dict:
    """Memory-map the arrays of one split and check them against the manifest.

    Checks: every file present, byte size, dtype and shape as recorded; offsets start at 0, end
    at the token count and never decrease; domain ids in range. ``verify=True`` also re-hashes
    every file (reads it all). Returns ``{file stem: np.ndarray (read-only memmap)}``.
    """
    splits = manifest["splits"]
    if split not in splits:
        raise PoolFormatError(f"pool {pool_dir} has no split {split!r}; it has {sorted(splits)}")
    entry = splits[split]
    base = Path(pool_dir) / split
    arrays = {}
    for name in ARRAY_FILES:
        path = base / name
        rec = entry["files"].get(name)
        if rec is None:
            raise PoolFormatError(f"manifest of {pool_dir} lists no {split}/{name}")
        if not path.is_file():
            raise PoolFormatError(f"{path} is missing; the pool is incomplete, rebuild it")
        if os.path.getsize(path) != rec["bytes"]:
            raise PoolFormatError(
                f"{path} has {os.path.getsize(path)} bytes, the manifest says {rec['bytes']}; "
                f"the file was changed or truncated, rebuild the pool")
        if verify and sha256_file(path) != rec["sha256"]:
            raise PoolFormatError(f"{path}: SHA-256 differs from the manifest; rebuild the pool")
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.dtype.str != rec["dtype"] or list(arr.shape) != rec["shape"]:
            raise PoolFormatError(f"{path}: dtype/shape {arr.dtype.str}{list(arr.shape)} differ from the "
                                  f"manifest's {rec['dtype']}{rec['shape']}")
        arrays[name[:-4]] = arr
    n, t = entry["num_records"], entry["num_tokens"]
    offsets = arrays["offsets"]
    sizes = {"tokens": t, "loss_mask": t, "offsets": n + 1, "domains": n, "truncated": n}
    for stem, want in sizes.items():
        if arrays[stem].shape != (want,):
            raise PoolFormatError(f"{base}/{stem}.npy has shape {arrays[stem].shape}, expected ({want},)")
    if offsets[0] != 0 or offsets[-1] != t or (n > 0 and np.any(np.diff(offsets) < 0)):
        raise PoolFormatError(f"{base}/offsets.npy is not a valid offset table (0 .. {t}, nondecreasing)")
    if n > 0 and (arrays["domains"].min() < 0 or arrays["domains"].max() >= len(manifest["domains"])):
        raise PoolFormatError(f"{base}/domains.npy has ids outside 0..{len(manifest['domains']) - 1}")
    return arrays
