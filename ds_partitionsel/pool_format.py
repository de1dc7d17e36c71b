"""The on-disk candidate pool format, shared by the builder (tools/build_pool.py) and the reader
(:mod:`ds_partitionsel.data`). docs/POOLS.md describes it for users.

A pool directory (format version 2)::

    POOL/
      manifest.json            format name and version, tokenizer, kind of candidates, domains,
                               per split: counts per domain, and the list of its shards, each
                               with its record/token counts, its own domain table and the size
                               and SHA-256 of each of its array files
      train/tokens.npy         a split with one shard keeps its arrays directly in the split folder;
      train/...                a split with several has one folder per shard:
      train/shard-00000/tokens.npy ...  train/shard-00001/tokens.npy ...
      valid/...                the same for every other split

One shard holds these arrays (``N`` records, ``T`` tokens)::

      tokens.npy      (T,)   uint16 or uint32   token ids of the shard's records, concatenated
      loss_mask.npy   (T,)   bool               True = the token is a training target
      offsets.npy     (N+1,) int64              record i is tokens[offsets[i]:offsets[i+1]]
      domains.npy     (N,)   int32              index into the shard's own ``domains`` list
      truncated.npy   (N,)   bool               record i was cut to max_length

A split is the concatenation of its shards in manifest order: global record ``i`` is record
``i - first(s)`` of the shard ``s`` that holds it. Which records make a shard depends only on
the input and ``--shard-docs`` (never on how many processes built the pool), so the files are
the same for any number of build workers. Version 1 pools (one shard, arrays in the split folder,
domain ids global) are still read.

Arrays are ``.npy`` files written with ``np.save(..., allow_pickle=False)`` and read memory-mapped
with ``allow_pickle=False``; the manifest is JSON. Nothing in the format uses pickle.

This module also holds the pure kernels that decide what goes into a pool
(:func:`tokenize_example`, :func:`pack_windows`, :func:`tokenizer_fingerprint`), the shard
writer (:class:`ShardBuffer`) and the safe replacement of an existing pool
(:func:`check_replaceable`, :func:`commit_pool`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

FORMAT_NAME = "ds_partitionsel.pool"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

# name -> (dtype or None for "token dtype", one entry per token / offset / record)
ARRAY_FILES = {
    "tokens.npy": (None, "token"),
    "loss_mask.npy": (np.bool_, "token"),
    "offsets.npy": (np.int64, "offset"),
    "domains.npy": (np.int32, "record"),
    "truncated.npy": (np.bool_, "record"),
}


MIN_RECORD_TOKENS = 2  # one token to read, one to predict


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
            f"files, e.g. .cache/models/smollm2-135m (python tools/fetch_demo_data.py --model-only).")
    try:
        # never run code shipped with a tokenizer folder (a manifest can name any folder)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
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


MAX_DOMAIN_NAME_BYTES = 100  # a domain name becomes part of monitor file names (limit 255 bytes)
RESERVED_DOMAIN_NAMES = ("mean",)  # held-out loss logs the mean over domains under this key


def monitor_file_stem(name: str) -> str:
    """What DeepSpeed's csv monitor makes of a metric name in its file name ('/' and ' ' -> '_')."""
    return name.replace("/", "_").replace(" ", "_")


def domain_name_problems(names) -> list:
    """Why these domain names cannot be logged one file per domain (empty: they can).

    Each domain's per-step counts and held-out loss are logged as metrics named after it, and
    DeepSpeed's csv monitor writes one file per metric name, mapping '/' and ' ' to '_'. Two
    names that map to one file (``a/b`` and ``a_b``) would interleave in one series; a name
    longer than :data:`MAX_DOMAIN_NAME_BYTES` (UTF-8) makes a file name the file system refuses;
    control characters break file names and csv rows; ``mean`` is the held-out loss's average.
    """
    problems, seen = [], {}
    for name in names:
        stem = monitor_file_stem(name)
        if stem in seen and seen[stem] != name:
            problems.append(f"domains {seen[stem]!r} and {name!r} are both logged as {stem!r} (metric files "
                            f"map '/' and ' ' to '_'); rename one of them")
        seen.setdefault(stem, name)
        if len(name.encode("utf-8")) > MAX_DOMAIN_NAME_BYTES:
            problems.append(f"domain name {name[:40]!r}... is {len(name.encode('utf-8'))} bytes long; at most "
                            f"{MAX_DOMAIN_NAME_BYTES} fit in a metric file name: use a shorter name")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            problems.append(f"domain name {name!r} contains a control character; rename it")
        if name in RESERVED_DOMAIN_NAMES:
            problems.append(f"domain name {name!r} is reserved (the held-out loss averaged over domains is "
                            f"logged as {name!r}); rename it")
    return problems


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


def batch_encoder(tokenizer):
    """``encode(texts) -> list of id lists``, the fastest batched call the tokenizer offers.

    Fast tokenizers go straight to the Rust backend (``encode_batch_fast`` skips the character
    offsets we do not need); no special tokens are added. Slow tokenizers fall back to
    ``tokenizer(texts, add_special_tokens=False)``. Both give ``tokenizer.encode(text,
    add_special_tokens=False)`` for every text.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return lambda texts: [e.ids for e in fast(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def document_ids(ids: np.ndarray, eos_token_id: int | None) -> np.ndarray:
    """A document's ids followed by EOS (unless it already ends with EOS, as Megatron documents
    built with ``--append-eod`` do, or the tokenizer has none)."""
    if eos_token_id is None or (len(ids) and int(ids[-1]) == eos_token_id):
        return ids
    return np.concatenate([ids, np.asarray([eos_token_id], dtype=ids.dtype)])


def pack_windows(stream: np.ndarray, seq_len: int, keep_tail: bool):
    """Fixed-length training windows over one domain's token stream.

    ``stream`` (L,) is the domain's documents, each followed by EOS, concatenated. Window ``i``
    is ``stream[i*(S-1) : i*(S-1) + S]`` (S = ``seq_len``): the model reads S tokens and learns
    the S-1 next-token predictions inside the window, and consecutive windows share one token,
    so every token of the stream after the first is a target exactly once (Megatron's
    GPTDataset draws S+1 tokens per sample with the same one-token overlap; a Hugging Face model
    shifts the labels itself, so S positions give S-1 targets and stay within the model's
    position limit). There are ``n = (L - S) // (S - 1) + 1`` full windows when L >= S.

    The rest, ``stream[n*(S-1):]`` (fewer than S tokens), is dropped (``keep_tail=False``, as
    Megatron drops the last partial training sample) or kept as one shorter record when it
    holds at least one target (``keep_tail=True``, for validation, as Megatron keeps the last
    partial validation sequence).

    Returns ``(tokens (sum of window lengths,), lengths (W,) int64, dropped_tokens int)``.
    """
    windows, rest = full_windows(stream, seq_len)
    n = len(windows)
    lengths = np.full(n, int(seq_len), dtype=np.int64)
    windows = windows.reshape(-1)
    if keep_tail and len(rest) >= 2:
        return np.concatenate([windows, rest]), np.append(lengths, len(rest)), 0
    return windows, lengths, len(rest) - 1 if n else len(stream)  # tokens that are in no window


def full_windows(stream: np.ndarray, seq_len: int):
    """The full windows of :func:`pack_windows` as one ``(n, S)`` copy, and the rest of the
    stream (a view, fewer than S tokens, starting with the last window's final token).

    Windows are cut from a strided view of ``stream`` (no index array: the copy is the only
    allocation, in the stream's dtype). Packing a prefix, then the rest followed by more tokens,
    gives the same windows as packing the whole stream at once (how :class:`WindowPacker`
    streams a long domain)."""
    S, L = int(seq_len), len(stream)
    n = (L - S) // (S - 1) + 1 if L >= S else 0
    if not n:
        return stream[:0].reshape(0, S), stream
    view = np.lib.stride_tricks.sliding_window_view(stream, S)[::S - 1][:n]
    return np.ascontiguousarray(view), stream[n * (S - 1):]


class WindowPacker:
    """:func:`pack_windows` over one domain's stream that arrives document by document, written
    to ``path`` as it goes: memory is the pending tokens (below ``flush_tokens`` plus one
    document) whatever the length of the stream. The file holds the records' tokens in order;
    :meth:`finish` returns ``(lengths (W,) int64, stream_tokens, dropped_tokens)`` as
    ``pack_windows`` would for the whole stream."""

    def __init__(self, seq_len: int, keep_tail: bool, path: Path, dtype, flush_tokens: int = 1 << 20):
        self.seq_len, self.keep_tail, self.path = int(seq_len), keep_tail, Path(path)
        self.dtype, self.flush_tokens = np.dtype(dtype), max(int(flush_tokens), int(seq_len))
        self.parts, self.pending, self.stream_tokens, self.windows = [], 0, 0, 0
        self.tail = None
        self.file = open(self.path, "wb")

    def add(self, ids: np.ndarray) -> None:
        self.parts.append(np.asarray(ids, dtype=self.dtype))
        self.pending += len(ids)
        self.stream_tokens += len(ids)
        if self.pending >= self.flush_tokens:
            self._emit()

    def _emit(self):
        stream = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
        windows, rest = full_windows(stream, self.seq_len)
        windows.tofile(self.file)
        self.windows += len(windows)
        self.parts, self.pending = [rest.copy()], len(rest)
        return rest

    def finish(self):
        rest = self._emit() if self.parts else np.zeros(0, self.dtype)
        lengths = np.full(self.windows, self.seq_len, dtype=np.int64)
        if self.keep_tail and len(rest) >= 2:
            rest.tofile(self.file)
            lengths, dropped = np.append(lengths, len(rest)), 0
        else:
            dropped = len(rest) - 1 if self.windows else len(rest)
        self.file.close()
        self.parts, self.pending = [], 0
        return lengths, self.stream_tokens, int(dropped)


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


def shard_dir(num_shards: int, index: int) -> str:
    """Folder of shard ``index`` inside its split folder ('' when the split has one shard)."""
    return "" if num_shards == 1 else f"shard-{index:05d}"


class ShardBuffer:
    """The records of one shard, collected in order and written as the five array files.

    Records come as segments: in-memory records (:meth:`add`, :meth:`add_many`) or packed
    windows already written to a file (:meth:`add_file`, from :class:`WindowPacker`). Memory:
    the in-memory segments and one int64 length per record; :meth:`write` streams the token
    and mask files, so windows on file are never loaded whole.
    """

    _COPY_BYTES = 1 << 24  # chunk of a spilled file copied at once

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        # (tokens: array or file path, mask: array or None (all targets), lengths (r,) int64,
        #  domain, truncated: (r,) bool or None)
        self.segments = []
        self.counts = {}  # extra per-domain counters (documents, dropped tokens, ...), summed at the end
        self.records = 0

    def add(self, ids: np.ndarray, mask: np.ndarray, domain: str, truncated: bool = False) -> None:
        if len(ids) < MIN_RECORD_TOKENS:  # nothing to predict: it would train as a loss of 0
            raise ValueError(f"a record of domain {domain!r} holds {len(ids)} token(s), fewer than the "
                             f"{MIN_RECORD_TOKENS} a training target needs (a document that tokenizes to nothing "
                             f"but EOS?); remove it from the input")
        self.segments.append((np.asarray(ids, dtype=self.dtype), np.asarray(mask, dtype=np.bool_),
                              np.asarray([len(ids)], np.int64), domain, np.asarray([bool(truncated)])))
        self.records += 1

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray, domain: str) -> None:
        """Records ``tokens`` split at ``lengths``, every token a target (packed windows)."""
        if len(lengths):  # a domain with no window has no record (and no name in the shard)
            self.segments.append((np.asarray(tokens, dtype=self.dtype), None, np.asarray(lengths, np.int64),
                                  domain, None))
            self.records += len(lengths)

    def add_file(self, path: Path, lengths: np.ndarray, domain: str) -> None:
        """Records whose tokens (this buffer's dtype) are the file ``path``, split at ``lengths``,
        every token a target; the file is read when the shard is written, then deleted."""
        if not len(lengths):  # a domain with no window has no record (and no name in the shard)
            Path(path).unlink(missing_ok=True)
            return
        self.segments.append((Path(path), None, np.asarray(lengths, np.int64), domain, None))
        self.records += len(lengths)

    def count(self, domain: str, key: str, n: int) -> None:
        c = self.counts.setdefault(domain, {})
        c[key] = c.get(key, 0) + int(n)

    def __len__(self) -> int:
        return self.records

    def _stream_array(self, path: Path, dtype: np.dtype, total: int, pieces) -> dict:
        """Write a 1-D ``.npy`` of ``total`` items from ``pieces`` (arrays, in order) as
        :func:`save_array` would, without holding them all; returns its manifest entry."""
        with open(path, "wb") as f:
            header = np.lib.format.header_data_from_array_1_0(np.zeros(0, dtype))
            header["shape"] = (int(total),)
            np.lib.format.write_array_header_1_0(f, header)
            written = 0
            for piece in pieces:
                piece = np.ascontiguousarray(piece, dtype=dtype)
                f.write(piece.data)
                written += len(piece)
        if written != total:
            raise RuntimeError(f"internal: wrote {written} items to {path}, expected {total}")
        return {"dtype": np.dtype(dtype).str, "shape": [int(total)], "bytes": os.path.getsize(path),
                "sha256": sha256_file(path)}

    def _token_pieces(self):
        step = max(1, self._COPY_BYTES // self.dtype.itemsize)
        for tokens, _, _, _, _ in self.segments:
            if isinstance(tokens, Path):
                with open(tokens, "rb") as f:
                    while True:
                        chunk = np.fromfile(f, dtype=self.dtype, count=step)
                        if not len(chunk):
                            break
                        yield chunk
            else:
                yield tokens

    def _mask_pieces(self):
        step = self._COPY_BYTES
        for _, mask, lengths, _, _ in self.segments:
            if mask is not None:
                yield mask
                continue
            left = int(lengths.sum())
            while left:
                yield np.ones(min(step, left), np.bool_)
                left -= min(step, left)

    def write(self, folder: Path) -> dict:
        """Write the arrays into ``folder`` (created); returns the shard's manifest entry."""
        folder.mkdir(parents=True, exist_ok=True)
        segs = self.segments
        names = sorted({s[3] for s in segs})
        local = {d: i for i, d in enumerate(names)}
        lengths = np.concatenate([s[2] for s in segs]) if segs else np.zeros(0, np.int64)
        domains = (np.concatenate([np.full(len(s[2]), local[s[3]], np.int32) for s in segs]) if segs
                   else np.zeros(0, np.int32))
        truncated = (np.concatenate([s[4] if s[4] is not None else np.zeros(len(s[2]), np.bool_) for s in segs])
                     if segs else np.zeros(0, np.bool_))
        # loss tokens per record: the mask's count, or the length where every token is a target
        loss = (np.concatenate([np.asarray([int(s[1].sum())], np.int64) if s[1] is not None else s[2]
                                for s in segs]) if segs else np.zeros(0, np.int64))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        files = {"tokens.npy": self._stream_array(folder / "tokens.npy", self.dtype, total, self._token_pieces()),
                 "loss_mask.npy": self._stream_array(folder / "loss_mask.npy", np.bool_, total,
                                                     self._mask_pieces())}
        for tokens, *_ in segs:
            if isinstance(tokens, Path):
                tokens.unlink(missing_ok=True)
        self.segments = []
        for name, arr in (("offsets.npy", offsets), ("domains.npy", domains), ("truncated.npy", truncated)):
            files[name] = save_array(folder / name, arr)
        per_domain = {}
        for d in sorted(set(names) | set(self.counts)):
            sel = domains == local[d] if d in local else np.zeros(len(domains), np.bool_)
            per_domain[d] = {"records": int(sel.sum()), "tokens": int(lengths[sel].sum()),
                             "loss_tokens": int(loss[sel].sum()), "truncated": int(truncated[sel].sum()),
                             **self.counts.get(d, {})}
        return {"num_records": int(len(lengths)), "num_tokens": total, "domains": names,
                "per_domain": per_domain, "files": files}


def merge_per_domain(blocks) -> dict:
    """Sum per-domain counter dicts (shards -> split), keys sorted."""
    out = {}
    for block in blocks:
        for d, c in block.items():
            acc = out.setdefault(d, {})
            for k, v in c.items():
                acc[k] = acc.get(k, 0) + v
    return {d: out[d] for d in sorted(out)}


# ----------------------------------------------------------------------------- reading


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PoolFormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PoolFormatError(f"{path}: format is {got!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise PoolFormatError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported by this "
            f"ds_partitionsel (reads versions {list(READABLE_VERSIONS)}); rebuild the pool with this "
            f"version's tools/build_pool.py")
    for key in ("tokenizer", "max_length", "domains", "splits"):
        if key not in manifest:
            raise PoolFormatError(f"{path}: missing key {key!r}")
    domains = manifest["domains"]
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise PoolFormatError(f"{path}: 'domains' must be a list of names, got {domains!r}")
    twice = sorted({d for d in domains if domains.count(d) > 1})
    if twice:
        raise PoolFormatError(f"{path}: 'domains' lists {twice} more than once; a domain has one id. "
                              f"The manifest was edited: rebuild the pool")
    if not isinstance(manifest["splits"], dict):
        raise PoolFormatError(f"{path}: 'splits' must map split names to their entries")
    return manifest


def split_shards(manifest: dict, split: str) -> list:
    """The shard entries of one split, each with ``dir`` (relative to the pool), whatever the version."""
    entry = manifest["splits"][split]
    if manifest["format_version"] == 1:  # one shard, arrays in the split folder, global domain ids
        return [{"dir": split, "num_records": entry["num_records"], "num_tokens": entry["num_tokens"],
                 "domains": list(manifest["domains"]), "files": entry["files"]}]
    shards = entry.get("shards") if isinstance(entry, dict) else None
    if not isinstance(shards, list):
        raise PoolFormatError(f"manifest split {split!r} lists no shards")
    for k, s in enumerate(shards):
        _check_shard_entry(s, f"manifest split {split!r}, shard {k}")
    return [dict(s, dir=f"{split}/{s['dir']}".rstrip("/")) for s in shards]


# what a shard entry of the manifest holds: key -> (type, what it is)
SHARD_KEYS = {"dir": (str, "its folder inside the split folder"), "num_records": (int, "a count"),
              "num_tokens": (int, "a count"), "domains": (list, "its domain table"),
              "files": (dict, "its array files")}


def _check_shard_entry(shard, where: str) -> None:
    """A shard entry names a folder inside its split (no ``..``, not absolute), its counts, a
    domain table of distinct names and its files; ``PoolFormatError`` naming what is wrong."""
    if not isinstance(shard, dict):
        raise PoolFormatError(f"{where} is not an object: the manifest is damaged, rebuild the pool")
    for key, (kind, what) in SHARD_KEYS.items():
        if not isinstance(shard.get(key), kind) or isinstance(shard.get(key), bool):
            raise PoolFormatError(f"{where} has no valid {key!r} ({what}; got {shard.get(key)!r}): the manifest "
                                  f"is damaged, rebuild the pool")
    folder = shard["dir"]
    if folder.startswith("/") or "\\" in folder or any(part in ("..", ".") for part in folder.split("/")):
        raise PoolFormatError(f"{where}: 'dir' {folder!r} leaves the split folder; a pool only reads files "
                              f"inside itself (rebuild the pool)")
    names = shard["domains"]
    if not all(isinstance(d, str) for d in names):
        raise PoolFormatError(f"{where}: its domain table {names!r} must list names")
    twice = sorted({d for d in names if names.count(d) > 1})
    if twice:
        raise PoolFormatError(f"{where}: its domain table lists {twice} more than once; rebuild the pool")


def pool_files(manifest: dict) -> list:
    """Every file of a pool (relative paths), the manifest included."""
    files = [MANIFEST]
    for split in manifest["splits"]:
        for shard in split_shards(manifest, split):
            files += [f"{shard['dir']}/{name}" for name in shard["files"]]
    return files


def open_shard(pool_dir, manifest: dict, shard: dict, verify: bool = False) -> dict:
    """Memory-map one shard's arrays and check them against its manifest entry.

    Checks: every file present, byte size, dtype and shape as recorded; offsets start at 0, end
    at the token count and never decrease; domain ids index the shard's domain list, whose names
    are domains of the pool. ``verify=True`` also re-hashes every file (reads it all).
    Returns ``{file stem: np.ndarray (read-only memmap)}`` plus ``"global_domain"`` (local id ->
    pool domain id, an int64 array).
    """
    base = Path(pool_dir) / shard["dir"]
    root = Path(pool_dir).resolve()
    if base.resolve() != root and root not in base.resolve().parents:  # e.g. a symbolic link out of the pool
        raise PoolFormatError(f"{base} resolves to {base.resolve()}, outside the pool {root}; a pool only reads "
                              f"files inside itself")
    arrays = {}
    for name, (want_dtype, _) in ARRAY_FILES.items():
        path = base / name
        rec = shard["files"].get(name)
        if rec is None:
            raise PoolFormatError(f"manifest of {pool_dir} lists no {shard['dir']}/{name}")
        if not path.is_file():
            raise PoolFormatError(f"{path} is missing; the pool is incomplete, rebuild it")
        if os.path.getsize(path) != rec["bytes"]:
            raise PoolFormatError(
                f"{path} has {os.path.getsize(path)} bytes, the manifest says {rec['bytes']}; "
                f"the file was changed or truncated, rebuild the pool")
        if verify and sha256_file(path) != rec["sha256"]:
            raise PoolFormatError(f"{path}: SHA-256 differs from the manifest; rebuild the pool")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # e.g. an object array (pickle), or not a .npy file
            raise PoolFormatError(f"{path} is not a plain .npy array ({e}); pools hold numeric arrays only, "
                                  f"never pickled objects: rebuild the pool") from None
        allowed = (np.dtype(np.uint16), np.dtype(np.uint32)) if want_dtype is None else (np.dtype(want_dtype),)
        if arr.dtype not in allowed:
            raise PoolFormatError(f"{path} holds {arr.dtype} values, expected "
                                  f"{' or '.join(d.name for d in allowed)}: rebuild the pool")
        if arr.dtype.str != rec["dtype"] or list(arr.shape) != rec["shape"]:
            raise PoolFormatError(f"{path}: dtype/shape {arr.dtype.str}{list(arr.shape)} differ from the "
                                  f"manifest's {rec['dtype']}{rec['shape']}")
        arrays[name[:-4]] = arr
    n, t = shard["num_records"], shard["num_tokens"]
    offsets = arrays["offsets"]
    sizes = {"tokens": t, "loss_mask": t, "offsets": n + 1, "domains": n, "truncated": n}
    for stem, want in sizes.items():
        if arrays[stem].shape != (want,):
            raise PoolFormatError(f"{base}/{stem}.npy has shape {arrays[stem].shape}, expected ({want},)")
    if offsets[0] != 0 or offsets[-1] != t or (n > 0 and np.any(np.diff(offsets) < 0)):
        raise PoolFormatError(f"{base}/offsets.npy is not a valid offset table (0 .. {t}, nondecreasing)")
    if n > 0 and np.diff(offsets).min() < MIN_RECORD_TOKENS:
        short = int(np.argmin(np.diff(offsets)))
        raise PoolFormatError(f"{base}: record {short} holds {int(offsets[short + 1] - offsets[short])} token(s), "
                              f"fewer than the {MIN_RECORD_TOKENS} a training target needs (it would train as a "
                              f"loss of 0); rebuild the pool")
    names = list(manifest["domains"])
    unknown = [d for d in shard["domains"] if d not in names]
    if unknown:
        raise PoolFormatError(f"{base}: shard domains {unknown} are not domains of the pool {names}")
    if n > 0 and (arrays["domains"].min() < 0 or arrays["domains"].max() >= len(shard["domains"])):
        raise PoolFormatError(f"{base}/domains.npy has ids outside 0..{len(shard['domains']) - 1}")
    arrays["global_domain"] = np.asarray([names.index(d) for d in shard["domains"]], dtype=np.int64)
    return arrays


def open_split_arrays(pool_dir, manifest: dict, split: str, verify: bool = False) -> list:
    """Open every shard of one split (see :func:`open_shard`); returns the list in shard order."""
    splits = manifest["splits"]
    if split not in splits:
        raise PoolFormatError(f"pool {pool_dir} has no split {split!r}; it has {sorted(splits)}")
    shards = split_shards(manifest, split)
    opened = [open_shard(pool_dir, manifest, s, verify=verify) for s in shards]
    entry = splits[split]
    n = sum(s["num_records"] for s in shards)
    if n != entry["num_records"]:
        raise PoolFormatError(f"pool {pool_dir} split {split!r}: shards hold {n} records, the manifest "
                              f"says {entry['num_records']}")
    check_domain_counts(pool_dir, manifest, split, opened)
    return opened


def check_domain_counts(pool_dir, manifest: dict, split: str, opened: list) -> None:
    """The records of each domain, counted through every shard's own domain table, must be the
    split's ``per_domain`` counts of the manifest: a shard whose table was reordered or renamed
    would otherwise relabel its records silently (its files, and so their hashes, unchanged)."""
    per_domain = manifest["splits"][split].get("per_domain")
    if not isinstance(per_domain, dict):
        return  # version 1 pools record no per-domain counts
    names = list(manifest["domains"])
    counts = np.zeros(len(names), np.int64)
    for arrays in opened:
        local = np.bincount(np.asarray(arrays["domains"], dtype=np.int64), minlength=len(arrays["global_domain"]))
        np.add.at(counts, arrays["global_domain"], local[:len(arrays["global_domain"])])
    wrong = [(d, int(counts[j]), (per_domain.get(d) or {}).get("records", 0)) for j, d in enumerate(names)
             if int(counts[j]) != (per_domain.get(d) or {}).get("records", 0)]
    if wrong:
        detail = "; ".join(f"{d!r}: {got} records in the shards, {want} in the manifest" for d, got, want in wrong)
        raise PoolFormatError(f"pool {pool_dir} split {split!r}: per-domain record counts disagree with the "
                              f"manifest ({detail}): a shard's domain table or domains.npy was changed, so records "
                              f"would carry the wrong domain. Rebuild the pool")


# ----------------------------------------------------------------------------- replacing a pool


def check_replaceable(out, inputs=()) -> str | None:
    """Why ``out`` must not be replaced by a new pool, or ``None`` when it may be.

    Only a pool of ours may be replaced: a directory whose manifest reads as a pool and which
    holds exactly the files that manifest lists (a file the user put there would be lost), and
    which holds none of the build's ``inputs`` (paths of input files or folders). A file, a
    symbolic link, a non-pool directory (``.``, a data folder) are refused.
    """
    out = Path(out)
    if out.is_symlink():
        return f"--out {out} is a symbolic link; pass the real directory"
    if not out.exists():
        return None
    if not out.is_dir():
        return f"--out {out} is an existing file, not a pool directory; refusing to replace it"
    try:
        manifest = read_manifest(out)
        listed = set(pool_files(manifest))
    except (PoolFormatError, KeyError, TypeError) as e:
        return (f"--out {out} exists and is not a ds_partitionsel pool ({str(e)[:200]}); refusing to "
                f"replace it: choose a new --out (nothing was changed)")
    real_out = out.resolve()
    for item in inputs:
        p = Path(item).resolve()
        if p == real_out or real_out in p.parents:
            return f"--out {out} holds the input {item}; refusing to replace it"
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_symlink() or (p.is_file() and rel not in listed) or not (p.is_file() or p.is_dir()):
            return (f"--out {out} is a pool but also holds {rel}, which is not part of it; refusing to "
                    f"replace it (move that file away first)")
        if p.is_dir() and not any(f.startswith(rel + "/") for f in listed):
            return f"--out {out} is a pool but also holds the folder {rel}; refusing to replace it"
    return None


def make_staging(out: Path) -> Path:
    """A fresh hidden directory next to ``out`` (same file system, so the final rename is atomic)."""
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


def commit_pool(staging: Path, out: Path, inputs=(), overwrite: bool = False) -> None:
    """Move a finished pool into place. An existing ``out`` must pass :func:`check_replaceable`
    (checked again here, right before it is touched); it is kept until the new pool is there.

    Without ``overwrite`` the claim of ``out`` is atomic: ``mkdir(out)`` fails when anything
    appeared there since the build started (another build to the same ``--out``), and only the
    empty folder this process just created is then replaced by the rename. Raises
    :class:`PoolFormatError` (nothing changed) in that case.
    """
    reason = check_replaceable(out, inputs)
    if reason:
        raise PoolFormatError(reason)
    os.chmod(staging, 0o755)  # mkdtemp makes it private
    if not overwrite:
        try:
            os.mkdir(out)  # atomic: exactly one of several builds to ``out`` gets it
        except FileExistsError:
            raise PoolFormatError(
                f"--out {out} appeared while this build ran (another build to the same --out?); it was left as it "
                f"is and this build's pool was discarded: choose another --out, or pass --overwrite to replace "
                f"it") from None
        try:
            os.rename(staging, out)  # replaces the empty folder claimed above
        except BaseException:
            os.rmdir(out)
            raise
        return
    if out.exists():
        backup = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rmdir(backup)
        os.rename(out, backup)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(backup, out)
            raise
        shutil.rmtree(backup)
    else:
        os.rename(staging, out)
