"""Per-sample gradient sketches of Hugging Face causal LMs, safe under DeepSpeed ZeRO.

For a linear layer ``y = x W^T (+ b)`` applied to the tokens of sequence ``i``, the gradient of
that sequence's loss ``L_i`` with respect to ``W`` is

    G_i = sum_t delta_{i,t} x_{i,t}^T,        delta_{i,t} = dL_i / dy_{i,t},     G_i: (d_out, d_in)

It needs only the layer's input activations and output gradients, never ``W`` itself, so it is
the same computation whether ``W`` is whole, partitioned by ZeRO-3 or sharded by tensor
parallelism. :class:`GradientSketcher` captures ``x`` and ``y`` with forward hooks that exist
only for the duration of one :meth:`GradientSketcher.sketch` call, takes ``delta`` from
``torch.autograd.grad(sum_i L_i, [y ...])`` (which never writes ``.grad``, so ZeRO's gradient
reduction hooks never fire), and reduces ``(delta, x)`` to one feature row per sequence:

- ``mode="exact"``: ``vec(G_i)`` itself, ``d_out * d_in`` columns per layer.
- ``mode="kron"``: the factored sketch ``P_out^T G_i P_in = sum_t (P_out^T delta_t)(P_in^T x_t)^T``
  with Gaussian ``P_in: (d_in, k_in)`` and ``P_out: (d_out, k_out)``, entries ``N(0, 1/k)``, so
  that ``E[<S_i, S_j>] = <G_i, G_j>``. A side with ``k >= d`` uses the identity (exact on that
  side). ``k_out * k_in`` columns per layer; the ``d_out x d_in`` gradient is never formed.
- ``dim=p`` adds a dense Gaussian projection of the concatenated feature to ``p`` columns
  (:class:`~ds_partitionsel.projection.BlockGaussianProjection`), also unbiased.

Projections are functions of ``(seed, module name)``: every rank builds the same ones with no
communication.

Loss convention (Hugging Face's shift): the logits at position ``t - 1`` predict token ``t``.
``loss_mask[:, t]`` marks token ``t`` as a trained label (a response token); the per-sample loss
is the mean next-token NLL over the labels of that row,

    L_i = (1 / |M_i|) sum_{t in M_i} -log p(x_{i,t} | x_{i,<t}),
    M_i = {t >= 1 : loss_mask[i, t] and attention_mask[i, t] and attention_mask[i, t - 1]}.

Column 0 can never be a label (nothing predicts it); a label whose predecessor is padding (the
first real token of a left-padded row) is dropped too, so a left-padded row gives the same result
as the row alone.

Only the forward from the earliest hooked layer onward records an autograd graph: the rest of
the forward runs under ``torch.no_grad`` and the backward cannot go below the hooked layers.

The LM head is chunked. ``L_i`` needs the logits only at the ``M`` label positions, and
``-log softmax(W h + b)[y]`` is a function of that position's final hidden state ``h`` alone,
with gradient

    d nll / d h = W^T (softmax(W h + b) - e_y).

So the head's input is captured (the head itself runs on an empty slice), and
:func:`label_nll` computes, ``head_chunk`` label positions at a time, the logits, the NLL and
this gradient, keeping only ``(M,)`` NLLs and the ``(M, d_model)`` gradients; the backward
scales those by the upstream gradient. Peak memory is ``head_chunk x vocab`` logits instead of
``n x T x vocab`` (and the same again for their gradient and log-softmax), with the same two
head matmuls as autograd would do. It runs in the head's forward hook, while the forward has the
weight (gathered by ZeRO-3, which costs no extra gather). Heads that transform their logits further (soft-capping,
logit scales), a peft-wrapped head, or a hooked head use the full logits instead.
"""
from __future__ import annotations

import inspect
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import record_function

from .projection import BlockGaussianProjection, gaussian_matrix

__all__ = ["GradientSketcher", "resolve_modules", "transformer_blocks", "label_mask",
           "exact_weight_grads", "label_nll"]

ModuleSpec = Union[int, str, Sequence[str], "re.Pattern[str]"]

DEFAULT_NUM_BLOCKS = 3
_MODES = ("exact", "kron")
# float32 logits held at once by the chunked head (``head_chunk="auto"``): 32 MiB
_HEAD_CHUNK_ELEMENTS = 1 << 23
# config attributes of HF heads that transform the logits after the linear head (Gemma 2/3
# soft-capping, Cohere's logit_scale, Granite's logits_scaling), with their values that leave the
# logits alone: the chunked head would skip any other, so such models use the full logits
_LOGIT_TRANSFORMS = {"final_logit_softcapping": (None, 0), "logit_scale": (None, 1),
                     "logits_scaling": (None, 1)}


# --------------------------------------------------------------------------- module selection

def unwrap_model(model: nn.Module) -> nn.Module:
    """The user model inside a DeepSpeed engine or a DDP wrapper (else ``model`` itself).

    Module names, and therefore the projections derived from them, are those of the inner model.
    """
    wrappers = [nn.parallel.DistributedDataParallel]
    ds_engine = getattr(sys.modules.get("deepspeed.runtime.engine"), "DeepSpeedEngine", None)
    if ds_engine is not None:
        wrappers.append(ds_engine)
    while isinstance(model, tuple(wrappers)):
        model = model.module
    return model


def _is_lora_linear(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B")


def _is_active_lora(model: nn.Module, name: str) -> bool:
    """Whether ``...lora_A.<adapter>`` belongs to an active adapter of its peft LoRA layer."""
    layer = model.get_submodule(name.rsplit(".", 2)[0])
    active = getattr(layer, "active_adapters", None)
    if isinstance(active, str):
        active = [active]
    return active is None or name.rsplit(".", 1)[-1] in active


def transformer_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: ``(qualified name, ModuleList)``.

    Chosen as the ``nn.ModuleList`` that holds the most ``nn.Linear`` modules in total (for a HF
    causal LM, ``model.layers``; per-block lists such as MoE experts hold fewer).
    """
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(isinstance(m, nn.Linear) for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise ValueError(
            f"could not find a list of transformer blocks (an nn.ModuleList holding nn.Linear "
            f"modules) in {type(model).__name__}; choose modules explicitly with "
            f"modules='all_linear', a list of names or a regex")
    return best


def resolve_modules(model: nn.Module, modules: ModuleSpec = DEFAULT_NUM_BLOCKS
                    ) -> List[Tuple[str, nn.Linear]]:
    """The ``(name, nn.Linear)`` pairs to sketch, in the model's module order.

    ``modules`` is one of

    - ``int k`` (default 3, the paper's choice): every ``nn.Linear`` in the last ``k``
      transformer blocks (all blocks when the model has fewer);
    - ``"all_linear"``: every ``nn.Linear`` except the output head
      (``model.get_output_embeddings()``);
    - ``"lora"``: every LoRA adapter linear (``lora_A`` / ``lora_B``); needs a peft LoRA model;
    - a list/tuple of exact module names (each must be an ``nn.Linear``);
    - a regex (``str`` other than the keywords above, or a compiled pattern), matched with
      ``re.search`` against the module names.

    On a peft LoRA model, the keyword selectors (``int`` and ``"all_linear"``) pick the LoRA
    adapter linears of the active adapters only, the trained weights (the paper's setting:
    LoRA parameters of the last 3 blocks). Names and regexes match any ``nn.Linear``, base
    layers included.

    Names are those of ``model.named_modules()`` after unwrapping a DeepSpeed engine / DDP.
    """
    model = unwrap_model(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear modules to sketch")
    lora = [(n, m) for n, m in linears if _is_lora_linear(n) and _is_active_lora(model, n)]

    def nothing_matched(what: str) -> ValueError:
        sample = ", ".join(n for n, _ in linears[:8])
        more = f" ... ({len(linears)} in all)" if len(linears) > 8 else ""
        return ValueError(f"modules={what} matched no nn.Linear module. "
                          f"Available nn.Linear names: {sample}{more}")

    if isinstance(modules, bool):
        raise TypeError("modules must be an int, 'all_linear', 'lora', a list of names or a regex")
    if isinstance(modules, int):
        if modules <= 0:
            raise ValueError(f"modules={modules}: the number of final blocks must be positive")
        prefix, blocks = transformer_blocks(model)
        chosen_blocks = [f"{prefix}.{i}." for i in range(max(0, len(blocks) - modules), len(blocks))]
        pool = lora if lora else linears
        chosen = [(n, m) for n, m in pool if any(n.startswith(b) for b in chosen_blocks)]
        if not chosen:
            raise nothing_matched(f"{modules} (last blocks under {prefix!r})")
        return chosen
    if isinstance(modules, str) and modules == "all_linear":
        if lora:
            return lora
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [(n, m) for n, m in linears if m is not head]
        if not chosen:
            raise nothing_matched("'all_linear'")
        return chosen
    if isinstance(modules, str) and modules == "lora":
        if not lora:
            raise ValueError("modules='lora' needs a peft LoRA model (modules named "
                             "'...lora_A.<adapter>' / '...lora_B.<adapter>'); this model has none")
        return lora
    if isinstance(modules, (str, re.Pattern)):
        pattern = re.compile(modules) if isinstance(modules, str) else modules
        chosen = [(n, m) for n, m in linears if pattern.search(n)]
        if not chosen:
            raise nothing_matched(f"regex {pattern.pattern!r}")
        return chosen
    if isinstance(modules, (list, tuple)):
        if not modules:
            raise ValueError("modules=[] selects nothing; pass at least one module name")
        by_name = dict(model.named_modules())
        chosen, bad = [], []
        for name in modules:
            module = by_name.get(name)
            if isinstance(module, nn.Linear):
                chosen.append(name)
            else:
                bad.append(name if module is None else f"{name} ({type(module).__name__})")
        if bad:
            raise nothing_matched(f"{list(modules)!r}: not nn.Linear modules: {bad};")
        wanted = set(chosen)
        return [(n, m) for n, m in linears if n in wanted]
    raise TypeError(f"modules must be an int, 'all_linear', 'lora', a list of names or a regex, "
                    f"got {type(modules).__name__}")


# --------------------------------------------------------------------------- pure kernels

def label_mask(attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``(n, T)`` bool: token ``t`` of row ``i`` is a label of ``L_i`` (see the module doc).

    ``M[:, 0]`` is False; ``M[:, t] = loss_mask[:, t] & attn[:, t] & attn[:, t-1]`` for ``t >= 1``.
    """
    attn = attention_mask.bool()
    out = loss_mask.bool() & attn
    out[:, 1:] &= attn[:, :-1]
    out[:, 0] = False
    return out


def exact_weight_grads(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``G_i = sum_t delta_{i,t} x_{i,t}^T``, flattened row-major.

    ``delta: (n, T, d_out)``, ``x: (n, T, d_in)`` -> ``(n, d_out * d_in)`` (the order of
    ``W.grad.flatten()``).
    """
    return torch.bmm(delta.transpose(1, 2), x).flatten(1)


class _LabelNLL(torch.autograd.Function):
    """``nll_m = logsumexp(W h_m + b) - (W h_m + b)[y_m]``, with ``d nll_m / d h_m`` computed alongside.

    Forward, ``chunk`` rows at a time: the ``(chunk, V)`` logits (in the head's dtype, then
    float32, as ``model(...).logits.float()``), their log-sum-exp, the NLL, and, in place of the
    logits, ``softmax - onehot`` times ``W``. Saved for backward: the ``(M, d)`` gradients only.
    The backward is ``grad_h_m = grad_nll_m * d nll_m / d h_m`` (``W`` and ``b`` get none).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        m = hidden.shape[0]
        nll = torch.empty(m, dtype=torch.float32, device=hidden.device)
        dnll = torch.empty_like(hidden)
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            target = targets[start:stop, None]
            logits = F.linear(hidden[start:stop], weight, bias).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            nll[start:stop] = (lse - logits.gather(1, target)).squeeze(1)
            probs = logits.sub_(lse).exp_()  # softmax, in the logits' memory
            probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))
            torch.mm(probs.to(weight.dtype), weight, out=dnll[start:stop])
            del logits, probs
        ctx.save_for_backward(dnll)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (dnll,) = ctx.saved_tensors
        return dnll * grad_nll.to(dnll.dtype)[:, None], None, None, None, None


def label_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Next-token NLL ``-log softmax(W h_m + b)[y_m]`` of ``M`` positions, ``(M,)`` float32.

    ``hidden: (M, d)`` final hidden states (differentiable), ``weight: (V, d)``, ``bias: (V,)``
    or None, ``targets: (M,)`` token ids, ``chunk``: positions whose logits are held at once.
    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")``
    with gradient w.r.t. ``hidden`` only, at ``chunk x V`` instead of ``M x V`` memory.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"label_nll needs hidden (M, d) and targets (M,), got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    return _LabelNLL.apply(hidden, weight.detach(), None if bias is None else bias.detach(),
                           targets, max(1, int(chunk)))


def _nonfinite_rows(features: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: rows with a NaN or Inf entry.

    A row with one has a non-finite sum (NaN and Inf propagate), so only the rows whose sum is
    non-finite are checked element by element: ``torch.isfinite`` over the whole ``(n, p)``
    matrix would allocate several temporaries of its size.
    """
    bad = ~torch.isfinite(features.sum(1))
    if bool(bad.any()):
        bad[bad.clone()] = ~torch.isfinite(features[bad]).all(1)  # a finite sum that overflowed
    return bad


def _row_list(rows: torch.Tensor, limit: int = 10) -> str:
    idx = rows.nonzero().flatten().tolist()
    text = ", ".join(map(str, idx[:limit]))
    return f"[{text}{', ...' if len(idx) > limit else ''}] ({len(idx)} rows)"


# --------------------------------------------------------------------------- the sketcher

def _warn_empty_rows(labels: torch.Tensor) -> None:
    empty = labels.sum(1) == 0
    if bool(empty.any()):
        # A warning, not an error, even when every row is empty: under ZeRO-3 the forward
        # must still run so that this rank's parameter gathers match the other ranks'.
        warnings.warn(f"rows {_row_list(empty)} have no label token in loss_mask (label t "
                      f"needs loss_mask[t], attention_mask[t] and attention_mask[t-1], t >= 1); "
                      f"their features are zero rows and their losses 0", RuntimeWarning,
                      stacklevel=3)


@dataclass
class _Capture:
    """What the hooks of one module saw during one forward (one entry per call)."""

    inputs: List[torch.Tensor] = field(default_factory=list)   # (n, T, d_in or k_in), detached
    outputs: List[torch.Tensor] = field(default_factory=list)  # (n, T, d_out), in the graph


@dataclass
class _HeadTap:
    """The chunked head during one forward: which positions it scores, and what came out."""

    rows: Optional[torch.Tensor] = None     # (M,) label positions: row i ...
    cols: Optional[torch.Tensor] = None     # (M,) ... and column j of the predictor positions
    targets: Optional[torch.Tensor] = None  # (M,) the token ids they predict
    predictors: Optional[torch.Tensor] = None  # (K,) set when the head sees all T positions
    nll: Optional[torch.Tensor] = None      # (M,) float32, in the graph
    calls: int = 0


@dataclass(frozen=True)
class SketchBlock:
    """One module's slice of the feature vector before the optional ``dim`` projection."""

    name: str
    shape: Tuple[int, ...]   # (d_out, d_in) exact / (k_out, k_in) kron; bias adds (rows,)
    bias: bool
    width: int


class GradientSketcher:
    """Per-sample gradient features of a causal LM for the hooked ``nn.Linear`` weights.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face causal LM (``model(input_ids, attention_mask, ...) .logits``), a peft
        model around one, or a DeepSpeed engine / its ``engine.module`` (any ZeRO stage).
    modules : int, str, list of str or re.Pattern, default 3
        Which linears to hook; see :func:`resolve_modules`.
    mode : {"exact", "kron"}
        ``exact``: ``vec(sum_t delta_t x_t^T)`` per module (right for LoRA and small layers).
        ``kron``: ``vec(sum_t (P_out^T delta_t)(P_in^T x_t)^T)``.
    kron_dims : int or (k_in, k_out), default 32
        Sketch sizes of the ``kron`` mode; a side with ``k >= d`` is kept exact.
    dim : int, optional
        Final dense Gaussian projection of the concatenated feature to ``dim`` columns.
    seed : int
        Seed of every projection (with the module name), identical on every rank.
    normalize : bool, default True
        Return unit-L2-norm rows (rows with no label tokens stay zero).
    include_bias : bool, default False
        Also sketch the bias gradient ``sum_t delta_t`` of linears that have one, appended
        after the weight block of that module (``P_out^T sum_t delta_t`` in ``kron`` mode).
    dtype : torch.dtype, default torch.float32
        Output dtype. Sketches are computed in float32 (float64 if ``dtype`` is float64)
        whatever the model's dtype; captured activations are cast.
    head_chunk : int, "auto" or None, default "auto"
        Label positions whose logits are held at once by the chunked LM head (see the module
        doc); ``"auto"``: as many as fit in 32 MiB of float32 logits. ``None``: the model's own
        full logits (the reference path; also used whenever the head cannot be chunked).

    Attributes
    ----------
    module_names : list of str
    blocks : list of SketchBlock
        Layout of the feature before ``dim``: with ``mode="exact"``, ``dim=None`` and
        ``normalize=False`` the row of sample ``i`` is
        ``cat([W.grad_i.flatten() (, b.grad_i) for each module])``.
    feature_dim : int
        ``p``, the number of columns returned by :meth:`sketch`.

    Notes
    -----
    Under ZeRO-3 a forward gathers parameters collectively, so every rank must call
    :meth:`sketch` the same number of times with the same number of forwards (same ``n`` and
    ``batch_size``), as in training. Rows with no label still run the forward. Sketches are
    rank-local: each rank sketches its own rows, and needs nothing from the others.

    Memory per forward: the hooked layers' activations and output gradients for the batch,
    ``head_chunk x vocab`` logits (``n x K x vocab`` three times over with ``head_chunk=None``),
    and the features. ``batch_size`` bounds all but the features.
    """

    streams_gram = True  # sketch_gram: the Gram of a pool without holding its features


    def __init__(self, model: nn.Module, *, modules: ModuleSpec = DEFAULT_NUM_BLOCKS,
                 mode: str = "exact", kron_dims: Union[int, Tuple[int, int]] = 32,
                 dim: Optional[int] = None, seed: int = 0, normalize: bool = True,
                 include_bias: bool = False, dtype: torch.dtype = torch.float32,
                 head_chunk: Union[int, str, None] = "auto"):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if isinstance(kron_dims, int):
            kron_dims = (kron_dims, kron_dims)
        if (len(tuple(kron_dims)) != 2 or any(int(k) != k or k <= 0 for k in kron_dims)):
            raise ValueError(f"kron_dims must be a positive int or a pair (k_in, k_out), got {kron_dims!r}")
        if dim is not None and (int(dim) != dim or dim <= 0):
            raise ValueError(f"dim must be None or a positive int, got {dim!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if not (head_chunk is None or head_chunk == "auto"
                or (isinstance(head_chunk, int) and not isinstance(head_chunk, bool) and head_chunk > 0)):
            raise ValueError(f"head_chunk must be a positive int, 'auto' or None, got {head_chunk!r}")

        self.model = unwrap_model(model)
        self.mode = mode
        self.kron_dims = (int(kron_dims[0]), int(kron_dims[1]))
        self.dim = None if dim is None else int(dim)
        self.seed = int(seed)
        self.normalize = bool(normalize)
        self.include_bias = bool(include_bias)
        self.dtype = dtype
        self.compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32

        self._modules = self._resolve_modules(modules)
        self.module_names = [n for n, _ in self._modules]
        self.blocks = [self._block_layout(n, m) for n, m in self._modules]
        self._projector = (BlockGaussianProjection(self.dim, seed=self.seed)
                           if self.dim is not None else None)
        self._factor_cache: Dict[Tuple[str, str, str], Optional[torch.Tensor]] = {}
        # module name -> ModulePreconditioner during one sketch() / sketch_gram() call, else None
        self._precondition: Optional[Dict[str, object]] = None
        self._forward_kwargs = self._supported_forward_kwargs()
        self._head = self._chunkable_head() if head_chunk is not None else None
        if self._head is None:
            self.head_chunk = None
        elif head_chunk == "auto":
            self.head_chunk = max(1, _HEAD_CHUNK_ELEMENTS // self._head.out_features)
        else:
            self.head_chunk = int(head_chunk)

    # ------------------------------------------------------------------ layout and projections

    def _resolve_modules(self, modules: ModuleSpec) -> List[Tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs to hook (:func:`resolve_modules`; a subclass for other
        linear layers, such as tensor-parallel ones, resolves its own)."""
        return resolve_modules(self.model, modules)

    def _linear_sizes(self, module: nn.Module) -> Tuple[int, int]:
        """``(d_in, d_out)`` of the whole weight, from the module's attributes, never from its
        (possibly partitioned or sharded) weight."""
        return module.in_features, module.out_features

    def _block_layout(self, name: str, module: nn.Linear) -> SketchBlock:
        d_in, d_out = self._linear_sizes(module)
        has_bias = self.include_bias and module.bias is not None
        if self.mode == "exact":
            rows, cols = d_out, d_in
        else:
            rows, cols = min(self.kron_dims[1], d_out), min(self.kron_dims[0], d_in)
        return SketchBlock(name, (rows, cols), has_bias, rows * cols + (rows if has_bias else 0))

    @property
    def feature_dim(self) -> int:
        return self.dim if self.dim is not None else sum(b.width for b in self.blocks)

    def _factor(self, name: str, side: str, d: int, k: int, device) -> Optional[torch.Tensor]:
        """``P_in`` / ``P_out`` of one module: ``(d, k)`` Gaussian ``N(0, 1/k)``, or None (identity)."""
        if k >= d:
            return None
        key = (name, side, str(device))
        if key not in self._factor_cache:
            self._factor_cache[key] = gaussian_matrix(
                d, k, seed=self.seed, key=(name, side), std=1.0 / math.sqrt(k),
                device=device, dtype=self.compute_dtype)
        return self._factor_cache[key]

    def _hf_model(self) -> nn.Module:
        """The Hugging Face model (inside peft, which passes kwargs and attributes through)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _chunkable_head(self) -> Optional[nn.Linear]:
        """The output head when the chunked head reproduces the model's logits exactly, else None.

        It must be a plain ``nn.Linear`` (not wrapped by peft), not hooked itself (its own
        ``delta`` needs the full logits), and the config must not transform the logits after it.
        """
        inner = self._hf_model()
        getter = getattr(inner, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if type(head) is not nn.Linear or any(m is head for _, m in self._modules):
            return None
        config = getattr(inner, "config", None)
        if any(getattr(config, key, None) not in neutral for key, neutral in _LOGIT_TRANSFORMS.items()):
            return None
        return head

    def _supported_forward_kwargs(self) -> set:
        inner = self._hf_model()
        try:
            params = inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            return set()
        return {k for k in ("position_ids", "logits_to_keep", "use_cache") if k in params}

    def _check_preconditioner(self, preconditioner, device) -> Optional[Dict[str, object]]:
        """``preconditioner`` checked against the hooked modules and moved to ``device`` in the
        compute dtype (None stays None: raw gradients)."""
        if preconditioner is None:
            return None
        if not isinstance(preconditioner, dict) or set(preconditioner) != set(self.module_names):
            got = sorted(preconditioner) if isinstance(preconditioner, dict) else type(preconditioner).__name__
            raise ValueError(f"preconditioner must map every hooked module {self.module_names} to a "
                             f"ModulePreconditioner, got {got}")
        from .precondition import ModulePreconditioner

        out = {}
        for name, module in self._modules:
            pre = preconditioner[name]
            d_in, d_out = self._linear_sizes(module)
            want = ({"weight": (d_out, d_in)} if self.mode == "exact" else {"row": (d_out,), "col": (d_in,)})
            want["bias"] = (d_out,)
            moved = {}
            for key, shape in want.items():
                value = getattr(pre, key)
                if value is None:
                    if key != "bias":
                        raise ValueError(f"preconditioner of {name} has no {key!r}, which mode {self.mode!r} needs")
                    continue
                if tuple(value.shape) != shape:
                    raise ValueError(f"preconditioner of {name}: {key} has shape {tuple(value.shape)}, "
                                     f"expected {shape}")
                moved[key] = value.to(device=device, dtype=self.compute_dtype)
            out[name] = ModulePreconditioner(**moved)
        return out

    # ------------------------------------------------------------------ public face

    def sketch(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               loss_mask: Optional[torch.Tensor] = None, *, return_losses: bool = False,
               batch_size: Optional[int] = None, preconditioner: Optional[Dict[str, "ModulePreconditioner"]] = None):
        """Gradient features of each sequence's mean label NLL.

        Parameters
        ----------
        input_ids : (n, T) integer tensor
        attention_mask : (n, T), optional
            1/True for real tokens, 0/False for padding (left or right). Default: all real.
        loss_mask : (n, T) bool, optional
            True where token ``t`` is a trained label (response token). Default: every real
            token. See the module docstring for the exact label set.
        return_losses : bool
            Also return the per-sample losses ``L_i``.
        batch_size : int, optional
            Process at most this many rows per forward/backward (bounds memory; the result does
            not depend on it up to float rounding).
        preconditioner : dict, optional
            Module name -> :class:`~ds_partitionsel.precondition.ModulePreconditioner` for every
            hooked module: each per-sample gradient is multiplied element-wise by ``M`` (``exact``)
            or by its rank-1 factors ``diag(r) G diag(c)`` (``kron``) before it is sketched (see
            :mod:`ds_partitionsel.precondition`). None (default): raw gradients.

        Returns
        -------
        features : (n, feature_dim) tensor of ``dtype``
        losses : (n,) float32 tensor, only with ``return_losses=True``. Rows with no label
            token get a zero feature row, loss 0, and a warning naming them.
        """
        input_ids, attention_mask, labels = self._validate(input_ids, attention_mask, loss_mask)
        n = input_ids.shape[0]
        step = n if batch_size is None else int(batch_size)
        if step <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self._precondition = self._check_preconditioner(preconditioner, input_ids.device)

        _warn_empty_rows(labels)

        # filled in place, batch by batch and block by block: no concatenation copies
        features = torch.zeros(n, self.feature_dim, dtype=self.compute_dtype, device=input_ids.device)
        losses = torch.zeros(n, dtype=torch.float32, device=input_ids.device)
        try:
            for start in range(0, n, step):
                sl = slice(start, min(start + step, n))
                losses[sl] = self._sketch_batch(input_ids[sl], attention_mask[sl], labels[sl],
                                                features[sl])
        finally:
            self._precondition = None

        bad = _nonfinite_rows(features)
        if bool(bad.any()):
            raise FloatingPointError(
                f"non-finite gradient features in rows {_row_list(bad)} (losses there: "
                f"{losses[bad][:5].tolist()}). The model produced NaN/Inf activations or "
                f"gradients; check the inputs and weights, or run the model in float32.")
        if self.normalize:
            norms = features.norm(dim=1, keepdim=True)
            features.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))
        features = features.to(self.dtype)
        return (features, losses) if return_losses else features

    def sketch_gram(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    loss_mask: Optional[torch.Tensor] = None, *, target: Optional[torch.Tensor] = None,
                    batch_size: Optional[int] = None, spill_dir: Optional[str] = None,
                    preconditioner: Optional[Dict[str, "ModulePreconditioner"]] = None,
                    nonfinite: str = "raise"):
        """What selection needs from the features, without ever holding them: the Gram matrix,
        the scores against ``target`` and the losses, streamed micro-batch by micro-batch.

        Each module's block of a micro-batch's features (``(b, width)``, one hooked linear) is
        reduced at once into the Gram rows of that micro-batch: against itself, and against
        the earlier rows' block, which is read back from a file under ``spill_dir`` (a
        temporary folder by default) where every block is appended as it is made. Memory:
        the working memory of :meth:`sketch` plus one module's block for the pool's rows
        (read back in chunks of at most 64 MiB), instead of the ``(n, p)`` features.
        Disk: the features once, deleted on return.

        Every entry is a sum over blocks, in block order, of :func:`row_dots` products, whose
        value for a row does not depend on the other rows or on the BLAS kernel; with
        ``normalize`` the rows are scaled to unit norm afterwards (``K_ij / (|g_i| |g_j|)``),
        exactly as the Gram of :meth:`sketch`'s rows up to float rounding (``dim`` is not
        supported: a projection needs the whole row).

        Returns ``(gram (n, n) float64, scores (n,) float64 or None, losses (n,) float32)``.
        ``target`` (p,): the validation gradient in this sketch's feature space (unnormalized).
        ``preconditioner``: as in :meth:`sketch`.
        ``nonfinite``: ``"raise"`` (a ``FloatingPointError`` naming the rows whose features are
        not finite) or ``"keep"`` (return them: such a row's Gram diagonal is not finite, and only
        its own row and column of the Gram and its score are touched).
        """
        import shutil
        import tempfile

        import numpy as np

        from .solver import row_dots

        if self._projector is not None:
            raise ValueError("sketch_gram needs the unprojected features (dim=None); use sketch() with dim")
        if nonfinite not in ("raise", "keep"):
            raise ValueError(f"nonfinite must be 'raise' or 'keep', got {nonfinite!r}")
        input_ids, attention_mask, labels = self._validate(input_ids, attention_mask, loss_mask)
        n = input_ids.shape[0]
        step = n if batch_size is None else int(batch_size)
        if step <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if target is not None and (target.dim() != 1 or target.numel() != self.feature_dim):
            raise ValueError(f"target must have shape ({self.feature_dim},), got {tuple(target.shape)}")
        _warn_empty_rows(labels)
        device = input_ids.device
        self._precondition = self._check_preconditioner(preconditioner, device)
        gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        scores = torch.zeros(n, dtype=torch.float64, device=device) if target is not None else None
        losses = torch.zeros(n, dtype=torch.float32, device=device)
        bad = torch.zeros(n, dtype=torch.bool, device=device)
        folder = tempfile.mkdtemp(prefix="sketch-gram-", dir=spill_dir)
        files = {}
        try:
            for start in range(0, n, step):
                rows = slice(start, min(start + step, n))

                def sink(offset, part, start=start, rows=rows):
                    part = part.to(self.compute_dtype).contiguous()
                    bad[rows] |= ~torch.isfinite(part.sum(1))
                    if scores is not None:
                        vec = target[offset:offset + part.shape[1]].to(part.dtype).to(part.device)
                        scores[rows] += row_dots(part, vec).double()
                    path = files.setdefault(offset, f"{folder}/block-{offset}.bin")
                    width = part.shape[1]
                    chunk = max(1, (1 << 26) // (width * part.element_size()))  # earlier rows per read
                    for lo in range(0, start, chunk):
                        prev = np.fromfile(path, dtype=np.float32 if part.dtype == torch.float32 else np.float64,
                                           count=min(chunk, start - lo) * width, offset=lo * width * part.element_size())
                        prev = torch.from_numpy(prev).view(-1, width).to(part.device)
                        for i in range(part.shape[0]):  # K[start + i, lo:lo + len(prev)]
                            dots = row_dots(prev, part[i]).double()
                            gram[start + i, lo:lo + len(prev)] += dots
                            gram[lo:lo + len(prev), start + i] += dots
                    for i in range(part.shape[0]):
                        gram[start + i, rows] += row_dots(part, part[i]).double()
                    with open(path, "ab") as f:
                        f.write(part.cpu().numpy().tobytes())

                losses[rows] = self._sketch_batch(input_ids[rows], attention_mask[rows], labels[rows], None, sink)
        finally:
            self._precondition = None
            shutil.rmtree(folder, ignore_errors=True)
        if bool(bad.any()) and nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite gradient features in rows {_row_list(bad)} (losses there: "
                f"{losses[bad][:5].tolist()}). The model produced NaN/Inf activations or "
                f"gradients; check the inputs and weights, or run the model in float32.")
        if self.normalize:
            norms = torch.sqrt(torch.diagonal(gram).clamp(min=0))
            inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
            gram = gram * (inv[:, None] * inv[None, :])  # inv_i inv_j: symmetric bit for bit
            if scores is not None:
                scores = scores * inv
        return gram, scores, losses

    def _validate(self, input_ids, attention_mask, loss_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D (n, T) tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must have at least 1 row and 2 tokens, got shape "
                             f"{tuple(input_ids.shape)}")
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.long)
        if loss_mask is None:
            loss_mask = attention_mask
        for name, mask in (("attention_mask", attention_mask), ("loss_mask", loss_mask)):
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(getattr(mask, 'shape', ()))}")
            if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(f"{name} must be boolean or 0/1, got values "
                                 f"{torch.unique(mask)[:6].tolist()}")
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        loss_mask = loss_mask.to(device=device).bool()
        if bool((loss_mask & (attention_mask == 0)).any()):
            raise ValueError("loss_mask is True on padding tokens (attention_mask == 0); "
                             "labels must be real tokens")
        return input_ids, attention_mask, label_mask(attention_mask, loss_mask)

    # ------------------------------------------------------------------ one batch

    def _sketch_batch(self, input_ids, attention_mask, labels, out: Optional[torch.Tensor],
                      sink=None) -> torch.Tensor:
        """Write the batch's features into ``out`` ``(n, p)`` (zeros on entry); return its losses.
        With ``sink``, each module's block goes to ``sink(offset, part (n, width))`` instead
        (rows without a label zeroed), and ``out`` is not used."""
        model = self.model
        captures = {name: _Capture() for name in self.module_names}
        tap = _HeadTap()
        handles = []
        training = [(m, m.training) for m in model.modules()]
        grad_mode = torch.is_grad_enabled()
        try:
            for name, module in self._modules:
                handles.append(module.register_forward_pre_hook(self._pre_hook))
                handles.append(module.register_forward_hook(self._make_hook(name, captures[name])))
            if self._head is not None:
                # Both prepended. ZeRO-3's own pre-hook wraps the head's input for a backward of
                # the head that never runs (the head is bypassed): take the hidden state before
                # that. ZeRO-3's own forward hook releases the gathered weight: use it before.
                pre_hook, hook = self._make_head_hooks(tap)
                handles.append(self._head.register_forward_pre_hook(pre_hook, prepend=True))
                handles.append(self._head.register_forward_hook(hook, prepend=True))
            model.eval()
            torch.set_grad_enabled(False)  # a pre-hook turns it on at the first hooked module
            # named ranges: torch.profiler tables (tools/bench_*.py --profile) show the phases
            with record_function("sketch.forward"):
                losses = self._forward_losses(input_ids, attention_mask, labels, tap)
            torch.set_grad_enabled(True)
            missing = [n for n, c in captures.items() if not c.outputs]
            if missing:
                raise RuntimeError(f"hooked modules did not run in the forward: {missing[:5]}; "
                                   f"choose modules that the model uses")
            outputs = [y for c in captures.values() for y in c.outputs]
            with record_function("sketch.backward"):
                deltas = torch.autograd.grad(losses.sum(), outputs, allow_unused=True,
                                             materialize_grads=True)
        finally:
            for h in handles:
                h.remove()
            torch.set_grad_enabled(grad_mode)
            for m, was in training:
                m.training = was

        real = attention_mask.bool().unsqueeze(-1)
        with torch.no_grad(), record_function("sketch.reduce"):
            offset = 0
            for block in self.blocks:
                cap = captures[block.name]
                n_out = len(cap.outputs)
                block_deltas, deltas = deltas[:n_out], deltas[n_out:]
                part = self._reduce_module(block, cap, block_deltas, real)
                cap.inputs.clear()
                cap.outputs.clear()
                if sink is not None:
                    part[labels.sum(1) == 0] = 0
                    sink(offset, part)
                    offset += block.width
                elif self._projector is not None:
                    self._projector.project_block(block.name, part, out)
                else:
                    out[:, offset:offset + block.width] = part
                    offset += block.width
                del part
            if out is not None:
                out[labels.sum(1) == 0] = 0
        return losses.detach().float()

    def _pre_hook(self, module, args):
        # The forward runs under no_grad up to here: only the hooked part records a graph.
        torch.set_grad_enabled(True)

    def _make_hook(self, name: str, capture: _Capture):
        module = dict(self._modules)[name]
        p_in_k = self.kron_dims[0]

        def hook(mod, args, output):
            if not args or not isinstance(args[0], torch.Tensor):
                raise RuntimeError(f"{name}: expected the input activation as the first argument")
            x = args[0].detach()
            if x.shape[-1] != module.in_features or output.shape[-1] != module.out_features:
                raise RuntimeError(f"{name}: activation shapes {tuple(x.shape)} -> {tuple(output.shape)} "
                                   f"do not match in/out features {module.in_features}/{module.out_features}")
            if x.dim() != 3:
                raise RuntimeError(f"{name}: expected (batch, seq, features) activations, got {tuple(x.shape)}")
            x = x.to(self.compute_dtype)
            pre = self._precondition.get(name) if self._precondition else None
            if pre is not None and pre.col is not None:  # kron: G diag(c) = sum_t delta_t (c * x_t)^T
                x = x * pre.col
            if self.mode == "kron":
                p_in = self._factor(name, "in", module.in_features, p_in_k, x.device)
                if p_in is not None:
                    x = x @ p_in
            capture.inputs.append(x)
            if not output.requires_grad:
                # frozen weight and no graph below: a leaf here gives dL/dy all the same
                output = output.detach().requires_grad_(True)
            capture.outputs.append(output)
            return output

        return hook

    def _make_head_hooks(self, tap: _HeadTap):
        """The head's (pre-hook, hook): the head runs on an empty slice, :func:`label_nll` on the
        ``M`` label positions' hidden states, with the head's weight as the forward has it (whole,
        also under ZeRO-3, which gathers it for the head's forward)."""
        def pre_hook(mod, args):
            if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
                raise RuntimeError("the output head was not called with one (n, T, d) hidden-state "
                                   "tensor; use GradientSketcher(head_chunk=None) for this model")
            tap.calls += 1
            hidden = args[0]  # (n, K, d) with logits_to_keep, else (n, T, d)
            if tap.predictors is not None:
                hidden = hidden[:, tap.predictors]
            if not hidden.requires_grad:
                raise RuntimeError("the logits do not depend on the hooked modules' outputs; "
                                   "choose modules that the model uses before its output head")
            tap.hidden = hidden[tap.rows, tap.cols]  # (M, d)
            return (args[0][..., :0, :],)

        def hook(mod, args, output):
            with record_function("sketch.head"):
                tap.nll = label_nll(tap.hidden, mod.weight, mod.bias, tap.targets, self.head_chunk)
            tap.hidden = None

        return pre_hook, hook

    def _forward_losses(self, input_ids, attention_mask, labels, tap: _HeadTap) -> torch.Tensor:
        """Per-sample mean label NLL ``(n,)``, float32, with a graph from the hooked layers."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        supported = self._forward_kwargs
        if "use_cache" in supported:
            kwargs["use_cache"] = False
        if "position_ids" in supported:
            # positions count real tokens, so left padding does not shift them
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # logits at position t predict token t + 1: keep only positions that predict a label
        predictors = labels[:, 1:].any(0).nonzero().flatten()
        if "logits_to_keep" in supported:
            kwargs["logits_to_keep"] = predictors
        if self._head is not None:
            is_label = labels[:, predictors + 1]                 # (n, K)
            tap.rows, tap.cols = is_label.nonzero(as_tuple=True)  # the M label positions
            tap.targets = input_ids[tap.rows, predictors[tap.cols] + 1]
            tap.predictors = None if "logits_to_keep" in supported else predictors
        logits = self.model(**kwargs).logits
        if self._head is not None:
            if tap.calls != 1:
                raise RuntimeError(f"the output head ran {tap.calls} times in one forward; "
                                   f"use GradientSketcher(head_chunk=None) for this model")
            weights = 1.0 / is_label.sum(1).clamp(min=1).to(torch.float32)
            losses = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
            return losses.index_add(0, tap.rows, tap.nll * weights[tap.rows])
        if "logits_to_keep" not in supported:
            logits = logits[:, predictors]
        if not logits.requires_grad:
            raise RuntimeError("the logits do not depend on the hooked modules' outputs; "
                               "choose modules that the model uses before its output head")
        targets = input_ids[:, predictors + 1]
        weights = labels[:, predictors + 1].to(torch.float32)
        counts = weights.sum(1, keepdim=True)
        weights = weights / counts.clamp(min=1)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                              reduction="none").view_as(weights)
        # where(), not multiply: a masked position must not turn NaN into the loss
        return torch.where(weights > 0, nll * weights, torch.zeros_like(nll)).sum(1)

    def _reduce_module(self, block: SketchBlock, cap: _Capture, deltas, real) -> torch.Tensor:
        """``(n, block.width)``: the module's weight (and bias) gradient sketch, summed over calls."""
        module = dict(self._modules)[block.name]
        pre = self._precondition.get(block.name) if self._precondition else None
        out = None
        for x, delta in zip(cap.inputs, deltas):  # unused outputs get zero deltas
            delta = delta.to(self.compute_dtype)
            # padding never contributes, even if the model left NaN there
            x = torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))
            delta = torch.where(real, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
            bias = None  # (n, d_out or k_out): the bias gradient sum_t delta_t, preconditioned
            if block.bias and pre is not None:
                bias = delta.sum(1) if pre.bias is None else delta.sum(1) * pre.bias
            if pre is not None and pre.row is not None:  # kron: diag(r) G = sum_t (r * delta_t) x_t^T
                delta = delta * pre.row
            p_out = None
            if self.mode == "kron":
                p_out = self._factor(block.name, "out", module.out_features, self.kron_dims[1], x.device)
                if p_out is not None:
                    delta = delta @ p_out
            if block.bias:
                if bias is None:  # raw: the sum of the (projected) output gradients
                    bias = delta.sum(1)
                elif p_out is not None:
                    bias = bias @ p_out
            part = exact_weight_grads(delta, x)
            if pre is not None and pre.weight is not None:  # exact: M * G, in W.grad's order
                part = part * pre.weight.reshape(1, -1)
            if bias is not None:
                part = torch.cat([part, bias], dim=1)
            out = part if out is None else out + part
        return out


def make_sketcher(model: nn.Module, *, mode: str = "exact", **kwargs):
    """The sketcher of ``mode``: :class:`GradientSketcher` for ``exact`` / ``kron``, the
    forward-only :class:`~ds_partitionsel.head_features.HeadSketcher` for ``head`` /
    ``head_kron`` (the LM head's per-sample gradient, no backward)."""
    from .head_features import HEAD_MODES, HeadSketcher

    if mode in HEAD_MODES:
        return HeadSketcher(model, mode=mode, **kwargs)
    return GradientSketcher(model, mode=mode, **kwargs)
