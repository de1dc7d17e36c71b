"""The selection step, for any training loop: :class:`Selector`.

One step, the same on every data-parallel rank (DESIGN: pool -> sketch -> select -> train)::

    plan(step)          the step's pool (seed, step) -> this rank's contiguous shard, budgets
    select(step, lr)    sketch the shard, build the validation target from the anchors, run the
                        distributed selection over the global pool, hand out the batch
                        owner-first -> an immutable StepSelection

The training loop (``ds_partitionsel.engine`` for DeepSpeed, ``ds_partitionsel.hf`` for the
Hugging Face Trainer) then runs forward/backward/step on ``selection.my_records`` with
``selection.my_weights``. The selector knows nothing of either loop: it needs an ``nn.Module``
to sketch (ZeRO-3 partitioned or not, peft-wrapped or not), the pools, the ``"partitionsel"``
config, the global batch size and the current learning rate.

Every rank must call :meth:`Selector.select` for the same steps in the same order: sketching
runs the same number of forwards on every rank (ZeRO-3 gathers parameters collectively) and the
selection is a sequence of collectives.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ds_partitionsel.budgets import allocate_budgets
from ds_partitionsel.collectives import Communicator
from ds_partitionsel.config import ConfigError, PartitionSelConfig
from ds_partitionsel.data import check_pad_id, check_same_pool
from ds_partitionsel.loss import per_sequence_loss
from ds_partitionsel.metrics import conflicting_pairs
from ds_partitionsel.shrink import pool_moments, shrink_target
from ds_partitionsel.sampler import (PoolSampler, as_int, assign_owner_first, generator, lockstep_chunks,
                                     shard_bounds)
from ds_partitionsel.selection import select_gram
from ds_partitionsel.windows import crop_windows

logger = logging.getLogger("ds_partitionsel")

__all__ = ["StepPlan", "StepTimings", "StepSelection", "Selector", "build_proxy", "check_pools", "pool_size_for"]

# methods that need no gradient features
FEATURELESS = ("random", "full")


@dataclass(frozen=True)
class StepPlan:
    """What every rank does in one step, decided from (seed, step) and the world size only.

    pool_ids : (N,) int64, the global record ids of the step's candidate pool.
    bounds : per rank, the ``[lo, hi)`` positions of its contiguous shard of the pool.
    budgets : (D,) int64, per-domain budgets of the batch (sum = batch_size).
    """
    step: int
    pool_ids: torch.Tensor
    bounds: Tuple[Tuple[int, int], ...]
    budgets: torch.Tensor
    rank: int
    world: int
    batch_size: int

    @property
    def shard(self) -> Tuple[int, int]:
        """This rank's ``[lo, hi)`` positions in the pool."""
        return self.bounds[self.rank]

    @property
    def local_ids(self) -> torch.Tensor:
        """Record ids of this rank's shard, (hi - lo,)."""
        lo, hi = self.shard
        return self.pool_ids[lo:hi]

    @property
    def share(self) -> int:
        """How many selected samples each rank trains on."""
        return self.batch_size // self.world


@dataclass(frozen=True)
class StepTimings:
    """Seconds spent in one selection (on this rank; comm includes waiting for slower ranks)."""
    sketch: float = 0.0   # the pool shard's sketches
    anchors: float = 0.0  # the validation target (0 when reused within a refresh interval)
    solve: float = 0.0    # the distributed selection outside collectives
    comm: float = 0.0     # waiting in the selection's collectives
    total: float = 0.0    # the whole select() call


@dataclass(frozen=True)
class StepSelection:
    """The outcome of :meth:`Selector.select`, identical on every rank except ``my_*``.

    indices : (k,) int64, pool positions in pick order; weights : (k,) float64 OMP weights.
    record_ids : (k,) int64, the selected global record ids (``plan.pool_ids[indices]``).
    my_records / my_weights : this rank's share of the batch (owner-first), record ids and their
        OMP weights.
    selected_features : (k, p) float64 sketches of the selected rows (replicated; None for
        featureless methods, under ``sketch.stream`` or when not requested).
    selected_gram : (k, k) float64 Gram of the selected rows under ``sketch.stream`` (else None).
    """
    plan: StepPlan
    method: str
    indices: torch.Tensor
    weights: torch.Tensor
    record_ids: torch.Tensor
    my_records: Tuple[int, ...]
    my_weights: Tuple[float, ...]
    domain_counts: Dict[str, int]
    utility: float
    dropped: int
    mode: str
    bytes_sent: int
    timings: StepTimings
    selected_features: Optional[torch.Tensor] = None
    selected_gram: Optional[torch.Tensor] = None

    @property
    def step(self) -> int:
        return self.plan.step

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    def train_weights(self, use_weights: bool) -> Optional[torch.Tensor]:
        """Per-sequence loss weights of ``my_records`` (None: plain mean). The OMP weights are
        scaled so that they average 1 over the whole batch (a weighted batch has the plain
        batch's loss scale)."""
        total = float(self.weights.sum())
        if not use_weights or total <= 0:
            return None
        return torch.tensor(self.my_weights, dtype=torch.float32) * (self.k / total)

    def conflicting_pairs(self) -> Optional[int]:
        """Selected pairs with a negative gradient inner product (None without features)."""
        if self.selected_features is None:
            if self.selected_gram is None:
                return None
            return int(torch.triu(self.selected_gram < 0, diagonal=1).sum())
        return conflicting_pairs(torch.nan_to_num(self.selected_features), torch.arange(self.k))


def pool_size_for(cfg: PartitionSelConfig, batch_size: int) -> int:
    """Candidates per step: the batch itself for ``full``, else ``pool_size`` or factor x batch."""
    if cfg.method == "full":
        return batch_size
    return cfg.pool_size or cfg.pool_factor * batch_size


def check_pools(pool, valid_pool, cfg: PartitionSelConfig) -> None:
    """Refuse pools that cannot serve this config, naming the domain or key at fault."""
    counts = pool.domain_counts()
    names = pool.domain_names
    missing = [names[j] for j in range(len(names)) if int(counts[j]) == 0]
    if missing:
        raise ConfigError(f"domain(s) {missing} have no records in the training split of {pool.path}; "
                          f"rebuild the pool with data for them or drop them")
    if valid_pool is None or len(valid_pool) == 0:
        raise ConfigError("the validation split is empty: PartitionSel needs held-out anchors; "
                          "build the pool with --valid data")
    try:
        check_same_pool(pool, valid_pool)
    except ValueError as e:  # another pool's split: ids would mean other domains or tokens
        raise ConfigError(str(e)) from None
    if cfg.budget.minority_domains:
        unknown = [d for d in cfg.budget.minority_domains if d not in names]
        if unknown:
            raise ConfigError(f"partitionsel.budget.minority_domains {unknown} are not domains of the "
                              f"pool; valid: {names}")
    if cfg.budget.fractions is not None and len(cfg.budget.fractions) != len(names):
        raise ConfigError(f"partitionsel.budget.fractions has {len(cfg.budget.fractions)} entries for "
                          f"{len(names)} domains {names}")


class Selector:
    """Plans, sketches and selects each step's batch; framework-neutral.

    Parameters
    ----------
    model : the ``nn.Module`` being trained (a Hugging Face causal LM, possibly ZeRO-3
        partitioned or peft-wrapped). It is sketched unless ``sketch.proxy_model`` names a proxy.
    cfg : the validated ``"partitionsel"`` block.
    pool, valid_pool : ``CandidatePool`` of the training and the held-out split.
    batch_size : the global batch ``k`` (micro batch x accumulation x data-parallel world).
    pad_token_id : padding id used to collate sequences.
    group : data-parallel process group (None: the world).
    """

    # the per-sequence loss of the trained model on a collated batch (evaluation); a loop whose
    # model is called differently (ds_partitionsel.megatron) swaps it
    sequence_loss = staticmethod(per_sequence_loss)

    def __init__(self, model, cfg: PartitionSelConfig, pool, valid_pool, *, batch_size: int,
                 pad_token_id: int, group=None):
        check_pools(pool, valid_pool, cfg)
        self.model, self.cfg, self.pool, self.valid_pool = model, cfg, pool, valid_pool
        self.pad_token_id = check_pad_id(pool, pad_token_id)
        self.group = group
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if initialized else 0
        self.world = dist.get_world_size(group) if initialized else 1
        self.batch_size = as_int(batch_size, "batch_size")
        if self.batch_size % self.world:
            raise ConfigError(f"the batch of {self.batch_size} does not divide over {self.world} ranks")
        self.pool_size = pool_size_for(cfg, self.batch_size)
        if self.pool_size < self.batch_size:
            raise ConfigError(f"pool of {self.pool_size} candidates is smaller than the batch of "
                              f"{self.batch_size}; raise partitionsel.pool_size / pool_factor")
        if self.pool_size < cfg.steps_per_pool * self.batch_size:
            raise ConfigError(f"pool of {self.pool_size} candidates cannot hold partitionsel.steps_per_pool = "
                              f"{cfg.steps_per_pool} disjoint batches of {self.batch_size}; raise "
                              f"partitionsel.pool_size / pool_factor or lower steps_per_pool")
        if self.pool_size % self.world:
            raise ConfigError(f"pool size {self.pool_size} must divide evenly over {self.world} ranks "
                              f"(every rank sketches the same number of candidates in lockstep)")
        self.sampler = PoolSampler(len(pool), self.pool_size, cfg.seed)
        sk = cfg.sketch
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        # sketches and target come from the proxy when there is one: the main model only trains
        self.proxy = build_proxy(sk, model, seed=cfg.seed)
        self.scorer = self.proxy.model if self.proxy is not None else model
        try:
            self.sketcher = self._sketcher_class()(self.scorer, modules=sk.modules, mode=sk.mode,
                                             kron_dims=tuple(sk.kron_dims) if isinstance(sk.kron_dims, list) else sk.kron_dims,
                                             dim=sk.dim, seed=cfg.seed, normalize=sk.normalize,
                                             head_chunk=sk.head_chunk)
        except ValueError as e:
            if sk.mode not in ("head", "head_kron"):
                raise
            raise ConfigError(f"partitionsel.sketch.mode {sk.mode!r} (forward-only LM-head features) cannot "
                              f"sketch this model with {type(self).__name__}: {e}") from None
        if sk.stream and cfg.method not in FEATURELESS:
            if self.world > 1:
                raise ConfigError(
                    f"partitionsel.sketch.stream holds no features, but a pool sharded over {self.world} "
                    f"ranks needs them: the Gram across shards and the distributed selection exchange "
                    f"feature rows. Run the selection on one data-parallel rank, or keep the features "
                    f"small instead (sketch.dim or sketch.mode 'kron') and set stream to false")
            if not getattr(self.sketcher, "streams_gram", False):
                raise ConfigError(f"partitionsel.sketch.stream: {type(self.sketcher).__name__} cannot stream "
                                  f"its sketches into a Gram matrix; set stream to false")
        self.global_step = 0  # the next step to select; loops keep it in their checkpoints
        # the trained model's optimizer, for sketch.precondition = "adam" (set_optimizer)
        self.optimizer, self._said_no_moments = None, False
        self._target, self._target_key = None, None
        # carried across steps, so in the checkpoint (state_dict): the EMA target of
        # validation.ema and the per-domain gains of the curriculum budgets
        self._ema = None
        self.last_shrink: Optional[float] = None  # validation.shrink: the last step's lambda
        self._gains = [0.0] * len(pool.domain_names)
        self._alignment = None
        # the current group of steps_per_pool steps: its batches (state_dict carries them, so a
        # resume in the middle of a group trains what a straight run trains)
        self._group, self._group_rows, self._group_timings, self._group_bytes = None, None, None, 0
        self._group_gram = None  # sketch.stream: the Gram of the group's picks (for metrics)

    def set_optimizer(self, optimizer) -> None:
        """Hand over the optimizer that trains ``model`` (a torch optimizer, possibly wrapped, or a
        DeepSpeed engine's ``engine.optimizer`` at any ZeRO stage): with ``sketch.precondition =
        "adam"`` the candidates' sketches are preconditioned by its second moments."""
        self.optimizer = optimizer

    def candidate_preconditioner(self, step: int):
        """Module name -> :class:`~ds_partitionsel.precondition.ModulePreconditioner` of the
        candidates' sketches at ``step`` (None: raw, for ``precondition = "none"`` and before the
        optimizer's first step). Under ZeRO a collective (the second moments are gathered)."""
        if self.cfg.sketch.precondition != "adam":
            return None
        from ds_partitionsel.precondition import build_preconditioners, read_adam_moments

        if self.optimizer is None:
            raise ConfigError("partitionsel.sketch.precondition 'adam' needs the optimizer: the training loop "
                              "must call Selector.set_optimizer(optimizer) before the first selection")
        try:
            moments = read_adam_moments(self.optimizer, self.sketcher._modules, device=self.device)
        except ValueError as e:
            raise ConfigError(f"partitionsel.sketch.precondition 'adam': {e}") from None
        if moments is None:
            if not self._said_no_moments:
                logger.info("step %d: sketch.precondition 'adam': the optimizer has taken no step yet (no "
                            "second moments); candidates are sketched raw until it has", step)
                self._said_no_moments = True
            return None
        return build_preconditioners(moments, self.sketcher.mode, with_bias=self.sketcher.include_bias)

    def _sketcher_class(self):
        """What sketches ``self.scorer`` (a subclass may sketch other models, e.g. tensor-parallel ones)."""
        from ds_partitionsel.sketch import make_sketcher

        return make_sketcher  # GradientSketcher, or the forward-only HeadSketcher for head modes

    # ------------------------------------------------------------------ the step

    def comm(self, step: int, phase: str = "selection") -> Communicator:
        """The data-parallel group for the collectives of ``step``: bounded by ``timeout_s``,
        errors naming the step, on the backend's device."""
        return Communicator(self.group, self.cfg.timeout_s, f"{phase} step {step}")

    def plan(self, step: int) -> StepPlan:
        """The step's pool, this rank's shard and the budgets: no model, no communication.

        With ``steps_per_pool = m`` the steps ``g m .. g m + m - 1`` share the pool of group
        ``g = step // m`` (a function of (seed, g)); the budgets here are those of the group's
        first batch, drawn from the whole pool (a later batch's budgets follow the candidates
        left, see :meth:`select`)."""
        step = as_int(step, "step")
        if step < 0:
            raise ValueError(f"step must be >= 0 (steps count from 0), got {step}")
        pool_ids = self.sampler.pool(step // self.cfg.steps_per_pool)
        counts = torch.bincount(self.pool.domains[pool_ids], minlength=len(self.pool.domain_names))
        return StepPlan(step=step, pool_ids=pool_ids, bounds=tuple(shard_bounds(self.pool_size, self.world)),
                        budgets=self._budgets(counts, step - step % self.cfg.steps_per_pool),
                        rank=self.rank, world=self.world,
                        batch_size=self.batch_size)

    def _budgets(self, counts: torch.Tensor, step: int) -> torch.Tensor:
        """(D,) budgets of the batch of ``step`` from candidates with per-domain ``counts``."""
        b = self.cfg.budget
        names = self.pool.domain_names
        minority = [names.index(d) for d in b.minority_domains] if b.minority_domains else None
        draw = int(torch.randint(0, 2 ** 53, (1,), generator=generator("budgets", self.cfg.seed, step)))
        budgets = allocate_budgets(counts, self.batch_size, b.strategy, fractions=b.fractions,
                                   minority_domains=minority, target_counts=self.target_counts(),
                                   gains=self._gains, floor=b.floor, lam=b.curriculum_lambda,
                                   rounding=b.rounding, draw=draw)
        if b.strategy == "fractions":
            forced = {names[j]: int(n) for j, n in enumerate(budgets.tolist()) if n and not b.fractions[j] > 0}
            if forced:
                logger.warning("step %d: budget.fractions: the domains with a fraction above 0 hold only %d "
                               "candidates in this step's pool, fewer than the batch of %d; %s filled the rest "
                               "(raise pool_factor, or give those domains a fraction)", step,
                               sum(c for j, c in enumerate(counts.tolist()) if b.fractions[j] > 0),
                               self.batch_size, forced)
        return budgets

    def target_counts(self) -> List[int]:
        """The validation anchors' expected count of each pool domain (the ``validation``
        budget strategy follows it): the held-out split's counts for ``pooled`` anchors, the
        same for every held-out domain for ``per_domain`` ones."""
        names = self.pool.domain_names
        counts = self.valid_pool.domain_counts().tolist()
        if self.cfg.validation.mix == "per_domain":
            counts = [1 if c > 0 else 0 for c in counts]
        return [int(c) for c in counts] + [0] * (len(names) - len(counts))

    def select(self, step: int, lr: float, *, with_features: bool = True) -> StepSelection:
        """Sketch this rank's shard, build the target and select the batch of ``step``.

        lr : the learning rate the step will train with (the utility's eta).
        with_features : also all-reduce the selected rows' sketches (for metrics such as
            conflicting pairs); one (k, p) float64 all-reduce.

        With ``steps_per_pool = m > 1`` the first call of a group of ``m`` steps scores the
        group's pool once and selects its ``m`` disjoint batches (:meth:`_select_group`); the
        other steps of the group return their stored batch (no sketch, no collective). A step
        of a group that is not stored (a resume from a checkpoint without it, a jump) selects
        the group anew.
        """
        m = self.cfg.steps_per_pool
        plan = self.plan(step)  # checks the step
        group, j = divmod(plan.step, m)
        start = time.perf_counter()
        if self._group is None or self._group["group"] != group:
            self._group = self._select_group(plan, lr, with_features)
            self._group_rows = self._group.pop("rows")
            self._group_gram = self._group.pop("gram")
            self._group_timings = self._group.pop("timings")
        timings = self._group_timings if j == 0 else StepTimings(total=time.perf_counter() - start)
        self.global_step = plan.step + 1
        return self._step_selection(plan, j, timings, with_features)

    def _step_selection(self, plan: StepPlan, j: int, timings: StepTimings, with_features: bool) -> StepSelection:
        """Batch ``j`` of the stored group as this rank's :class:`StepSelection`."""
        g = self._group
        k = self.batch_size
        indices = g["indices"][j]
        budgets = g["budgets"][j]
        plan = StepPlan(step=plan.step, pool_ids=plan.pool_ids, bounds=plan.bounds, budgets=budgets.clone(),
                        rank=plan.rank, world=plan.world, batch_size=plan.batch_size)
        picked = indices.tolist()
        mine = assign_owner_first(picked, list(plan.bounds), plan.share)[self.rank]
        weight_of = dict(zip(picked, g["weights"][j].tolist()))
        rows = self._group_rows
        selected_features = rows[j * k:(j + 1) * k] if with_features and rows is not None else None
        gram = self._group_gram
        selected_gram = gram[j * k:(j + 1) * k, j * k:(j + 1) * k] if with_features and gram is not None else None
        first = j == 0
        return StepSelection(
            plan=plan, method=self.cfg.method, indices=indices.clone(), weights=g["weights"][j].clone(),
            record_ids=plan.pool_ids[indices],
            my_records=tuple(int(plan.pool_ids[i]) for i in mine),
            my_weights=tuple(float(weight_of[i]) for i in mine),
            domain_counts=dict(zip(self.pool.domain_names, g["counts"][j].tolist())),
            utility=float(g["utility"][j]), dropped=int(g["dropped"]) if first else 0,
            mode=str(g["mode"]), bytes_sent=int(self._group_bytes) if first else 0, timings=timings,
            selected_features=selected_features, selected_gram=selected_gram)

    def _select_group(self, plan: StepPlan, lr: float, with_features: bool) -> dict:
        """Score the pool of ``plan``'s group once and select its ``m`` disjoint batches.

        Batch ``j`` (step ``g m + j``) is the selection of step ``g m + j`` (its own seeded
        generator) over the pool without the rows of batches ``0 .. j-1``, under the budgets of
        the candidates left, with the same features and target: ``m`` selections on the same
        features minus the chosen rows. ``m = 1`` is the plain step.

        Returns the rank-independent record of the group (what :meth:`state_dict` carries) plus
        this rank's ``rows`` (the selected rows' features, (m k, p), or None) and ``timings``.
        """
        from ds_partitionsel import distributed

        cfg = self.cfg
        m, k = cfg.steps_per_pool, self.batch_size
        group = plan.step // m
        first_step = group * m
        lo, hi = plan.shard
        start = time.perf_counter()
        t_sketch = t_anchor = solve = comm_s = 0.0
        local_domains = self.pool.domains[plan.local_ids]
        stream = cfg.sketch.stream and cfg.method not in FEATURELESS
        gram = scores = None
        if cfg.method in FEATURELESS:
            features = torch.zeros(hi - lo, 1)  # no gradients needed
            target = torch.zeros(1)
        elif stream:  # the Gram and the scores, streamed: no (n, p) features held
            target = anchors_target = self.validation_target(first_step)
            t_anchor = time.perf_counter() - start
            t1 = time.perf_counter()
            gram, scores = self.sketch_gram_records(self.pool, plan.local_ids.tolist(), target,
                                                    window=("pool", group),
                                                    preconditioner=self.candidate_preconditioner(first_step))
            features = None
            usable = torch.isfinite(torch.diagonal(gram)) & torch.isfinite(scores)  # not finite: dropped
            t_sketch = time.perf_counter() - t1
        else:
            features = self.sketch_records(self.pool, plan.local_ids.tolist(), window=("pool", group),
                                           preconditioner=self.candidate_preconditioner(first_step))
            t_sketch = time.perf_counter() - start
            t1 = time.perf_counter()
            target = anchors_target = self.validation_target(first_step)
            if cfg.validation.shrink:
                mean, mean_sq = pool_moments(features, self.pool_size, self.comm(first_step))
                target, self.last_shrink = shrink_target(target, mean, mean_sq, self.pool_size,
                                                         self.anchor_weight(first_step))
            t_anchor = time.perf_counter() - t1
        n_dom = len(self.pool.domain_names)
        pool_counts = torch.bincount(self.pool.domains[plan.pool_ids], minlength=n_dom)
        chosen: List[int] = []
        out = {"indices": [], "weights": [], "utility": [], "counts": [], "budgets": []}
        dropped, mode, sent = 0, "local", 0
        for j in range(m):
            if j == 0:
                feats, doms, budgets, left = features, local_domains, plan.budgets, None
            else:
                taken = torch.zeros(self.pool_size, dtype=torch.bool)
                taken[chosen] = True
                keep = (~taken[lo:hi]).nonzero().flatten()
                feats = None if features is None else features[keep]
                doms = local_domains[keep]
                left = (~taken).nonzero().flatten()  # rank-major order of the remaining rows
                counts = pool_counts - torch.bincount(self.pool.domains[plan.pool_ids[chosen]], minlength=n_dom)
                budgets = self._budgets(counts, first_step + j)
            step_j = first_step + j
            if stream:
                t1 = time.perf_counter()
                rows_j = torch.arange(hi - lo) if j == 0 else keep  # the candidates of batch j
                inner = usable[rows_j].nonzero().flatten()  # without the non-finite ones
                if inner.numel() < int(budgets.sum()):
                    raise ValueError(
                        f"selection step {step_j}: the sketches of {len(rows_j) - inner.numel()} of "
                        f"{len(rows_j)} candidates are not finite (NaN/Inf), which leaves {inner.numel()}, "
                        f"fewer than the batch of {int(budgets.sum())}: the model has probably diverged "
                        f"(non-finite weights or activations); lower the learning rate, or resume from an "
                        f"earlier checkpoint")
                cand = rows_j[inner]
                sel = select_gram(cfg.method, gram[cand][:, cand], scores[cand], doms[inner], budgets,
                                  lr=lr, ridge=cfg.ridge, generator=generator("select", cfg.seed, step_j),
                                  rule=cfg.rule, nonneg=cfg.nonneg, allow_shortfall=True,
                                  temperature=cfg.temperature)
                sel.indices = inner[sel.indices]  # positions among batch j's candidates
                sel.info.update(time_solve=time.perf_counter() - t1, dropped=len(rows_j) - inner.numel())
            else:
                sel = distributed.select(
                    cfg.method, feats, doms, target, budgets,
                    lr=lr, ridge=cfg.ridge, mode=cfg.mode, group=self.group,
                    generator=generator("select", cfg.seed, step_j), rule=cfg.rule, nonneg=cfg.nonneg,
                    drop_nonfinite=True, step=step_j, timeout=cfg.timeout_s, temperature=cfg.temperature)
            indices = sel.indices if left is None else left[sel.indices]
            if j == 0:
                dropped, mode = int(sel.info.get("dropped", 0)), sel.info.get("mode", "local")
            sent += int(sel.bytes_sent)
            solve += sel.info.get("time_solve", 0.0)
            comm_s += sel.info.get("time_comm", 0.0)
            chosen += indices.tolist()
            out["indices"].append(indices.to(torch.int64))
            out["weights"].append(sel.weights.to(torch.float64))
            out["utility"].append(float(sel.utility))
            out["counts"].append(sel.domain_counts.to(torch.int64))
            out["budgets"].append(torch.as_tensor(budgets, dtype=torch.int64))
        if cfg.budget.strategy == "curriculum" and cfg.method not in FEATURELESS:
            if stream:  # <mean_{i in d} g_i, v> is the mean of the domain's scores
                self._update_gains(first_step, scores[:, None], local_domains, torch.ones(1))
            else:
                self._update_gains(first_step, features, local_domains, anchors_target)
        if dropped:
            logger.warning("step %d: %d candidate(s) with non-finite sketches dropped", first_step, dropped)
        rows = picked_gram = None
        if with_features and stream:
            picked_gram = gram[chosen][:, chosen]
        elif with_features and cfg.method not in FEATURELESS:
            rows = self._gather_rows(first_step, chosen, features, lo, hi)
        del features, gram
        self._group_bytes = sent
        timings = StepTimings(sketch=t_sketch, anchors=t_anchor, solve=solve, comm=comm_s,
                              total=time.perf_counter() - start)
        return {"group": group, "indices": torch.stack(out["indices"]), "weights": torch.stack(out["weights"]),
                "utility": torch.tensor(out["utility"], dtype=torch.float64),
                "counts": torch.stack(out["counts"]), "budgets": torch.stack(out["budgets"]),
                "dropped": dropped, "mode": mode, "rows": rows, "gram": picked_gram, "timings": timings}

    def after_step(self, selection: StepSelection) -> Optional[float]:
        """Train the proxy on the selected batch (``sketch.proxy_train``); its loss or None.
        The same on every rank: every rank holds the whole batch's record ids."""
        if self.proxy is None or not self.proxy.train:
            return None
        ids = selection.record_ids.tolist()
        mb = self.cfg.sketch.micro_batch
        batches = [self.pool.collate(ids[s:s + mb], self.pad_token_id) for s in range(0, len(ids), mb)]
        return self.proxy.train_on(batches, lambda batch, module: per_sequence_loss(module, batch, self.device))

    def _update_gains(self, step: int, features, domains, target) -> None:
        """Curriculum gains: per domain, the EMA (``budget.curriculum_beta``) of the relative
        change of its alignment ``<mean_{i in d} g_i, v>`` between steps. One (D+1)-row
        all-reduce of per-domain feature sums and counts."""
        n_dom = len(self.pool.domain_names)
        feats = torch.nan_to_num(features.double())
        sums = torch.zeros(n_dom, feats.shape[1] + 1, dtype=torch.float64)
        sums[:, :-1].index_add_(0, domains, feats)
        sums[:, -1].index_add_(0, domains, torch.ones(len(domains), dtype=torch.float64))
        sums = self.comm(step).all_reduce(sums, "sum", "all-reduce of the per-domain sketch sums")
        means = sums[:, :-1] / sums[:, -1:].clamp_min(1)
        # rounded to 12 digits: the budgets must not hang on the last bits of a float sum
        align = [round(float(x), 12) for x in (means @ target.double()).tolist()]
        beta = self.cfg.budget.curriculum_beta
        if self._alignment is not None:
            for j, (old, new) in enumerate(zip(self._alignment, align)):
                change = (new - old) / max(abs(old), 1e-12)
                self._gains[j] = round(beta * self._gains[j] + (1 - beta) * change, 12)
        self._alignment = align

    def state_dict(self) -> dict:
        """What a checkpoint must carry beyond the step for an exact resume: a trained proxy's
        weights and optimizer, the EMA target and the curriculum gains (the rest of the
        selection is a function of the step)."""
        state = {}
        if self.proxy is not None and self.proxy.train:
            state["proxy"] = self.proxy.state_dict()
        if self._ema is not None:
            state["ema_target"] = self._ema.clone()
            state["ema_key"] = self._target_key
        if self.cfg.budget.strategy == "curriculum":
            state["gains"] = list(self._gains)
            state["alignment"] = self._alignment
        m = self.cfg.steps_per_pool
        if self._group is not None and m > 1 and self.global_step < (self._group["group"] + 1) * m:
            # mid-group: the batches still to train (rank-independent; no features)
            state["group"] = {key: (value.clone() if isinstance(value, torch.Tensor) else value)
                              for key, value in self._group.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        state = state or {}
        if "ema_target" in state:
            self._ema = torch.as_tensor(state["ema_target"]).double()
            self._target, self._target_key = self._ema.float(), state.get("ema_key")
        if "gains" in state:
            self._gains = [float(x) for x in state["gains"]]
            self._alignment = state.get("alignment")
        if "group" in state:
            group = dict(state["group"])
            m, k = self.cfg.steps_per_pool, self.batch_size
            if tuple(group["indices"].shape) != (m, k):
                raise ValueError(f"the checkpoint's amortized group holds {tuple(group['indices'].shape)} picks, "
                                 f"this run selects {m} batches of {k} (steps_per_pool x batch): it was saved "
                                 f"by another configuration")
            self._group, self._group_rows, self._group_timings, self._group_bytes = group, None, StepTimings(), 0
            self._group_gram = None
        if self.proxy is not None and self.proxy.train:
            if "proxy" not in (state or {}):
                raise ValueError("the checkpoint holds no trained proxy state, but sketch.proxy_train is on: "
                                 "it was saved without a trained proxy")
            self.proxy.load_state_dict(state["proxy"])

    # ------------------------------------------------------------------ sketches and target

    def sketch_records(self, pool, ids, lockstep_rows: Optional[int] = None, window=None,
                       preconditioner=None) -> torch.Tensor:
        """Features of records ``ids`` (n, p) on the host, sketched ``sketch.micro_batch`` at a time.

        Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively):
        ``lockstep_rows`` pads the work to that many rows with repeats that are discarded.
        ``window``: the draw key of ``sketch.score_len`` windows (None: whole sequences); with
        ``score_len`` set, each record is scored on its seeded window
        (:mod:`ds_partitionsel.windows`). ``preconditioner``: see :meth:`candidate_preconditioner`
        (the anchors are always sketched raw).
        """
        rows = list(self._sketch_chunks(pool, ids, lockstep_rows, window, preconditioner))
        p = self.sketcher.feature_dim
        return torch.cat(rows) if rows else torch.zeros(0, p)

    def _sketch_chunks(self, pool, ids, lockstep_rows=None, window=None, preconditioner=None):
        """:meth:`sketch_records` one micro-batch at a time: yields each chunk's real rows."""
        total = max(len(ids), lockstep_rows or 0)
        width = self.cfg.sketch.score_len
        for work, n_real in lockstep_chunks(ids, total, self.cfg.sketch.micro_batch, ids[0] if ids else 0):
            batch = pool.collate(work, self.pad_token_id)
            if width is not None and window is not None:
                batch = crop_windows(batch, work, width, self.cfg.seed, (getattr(pool, "split", ""), *window))
            yield self._sketch_batch(batch, preconditioner)[:n_real]

    def sketch_gram_records(self, pool, ids, target, window=None, preconditioner=None):
        """``(gram (n, n), scores (n,))`` float64 of records ``ids`` against ``target``, streamed
        ``sketch.micro_batch`` rows at a time (``sketch.stream``: the features are never held).
        ``window`` and ``preconditioner`` as in :meth:`sketch_records`. A record whose sketch is
        not finite has a non-finite Gram diagonal (the caller drops it)."""
        width = self.cfg.sketch.score_len
        batch = pool.collate(list(ids), self.pad_token_id)
        if width is not None and window is not None:
            batch = crop_windows(batch, list(ids), width, self.cfg.seed, (getattr(pool, "split", ""), *window))
        dev = self.device
        extra = {} if preconditioner is None else {"preconditioner": preconditioner}
        gram, scores, _ = self.sketcher.sketch_gram(
            batch["input_ids"].to(dev), batch["attention_mask"].to(dev), batch["loss_mask"].to(dev),
            target=target.to(dev), batch_size=self.cfg.sketch.micro_batch, nonfinite="keep", **extra)
        return gram.cpu(), scores.cpu()

    def _sketch_batch(self, batch, preconditioner=None) -> torch.Tensor:
        dev = self.device
        extra = {} if preconditioner is None else {"preconditioner": preconditioner}
        try:
            return self.sketcher.sketch(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                                        batch["loss_mask"].to(dev), **extra).float().cpu()
        except FloatingPointError:
            # keep the step going: mark the whole chunk non-finite, it is dropped and counted
            n = batch["input_ids"].shape[0]
            return torch.full((n, self.sketcher.feature_dim), float("nan"))

    def validation_target(self, step: int) -> torch.Tensor:
        """Mean sketch of ``validation.anchors`` held-out sequences (p,), all-reduced over ranks;
        drawn anew every ``refresh_interval`` steps and reused in between.

        ``validation.mix = "pooled"``: ``v = (1/A) sum_a g_a`` over anchors drawn uniformly from
        the held-out split. ``"per_domain"``: ``ceil(A/D)`` anchors from each of the ``D`` held-out
        domains and ``v = (1/D) sum_d mean_{a in d} g_a`` (every domain counts the same).
        """
        v = self.cfg.validation
        key = step // v.refresh_interval
        if key == self._target_key:
            return self._target
        ids, weights, divisor = self.anchor_draw(key)
        mine = list(range(self.rank, len(ids), self.world))
        per_rank = math.ceil(len(ids) / self.world)
        # the weighted sum, micro-batch by micro-batch: the anchors' (A, p) sketches are never held
        local = torch.zeros(self.sketcher.feature_dim)
        mine_weights = [weights[i] for i in mine]
        for feats in self._sketch_chunks(self.valid_pool, [ids[i] for i in mine], lockstep_rows=per_rank,
                                         window=("anchors", key)):
            feats = torch.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)
            w = torch.tensor(mine_weights[:len(feats)], dtype=feats.dtype)
            mine_weights = mine_weights[len(feats):]
            local = local + (feats * w[:, None]).sum(0)
        total = self.comm(step).all_reduce(local, "sum", "all-reduce of the validation target")
        fresh = total / divisor
        beta = v.ema
        if beta > 0:  # average the noisy small-sample target over refreshes
            self._ema = fresh.double() if self._ema is None else beta * self._ema + (1 - beta) * fresh.double()
            fresh = self._ema.to(total.dtype)
        self._target = fresh
        self._target_key = key
        return self._target

    def anchor_weight(self, step: int) -> float:
        """``sum_a w_a^2`` of the target of ``step`` (its variance over one anchor's): ``1/A``
        for ``A`` pooled anchors, times ``(1 - ema) / (1 + ema)`` under an EMA (its steady state)."""
        v = self.cfg.validation
        _, weights, divisor = self.anchor_draw(step // v.refresh_interval)
        weight = sum((w / divisor) ** 2 for w in weights)
        return weight * (1 - v.ema) / (1 + v.ema)

    def anchor_draw(self, key: int) -> Tuple[List[int], List[float], float]:
        """``(anchor ids, weights, divisor)`` of draw ``key``: the target is
        ``sum_a weights[a] g_a / divisor``. The same on every rank (a function of the seed and
        ``key``)."""
        v = self.cfg.validation
        n_valid = len(self.valid_pool)
        gen = generator("anchors", self.cfg.seed, key)
        if v.mix == "pooled":
            count = min(v.anchors, n_valid)
            ids = torch.randperm(n_valid, generator=gen)[:count].tolist()
            return ids, [1.0] * count, float(count)
        domains = self.valid_pool.domains
        present = torch.unique(domains).tolist()
        per_domain = math.ceil(v.anchors / len(present))
        ids, weights = [], []
        for d in present:
            members = (domains == d).nonzero().flatten()
            take = members[torch.randperm(members.numel(), generator=gen)[:per_domain]].tolist()
            ids += take
            weights += [1.0 / (len(present) * len(take))] * len(take)
        return ids, weights, 1.0

    def _gather_rows(self, step, picked, features, lo, hi) -> torch.Tensor:
        """The selected rows' features (k, p) float64 on every rank: one all-reduce."""
        rows = torch.zeros(len(picked), features.shape[1], dtype=torch.float64)
        for pos, idx in enumerate(picked):
            if lo <= idx < hi:
                rows[pos] = features[idx - lo].double()
        return self.comm(step).all_reduce(rows, "sum", "all-reduce of the selected rows")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model, micro_batch: int, step: int) -> Dict[str, float]:
        """Held-out loss per domain of ``model`` (mean per-sequence loss) and their mean, over the
        same ``eval_samples`` held-out records at every call; all-reduced."""
        n_valid = len(self.valid_pool)
        limit = self.cfg.eval_samples or n_valid
        ids = torch.randperm(n_valid, generator=generator("eval", self.cfg.seed))[:limit].sort().values
        mine = ids[self.rank::self.world].tolist()
        per_rank = math.ceil(len(ids) / self.world)
        n_dom = len(self.valid_pool.domain_names)
        sums = torch.zeros(2, n_dom, dtype=torch.float64)
        was_training = model.training
        model.eval()
        for work, n_real in lockstep_chunks(mine, per_rank, micro_batch, int(ids[0])):
            batch = self.valid_pool.collate(work, self.pad_token_id)
            per_seq, _ = self.sequence_loss(model, batch, self.device)
            per_seq = per_seq[:n_real].double().cpu()
            dom = batch["domains"][:n_real]
            sums[0].index_add_(0, dom, per_seq)
            sums[1].index_add_(0, dom, torch.ones_like(per_seq))
        model.train(was_training)
        sums = self.comm(step, "evaluation").all_reduce(sums, "sum", "all-reduce of the held-out losses")
        losses = {name: float(sums[0, j] / sums[1, j]) for j, name in enumerate(self.valid_pool.domain_names)
                  if sums[1, j] > 0}
        losses["mean"] = sum(losses.values()) / max(len(losses), 1)
        return losses


def build_proxy(sketch_cfg, main_module, seed: int = 0):
    """The proxy scorer (:class:`~ds_partitionsel.proxy.ProxyModel`) of ``sketch.proxy_model``
    (a folder) or ``sketch.proxy_config`` (a new model of the main model's family, initialized
    from ``seed``) for a main model, or None without one; a proxy that cannot serve raises
    :class:`ConfigError`."""
    if sketch_cfg.proxy_model is None and sketch_cfg.proxy_config is None:
        return None
    from ds_partitionsel.proxy import ProxyModel, proxy_from_config, vocab_size

    params = list(main_module.parameters())
    if sketch_cfg.proxy_config is not None:
        arch = sketch_cfg.proxy_config
        try:
            model = proxy_from_config(main_module, hidden_size=arch.hidden_size, layers=arch.layers, heads=arch.heads,
                                      kv_heads=arch.kv_heads, intermediate_size=arch.intermediate_size, seed=seed)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"partitionsel.sketch.proxy_config: {e}") from e
        return ProxyModel(model, train=True, lr=sketch_cfg.proxy_lr, device=params[0].device if params else None,
                          main_vocab=vocab_size(main_module))
    try:
        return ProxyModel(sketch_cfg.proxy_model, layers=sketch_cfg.proxy_layers, train=sketch_cfg.proxy_train,
                          lr=sketch_cfg.proxy_lr, device=params[0].device if params else None,
                          main_vocab=vocab_size(main_module))
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise ConfigError(f"partitionsel.sketch.proxy_model: {e}") from e
