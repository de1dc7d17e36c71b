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

__all__ = ["CandidatePool", "PoolFormatError"]

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
        if isinstance(i, (torch.Tensor, np.ndarray)):
            i = i.item()
        i = int(i)
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
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; pass the tokenizer's pad id (or its eos id if it has none)")
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
