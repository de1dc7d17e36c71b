"""PartitionSel on Megatron-core models: tensor-parallel sketches and the TP x DP selection.

Layout of the ranks (Megatron's, ``parallel_state.initialize_model_parallel(tp, 1)``): the world
of ``W`` ranks is ``W / tp`` data-parallel replicas of one model, each split over a
tensor-parallel (TP) group of ``tp`` ranks. The TP peers of a replica see the same batch; the
data-parallel (DP) group links the ranks that hold the same shard in different replicas.

Sketches of tensor-parallel linears
-----------------------------------
A linear ``y = x W^T`` (whole weight ``W: (d_out, d_in)``) is split over the TP group:

- ``ColumnParallelLinear``: rank ``r`` holds the output rows ``R_r`` (``W[R_r]``, ``d_out / tp``
  of them); its input ``x`` is whole, its output ``y[:, R_r]`` a shard.
- ``RowParallelLinear`` (``input_is_parallel``): rank ``r`` holds the input columns ``C_r``
  (``W[:, C_r]``); its input ``x[:, C_r]`` is a shard, its output (after Megatron's all-reduce)
  whole.

The per-sample gradient ``G_i = sum_t delta_{i,t} x_{i,t}^T`` of the whole weight is therefore
split the same way: rank ``r`` can form ``G_i[R_r]`` (column) or ``G_i[:, C_r]`` (row) from what
its own hooks capture. The sketch of the whole weight is, with ``P_out: (d_out, k_out)`` and
``P_in: (d_in, k_in)`` drawn exactly as at TP=1 (same seed, same module name) and sliced to the
shard's rows,

    column:  P_out^T G_i P_in = sum_r (P_out[R_r]^T delta_{i,r}) (P_in^T x_i)^T
    row:     P_out^T G_i P_in = sum_r (P_out^T delta_i) (P_in[C_r]^T x_{i,r})^T

so each rank computes its partial sketch and the TP group sums them: the result is the TP=1
sketch up to float rounding, for any ``k`` (and so exactly as unbiased). A side whose
projection is the identity (``mode="exact"``, or ``k >= d``) is not summed but concatenated:
the shards' blocks are the rows (column) or columns (row) of the TP=1 block in rank order,
which is the TP=1 layout because Megatron splits the whole weight into contiguous chunks in
rank order (``partition_stride`` 1, checked). Both go through one all-gather over the TP group
per module and micro batch (:class:`~ds_partitionsel.collectives.Communicator`), then a sum in
rank order or a concatenation: every TP peer ends with bit-identical features whatever the
backend's reduction order, which the selection needs (the peers must pick the same batch).
Normalization and the optional dense ``dim`` projection come after, on the whole block. The DP
group is never involved in a sketch.

The per-sample loss is Megatron's own: ``GPTModel(..., labels=...)`` returns the per-token loss
``(b, s)`` from the vocab-parallel cross entropy (no TP rank ever holds whole logits), where
column ``t`` is the NLL of token ``t + 1``; ``L_i`` is its mean over the sample's label tokens
(the convention of :mod:`ds_partitionsel.loss`). The LM head (``output_layer``) is not sketched
unless named.

Selection
---------
:class:`MegatronSelector` is the framework-neutral :class:`~ds_partitionsel.selector.Selector`
run over the DP group. Every TP peer of a replica sketches the same shard of the pool (the
same DP rank) and, after the TP all-gathers, holds the same features, so every DP group runs the
same selection; :meth:`MegatronSelector.select` checks that the TP peers agree (the selected ids
and weights, all-gathered over the TP group) and raises if they do not.

Not supported (refused with an error that says so): pipeline parallelism > 1 (how it would work:
docs/MEGATRON.md), sequence parallelism, context parallelism, expert parallelism / MoE layers,
``gather_output`` column linears and strided partitions.

CPU
---
Megatron-core assumes CUDA in two places that a CPU run reaches: the global memory buffer of the
attention scores and the model-parallel RNG tracker. :func:`initialize_parallel` replaces them
on CPU with a buffer that allocates on the CPU and a tracker without a CUDA state (dropout in
TP regions then draws from the CPU generator); on CUDA Megatron's own are used.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ds_partitionsel.collectives import Communicator
from ds_partitionsel.config import ConfigError
from ds_partitionsel.extras import require
from ds_partitionsel.selector import Selector
from ds_partitionsel.sketch import DEFAULT_NUM_BLOCKS, GradientSketcher, ModuleSpec

__all__ = ["ParallelLayout", "initialize_parallel", "check_parallel_config", "parallel_linears",
           "TensorParallelSketcher", "MegatronSelector", "gpt_token_losses", "megatron_sequence_loss",
           "causal_padding_mask", "padded_vocab_size", "check_selection_config", "VOCAB_MULTIPLE", "build_gpt",
           "check_gpt_shape", "current_layout"]

# the vocabulary is padded to a multiple of this (Megatron pads too: the embedding and the head
# are split over the TP group); one multiple for every tp that divides it, so that a model's
# shape does not depend on tp
VOCAB_MULTIPLE = 128


def _megatron(purpose: str = "Megatron-core models"):
    return require("megatron.core", purpose)


# --------------------------------------------------------------------------- process groups

@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the TP x DP grid (groups from Megatron's ``parallel_state``)."""

    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    tp_group: object
    dp_group: object


def check_parallel_config(world: int, tp: int, pp: int = 1, *, sequence_parallel: bool = False,
                          context_parallel: int = 1) -> int:
    """Refuse a layout this module cannot run; return the data-parallel size ``world / tp``."""
    if pp != 1:
        raise ConfigError(f"pipeline parallelism ({pp} stages) is not supported: PartitionSel sketches need "
                          f"every hooked layer and the loss on the rank that sketches (see docs/MEGATRON.md "
                          f"for how it would work); use pipeline size 1 (tensor and data parallelism only)")
    if sequence_parallel:
        raise ConfigError("sequence parallelism is not supported: the hooked linears would see sequence "
                          "shards of their inputs; turn sequence_parallel off (tensor parallelism without it)")
    if context_parallel != 1:
        raise ConfigError(f"context parallelism ({context_parallel}) is not supported; use context size 1")
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"the tensor-parallel size must be a positive integer, got {tp!r}")
    if world % tp:
        raise ConfigError(f"the tensor-parallel size {tp} does not divide the world of {world} ranks; "
                          f"launch a multiple of {tp} ranks or choose a divisor of {world}")
    return world // tp


def initialize_parallel(tp: int, pp: int = 1, *, seed: int = 0) -> ParallelLayout:
    """Megatron's model-parallel state for ``tp`` x ``world / tp`` ranks (torch.distributed must
    be initialized), its RNG on CUDA or the CPU replacements (module doc); returns the layout."""
    import torch.distributed as dist

    core = _megatron()
    from megatron.core import parallel_state

    world = dist.get_world_size() if dist.is_initialized() else 1
    check_parallel_config(world, tp, pp)
    if not dist.is_initialized():
        raise RuntimeError("initialize torch.distributed before initialize_parallel "
                           "(ds_partitionsel.launch_env.init_distributed)")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    if torch.cuda.is_available() and str(dist.get_backend()) == "nccl":
        core.tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        _use_cpu_state()
    return current_layout()


def current_layout() -> ParallelLayout:
    """The layout of an initialized ``parallel_state``."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(tp=ps.get_tensor_model_parallel_world_size(), dp=ps.get_data_parallel_world_size(),
                          tp_rank=ps.get_tensor_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                          tp_group=ps.get_tensor_model_parallel_group(), dp_group=ps.get_data_parallel_group())


def _use_cpu_state() -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.utils import GlobalMemoryBuffer

    class CpuMemoryBuffer(GlobalMemoryBuffer):
        """Megatron's scratch buffer (attention scores, all-gathers), on the CPU: a fresh tensor
        per call (its users overwrite it: ``baddbmm(beta=0)``, all-gather outputs)."""

        def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
            return torch.empty(tuple(tensor_shape), dtype=dtype)

    parallel_state._GLOBAL_MEMORY_BUFFER = CpuMemoryBuffer()
    # the RNG tracker's fork() swaps CUDA generator states; without CUDA it must be a no-op
    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def padded_vocab_size(vocab: int, tp: int) -> int:
    """``vocab`` rounded up to a multiple of :data:`VOCAB_MULTIPLE` (which ``tp`` must divide)."""
    if VOCAB_MULTIPLE % tp:
        raise ConfigError(f"the tensor-parallel size {tp} must divide {VOCAB_MULTIPLE} (the vocabulary is "
                          f"padded to a multiple of it and split over the TP group)")
    return int(math.ceil(vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


def check_gpt_shape(*, tp: int, hidden_size: int, num_heads: int, ffn_hidden_size: Optional[int] = None) -> int:
    """Refuse a model shape that does not split over ``tp`` ranks; returns the FFN size."""
    ffn_hidden_size = ffn_hidden_size or 4 * hidden_size
    for what, value in (("--num-heads", num_heads), ("--ffn-hidden-size", ffn_hidden_size)):
        if value % tp:
            raise ConfigError(f"{what} {value} must be a multiple of the tensor-parallel size {tp}")
    if hidden_size % num_heads:
        raise ConfigError(f"--hidden-size {hidden_size} must be a multiple of --num-heads {num_heads}")
    padded_vocab_size(1, tp)  # tp must divide the vocabulary's multiple
    return ffn_hidden_size


def build_gpt(*, vocab_size: int, tp: int, num_layers: int = 2, hidden_size: int = 64, num_heads: int = 4,
              ffn_hidden_size: Optional[int] = None, seq_length: int = 64, seed: int = 0, device=None) -> nn.Module:
    """A Megatron-core ``GPTModel`` with the local layer spec (no Transformer Engine), float32,
    no dropout, its vocabulary padded (:func:`padded_vocab_size`). The weights are drawn whole on
    the CPU from ``seed`` and split (``use_cpu_initialization``): the same model at every ``tp``.
    ``initialize_parallel(tp)`` must have run."""
    _megatron()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    ffn_hidden_size = check_gpt_shape(tp=tp, hidden_size=hidden_size, num_heads=num_heads,
                                      ffn_hidden_size=ffn_hidden_size)
    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_heads,
                               ffn_hidden_size=ffn_hidden_size, tensor_model_parallel_size=tp,
                               use_cpu_initialization=True, gradient_accumulation_fusion=False,
                               hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
                               pipeline_dtype=torch.float32)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=padded_vocab_size(vocab_size, tp), max_sequence_length=seq_length)
    return model.to(device) if device is not None else model


# --------------------------------------------------------------------------- losses

def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Megatron's ``(b, 1, s, s)`` bool attention mask, True where query ``q`` may NOT see key
    ``k``: ``k > q`` or key ``k`` is padding."""
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    return (~allowed).unsqueeze(1)


def gpt_token_losses(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(b, s)`` float32 per-token NLL of a Megatron ``GPTModel``: column ``t`` is
    ``-log p(x_{t+1} | x_{<=t})`` (the last column predicts nothing; callers mask it).

    Positions count real tokens (left padding does not shift them); the vocab-parallel cross
    entropy runs on every TP rank and returns the same values on each."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    labels = torch.roll(input_ids, -1, dims=1)  # column t holds token t + 1 (the last wraps: masked)
    loss = model(input_ids, position_ids, causal_padding_mask(attention_mask), labels=labels)
    return loss.float()


def megatron_sequence_loss(model: nn.Module, batch: dict, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`ds_partitionsel.loss.per_sequence_loss` for a Megatron ``GPTModel``: ``(loss (B,),
    label_count (B,))``, the mean NLL over the tokens whose ``labels`` are not -100 (t >= 1)."""
    if device is None:
        device = batch["input_ids"].device
    ids = batch["input_ids"].to(device)
    nll = gpt_token_losses(model, ids, batch["attention_mask"].to(device))[:, :-1]
    is_label = batch["labels"][:, 1:].to(device) != -100
    count = is_label.sum(1)
    per_seq = torch.where(is_label, nll, torch.zeros_like(nll)).sum(1)
    return per_seq / count.clamp(min=1), count


# --------------------------------------------------------------------------- sketches

def _parallel_linear_types():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear


def check_megatron_model(model: nn.Module) -> None:
    """Refuse a model whose parallel layout the sketches do not handle (module doc)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "tensor_model_parallel_size"):
        raise TypeError(f"{type(model).__name__} is not a Megatron-core model (no TransformerConfig at .config)")
    check_parallel_config(config.tensor_model_parallel_size, config.tensor_model_parallel_size,
                          getattr(config, "pipeline_model_parallel_size", 1) or 1,
                          sequence_parallel=bool(getattr(config, "sequence_parallel", False)),
                          context_parallel=getattr(config, "context_parallel_size", 1) or 1)
    if getattr(config, "num_moe_experts", None):
        raise ConfigError("MoE layers (num_moe_experts) are not supported by the tensor-parallel sketches")


def parallel_linears(model: nn.Module, modules: ModuleSpec = DEFAULT_NUM_BLOCKS) -> List[Tuple[str, nn.Module]]:
    """The ``(name, Column/RowParallelLinear)`` pairs to sketch, in module order.

    ``modules``: ``int k`` (default 3): every parallel linear of the last ``k`` blocks of
    ``decoder.layers``; ``"all_linear"``: every parallel linear but the LM head ``output_layer``;
    a list of exact names or a regex (the head may be named explicitly).
    """
    import re

    column, row = _parallel_linear_types()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (column, row))]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no ColumnParallelLinear/RowParallelLinear modules to sketch")
    names = ", ".join(n for n, _ in linears[:8]) + (f" ... ({len(linears)} in all)" if len(linears) > 8 else "")

    def nothing(what):
        return ValueError(f"modules={what} matched no tensor-parallel linear. Available: {names}")

    if isinstance(modules, bool):
        raise TypeError("modules must be an int, 'all_linear', a list of names or a regex")
    if isinstance(modules, int):
        if modules <= 0:
            raise ValueError(f"modules={modules}: the number of final blocks must be positive")
        layers = getattr(getattr(model, "decoder", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ValueError(f"{type(model).__name__} has no decoder.layers; name the modules to sketch")
        blocks = [f"decoder.layers.{i}." for i in range(max(0, len(layers) - modules), len(layers))]
        chosen = [(n, m) for n, m in linears if any(n.startswith(b) for b in blocks)]
    elif modules == "all_linear":
        chosen = [(n, m) for n, m in linears if n != "output_layer"]
    elif modules == "lora":
        raise ValueError("modules='lora' needs a peft LoRA model; Megatron models have no LoRA adapters here")
    elif isinstance(modules, (str, re.Pattern)):
        pattern = re.compile(modules) if isinstance(modules, str) else modules
        chosen = [(n, m) for n, m in linears if pattern.search(n)]
    elif isinstance(modules, (list, tuple)):
        by_name = dict(linears)
        bad = [n for n in modules if n not in by_name]
        if bad or not modules:
            raise nothing(f"{list(modules)!r} (not tensor-parallel linears: {bad})")
        chosen = [(n, m) for n, m in linears if n in set(modules)]
    else:
        raise TypeError(f"modules must be an int, 'all_linear', a list of names or a regex, "
                        f"got {type(modules).__name__}")
    if not chosen:
        raise nothing(repr(modules))
    for name, module in chosen:
        _check_linear(name, module)
    return chosen


def _check_linear(name: str, module: nn.Module) -> None:
    column, _ = _parallel_linear_types()
    if getattr(module, "sequence_parallel", False):
        raise ConfigError(f"{name}: sequence parallelism is not supported; turn sequence_parallel off")
    if getattr(module, "explicit_expert_comm", False) or getattr(module, "is_expert", False):
        raise ConfigError(f"{name}: expert (MoE) linears are not supported")
    stride = getattr(module.weight, "partition_stride", 1) if getattr(module, "weight", None) is not None else 1
    if stride != 1:
        raise ConfigError(f"{name}: strided partitions (partition_stride {stride}) are not supported")
    if isinstance(module, column):
        if getattr(module, "gather_output", False):
            raise ConfigError(f"{name}: ColumnParallelLinear with gather_output=True is not supported")
    elif not getattr(module, "input_is_parallel", True):
        raise ConfigError(f"{name}: RowParallelLinear with input_is_parallel=False is not supported")


@dataclass(frozen=True)
class _Shard:
    """Which slice of the whole weight a rank's module holds."""

    kind: str   # "column" (output rows sharded) or "row" (input columns sharded)
    lo: int     # [lo, hi) of the sharded dimension
    hi: int


class TensorParallelSketcher(GradientSketcher):
    """:class:`~ds_partitionsel.sketch.GradientSketcher` of a Megatron-core ``GPTModel`` whose
    linears are split over a tensor-parallel group (module doc for the math).

    Same parameters as ``GradientSketcher`` (``head_chunk`` is ignored: the loss is Megatron's
    vocab-parallel cross entropy), plus

    tp_group : the tensor-parallel process group (default: ``parallel_state``'s).
    timeout : seconds each TP all-gather may take.

    The feature layout (``blocks``, ``feature_dim``) is the TP=1 layout, and so are the features.
    """

    streams_gram = False  # a Gram of tensor-parallel shards would need their all-reduce


    def __init__(self, model: nn.Module, *, tp_group=None, timeout: Optional[float] = None, **kwargs):
        check_megatron_model(model)
        if tp_group is None:
            from megatron.core import parallel_state

            tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_comm = Communicator(tp_group, timeout, "tensor-parallel sketch")
        kwargs["head_chunk"] = None
        super().__init__(model, **kwargs)
        tp = self.tp_comm.world
        if tp != model.config.tensor_model_parallel_size:
            raise ConfigError(f"the tensor-parallel group has {tp} ranks but the model was built for "
                              f"tensor_model_parallel_size {model.config.tensor_model_parallel_size}")
        column, _ = _parallel_linear_types()
        self._shards: Dict[str, _Shard] = {}
        for name, module in self._modules:
            d_in, d_out = self._linear_sizes(module)
            kind, d = ("column", d_out) if isinstance(module, column) else ("row", d_in)
            if d % tp:
                raise ConfigError(f"{name}: dimension {d} does not split over {tp} tensor-parallel ranks")
            size = d // tp
            self._shards[name] = _Shard(kind, self.tp_comm.rank * size, (self.tp_comm.rank + 1) * size)

    def _resolve_modules(self, modules):
        return parallel_linears(self.model, modules)

    def _linear_sizes(self, module):
        return module.input_size, module.output_size

    def _projected(self, side: str, d: int) -> bool:
        k = self.kron_dims[0] if side == "in" else self.kron_dims[1]
        return self.mode == "kron" and k < d

    def _make_hook(self, name, capture):
        d_in, d_out = self._linear_sizes(dict(self._modules)[name])

        def hook(mod, args, output):
            shard = self._shards[name]
            if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
                raise RuntimeError(f"{name}: expected the (seq, batch, features) input as the first argument")
            if not isinstance(output, tuple) or not isinstance(output[0], torch.Tensor):
                raise RuntimeError(f"{name}: expected Megatron's (output, bias) tuple")
            y = output[0]
            local_in = shard.hi - shard.lo if shard.kind == "row" else d_in
            local_out = shard.hi - shard.lo if shard.kind == "column" else d_out
            if args[0].shape[-1] != local_in or y.shape[-1] != local_out:
                raise RuntimeError(f"{name}: activation shapes {tuple(args[0].shape)} -> {tuple(y.shape)} do not "
                                   f"match this rank's shard ({local_in} -> {local_out})")
            x = args[0].detach().transpose(0, 1).to(self.compute_dtype)  # (s, b, d) -> (b, s, d)
            if self._projected("in", d_in):
                p_in = self._factor(name, "in", d_in, self.kron_dims[0], x.device)
                x = x @ (p_in[shard.lo:shard.hi] if shard.kind == "row" else p_in)
            capture.inputs.append(x)
            if not y.requires_grad:
                y = y.detach().requires_grad_(True)
            capture.outputs.append(y)
            return (y,) + tuple(output[1:])

        return hook

    def _forward_losses(self, input_ids, attention_mask, labels, tap):
        """Per-sample mean label NLL ``(n,)`` (module doc), in the graph of the hooked layers."""
        nll = gpt_token_losses(self.model, input_ids, attention_mask)[:, :-1]  # predicts tokens 1..T-1
        is_label = labels[:, 1:]
        if not nll.requires_grad:
            raise RuntimeError("the loss does not depend on the hooked modules' outputs; "
                               "choose modules that the model uses")
        weights = is_label.to(torch.float32) / is_label.sum(1, keepdim=True).clamp(min=1)
        return torch.where(is_label, nll * weights, torch.zeros_like(nll)).sum(1)

    def _reduce_module(self, block, cap, deltas, real):
        """``(n, block.width)``: the whole weight's sketch (the TP=1 block), from this rank's
        partial block and its TP peers' (one all-gather; module doc)."""
        module = dict(self._modules)[block.name]
        shard = self._shards[block.name]
        d_in, d_out = self._linear_sizes(module)
        local = bias = None
        for x, delta in zip(cap.inputs, deltas):
            delta = delta.transpose(0, 1).to(self.compute_dtype)  # (b, s, d_out or its shard)
            x = torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))
            delta = torch.where(real, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
            if self._projected("out", d_out):
                p_out = self._factor(block.name, "out", d_out, self.kron_dims[1], x.device)
                delta = delta @ (p_out[shard.lo:shard.hi] if shard.kind == "column" else p_out)
            part = torch.bmm(delta.transpose(1, 2), x)  # (n, rows here, cols here)
            local = part if local is None else local + part
            if block.bias:
                b = delta.sum(1)
                bias = b if bias is None else bias + b
        n, rows, cols = local.shape
        summed = self._projected("out" if shard.kind == "column" else "in", d_out if shard.kind == "column" else d_in)
        # the column bias is sharded like the rows; a row-parallel linear's bias is whole on every rank
        send = local.flatten(1)
        if block.bias and shard.kind == "column":
            send = torch.cat([send, bias], dim=1)
        parts = self.tp_comm.all_gather(send, f"all-gather of {block.name}'s partial sketches")
        weights = [p[:, :rows * cols].view(n, rows, cols) for p in parts]
        if summed:
            whole = functools.reduce(torch.add, weights)  # in rank order: the same bits on every peer
        else:
            whole = torch.cat(weights, dim=1 if shard.kind == "column" else 2)
        out = [whole.flatten(1)]
        if block.bias:
            if shard.kind == "column":
                biases = [p[:, rows * cols:] for p in parts]
                out.append(functools.reduce(torch.add, biases) if summed else torch.cat(biases, dim=1))
            else:
                out.append(bias)
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]


# --------------------------------------------------------------------------- selection

def check_selection_config(cfg) -> None:
    """Refuse ``"partitionsel"`` keys that the Megatron selection does not serve."""
    if cfg.sketch.proxy_model is not None:
        raise ConfigError("partitionsel.sketch.proxy_model is not supported with Megatron models "
                          "(the model itself is sketched); remove it")
    if cfg.sketch.modules == "lora":
        raise ConfigError("partitionsel.sketch.modules='lora' needs a peft LoRA model; Megatron models "
                          "have none here: use an int, 'all_linear', names or a regex")
    if cfg.sketch.precondition != "none":
        raise ConfigError(f"partitionsel.sketch.precondition {cfg.sketch.precondition!r} is not supported by the "
                          f"Megatron loop (tensor-parallel sketches, distributed optimizer state); it works with "
                          f"the DeepSpeed engine (ds_partitionsel.engine) and the HF Trainer: use 'none' here")


class MegatronSelector(Selector):
    """The :class:`~ds_partitionsel.selector.Selector` of a Megatron ``GPTModel`` on TP x DP ranks:
    selection over the DP group, sketches reduced over the TP group, the TP peers' agreement on
    every selection checked. ``sketch.proxy_model`` is not supported."""

    sequence_loss = staticmethod(megatron_sequence_loss)

    def __init__(self, model, cfg, pool, valid_pool, *, batch_size: int, pad_token_id: int,
                 layout: Optional[ParallelLayout] = None):
        check_selection_config(cfg)
        self.layout = layout or current_layout()
        super().__init__(model, cfg, pool, valid_pool, batch_size=batch_size, pad_token_id=pad_token_id,
                         group=self.layout.dp_group)

    def _sketcher_class(self):
        return functools.partial(TensorParallelSketcher, tp_group=self.layout.tp_group,
                                 timeout=self.cfg.timeout_s)

    def select(self, step: int, lr: float, *, with_features: bool = True):
        selection = super().select(step, lr, with_features=with_features)
        self.check_tp_agreement(selection)
        return selection

    def check_tp_agreement(self, selection) -> None:
        """Raise unless every TP peer selected the same ids with the same weights."""
        mine = torch.stack([selection.record_ids.to(torch.float64), selection.weights.to(torch.float64)])
        comm = Communicator(self.layout.tp_group, self.cfg.timeout_s, f"selection step {selection.step}")
        peers = comm.all_gather(mine, "all-gather of the selection over the tensor-parallel group")
        differ = [r for r, p in enumerate(peers) if not torch.equal(p, mine)]
        if differ:
            raise RuntimeError(f"step {selection.step}: tensor-parallel rank(s) {differ} selected another batch "
                               f"than TP rank {self.layout.tp_rank} (ids {selection.record_ids[:8].tolist()} ...); "
                               f"the TP peers' sketches differ")
