"""Forward-only features: the LM head's per-sample gradient (``sketch.mode`` ``head`` / ``head_kron``).

For the output head ``z_t = W h_t (+ b)`` (``W: (V, d)``) and the per-sample loss
``L_i = (1/|M_i|) sum_{t in M_i} -log softmax(z_t)[y_t]`` (the sketch's loss, see
:mod:`ds_partitionsel.sketch`), the gradient with respect to ``W`` is

    G_i = (1/|M_i|) sum_{t in M_i} (softmax(z_t) - e_{y_t}) h_t^T,        (V, d)

with ``h_t`` the final hidden state that predicts label ``t``. Everything in it comes out of the
forward pass: no backward, no autograd graph, no activations kept. So scoring costs one forward
of the scorer (the blocks) plus the head at the label positions, where a block sketch also pays
a backward through the sketched blocks (see docs/COST.md).

- ``mode="head"``: ``vec(G_i)``, ``V * d`` columns (the order of ``W.grad.flatten()``); for small
  vocabularies and tests, or with ``dim`` (a dense projection of it).
- ``mode="head_kron"``: ``P_out^T G_i P_in = (1/|M_i|) sum_t (P_out^T (p_t - e_t)) (P_in^T h_t)^T``
  with the Gaussian factors of :class:`~ds_partitionsel.sketch.GradientSketcher`'s ``kron`` mode
  for the head's module name (``P_out: (V, k_out)``, ``P_in: (d, k_in)``, ``N(0, 1/k)``), so the
  features equal that sketcher's ``kron`` sketch of the head, computed without its backward.

Chunked over the vocabulary: ``P_out^T p_t`` is accumulated over chunks of ``vocab_chunk`` rows of
``W`` with an online softmax (the running maximum rescales the running sums), so at most
``positions x vocab_chunk`` logits exist at once and the softmax is never materialized over the
vocabulary. The exact mode needs the normalizer first: one online pass for the log-sum-exp, then
a second pass writes each chunk's ``(vocab_chunk, d)`` block of ``G_i``.

The head runs on an empty slice during the forward (as in the chunked head of the sketcher), and
the features are computed in its forward hook, while the forward holds the head's weight (whole,
also under ZeRO-3). Heads that transform their logits after the linear (soft-capping, logit
scales) or that are not a plain ``nn.Linear`` are refused.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .projection import BlockGaussianProjection, gaussian_matrix
from .sketch import _LOGIT_TRANSFORMS, _nonfinite_rows, label_mask, unwrap_model

__all__ = ["HEAD_MODES", "HeadSketcher", "head_kron_features", "head_exact_features"]

HEAD_MODES = ("head", "head_kron")
_VOCAB_CHUNK = 8192
_POSITION_CHUNK = 512


# --------------------------------------------------------------------------- pure kernels

def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lo: int, hi: int):
    """``(M, hi - lo)`` float32 logits of vocabulary rows ``lo:hi``."""
    z = hidden @ weight[lo:hi].to(hidden.dtype).T
    if bias is not None:
        z = z + bias[lo:hi].to(hidden.dtype)
    return z.float()


def head_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   vocab_chunk: int) -> torch.Tensor:
    """``(M,)`` log-sum-exp of the logits ``W h_m + b`` over the vocabulary, one chunk at a time."""
    m = torch.full((hidden.shape[0],), -math.inf, dtype=torch.float32, device=hidden.device)
    s = torch.zeros_like(m)
    for lo in range(0, weight.shape[0], vocab_chunk):
        z = _logits(hidden, weight, bias, lo, min(lo + vocab_chunk, weight.shape[0]))
        new = torch.maximum(m, z.max(1).values)
        s = s * torch.exp(m - new) + torch.exp(z - new[:, None]).sum(1)
        m = new
    return m + torch.log(s)


def projected_softmax(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      p_out: Optional[torch.Tensor], vocab_chunk: int) -> torch.Tensor:
    """``P_out^T softmax(W h_m + b)`` for each of the ``M`` rows of ``hidden`` (M, k_out), in one
    pass over vocabulary chunks (online softmax: the running maximum rescales the sums).
    ``p_out`` None: the identity (the softmax itself, (M, V))."""
    M, V = hidden.shape[0], weight.shape[0]
    width = V if p_out is None else p_out.shape[1]
    m = torch.full((M,), -math.inf, dtype=torch.float32, device=hidden.device)
    s = torch.zeros_like(m)
    acc = torch.zeros(M, width, dtype=torch.float32, device=hidden.device)
    for lo in range(0, V, vocab_chunk):
        hi = min(lo + vocab_chunk, V)
        z = _logits(hidden, weight, bias, lo, hi)
        new = torch.maximum(m, z.max(1).values)
        scale = torch.exp(m - new)
        e = torch.exp(z - new[:, None])
        s = s * scale + e.sum(1)
        acc.mul_(scale[:, None])
        if p_out is None:
            acc[:, lo:hi] += e
        else:
            acc.addmm_(e, p_out[lo:hi].float())
        m = new
    return acc / s[:, None]


def head_kron_features(hidden, weight, bias, targets, rows, row_weights, n, p_in, p_out,
                       vocab_chunk: int = _VOCAB_CHUNK) -> torch.Tensor:
    """``(n, k_out * k_in)``: ``sum_m w_m (P_out^T (p_m - e_{y_m})) (P_in^T h_m)^T`` per sample.

    hidden : (M, d) hidden states of the label positions; targets : (M,) their token ids;
    rows : (M,) the sample of each position; row_weights : (M,) ``1/|M_i|``; ``p_in`` (d, k_in)
    and ``p_out`` (V, k_out), None for the identity on that side.
    """
    hidden = hidden.float()
    u = projected_softmax(hidden, weight, bias, p_out, vocab_chunk)
    u -= (p_out[targets].float() if p_out is not None
          else torch.nn.functional.one_hot(targets, weight.shape[0]).float())
    v = hidden if p_in is None else hidden @ p_in.float()
    u *= row_weights[:, None]
    out = torch.zeros(n, u.shape[1] * v.shape[1], dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, rows, (u[:, :, None] * v[:, None, :]).flatten(1))


def head_exact_features(hidden, weight, bias, targets, rows, row_weights, n,
                        vocab_chunk: int = _VOCAB_CHUNK) -> torch.Tensor:
    """``(n, V * d)``: ``vec(sum_m w_m (p_m - e_{y_m}) h_m^T)`` per sample, row-major like
    ``W.grad.flatten()``. Two passes over vocabulary chunks: the log-sum-exp, then each chunk's
    ``(chunk, d)`` block of every sample's gradient."""
    hidden = hidden.float()
    V, d = weight.shape
    lse = head_logsumexp(hidden, weight, bias, vocab_chunk)
    out = torch.zeros(n, V, d, dtype=torch.float32, device=hidden.device)
    onehot_rows = torch.arange(hidden.shape[0], device=hidden.device)
    weighted = hidden * row_weights[:, None]
    for lo in range(0, V, vocab_chunk):
        hi = min(lo + vocab_chunk, V)
        probs = torch.exp(_logits(hidden, weight, bias, lo, hi) - lse[:, None])  # (M, c)
        inside = (targets >= lo) & (targets < hi)
        probs[onehot_rows[inside], targets[inside] - lo] -= 1.0
        for i in range(n):
            mine = rows == i
            if bool(mine.any()):
                out[i, lo:hi] = probs[mine].T @ weighted[mine]
    return out.flatten(1)


# --------------------------------------------------------------------------- the sketcher

class HeadSketcher:
    """Per-sample LM-head gradient features from a forward pass only.

    The interface of :class:`~ds_partitionsel.sketch.GradientSketcher` (``sketch``,
    ``feature_dim``, ``module_names``, ``model``), for ``mode`` in :data:`HEAD_MODES`. The head
    is ``model.get_output_embeddings()``; ``modules`` does not apply (the head is the sketched
    layer). ``kron_dims``, ``dim``, ``seed``, ``normalize`` as in ``GradientSketcher``;
    ``vocab_chunk``: vocabulary rows whose logits are held at once.
    """

    def __init__(self, model: nn.Module, *, mode: str = "head_kron", kron_dims: Union[int, Tuple[int, int]] = 32,
                 dim: Optional[int] = None, seed: int = 0, normalize: bool = True,
                 vocab_chunk: int = _VOCAB_CHUNK, dtype: torch.dtype = torch.float32, **unused):
        if mode not in HEAD_MODES:
            raise ValueError(f"HeadSketcher mode must be one of {HEAD_MODES}, got {mode!r}")
        if isinstance(kron_dims, int):
            kron_dims = (kron_dims, kron_dims)
        if len(tuple(kron_dims)) != 2 or any(int(k) != k or k <= 0 for k in kron_dims):
            raise ValueError(f"kron_dims must be a positive int or a pair (k_in, k_out), got {kron_dims!r}")
        if dim is not None and (int(dim) != dim or dim <= 0):
            raise ValueError(f"dim must be None or a positive int, got {dim!r}")
        if int(vocab_chunk) <= 0:
            raise ValueError(f"vocab_chunk must be a positive int, got {vocab_chunk!r}")
        self.model = unwrap_model(model)
        self.mode, self.seed, self.normalize, self.dtype = mode, int(seed), bool(normalize), dtype
        self.kron_dims = (int(kron_dims[0]), int(kron_dims[1]))
        self.dim = None if dim is None else int(dim)
        self.vocab_chunk = int(vocab_chunk)
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._inner = inner
        getter = getattr(inner, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if type(head) is not nn.Linear:
            raise ValueError(f"sketch.mode {mode!r} needs a plain nn.Linear output head "
                             f"(model.get_output_embeddings()), got {type(head).__name__}; use mode 'kron'")
        config = getattr(inner, "config", None)
        bad = [key for key, neutral in _LOGIT_TRANSFORMS.items() if getattr(config, key, None) not in neutral]
        if bad:
            raise ValueError(f"sketch.mode {mode!r}: the model transforms its logits after the head ({bad}); "
                             f"the head gradient would not be that of its loss: use mode 'kron'")
        self._head = head
        self.head_name = next(n for n, m in self.model.named_modules() if m is head)
        self.module_names = [self.head_name]
        d, V = head.in_features, head.out_features
        self.block_width = V * d if mode == "head" else min(self.kron_dims[1], V) * min(self.kron_dims[0], d)
        self._projector = BlockGaussianProjection(self.dim, seed=self.seed) if self.dim is not None else None
        self._factors = {}
        try:
            params = inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._forward_kwargs = {k for k in ("position_ids", "logits_to_keep", "use_cache") if k in params}

    @property
    def feature_dim(self) -> int:
        return self.dim if self.dim is not None else self.block_width

    def _factor(self, side: str, d: int, k: int, device) -> Optional[torch.Tensor]:
        """The ``kron`` factor of :class:`GradientSketcher` for the head (same seed and key)."""
        if k >= d:
            return None
        key = (side, str(device))
        if key not in self._factors:
            self._factors[key] = gaussian_matrix(d, k, seed=self.seed, key=(self.head_name, side),
                                                 std=1.0 / math.sqrt(k), device=device, dtype=torch.float32)
        return self._factors[key]

    @torch.no_grad()
    def sketch(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(n, feature_dim)`` head-gradient features of each sequence's mean label NLL."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be a 2-D (n, T) tensor with T >= 2, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        loss_mask = attention_mask if loss_mask is None else loss_mask
        attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        labels = label_mask(attention_mask, loss_mask.to(input_ids.device).bool())
        n = input_ids.shape[0]
        predictors = labels[:, 1:].any(0).nonzero().flatten()    # positions that predict a label
        is_label = labels[:, predictors + 1]                      # (n, K)
        rows, cols = is_label.nonzero(as_tuple=True)             # the M label positions
        targets = input_ids[rows, predictors[cols] + 1]
        row_weights = (1.0 / is_label.sum(1).clamp(min=1).float())[rows]
        out = torch.zeros(n, self.feature_dim, dtype=torch.float32, device=input_ids.device)
        keep = "logits_to_keep" in self._forward_kwargs
        state = {}

        def pre_hook(mod, args):
            hidden = args[0]  # (n, K, d) with logits_to_keep, else (n, T, d)
            state["hidden"] = (hidden if keep else hidden[:, predictors])[rows, cols]
            state["calls"] = state.get("calls", 0) + 1
            return (args[0][..., :0, :],)  # the head itself computes nothing

        def hook(mod, args, output):
            state["features"] = self._features(state.pop("hidden"), mod.weight, mod.bias, targets, rows,
                                               row_weights, n)

        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "use_cache" in self._forward_kwargs:
            kwargs["use_cache"] = False
        if "position_ids" in self._forward_kwargs:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if keep:
            kwargs["logits_to_keep"] = predictors
        handles = [self._head.register_forward_pre_hook(pre_hook, prepend=True),
                   self._head.register_forward_hook(hook, prepend=True)]
        training = self.model.training
        try:
            self.model.eval()
            self.model(**kwargs)
        finally:
            for h in handles:
                h.remove()
            self.model.train(training)
        if state.get("calls") != 1:
            raise RuntimeError(f"the output head ran {state.get('calls', 0)} times in one forward; "
                               f"use sketch.mode 'kron' for this model")
        block = state["features"]
        if self._projector is not None:
            self._projector.project_block(self.head_name, block, out)
        else:
            out.copy_(block)
        bad = _nonfinite_rows(out)
        if bool(bad.any()):
            raise FloatingPointError(f"non-finite head features in {int(bad.sum())} row(s); run the model in float32")
        if self.normalize:
            norms = out.norm(dim=1, keepdim=True)
            out.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))
        return out.to(self.dtype)

    def _features(self, hidden, weight, bias, targets, rows, row_weights, n) -> torch.Tensor:
        """The head-gradient block of the ``n`` samples, ``_POSITION_CHUNK`` label positions at a time."""
        d, V = weight.shape[1], weight.shape[0]
        out = torch.zeros(n, self.block_width, dtype=torch.float32, device=hidden.device)
        p_in = self._factor("in", d, self.kron_dims[0], hidden.device) if self.mode == "head_kron" else None
        p_out = self._factor("out", V, self.kron_dims[1], hidden.device) if self.mode == "head_kron" else None
        for lo in range(0, hidden.shape[0], _POSITION_CHUNK):
            sl = slice(lo, lo + _POSITION_CHUNK)
            if self.mode == "head_kron":
                out += head_kron_features(hidden[sl], weight, bias, targets[sl], rows[sl], row_weights[sl], n,
                                          p_in, p_out, self.vocab_chunk)
            else:
                out += head_exact_features(hidden[sl], weight, bias, targets[sl], rows[sl], row_weights[sl], n,
                                           self.vocab_chunk)
        return out
