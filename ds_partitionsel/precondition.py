"""Adam-preconditioned candidate sketches (``partitionsel.sketch.precondition = "adam"``).

AdamW does not move the weights along a sample's gradient ``G`` but along roughly
``G / (sqrt(v_hat) + eps)``, with ``v_hat`` the bias-corrected second moment. Scoring a candidate
by the update it would cause (as LESS does) therefore multiplies its per-sample gradient
element-wise by

    M = 1 / (sqrt(v_hat) + eps),      v_hat = exp_avg_sq / (1 - beta2 ** step)        (d_out, d_in)

The validation anchors stay raw gradients: the target is the direction that lowers the held-out
loss, and a candidate's preconditioned gradient is the step that training on it takes.

Kronecker sketches project ``P_out^T G P_in`` without forming ``G``, and an element-wise ``M`` does
not pass through that product. A rank-1 ``M ~ r c^T`` does:
``P_out^T ((r c^T) * G) P_in = (diag(r) P_out)^T G (diag(c) P_in)``, i.e. the output gradients are
scaled by ``r`` and the inputs by ``c`` before projecting. The factors come from Adafactor's
factorization of the second moment, ``v ~ R C^T / S`` with ``R = v.sum(1)``, ``C = v.sum(0)``,
``S = sum(R)``, so ``sqrt(v) ~ a b^T`` with ``a = sqrt(R) / S^(1/4)``, ``b = sqrt(C) / S^(1/4)``, and

    r = 1 / (a + sqrt(eps)),     c = 1 / (b + sqrt(eps))

(``(a_i + sqrt(eps)) (b_j + sqrt(eps)) >= a_i b_j + eps``: the factored ``M`` never exceeds the
factored form of the exact one, and a row or column with no second moment gets ``1/sqrt(eps)`` as
the exact ``M`` gives ``1/eps`` there).

Reading ``exp_avg_sq``: under DeepSpeed ZeRO 1-3 the state is partitioned across the data-parallel
ranks; :func:`deepspeed.utils.safe_get_full_optimizer_state` gathers a parameter's whole state (a
collective under ZeRO: every rank asks for the same parameters in the same order, which
:func:`read_adam_moments` does). Unpartitioned optimizers (ZeRO-0 in float32, a plain torch optimizer,
optimizer wrappers holding one in ``.optimizer``) keep it in ``optimizer.state[param]``. Before the
first optimizer step there is no state: :func:`read_adam_moments` returns None and the step's
candidates are sketched raw.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["PRECONDITIONS", "ModulePreconditioner", "AdamMoments", "bias_corrected",
           "diagonal_preconditioner", "rank_one_preconditioner", "read_adam_moments", "build_preconditioners"]

logger = logging.getLogger("ds_partitionsel")

PRECONDITIONS = ("none", "adam")


@dataclass(frozen=True)
class ModulePreconditioner:
    """What multiplies one linear module's per-sample gradient in its sketch.

    weight : (d_out, d_in) element-wise ``M`` (exact mode), or None.
    row, col : (d_out,), (d_in,) rank-1 factors ``M ~ row col^T`` (kron mode), or None.
    bias : (d_out,) element-wise ``M`` of the bias gradient, or None (bias sketched raw).
    """
    weight: Optional[torch.Tensor] = None
    row: Optional[torch.Tensor] = None
    col: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class AdamMoments:
    """Bias-corrected second moments of the hooked modules, the same on every rank.

    weights : module name -> (d_out, d_in) float32 ``v_hat`` of its weight.
    biases : module name -> (d_out,) float32 ``v_hat`` of its bias (modules with a bias).
    eps : Adam's epsilon.  step : the optimizer steps taken.
    """
    weights: Dict[str, torch.Tensor]
    biases: Dict[str, torch.Tensor]
    eps: float
    step: int


# --------------------------------------------------------------------------- pure kernels

def bias_corrected(exp_avg_sq: torch.Tensor, step: int, beta2: float) -> torch.Tensor:
    """``v_hat = exp_avg_sq / (1 - beta2 ** step)`` (Adam's bias correction), float32."""
    if step < 1:
        raise ValueError(f"bias correction needs step >= 1, got {step}")
    return exp_avg_sq.float() / (1.0 - float(beta2) ** int(step))


def diagonal_preconditioner(v_hat: torch.Tensor, eps: float) -> torch.Tensor:
    """``M = 1 / (sqrt(v_hat) + eps)``, element-wise, the shape of ``v_hat``."""
    return 1.0 / (v_hat.float().clamp_min(0).sqrt() + float(eps))


def rank_one_preconditioner(v_hat: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(r (d_out,), c (d_in,))`` with ``r c^T ~ 1 / (sqrt(v_hat) + eps)`` from Adafactor's
    factorization ``v_hat ~ R C^T / S`` (see the module doc): ``r = 1 / (sqrt(R) / S^(1/4) + sqrt(eps))``,
    ``c = 1 / (sqrt(C) / S^(1/4) + sqrt(eps))``. Exact (up to the eps terms) when ``v_hat`` has rank 1."""
    if v_hat.dim() != 2:
        raise ValueError(f"rank_one_preconditioner needs a (d_out, d_in) second moment, got {tuple(v_hat.shape)}")
    v = v_hat.double().clamp_min(0)
    rows, cols = v.sum(1), v.sum(0)
    total = float(rows.sum())
    scale = total ** 0.25 if total > 0 else 1.0  # all zero: a = b = 0
    root_eps = math.sqrt(float(eps))
    r = 1.0 / (rows.sqrt() / scale + root_eps)
    c = 1.0 / (cols.sqrt() / scale + root_eps)
    return r.float(), c.float()


def build_preconditioners(moments: AdamMoments, mode: str, with_bias: bool = False
                          ) -> Dict[str, ModulePreconditioner]:
    """Module name -> :class:`ModulePreconditioner` for a sketch ``mode`` (``exact``: the element-wise
    ``M``; ``kron``: its rank-1 factors). ``with_bias``: also the biases' element-wise ``M``."""
    out = {}
    for name, v in moments.weights.items():
        bias = moments.biases.get(name) if with_bias else None
        bias = None if bias is None else diagonal_preconditioner(bias, moments.eps)
        if mode == "exact":
            out[name] = ModulePreconditioner(weight=diagonal_preconditioner(v, moments.eps), bias=bias)
        elif mode == "kron":
            r, c = rank_one_preconditioner(v, moments.eps)
            out[name] = ModulePreconditioner(row=r, col=c, bias=bias)
        else:
            raise ValueError(f"precondition 'adam' works with sketch modes 'exact' and 'kron', not {mode!r}")
    return out


# --------------------------------------------------------------------------- reading the optimizer

def _optimizer_chain(optimizer) -> List[object]:
    """``optimizer`` and the optimizers it wraps through ``.optimizer`` (accelerate's and
    DeepSpeed's wrappers, ZeRO's base optimizer), outermost first."""
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        chain.append(optimizer)
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def _torch_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    return [o for o in _optimizer_chain(optimizer) if isinstance(o, torch.optim.Optimizer)]


def _hyper(optimizer) -> Tuple[float, float]:
    """``(beta2, eps)`` of the optimizer's parameter groups; they must agree across groups."""
    for opt in _optimizer_chain(optimizer):
        groups = getattr(opt, "param_groups", None)
        if groups:
            found = {(float(g["betas"][1]), float(g["eps"])) for g in groups if "betas" in g and "eps" in g}
            if not found:
                break
            if len(found) > 1:
                raise ValueError(f"precondition 'adam' needs one (beta2, eps) for all parameter groups, "
                                 f"the optimizer has {sorted(found)}")
            return found.pop()
    raise ValueError(f"precondition 'adam' needs an Adam-family optimizer (param groups with 'betas' and "
                     f"'eps'); {type(optimizer).__name__} has none")


def _step_count(optimizer) -> int:
    """Optimizer steps taken, from the innermost torch optimizer's state (0: no state yet).
    Local: ZeRO's base optimizer holds the state of this rank's partitions, stepped by all ranks."""
    steps = []
    for opt in _torch_optimizers(optimizer):
        steps += [int(s["step"]) for s in opt.state.values() if isinstance(s, dict) and "step" in s]
    return max(steps) if steps else 0


def _relink_zero_fragments(optimizer) -> None:
    """Point each parameter's ZeRO-1/2 (and bf16) optimizer-state fragment at the current state.

    DeepSpeed links these views once, after its first ``step()``; a ``load_checkpoint`` replaces the
    state tensors without relinking, so until the next step the views are missing (a resumed run) or
    stale (a run that loads into a stepped engine). Relinking is local (views, no copy, no
    collective) and idempotent."""
    for opt in _optimizer_chain(optimizer):
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and hasattr(opt, "_hp_optimizer_states_linked"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()


def _is_deepspeed_param(param) -> bool:
    return "deepspeed" in sys.modules and (hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"))


def _second_moment(optimizer, param) -> Optional[torch.Tensor]:
    """The whole ``exp_avg_sq`` of ``param`` (its full shape), or None where the optimizer keeps none.
    Under ZeRO a collective: every rank calls it for the same parameters in the same order."""
    if _is_deepspeed_param(param):
        from deepspeed.utils import safe_get_full_optimizer_state

        value = safe_get_full_optimizer_state(param, "exp_avg_sq")
        if value is not None:
            shape = getattr(param, "ds_shape", param.shape)
            return value.reshape(shape)
    for opt in _torch_optimizers(optimizer):
        state = opt.state.get(param) if param in opt.state else None
        if state and "exp_avg_sq" in state:
            return state["exp_avg_sq"]
    return None


def read_adam_moments(optimizer, modules: Sequence[Tuple[str, torch.nn.Module]], device=None
                      ) -> Optional[AdamMoments]:
    """Bias-corrected second moments of ``modules``' weights and biases from ``optimizer``
    (a DeepSpeed engine's optimizer at any ZeRO stage, or a torch optimizer, possibly wrapped);
    None before the first optimizer step. Every rank gets the same values (gathered under ZeRO)."""
    beta2, eps = _hyper(optimizer)  # first: an optimizer without Adam's moments is refused, not skipped
    step = _step_count(optimizer)
    if step < 1:
        return None
    _relink_zero_fragments(optimizer)
    weights, biases = {}, {}
    for name, module in modules:
        for kind, param, into in (("weight", module.weight, weights), ("bias", getattr(module, "bias", None), biases)):
            if param is None:
                continue
            v = _second_moment(optimizer, param)
            if v is None:
                if kind == "bias":
                    continue
                raise ValueError(f"the optimizer ({type(optimizer).__name__}) holds no 'exp_avg_sq' for "
                                 f"{name}.weight after {step} steps: precondition 'adam' needs an Adam-family "
                                 f"optimizer that trains the sketched modules")
            into[name] = bias_corrected(v.detach(), step, beta2).to(device if device is not None else v.device)
    return AdamMoments(weights=weights, biases=biases, eps=eps, step=step)
