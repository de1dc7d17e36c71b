"""The ``"partitionsel"`` block of a DeepSpeed JSON config: typed, validated, documented defaults.

Example (every key optional; defaults follow the paper)::

    "partitionsel": {
        "method": "partitionsel",          # or a baseline: random, full, gradnorm, greats, ...
        "pool_factor": 8,                  # pool = pool_factor * train_batch_size candidates
        "steps_per_pool": 1,               # batches selected (and trained) per scoring pass of a pool
        "budget": {"strategy": "proportional"},
        "sketch": {"modules": 3, "mode": "exact", "dim": null, "micro_batch": 8},
        "validation": {"anchors": 8, "refresh_interval": 1},
        "mode": "auto", "rule": "greedy", "use_weights": false,
        "seed": 1234, "log_interval": 1, "eval_interval": 0, "timeout_s": 600
    }

The block is a tree of pydantic models (as DeepSpeed validates its own blocks), in strict mode:
a value must already have its JSON type (``"use_weights": "false"`` is refused, not truthy), unknown
keys are rejected with the list of valid ones at any level, and every error is a
:class:`ConfigError` whose message names the key, the value given and what is valid. Command-line
overrides go through :func:`apply_override`, which parses ``KEY=VALUE`` text with the type of
that key, so ``use_weights=False`` is the boolean ``False``.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, List, Literal, Optional, Tuple, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ds_partitionsel.budgets import ROUNDINGS, STRATEGIES
from ds_partitionsel.selection import METHODS
from ds_partitionsel.solver import RULES

SELECTION_MODES = ("auto", "replicated", "sharded")
SKETCH_MODES = ("exact", "kron", "head", "head_kron")
PRECONDITIONS = ("none", "adam")  # ds_partitionsel.precondition
ANCHOR_MIXES = ("pooled", "per_domain")
MAX_SEED = 2 ** 63 - 1  # torch generators take a signed 64-bit seed

# Keys that change what a run selects and trains on. A resume refuses a checkpoint whose values
# differ (see config_differences); the others only change logging, evaluation or timeouts.
RESUME_FREE_KEYS = ("log_interval", "eval_interval", "eval_samples", "timeout_s")


class ConfigError(ValueError):
    """A bad ``"partitionsel"`` block; the message names the key and the fix."""


def _expects(text: str, **extra) -> Any:
    """Field metadata: ``text`` completes "KEY must be ..." in error messages."""
    return {"expects": text, **extra}


class _Block(BaseModel):
    """Common settings: strict JSON types, unknown keys rejected, immutable after validation."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=False)


class BudgetConfig(_Block):
    """How the batch of k is split over domains (see :func:`ds_partitionsel.budgets.allocate_budgets`)."""

    strategy: Literal[STRATEGIES] = "validation"
    fractions: Optional[List[float]] = Field(
        None, json_schema_extra=_expects("null or a list of numbers >= 0, one per domain in the pool's "
                                         "domain order, not all 0"))
    minority_domains: Optional[List[str]] = Field(
        None, json_schema_extra=_expects('null or a list of domain names, e.g. ["code"]'))
    floor: float = Field(0.25, json_schema_extra=_expects(
        "a number in [0, 1]: the coverage floor of the 'validation' and 'curriculum' strategies "
        "(every domain keeps at least this fraction of its proportional share)"))
    rounding: Literal[ROUNDINGS] = Field("largest_remainder", json_schema_extra=_expects(
        '"largest_remainder" (the same rounding every step) or "stochastic" (seeded per step, '
        "each domain's expected budget equals its quota)"))
    curriculum_lambda: float = Field(0.5, json_schema_extra=_expects(
        "a finite number > 0 (the 'curriculum' rule's lambda: smaller moves budgets more)"))
    curriculum_beta: float = Field(0.9, json_schema_extra=_expects(
        "a number in [0, 1) (EMA factor of the 'curriculum' rule's per-domain gains)"))

    @field_validator("floor")
    @classmethod
    def _floor(cls, v):
        if not (math.isfinite(v) and 0 <= v <= 1):
            raise PydanticCustomError("partitionsel", "bad floor")
        return v

    @field_validator("curriculum_lambda")
    @classmethod
    def _lam(cls, v):
        if not math.isfinite(v) or v <= 0:
            raise PydanticCustomError("partitionsel", "bad lambda")
        return v

    @field_validator("curriculum_beta")
    @classmethod
    def _beta(cls, v):
        if not (math.isfinite(v) and 0 <= v < 1):
            raise PydanticCustomError("partitionsel", "bad beta")
        return v

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v):
        if v is not None and (not v or any(not math.isfinite(f) or f < 0 for f in v) or sum(v) <= 0):
            raise PydanticCustomError("partitionsel", "bad fractions")
        return v

    @field_validator("minority_domains")
    @classmethod
    def _minority(cls, v):
        if v is not None and (not v or len(set(v)) != len(v) or any(not d for d in v)):
            raise PydanticCustomError("partitionsel", "bad domain list")
        return v

    @model_validator(mode="after")
    def _needs(self):
        if self.strategy == "fractions" and self.fractions is None:
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.budget.strategy 'fractions' needs partitionsel.budget.fractions, "
                                "one number per domain in the pool's domain order")
        if self.strategy == "minority_full" and self.minority_domains is None:
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.budget.strategy 'minority_full' needs "
                                "partitionsel.budget.minority_domains, a list of domain names")
        return self


class ProxyArchConfig(_Block):
    """A proxy scorer built from the main model's config with another width and depth (same
    vocabulary, so the same tokenizer), initialized from the seed and trained from scratch
    alongside the main model (:func:`ds_partitionsel.proxy.proxy_from_config`)."""

    hidden_size: int = Field(..., json_schema_extra=_expects("a positive integer (the proxy's model width)"))
    layers: int = Field(..., json_schema_extra=_expects("a positive integer (the proxy's transformer blocks)"))
    heads: int = Field(..., json_schema_extra=_expects("a positive integer dividing hidden_size (attention heads)"))
    kv_heads: Optional[int] = Field(None, json_schema_extra=_expects(
        "null (= heads) or a positive integer dividing heads (key/value heads)"))
    intermediate_size: Optional[int] = Field(None, json_schema_extra=_expects(
        "null (the main model's ratio to its width) or a positive integer (MLP width)"))

    @field_validator("hidden_size", "layers", "heads", "kv_heads", "intermediate_size")
    @classmethod
    def _positive(cls, v):
        return _positive(v)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.heads:
            raise PydanticCustomError(
                "partitionsel_rule", f"partitionsel.sketch.proxy_config.heads = {self.heads} does not divide "
                                f"hidden_size = {self.hidden_size}; pick heads so that hidden_size / heads is an integer")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise PydanticCustomError(
                "partitionsel_rule", f"partitionsel.sketch.proxy_config.kv_heads = {self.kv_heads} does not divide "
                                f"heads = {self.heads}")
        return self


class SketchConfig(_Block):
    """Which linears are sketched and how (see :class:`ds_partitionsel.sketch.GradientSketcher`)."""

    modules: Union[int, str, List[str]] = Field(
        3, json_schema_extra=_expects("a positive int (the last N blocks), \"all_linear\", \"lora\", "
                                      "a regex or a non-empty list of module names"))
    mode: Literal[SKETCH_MODES] = "exact"
    kron_dims: Union[int, List[int]] = Field(
        32, json_schema_extra=_expects("a positive int or a pair [k_in, k_out] of positive ints"))
    dim: Optional[int] = Field(None, json_schema_extra=_expects("null or a positive integer"))
    normalize: bool = True
    micro_batch: int = Field(8, json_schema_extra=_expects("a positive integer (sequences per sketch "
                                                            "forward/backward)"))
    head_chunk: Union[int, Literal["auto"], None] = Field(
        "auto", json_schema_extra=_expects('"auto", null (all positions at once) or a positive integer '
                                           "(label positions per chunk of the output head)"))
    proxy_model: Optional[str] = Field(None, json_schema_extra=_expects(
        "null or the path of a local Hugging Face model folder that sketches in place of the trained model"))
    proxy_layers: Optional[int] = Field(None, json_schema_extra=_expects(
        "null (all) or a positive integer (blocks of the proxy model kept)"))
    proxy_train: bool = False
    proxy_lr: float = Field(1e-4, json_schema_extra=_expects("a finite number > 0 (the proxy's learning rate)"))
    proxy_config: Optional[ProxyArchConfig] = None
    score_len: Optional[int] = Field(None, json_schema_extra=_expects(
        "null (score whole sequences) or an integer >= 2 (tokens of the seeded window of each "
        "candidate and anchor that is scored)"))
    # "adam": candidates' sketches scaled by AdamW's 1/(sqrt(v_hat)+eps), anchors raw
    precondition: Literal[PRECONDITIONS] = "none"
    stream: bool = Field(False, json_schema_extra=_expects(
        "true or false: stream the pool's exact sketches into its Gram matrix instead of holding "
        "them (mode 'exact', dim null, one data-parallel rank)"))

    @field_validator("modules")
    @classmethod
    def _modules(cls, v):
        if (isinstance(v, int) and v <= 0) or (isinstance(v, str) and not v) or (isinstance(v, list) and not v):
            raise PydanticCustomError("partitionsel", "bad modules")
        return v

    @field_validator("kron_dims")
    @classmethod
    def _kron(cls, v):
        dims = [v] if isinstance(v, int) else v
        if len(dims) not in ((1,) if isinstance(v, int) else (2,)) or any(d <= 0 for d in dims):
            raise PydanticCustomError("partitionsel", "bad kron_dims")
        return v

    @field_validator("dim", "micro_batch", "proxy_layers")
    @classmethod
    def _positive(cls, v):
        return _positive(v)

    @field_validator("score_len")
    @classmethod
    def _score_len(cls, v):
        if v is not None and v < 2:  # a window needs a predictor and a label
            raise PydanticCustomError("partitionsel", "bad score_len")
        return v

    @field_validator("head_chunk")
    @classmethod
    def _head_chunk(cls, v):
        return v if v == "auto" else _positive(v)

    @field_validator("proxy_model", mode="before")
    @classmethod
    def _path(cls, v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @field_validator("proxy_lr")
    @classmethod
    def _proxy_lr(cls, v):
        if not math.isfinite(v) or v <= 0:
            raise PydanticCustomError("partitionsel", "bad lr")
        return v

    @model_validator(mode="after")
    def _proxy_needs_model(self):
        # proxy_layers / proxy_train without a proxy would be ignored without a word
        if self.proxy_config is not None and self.proxy_layers is not None:
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.sketch.proxy_layers truncates a loaded proxy_model; with "
                                "proxy_config set the depth there (proxy_config.layers)")
        if self.proxy_model is None and self.proxy_config is None and (self.proxy_train or self.proxy_layers is not None):
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.sketch.proxy_train / proxy_layers need "
                                "partitionsel.sketch.proxy_model, the path of the proxy's model folder")
        if self.proxy_config is not None and self.proxy_model is not None:
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.sketch.proxy_config and proxy_model are two ways to get a "
                                "proxy: give one (a config builds a new proxy, a folder loads one)")
        if self.proxy_config is not None and not self.proxy_train:
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.sketch.proxy_config builds an untrained proxy: set "
                                "partitionsel.sketch.proxy_train to true (it trains on the selected batches)")
        if self.precondition == "adam" and self.mode in ("head", "head_kron"):
            raise PydanticCustomError(
                "partitionsel_rule", f"partitionsel.sketch.precondition 'adam' scales the hooked linears' "
                                f"gradients by the optimizer's second moments; sketch.mode {self.mode!r} has no "
                                f"hooked linears: use sketch.mode 'exact' or 'kron', or precondition 'none'")
        if self.stream and (self.mode != "exact" or self.dim is not None):
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.sketch.stream streams the unprojected exact gradients into "
                                "the pool's Gram matrix; it needs sketch.mode 'exact' and sketch.dim null (a "
                                "projection or a Kronecker sketch is already small: set stream to false)")
        if self.precondition == "adam" and (self.proxy_model is not None or self.proxy_config is not None):
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.sketch.precondition 'adam' needs the trained model's "
                                "optimizer state; a proxy scorer (sketch.proxy_model / proxy_config) has "
                                "another optimizer: drop the proxy or use precondition 'none'")
        return self


class ValidationConfig(_Block):
    """The held-out anchors whose mean sketch is the selection target."""

    anchors: int = Field(8, json_schema_extra=_expects("a positive integer (validation sequences averaged "
                                                        "into the target gradient)"))
    refresh_interval: int = Field(1, json_schema_extra=_expects("a positive integer (steps between new "
                                                                 "anchor draws)"))
    ema: float = Field(0.0, json_schema_extra=_expects(
        "a number in [0, 1): the target is an exponential moving average of the anchors' mean "
        "sketch across refreshes, t = ema * t_prev + (1 - ema) * fresh (0: no averaging)"))
    shrink: bool = Field(False, json_schema_extra=_expects(
        "true or false: shrink the anchors' mean toward the pool's mean sketch by how much of their "
        "difference stands above the anchors' sampling noise (positive-part James-Stein; when the "
        "validation set asks for nothing the pool lacks, the target becomes the pool's own mean)"))
    mix: Literal[ANCHOR_MIXES] = Field("pooled", json_schema_extra=_expects(
        '"pooled" (anchors drawn uniformly from the held-out split: the target follows its domain mix) '
        'or "per_domain" (an equal share of anchors from every held-out domain, each domain weighted '
        'the same in the target)'))

    @field_validator("anchors", "refresh_interval")
    @classmethod
    def _positive(cls, v):
        return _positive(v)

    @field_validator("ema")
    @classmethod
    def _ema(cls, v):
        if not (math.isfinite(v) and 0 <= v < 1):
            raise PydanticCustomError("partitionsel", "bad ema")
        return v


class PartitionSelConfig(_Block):
    """The whole ``"partitionsel"`` block. Build it with :meth:`from_dict`."""

    method: Literal[METHODS] = "partitionsel"
    pool_factor: int = Field(8, json_schema_extra=_expects("a positive integer (pool = pool_factor x "
                                                            "train_batch_size)"))
    pool_size: Optional[int] = Field(None, json_schema_extra=_expects("null or a positive integer "
                                                                       "(overrides pool_factor)"))
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    sketch: SketchConfig = Field(default_factory=SketchConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    steps_per_pool: int = Field(1, json_schema_extra=_expects(
        "a positive integer m: one scoring pass over a pool selects m disjoint batches, trained "
        "over m steps (pool_size must hold m batches)"))
    mode: Literal[SELECTION_MODES] = "auto"
    rule: Literal[RULES] = "sample"
    temperature: float = Field(3.0, json_schema_extra=_expects(
        "a finite number > 0 (rule 'sample': Gumbel noise against residuals scaled by their "
        "spread; larger is closer to uniform sampling within the budgets)"))
    nonneg: bool = True
    ridge: float = Field(0.0, json_schema_extra=_expects("a finite number >= 0"))
    use_weights: bool = False
    seed: int = Field(1234, json_schema_extra=_expects(f"an integer in 0..{MAX_SEED}"))
    log_interval: int = Field(1, json_schema_extra=_expects("a positive integer (steps between "
                                                             "conflicting-pair measurements)"))
    eval_interval: int = Field(0, json_schema_extra=_expects("an integer >= 0 (0: no periodic held-out "
                                                              "evaluation)"))
    eval_samples: int = Field(0, json_schema_extra=_expects("an integer >= 0 (0: the whole validation split)"))
    timeout_s: float = Field(600.0, json_schema_extra=_expects(
        "a finite number of seconds > 0 (how long any collective of training or selection waits "
        "for the other ranks)"))

    @field_validator("pool_factor", "pool_size", "log_interval", "steps_per_pool")
    @classmethod
    def _positive(cls, v):
        return _positive(v)

    @model_validator(mode="after")
    def _amortize(self):
        if self.steps_per_pool > 1 and self.method == "full":
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.steps_per_pool > 1 needs a pool larger than the batch; "
                                "method 'full' trains on the whole pool: set steps_per_pool to 1")
        if self.steps_per_pool > 1 and self.pool_size is None and self.pool_factor < self.steps_per_pool:
            raise PydanticCustomError(
                "partitionsel_rule", f"partitionsel.steps_per_pool = {self.steps_per_pool} disjoint batches do "
                                f"not fit in a pool of pool_factor = {self.pool_factor} batches; raise "
                                f"pool_factor to at least {self.steps_per_pool} or lower steps_per_pool")
        if self.validation.shrink and self.sketch.precondition != "none":
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.validation.shrink compares the anchors' mean with the pool's "
                                "mean sketch, but sketch.precondition '{p}' puts the candidates in another "
                                "space than the (raw) anchors: set validation.shrink to false or "
                                "sketch.precondition to 'none'", {"p": self.sketch.precondition})
        if self.sketch.stream and self.validation.shrink:
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.validation.shrink needs the pool's mean sketch, which "
                                "sketch.stream does not hold: set one of them to false")
        if self.sketch.stream and self.method == "gradnorm":
            raise PydanticCustomError(
                "partitionsel_rule", "partitionsel.sketch.stream selects from the pool's Gram matrix; method "
                                "'gradnorm' has no Gram form here: set stream to false")
        return self

    @field_validator("eval_interval", "eval_samples")
    @classmethod
    def _non_negative(cls, v):
        if v < 0:
            raise PydanticCustomError("partitionsel", "negative")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if not math.isfinite(v) or v <= 0:
            raise PydanticCustomError("partitionsel", "bad temperature")
        return v

    @field_validator("ridge")
    @classmethod
    def _ridge(cls, v):
        if not math.isfinite(v) or v < 0:
            raise PydanticCustomError("partitionsel", "bad ridge")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if not 0 <= v <= MAX_SEED:
            raise PydanticCustomError("partitionsel", "bad seed")
        return v

    @field_validator("timeout_s")
    @classmethod
    def _timeout(cls, v):
        if not math.isfinite(v) or v <= 0:
            raise PydanticCustomError("partitionsel", "bad timeout")
        return v

    @classmethod
    def from_dict(cls, block: Optional[dict]) -> "PartitionSelConfig":
        """Validate a ``"partitionsel"`` block (``None``: all defaults); raises :class:`ConfigError`."""
        block = {} if block is None else block
        if not isinstance(block, dict):
            raise ConfigError(f"partitionsel must be a JSON object, got {type(block).__name__} {block!r}")
        try:
            return cls.model_validate(block)
        except ValidationError as e:
            raise ConfigError(_message(e, block)) from None

    def to_dict(self) -> dict:
        """Plain JSON-able dict; ``from_dict(cfg.to_dict()) == cfg``."""
        return self.model_dump()


def _positive(v):
    if v is not None and v <= 0:
        raise PydanticCustomError("partitionsel", "not positive")
    return v


# ----------------------------------------------------------------------------- messages


def _sub_block(annotation) -> Optional[type]:
    """The block class of a field (``X`` or ``Optional[X]`` for a block ``X``), else None."""
    if get_origin(annotation) is Union:
        inner = [a for a in get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, _Block) else None


def _field_of(loc: tuple) -> Tuple[type, List[str]]:
    """Walk ``loc`` through the nested blocks: (the block holding the last field, its key path).

    The walk stops at the first part that is not a field name (a list index, a union branch).
    """
    block, holder, path = PartitionSelConfig, PartitionSelConfig, []
    for part in loc:
        if block is None or not isinstance(part, str) or part not in block.model_fields:
            break
        path.append(part)
        holder = block
        block = _sub_block(block.model_fields[part].annotation)
    return holder, path


def _block_at(path) -> type:
    block = PartitionSelConfig
    for part in path:
        block = _sub_block(block.model_fields[part].annotation)
    return block


def _lookup(block, path):
    node = block
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _expectation(model: type, name: str) -> str:
    info = model.model_fields[name]
    annotation = info.annotation
    if get_origin(annotation) is Literal:
        return "one of: " + ", ".join(get_args(annotation))
    if annotation is bool:
        return "true or false (a JSON boolean, not a string)"
    return (info.json_schema_extra or {}).get("expects", str(annotation))


def _message(error: ValidationError, block: dict) -> str:
    """One line per bad key: ``partitionsel.KEY must be WHAT, got VALUE`` (or the unknown keys)."""
    lines, seen = [], set()
    for err in error.errors(include_url=False):
        loc = err["loc"]
        if err["type"] == "extra_forbidden":
            path = [str(p) for p in loc[:-1]]
            model = _block_at(path)
            where = ".".join(["partitionsel", *path])
            unknown = [e["loc"][-1] for e in error.errors(include_url=False)
                       if e["type"] == "extra_forbidden" and tuple(e["loc"][:-1]) == tuple(loc[:-1])]
            line = (f"unknown key(s) {', '.join(repr(u) for u in unknown)} in {where}; "
                    f"valid keys: {', '.join(model.model_fields)}")
        elif err["type"] == "partitionsel_rule":
            line = err["msg"]  # a rule across keys, with its own message
        else:
            model, path = _field_of(loc)
            if not path:
                line = f"partitionsel: {err['msg']}"
            else:
                key = ".".join(["partitionsel", *path])
                value = _lookup(block, path)
                if _sub_block(model.model_fields[path[-1]].annotation) is not None:
                    line = f"{key} must be a JSON object, got {type(value).__name__} {value!r}"
                elif get_origin(model.model_fields[path[-1]].annotation) is Literal:
                    line = f"{key} = {value!r} is not valid; choose {_expectation(model, path[-1])}"
                else:
                    line = f"{key} must be {_expectation(model, path[-1])}, got {value!r}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "; ".join(lines)


# ----------------------------------------------------------------------------- overrides


def _leaf_annotation(path: List[str]):
    model = PartitionSelConfig
    for i, key in enumerate(path):
        if key not in model.model_fields:
            return None
        annotation = model.model_fields[key].annotation
        if i == len(path) - 1:
            return annotation
        if _sub_block(annotation) is None:
            return None
        model = _sub_block(annotation)
    return None


def parse_override(key: str, text: str) -> Any:
    """The value of ``--set KEY=TEXT``: JSON when it parses, else read with KEY's type.

    ``True``/``False`` (any case) are booleans for a boolean key; other non-JSON text is a
    string. The result is validated with the whole block, so a wrong type still fails there.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    annotation = _leaf_annotation(key.split("."))
    if annotation is bool and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    return text


def apply_override(block: dict, item: str) -> None:
    """Apply one ``KEY=VALUE`` (dotted KEY, e.g. ``sketch.mode=kron``) to a ``partitionsel`` dict."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. --set pool_factor=4), got {item!r}")
    node = block
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: partitionsel.{'.'.join(parents[:i + 1])} is {child!r}, "
                              f"not a block with keys")
        node = child
    node[leaf] = parse_override(key, text)


def config_differences(saved: dict, current: dict, ignore=RESUME_FREE_KEYS) -> List[str]:
    """``["seed: 7 -> 8", ...]``: the keys (dotted) whose values differ, ``ignore`` left out."""
    out = []

    def walk(a, b, prefix):
        for k in sorted(set(a) | set(b)):
            name = f"{prefix}{k}"
            if name in ignore:
                continue
            x, y = a.get(k), b.get(k)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, name + ".")
            elif x != y:
                out.append(f"{name}: {x!r} -> {y!r}")

    walk(saved, current, "")
    return out


# ----------------------------------------------------------------------------- batch and pool


def split_deepspeed_config(config) -> Tuple[dict, "PartitionSelConfig", bool]:
    """A DeepSpeed config (dict or JSON path) -> ``(DeepSpeed's own dict without our block, the
    validated ``"partitionsel"`` block, whether the config had one)``. The input is not changed."""
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as fh:
                config = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"DeepSpeed config {str(config)!r} not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"DeepSpeed config {str(config)!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a dict or a path to a DeepSpeed JSON file, got {type(config).__name__}")
    ds_config = copy.deepcopy(config)
    present = "partitionsel" in ds_config
    block = ds_config.pop("partitionsel", None)
    return ds_config, PartitionSelConfig.from_dict(block), present


def train_batch_size(ds_config: dict, world: int) -> Optional[int]:
    """The global batch k that DeepSpeed will derive from ``ds_config`` on ``world`` ranks.

    ``train_batch_size`` when given, else ``train_micro_batch_size_per_gpu x
    gradient_accumulation_steps (default 1) x world``; ``None`` when neither is set (DeepSpeed
    then reports the error itself). Raises :class:`ConfigError` on values that are not positive
    integers or that disagree.
    """
    given = {}
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds_config.get(key)
        if value is None or value == "auto":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        given[key] = value
    micro, accum = given.get("train_micro_batch_size_per_gpu"), given.get("gradient_accumulation_steps")
    if "train_batch_size" in given:
        k = given["train_batch_size"]
        if micro is not None and accum is not None and k != micro * accum * world:
            raise ConfigError(f"train_batch_size {k} != train_micro_batch_size_per_gpu {micro} x "
                              f"gradient_accumulation_steps {accum} x {world} rank(s)")
        return k
    return None if micro is None else micro * (accum or 1) * world


def check_pool_fit(cfg: PartitionSelConfig, batch_size: int, world: int, num_records: int) -> int:
    """The per-step pool size for a batch of ``batch_size`` over ``world`` ranks; ConfigError if
    it cannot work (smaller than the batch, uneven over ranks, larger than the training split)."""
    pool_size = batch_size if cfg.method == "full" else (cfg.pool_size or cfg.pool_factor * batch_size)
    if batch_size % world:
        raise ConfigError(f"the batch of {batch_size} does not split evenly over {world} ranks")
    if pool_size < batch_size:
        raise ConfigError(f"pool of {pool_size} candidates is smaller than the batch of {batch_size}; "
                          f"raise partitionsel.pool_size / pool_factor")
    if pool_size < cfg.steps_per_pool * batch_size:
        raise ConfigError(f"pool of {pool_size} candidates cannot hold partitionsel.steps_per_pool = "
                          f"{cfg.steps_per_pool} disjoint batches of {batch_size}; raise pool_size / pool_factor "
                          f"or lower steps_per_pool")
    if pool_size % world:
        raise ConfigError(f"pool size {pool_size} must divide evenly over {world} ranks (every rank "
                          f"sketches the same number of candidates in lockstep)")
    if num_records < pool_size:
        raise ConfigError(f"the training split holds {num_records} records, fewer than one pool of "
                          f"{pool_size}; lower pool_factor / the batch size or add data")
    return pool_size


def check_deepspeed_config(ds_config: dict, world: int) -> None:
    """DeepSpeed's own validation of its blocks (its pydantic models) and of the optimizer name,
    without building an engine or a process group; a rejection becomes one :class:`ConfigError`
    naming the key. The batch sizes are checked by :func:`train_batch_size` for ``world`` ranks
    (DeepSpeed's check would assume the world size of an uninitialized process group, 1)."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig

    train_batch_size(ds_config, world)
    probe = {k: copy.deepcopy(v) for k, v in ds_config.items()
             if k not in ("train_batch_size", "gradient_accumulation_steps", "partitionsel")}
    probe["train_micro_batch_size_per_gpu"] = 1
    try:
        DeepSpeedConfig(probe)
    except ValidationError as e:
        what = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}, got {err.get('input')!r}"
                         for err in e.errors(include_url=False))
        raise ConfigError(f"DeepSpeed rejects its config ({e.title}): {what}") from None
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"DeepSpeed rejects its config: {e}") from None
    name = (ds_config.get("optimizer") or {}).get("type")
    if isinstance(name, str) and name.lower() not in DEEPSPEED_OPTIMIZERS and getattr(torch.optim, name, None) is None:
        raise ConfigError(f"optimizer.type {name!r} is neither a DeepSpeed optimizer "
                          f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor a torch.optim class")
