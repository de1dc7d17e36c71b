"""The per-sequence loss: the one convention that sketches, training and evaluation share.

For a batch of sequences with ``labels`` (``-100`` where a token is not trained on), the loss of
sequence ``b`` is the mean token NLL over its label tokens::

    loss_b = (1 / |T_b|) sum_{t in T_b} -log p(x_{b,t} | x_{b,<t}),   T_b = {t >= 1 : labels[b, t] != -100}

The batch loss is the plain mean over sequences (every sequence counts the same, whatever its
length), or ``mean_b(w_b * loss_b)`` with per-sequence weights (``use_weights``). A per-sample
gradient sketch is the gradient of ``loss_b``, so what is selected and what is trained agree.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["per_sequence_loss", "batch_loss"]


def per_sequence_loss(model, batch: dict, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss (B,), label_count (B,))`` of ``model`` (any causal LM returning ``.logits``, or a
    DeepSpeed engine wrapping one) on a collated ``batch`` with ``input_ids``, ``attention_mask``
    and ``labels`` (B, T). Logits are taken in float32 whatever the model's dtype."""
    if device is None:
        device = batch["input_ids"].device
    ids = batch["input_ids"].to(device)
    out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device))
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=-100, reduction="none").view(labels.shape)
    count = (labels != -100).sum(1)
    return nll.sum(1) / count.clamp(min=1), count


def batch_loss(model, batch: dict, weights: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """The training loss of a micro batch: the mean of :func:`per_sequence_loss`, weighted by
    ``weights`` (B,) when given."""
    per_seq, _ = per_sequence_loss(model, batch, device)
    if weights is not None:
        return (per_seq * weights.to(per_seq.device, per_seq.dtype)).mean()
    return per_seq.mean()
