"""Short scoring windows (``sketch.score_len``): score ``W`` tokens of each sequence, not all.

The scorer's cost is linear in the tokens it reads (the forward of the pool is the bill, see
docs/COST.md), so scoring a window of ``W`` of a sequence's ``T`` tokens costs about ``W / T``
of scoring it whole. The window is a contiguous span ``[s, s + W)`` (the model sees a coherent
context), its start drawn from ``(seed, key, record id)`` only, so every rank, world size and
resume picks the same window for the same record, and another draw key (another pool, another
anchor refresh) gives another window.

Labels inside a window follow the sketch's rule (token ``t`` is a label when it is a loss token
and ``t - 1`` is also in the window), so a window must hold a label and its predecessor. The
start is drawn uniformly among the starts whose window holds at least one label: with
``f`` the first and ``l`` the last label position of the record (length ``L > W``),
``s in [max(0, f - W + 1), min(L - W, l - 1)]`` (never empty: ``W >= 2``, ``1 <= f <= l < L``).
A record with no label uses ``[0, L - W]``; a record of ``L <= W`` tokens is scored whole.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ds_partitionsel.sampler import derived_seed

__all__ = ["window_starts", "crop_windows"]


def window_starts(lengths: torch.Tensor, labels: torch.Tensor, record_ids: Sequence[int], width: int,
                  seed: int, key) -> torch.Tensor:
    """Start position of each row's window, ``(B,)`` int64.

    lengths : (B,) tokens of each right-padded row. labels : (B, T) bool, the label positions
    (:func:`ds_partitionsel.sketch.label_mask`). record_ids : the B records' global ids (the draw
    of a row depends on its record, never on its place in the batch). width : ``W >= 2``.
    key : anything hashable by ``repr`` that names the draw (e.g. ``("pool", group)``).
    """
    if width < 2:
        raise ValueError(f"score_len must be >= 2 (a label and its predecessor), got {width}")
    if len(record_ids) != lengths.numel() or labels.shape[0] != lengths.numel():
        raise ValueError(f"{len(record_ids)} record ids for {lengths.numel()} rows")
    starts = torch.zeros(lengths.numel(), dtype=torch.int64)
    for row, (length, rid) in enumerate(zip(lengths.tolist(), record_ids)):
        if length <= width:
            continue
        where = labels[row].nonzero().flatten()
        lo, hi = 0, length - width
        if where.numel():
            lo = max(0, int(where[0]) - width + 1)
            hi = min(hi, int(where[-1]) - 1)
        starts[row] = lo + derived_seed("score_window", seed, key, int(rid)) % (hi - lo + 1)
    return starts


def crop_windows(batch: dict, record_ids: Sequence[int], width: int, seed: int, key) -> dict:
    """A collated right-padded batch cut to each row's window: ``(B, min(W, T))`` tensors.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``loss_mask`` (B, T) (other keys are
    dropped). Rows of ``L <= W`` tokens are kept whole (their padding stays padding).
    """
    from ds_partitionsel.sketch import label_mask

    ids, attn, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    T = ids.shape[1]
    if T <= width:
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
    lengths = attn.sum(1)
    starts = window_starts(lengths, label_mask(attn, loss), record_ids, width, seed, key)
    cols = starts[:, None] + torch.arange(width)[None, :]  # (B, W), inside [0, T): s + W <= max(L, W) <= T
    return {"input_ids": ids.gather(1, cols), "attention_mask": attn.gather(1, cols),
            "loss_mask": loss.gather(1, cols)}
