"""Read a candidate pool built by ``tools/build_pool.py`` (format: :mod:`ds_partitionsel.pool_format`).

    pool = CandidatePool(".cache/pools/demo", split="train", tokenizer=".cache/models/smollm2-135m")
    len(pool)                 # N records
    pool[i]                   # {"input_ids": (T_i,) int64, "loss_mask": (T_i,) bool, "domain": int}
    batch = pool.collate([3, 1, 4], pad_token_id=2)   # right-padded (B, T) tensors

The arrays are memory-mapped: opening a pool reads only the manifest and the small per-record
arrays, and every rank of a job can open the same files and fetch any record by global index.
A split stored as several shards (``tools/build_pool.py`` on a large corpus) reads as one
sequence of records: global index ``i`` maps to the shard that holds it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .pool_format import PoolFormatError, load_tokenizer, open_split_arrays, read_manifest, tokenizer_fingerprint
from .sampler import as_int

__all__ = ["CandidatePool", "PoolFormatError", "check_pad_id", "check_same_pool"]

IGNORE_INDEX = -100


class CandidatePool:
    """Map-style view of one split of a pool directory, indexed by global record index.

    Parameters
    ----------
    path : str or Path
        The pool directory (holds ``manifest.json``).
    split : str
        Which split to read (``"train"``, ``"valid"``, ...).
    tokenizer : None, str, Path or a Hugging Face tokenizer
        When given, the pool must have been built with the same tokenizer (compared by
        :func:`~ds_partitionsel.pool_format.tokenizer_fingerprint`); otherwise ``ValueError``.
    verify : bool
        Also re-hash every array file against the manifest (reads the whole split).

    Attributes
    ----------
    domains : torch.LongTensor (N,)
        Domain id of every record.
    domain_names : list[str]
        ``domain_names[d]`` is the name of domain id ``d`` (shared by all splits of the pool).
    lengths : torch.LongTensor (N,)
        Token count of every record (after truncation).
    manifest : dict
        The parsed ``manifest.json``.
    """

    def __init__(self, path, split: str = "train", tokenizer=None, *, verify: bool = False):
        self.path = Path(path)
        self.split = split
        self.manifest = read_manifest(self.path)
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        shards = open_split_arrays(self.path, self.manifest, split, verify=verify)
        self._tokens = [s["tokens"] for s in shards]        # per shard: (T_s,) memmap
        self._loss_mask = [s["loss_mask"] for s in shards]  # per shard: (T_s,) memmap
        offsets = [np.array(s["offsets"], dtype=np.int64) for s in shards]  # small: keep in memory
        # per record: its shard, and its first token within that shard
        self._shard_of = np.concatenate([np.full(len(o) - 1, k, dtype=np.int32) for k, o in enumerate(offsets)]
                                        + [np.zeros(0, np.int32)])
        self._starts = np.concatenate([o[:-1] for o in offsets] + [np.zeros(0, np.int64)])
        self._shard_offsets = offsets
        self.domain_names = list(self.manifest["domains"])
        self.domains = torch.from_numpy(np.concatenate(
            [s["global_domain"][np.asarray(s["domains"], dtype=np.int64)] for s in shards] + [np.zeros(0, np.int64)]))
        self.lengths = torch.from_numpy(np.concatenate([np.diff(o) for o in offsets] + [np.zeros(0, np.int64)]))
        self.truncated = torch.from_numpy(np.concatenate(
            [np.array(s["truncated"], dtype=np.bool_) for s in shards] + [np.zeros(0, np.bool_)]))
        self.num_shards = len(shards)

    def _check_tokenizer(self, tokenizer) -> None:
        built = self.manifest["tokenizer"]
        if isinstance(tokenizer, (str, Path)):
            name, tokenizer = str(tokenizer), load_tokenizer(tokenizer)
        else:
            name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        got = tokenizer_fingerprint(tokenizer)
        if got != built["fingerprint_sha256"]:
            raise ValueError(
                f"pool {self.path} was built with tokenizer {built['name_or_path']!r} "
                f"(fingerprint {built['fingerprint_sha256'][:12]}), but tokenizer {name!r} has fingerprint "
                f"{got[:12]}. Token ids would not match the model: rebuild the pool with "
                f"python tools/build_pool.py --tokenizer {name} ...")

    # ------------------------------------------------------------------ map-style access

    def __len__(self) -> int:
        return len(self._starts)

    def _index(self, i) -> int:
        n = len(self)
        i = as_int(i, "a pool index")  # 2.7 or True is a caller's bug, never a record
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a pool split of {n} records")
        return i + n if i < 0 else i

    def __getitem__(self, i) -> dict:
        """Record ``i``: ``{"input_ids": LongTensor (T_i,), "loss_mask": BoolTensor (T_i,), "domain": int}``.

        ``loss_mask[t]`` True means token t is a response token trained on (its label is the
        token itself; the model shifts internally).
        """
        i = self._index(i)
        k, a = self._shard_of[i], self._starts[i]
        b = a + int(self.lengths[i])
        return {
            "input_ids": torch.from_numpy(self._tokens[k][a:b].astype(np.int64)),
            "loss_mask": torch.from_numpy(np.array(self._loss_mask[k][a:b], dtype=np.bool_)),
            "domain": int(self.domains[i]),
        }

    def collate(self, indices: Sequence[int], pad_token_id: int) -> dict:
        """Right-padded batch of the records ``indices`` (B of them), T = longest in the batch.

        Returns ``input_ids`` (B, T) int64 (``pad_token_id`` after each record),
        ``attention_mask`` (B, T) int64, ``loss_mask`` (B, T) bool, ``labels`` (B, T) int64
        (``input_ids`` where ``loss_mask``, else -100) and ``domains`` (B,) int64.
        """
        pad_token_id = check_pad_id(self, pad_token_id)
        idx = [self._index(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        if not idx:
            raise ValueError("collate needs at least one index")
        starts, shards = self._starts[idx], self._shard_of[idx]
        lens = self.lengths.numpy()[idx]
        B, T = len(idx), int(lens.max())
        input_ids = np.full((B, T), int(pad_token_id), dtype=np.int64)
        loss_mask = np.zeros((B, T), dtype=np.bool_)
        attention = np.zeros((B, T), dtype=np.int64)
        for row, (k, a, n) in enumerate(zip(shards, starts, lens)):
            input_ids[row, :n] = self._tokens[k][a:a + n]
            loss_mask[row, :n] = self._loss_mask[k][a:a + n]
            attention[row, :n] = 1
        labels = np.where(loss_mask, input_ids, IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "loss_mask": torch.from_numpy(loss_mask),
            "labels": torch.from_numpy(labels),
            "domains": self.domains[torch.as_tensor(idx, dtype=torch.int64)],
        }

    def domain_counts(self) -> torch.Tensor:
        """(D,) int64: number of records of each domain id in this split (D = len(domain_names))."""
        return torch.bincount(self.domains, minlength=len(self.domain_names))

    def loss_token_counts(self) -> torch.Tensor:
        """(N,) int64: number of trained (response) tokens of every record. Reads the whole mask."""
        counts = [np.zeros(0, np.int64)]
        for mask, offsets in zip(self._loss_mask, self._shard_offsets):  # one shard in memory at a time
            running = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
            counts.append(running[offsets[1:]] - running[offsets[:-1]])
        return torch.from_numpy(np.concatenate(counts))

    def __repr__(self) -> str:
        counts = dict(zip(self.domain_names, self.domain_counts().tolist()))
        return f"CandidatePool({str(self.path)!r}, split={self.split!r}, n={len(self)}, domains={counts})"


def _tokenizer_block(pool) -> dict:
    manifest = getattr(pool, "manifest", None)  # a view of a pool (a subset) may carry none
    block = manifest.get("tokenizer") if isinstance(manifest, dict) else None
    return block if isinstance(block, dict) else {}


def check_pad_id(pool, pad_token_id) -> int:
    """``pad_token_id`` as an int inside the vocabulary of ``pool``'s tokenizer, else
    ``ValueError``/``TypeError`` (an id past the vocabulary fails only later, as a bare IndexError
    in the model's embedding)."""
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; pass the tokenizer's pad id (or its eos id if it has none)")
    pad = as_int(pad_token_id, "pad_token_id")
    vocab = _tokenizer_block(pool).get("vocab_size")
    vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
    if pad < 0 or (vocab is not None and pad >= vocab):
        raise ValueError(f"pad_token_id {pad} is outside the vocabulary of the tokenizer of pool "
                         f"{getattr(pool, 'path', '?')} (ids 0..{vocab - 1 if vocab else '?'}); pass the "
                         f"tokenizer's pad id (or its eos id when it has none)")
    return pad


def check_same_pool(train, other, what: str = "validation split") -> None:
    """Refuse ``other`` (a split used with the training split ``train``) when it comes from a pool
    with other domains (ids would name other domains) or another tokenizer (ids would be other
    tokens). Raises ``ValueError`` naming both pools."""
    if list(other.domain_names) != list(train.domain_names):
        raise ValueError(f"the {what} ({getattr(other, 'path', '?')}) has domains {list(other.domain_names)}, "
                         f"the training split ({getattr(train, 'path', '?')}) has {list(train.domain_names)}: domain "
                         f"ids would mean other domains; use the splits of one pool")
    mine, theirs = _tokenizer_block(train), _tokenizer_block(other)
    if mine and theirs and mine.get("fingerprint_sha256") != theirs.get("fingerprint_sha256"):
        raise ValueError(f"the {what} ({getattr(other, 'path', '?')}) was built with tokenizer "
                         f"{theirs.get('name_or_path')!r} (fingerprint {str(theirs.get('fingerprint_sha256'))[:12]}), "
                         f"the training split ({getattr(train, 'path', '?')}) with {mine.get('name_or_path')!r} "
                         f"({str(mine.get('fingerprint_sha256'))[:12]}): token ids would mean other tokens; use the "
                         f"splits of one pool")
