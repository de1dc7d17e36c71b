"""Batch diagnostics."""
import torch


def conflicting_pairs(features: torch.Tensor, indices: torch.Tensor) -> int:
    """Number of selected pairs ``i < j`` whose gradients conflict: ``<g_i, g_j> < 0``.

    features : (n, p); indices : (k,) rows of the selected batch.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (n, p), got {tuple(features.shape)}")
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= features.shape[0]):
        raise ValueError(f"indices must lie in [0, {features.shape[0]}), got range "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    g = features[idx].double()
    gram = g @ g.T
    return int(torch.triu(gram < 0, diagonal=1).sum())
