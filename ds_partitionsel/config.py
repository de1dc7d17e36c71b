"""The ``"partitionsel"`` block of a DeepSpeed JSON config: typed, validated, documented defaults.

Example (every key optional; defaults follow the paper)::

    "partitionsel": {
        "method": "partitionsel",          # or a baseline: random, full, gradnorm, greats, ...
        "pool_factor": 8,                  # pool = pool_factor * train_batch_size candidates
        "budget": {"strategy": "proportional"},
        "sketch": {"modules": 3, "mode": "exact", "dim": null, "micro_batch": 8},
        "validation": {"anchors": 8, "refresh_interval": 1},
        "mode": "auto", "rule": "greedy", "use_weights": false,
        "seed": 1234, "log_interval": 1, "eval_interval": 0
    }

Unknown keys are rejected with the list of valid ones, at any level.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Union

from ds_partitionsel.budgets import STRATEGIES
from ds_partitionsel.selection import METHODS
from ds_partitionsel.solver import RULES

SELECTION_MODES = ("auto", "replicated", "sharded")
SKETCH_MODES = ("exact", "kron")


class ConfigError(ValueError):
    """A bad ``"partitionsel"`` block; the message names the key and the fix."""


@dataclass
class BudgetConfig:
    strategy: str = "proportional"
    fractions: Optional[List[float]] = None
    minority_domains: Optional[List[str]] = None  # domain names


@dataclass
class SketchConfig:
    modules: Union[int, str, List[str]] = 3  # last N blocks, "all_linear", names or a regex
    mode: str = "exact"
    kron_dims: Union[int, List[int]] = 32
    dim: Optional[int] = None
    normalize: bool = True
    micro_batch: int = 8  # sequences per sketch forward/backward


@dataclass
class ValidationConfig:
    anchors: int = 8  # validation sequences averaged into the target gradient
    refresh_interval: int = 1  # steps between new anchor draws


@dataclass
class PartitionSelConfig:
    method: str = "partitionsel"
    pool_factor: int = 8
    pool_size: Optional[int] = None  # overrides pool_factor
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    mode: str = "auto"
    rule: str = "greedy"
    nonneg: bool = True
    ridge: float = 0.0
    use_weights: bool = False
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 0  # 0: no periodic held-out evaluation
    eval_samples: int = 0  # 0: the whole validation split
    timeout_s: float = 600.0  # collectives of the selection step

    @classmethod
    def from_dict(cls, block: Optional[dict]) -> "PartitionSelConfig":
        cfg = _build(cls, block or {}, "partitionsel")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        _one_of("partitionsel.method", self.method, METHODS)
        _one_of("partitionsel.mode", self.mode, SELECTION_MODES)
        _one_of("partitionsel.rule", self.rule, RULES)
        _one_of("partitionsel.budget.strategy", self.budget.strategy, STRATEGIES)
        _one_of("partitionsel.sketch.mode", self.sketch.mode, SKETCH_MODES)
        for name, value in [("pool_factor", self.pool_factor), ("validation.anchors", self.validation.anchors),
                            ("validation.refresh_interval", self.validation.refresh_interval),
                            ("sketch.micro_batch", self.sketch.micro_batch), ("log_interval", self.log_interval)]:
            _positive_int(f"partitionsel.{name}", value)
        if self.pool_size is not None:
            _positive_int("partitionsel.pool_size", self.pool_size)
        if self.sketch.dim is not None:
            _positive_int("partitionsel.sketch.dim", self.sketch.dim)
        for name, value in [("eval_interval", self.eval_interval), ("eval_samples", self.eval_samples)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"partitionsel.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.ridge, (int, float)) or self.ridge < 0:
            raise ConfigError(f"partitionsel.ridge must be a number >= 0, got {self.ridge!r}")
        if self.budget.strategy == "fractions" and not self.budget.fractions:
            raise ConfigError("partitionsel.budget.strategy 'fractions' needs partitionsel.budget.fractions, "
                              "one number per domain in the pool's domain order")
        if self.budget.strategy == "minority_full" and not self.budget.minority_domains:
            raise ConfigError("partitionsel.budget.strategy 'minority_full' needs "
                              "partitionsel.budget.minority_domains, a list of domain names")
        if self.timeout_s <= 0:
            raise ConfigError(f"partitionsel.timeout_s must be > 0, got {self.timeout_s!r}")


def _build(cls, block, where):
    if not isinstance(block, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(block).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(block) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(repr(u) for u in unknown)} in {where}; "
                          f"valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in block.items():
        default = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        sub = default() if default is not None else None
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(type(sub), value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _one_of(name, value, valid):
    if value not in valid:
        raise ConfigError(f"{name} = {value!r} is not valid; choose one of: {', '.join(valid)}")


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
