"""Judging a scorer's choice on the main model's terms (``tools/bench_proxy.py``,
``tools/bench_proxy_sizes.py``): the sketches of a list of records, and the utility a chosen set
reaches at its best nonnegative weights."""
from __future__ import annotations


def sketch_pool(sketcher, pool, ids, pad_token_id, batch):
    """``(n, p)`` features of records ``ids``, ``batch`` records per forward."""
    import torch

    rows = []
    for s in range(0, len(ids), batch):
        b = pool.collate(ids[s:s + batch], pad_token_id)
        rows.append(sketcher.sketch(b["input_ids"], b["attention_mask"], b["loss_mask"]))
    return torch.cat(rows)


def best_utility(features, target, indices, lr, ridge=0.0):
    """``U*(S) = max_{w >= 0} <w, a_S> - 1/2 w^T Q_SS w`` on the rows ``indices``, float64.

    As a nonnegative least squares problem: with ``Q_SS = R^T R`` (Cholesky), the objective is
    ``-1/2 ||R w - R^{-T} a_S||^2`` plus a constant, so ``w* = nnls(R, R^{-T} a_S)``.
    """
    import numpy as np
    import torch
    from scipy.optimize import nnls

    from ds_partitionsel.selection import selection_utility

    g = features[indices].double()
    gram = g @ g.T
    a = lr * (g @ target.double()) + 0.5 * lr * lr * torch.diagonal(gram)
    q = lr * lr * gram + ridge * torch.eye(len(indices), dtype=torch.float64)
    q = q + 1e-12 * float(torch.diagonal(q).mean()) * torch.eye(len(indices), dtype=torch.float64)
    r = np.linalg.cholesky(q.numpy()).T
    w, _ = nnls(r, np.linalg.solve(r.T, a.numpy()))
    return selection_utility(features, target, indices, torch.from_numpy(w), lr=lr, ridge=ridge)
