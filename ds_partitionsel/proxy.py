"""Proxy-model scoring: a smaller causal LM computes the sketches and the validation target.

At pretraining scale the pool's forward is the bill: scoring ``pool_factor`` candidates per
trained sample with the model being trained costs more than training it. A proxy with the same
tokenizer (so that token ids mean the same thing) scores the pool instead, and the main model
only trains on what the proxy chose (small models choosing data for large ones: DoReMi, S2L,
CoLoR-Filter). A natural proxy is the main model truncated to its first few blocks
(``sketch.proxy_layers``): same tokenizer, same embeddings, a fraction of the cost.

The proxy is either frozen, or trained on the selected batches (``sketch.proxy_train``) with
its own AdamW. Training is replicated, not data-parallel: every rank trains its copy on the
whole selected batch (the selected record ids are known to every rank) in the same order, so
the copies stay identical with no communication and the result does not depend on the world
size. The proxy is a plain module on every rank, outside DeepSpeed (never ZeRO-partitioned), so
its sketches need no lockstep between ranks.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

from ds_partitionsel.sketch import transformer_blocks, unwrap_model

__all__ = ["ProxyModel", "proxy_from_config", "truncate_blocks", "vocab_size", "flops_per_token"]


def vocab_size(model: nn.Module) -> Optional[int]:
    """Rows of the input embedding (the token ids a model accepts), or None when it has none."""
    model = unwrap_model(model)
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    return getattr(emb, "num_embeddings", None)


def truncate_blocks(model: nn.Module, layers: int) -> nn.Module:
    """Keep the first ``layers`` transformer blocks of a HF causal LM, in place; returns it.

    The blocks are the list found by :func:`~ds_partitionsel.sketch.transformer_blocks`; the
    config's ``num_hidden_layers`` follows (HF models size their caches and masks from it).
    """
    prefix, blocks = transformer_blocks(model)
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= len(blocks):
        raise ValueError(f"proxy_layers must be an int in [1, {len(blocks)}] (the model has "
                         f"{len(blocks)} blocks under {prefix!r}), got {layers!r}")
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(list(blocks)[:layers]))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    return model


def proxy_from_config(main: nn.Module, *, hidden_size: int, layers: int, heads: int,
                      kv_heads: Optional[int] = None, intermediate_size: Optional[int] = None,
                      seed: int = 0) -> nn.Module:
    """A new, randomly initialized causal LM of the main model's family and vocabulary (so its
    tokenizer) with another width and depth: the "reference model" trained from scratch
    alongside the main model.

    The main model's Hugging Face config is copied with ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads`` (``kv_heads``, default ``heads``),
    ``head_dim`` (``hidden_size / heads``) and ``intermediate_size`` (default: the main model's
    ratio to its width) replaced. The weights are drawn from ``seed`` (the same on every rank),
    whatever the global torch seed.
    """
    import copy

    from ds_partitionsel.sampler import derived_seed

    inner = unwrap_model(main)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    config = getattr(inner, "config", None)
    if config is None or not hasattr(config, "hidden_size") or not hasattr(config, "num_hidden_layers"):
        raise ValueError(f"proxy_config needs a Hugging Face main model (a config with hidden_size and "
                         f"num_hidden_layers); {type(inner).__name__} has none: load a proxy with proxy_model")
    if hidden_size % heads or (kv_heads is not None and heads % kv_heads):
        raise ValueError(f"proxy heads {heads} must divide hidden_size {hidden_size} and kv_heads "
                         f"{kv_heads} must divide heads")
    new = copy.deepcopy(config)
    new.hidden_size, new.num_hidden_layers, new.num_attention_heads = hidden_size, layers, heads
    if hasattr(new, "num_key_value_heads"):
        new.num_key_value_heads = kv_heads or heads
    if getattr(new, "head_dim", None) is not None:
        new.head_dim = hidden_size // heads
    if hasattr(new, "intermediate_size"):
        ratio = config.intermediate_size / config.hidden_size
        new.intermediate_size = intermediate_size or max(1, int(round(ratio * hidden_size)))
    if isinstance(getattr(new, "layer_types", None), list):
        new.layer_types = (list(config.layer_types) * layers)[:layers]
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed("proxy_init", seed))
        return AutoModelForCausalLM.from_config(new, dtype=torch.float32)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of a decoder LM: ``2 x`` the weights of its linears (blocks and
    head; the embedding lookup is free) plus attention's ``2 x seq_len x heads x head_dim`` per
    block (scores and their product with the values over the causal average of ``seq_len / 2``
    keys)."""
    inner = unwrap_model(model)
    linear = sum(m.weight.numel() for m in inner.modules() if isinstance(m, nn.Linear))
    config = getattr(inner, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // max(1, heads))
    return 2.0 * linear + 2.0 * layers * seq_len * heads * head_dim


class ProxyModel:
    """A frozen or trained proxy LM that scores candidates for the main model.

    Parameters
    ----------
    model : nn.Module or str
        A HF causal LM, or the path of a local HF model folder (``from_pretrained``, no hub).
    layers : int, optional
        Keep only the first ``layers`` transformer blocks (see :func:`truncate_blocks`).
    train : bool
        Train the proxy on the selected batches (:meth:`train_on`) with its own AdamW.
    lr : float
        The proxy optimizer's learning rate (with ``train``).
    device, dtype : where and in what dtype the proxy lives (a path is loaded in ``dtype``).
    main_vocab : int, optional
        The main model's vocabulary size: a proxy with another one cannot share its tokenizer.
    """

    def __init__(self, model, *, layers: Optional[int] = None, train: bool = False, lr: float = 1e-4,
                 device=None, dtype: torch.dtype = torch.float32, main_vocab: Optional[int] = None):
        if isinstance(model, (str, os.PathLike)):
            model = self._load(os.fspath(model), dtype)
        if not isinstance(model, nn.Module):
            raise TypeError(f"proxy model must be an nn.Module or a local HF folder, got {type(model).__name__}")
        if layers is not None:
            truncate_blocks(model, layers)
        proxy_vocab = vocab_size(model)
        if main_vocab is not None and proxy_vocab is not None and proxy_vocab != main_vocab:
            raise ValueError(f"the proxy model's vocabulary has {proxy_vocab} tokens, the main model's "
                             f"{main_vocab}: the proxy must use the main model's tokenizer (the pool "
                             f"holds token ids of that tokenizer)")
        if not lr > 0:
            raise ValueError(f"proxy learning rate must be > 0, got {lr!r}")
        self.model = model.to(device) if device is not None else model
        self.train = bool(train)
        for p in self.model.parameters():
            p.requires_grad_(self.train)
        self.optimizer = (torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
                          if self.train else None)
        self.steps = 0

    @staticmethod
    def _load(path: str, dtype: torch.dtype) -> nn.Module:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"sketch.proxy_model {path!r} is not a Hugging Face model folder "
                                    f"(no config.json); save one with model.save_pretrained(path)")
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)

    def train_on(self, batches: Sequence[dict], loss_fn) -> Optional[float]:
        """One optimizer step on ``batches`` (collated micro batches of the selected records).

        ``loss_fn(batch, module) -> (per-sequence losses (B,), counts)``; the step minimizes their
        mean over all rows of all batches. Returns that mean, or None for a frozen proxy.
        """
        if not self.train:
            return None
        rows = sum(int(b["input_ids"].shape[0]) for b in batches)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            per_seq, _ = loss_fn(batch, self.model)
            loss = per_seq.sum() / rows
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.steps += 1
        return total

    def state_dict(self) -> dict:
        """Weights, optimizer state and step count (for the engine's checkpoints)."""
        return {"model": self.model.state_dict(), "steps": self.steps,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = int(state["steps"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
