"""Selection over a candidate pool sharded across data-parallel ranks (docs/DISTRIBUTED.md).

Rank ``r`` holds ``n_r`` rows of the global ``(N, p)`` feature matrix; the global pool is the
rank-major concatenation (rank 0's rows first), so rank ``r``'s rows have global indices
``offset_r .. offset_r + n_r - 1`` with ``offset_r = n_0 + ... + n_{r-1}``. Shards may differ in
length, including zero. :func:`select` returns, on every rank, exactly what
:func:`ds_partitionsel.select` returns on the concatenated pool: the same indices and
bit-identical weights.

Modes
-----
``replicated``
    all-gather the features and domain ids (2 collectives, ``max_r n_r * (p*itemsize + 8)``
    bytes sent per rank) and run the single-process solver everywhere.
``sharded``
    the OMP loop (:func:`~ds_partitionsel.solver.greedy_select`) runs on every rank in lockstep
    over the rank's own rows. Per pick, one all-reduce agrees on the global best feasible
    candidate exactly (ties to the lowest global index), then its owner broadcasts the pick's
    payload (index, ``a_j``, domains and the feature row, ``p + 4`` float64); the small refit
    consumes only that replicated data. Bytes per rank do not depend on ``N``. Greedy rule:
    float32 (and narrower) residuals pack value and index into one int64 MAX all-reduce;
    float64 residuals need a MAX all-reduce of the value and a MIN all-reduce of the index.
    ``rrg`` rule: an all-gather of every rank's per-domain shortlists (at most the remaining
    budget, padded to it), then the same seeded draw on every rank. The baselines that need
    every row (``random``, ``full``, ``gradnorm``) run replicated.
``auto``
    :class:`CostModel` estimates both from the global shapes and picks the cheaper; the choice
    is logged and recorded in ``Selection.info``.

Safety: one all-gather of a small header checks that every rank got valid inputs and the same
arguments (method, budgets, lr, target, generator state, ...) before any work; one all-reduce
of a checksum of the result checks that every rank selected the same batch
(:func:`check_agreement`). Both raise the same error on every rank. Every collective waits at
most ``timeout`` seconds and its error names the step.
"""
import bisect
import logging
import math
import time
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from ds_partitionsel.collectives import CollectiveError, Communicator
from ds_partitionsel.selection import GREEDY_METHODS, run_method, select as select_single, validate_inputs
from ds_partitionsel.solver import (Selection, check_budget_fit, check_rule, check_temperature,
                                   max_abs_finite, rrg_pick, rrg_shortlist, spread_from, spread_moments)

__all__ = ["MODES", "CostModel", "CollectiveError", "SelectionDivergence", "check_agreement",
           "select"]

logger = logging.getLogger(__name__)

MODES = ("auto", "replicated", "sharded")
_OPTIONS = ("rule", "nonneg", "drop_nonfinite", "allow_shortfall", "step", "timeout",
            "cost_model", "temperature")
_INT64_MIN = -(2 ** 63)
_INT64_MAX = 2 ** 63 - 1


class SelectionDivergence(RuntimeError):
    """Ranks disagree on the arguments or on the result of a selection (raised on every rank)."""


# --------------------------------------------------------------------------- cost model

@dataclass(frozen=True)
class CostModel:
    """Alpha-beta model of one selection step per rank, used by ``mode="auto"``.

    ``seconds = rounds_latency * latency_s + wire_bytes / bandwidth_Bps + flops / flop_rate``
    where a collective over ``W`` ranks costs ``ceil(log2 W)`` latencies (tree / recursive
    doubling), an all-gather puts ``(W-1) * m`` bytes through each rank, an all-reduce ``2m``
    and a broadcast ``m``. Solver flops: ``2 k n p`` for the residual columns over the ``n``
    rows a rank holds (``N`` replicated, ``max n_r`` sharded). The defaults are fitted to gloo
    over loopback TCP with the CPU solver (tools/bench_distributed.py, docs/DISTRIBUTED.md);
    :meth:`for_backend` gives NCCL-typical values. Pass measured values for your cluster.
    """
    latency_s: float = 5e-4
    bandwidth_Bps: float = 2e9
    flop_rate: float = 2.5e9  # effective: includes the solver's per-pick overheads

    @classmethod
    def for_backend(cls, backend: str) -> "CostModel":
        """Defaults for a ``torch.distributed`` backend: ``gloo`` (and anything else) as measured
        here; ``nccl`` with typical NVLink/InfiniBand latency and bandwidth and a GPU solver
        (not measured in this project)."""
        if backend == "nccl":
            return cls(latency_s=3e-5, bandwidth_Bps=2e10, flop_rate=1e12)
        return cls()

    def estimate(self, mode: str, *, n_total: int, n_max: int, p: int, itemsize: int, k: int,
                 world: int, rule: str = "greedy", method: str = "partitionsel") -> dict:
        """Bytes sent per rank, collective rounds and modelled seconds of one step in ``mode``.

        Setup and the agreement check (3 small collectives) are common to both modes and left
        out. ``n_total`` = N, ``n_max`` = max_r n_r, ``itemsize`` of the features.
        """
        hops = max(1, math.ceil(math.log2(world))) if world > 1 else 0
        if mode == "replicated" or method not in GREEDY_METHODS:
            chunk = n_max * (p * itemsize + 8)
            rounds, sent, received = 2, chunk, (world - 1) * chunk
            wire = received
            flops = 2.0 * k * n_total * p
        elif mode == "sharded":
            payload = 8 * (p + 4)
            if rule == "rrg":
                shortlists = 24 * k * (k + 1) // 2  # (value, index, domain) x remaining budget
                rounds, sent = 2 * k, shortlists + k * payload
                received = (world - 1) * shortlists + k * payload
                wire = received
            else:
                reduces = 1 if itemsize <= 4 else 2
                rounds, sent = (reduces + 1) * k, k * (8 * reduces + payload)
                received = sent
                wire = k * (16 * reduces + payload)
            flops = 2.0 * k * n_max * p
        else:
            raise ValueError(f"unknown mode {mode!r}; valid: replicated, sharded")
        if world == 1:
            rounds = sent = received = wire = 0
        seconds = rounds * hops * self.latency_s + wire / self.bandwidth_Bps + flops / self.flop_rate
        return {"bytes_sent": int(sent), "bytes_received": int(received), "rounds": int(rounds),
                "seconds": seconds}

    def choose(self, **shape) -> tuple:
        """``(mode, {mode: estimate})``: the mode with the smaller modelled time (ties: sharded)."""
        est = {m: self.estimate(m, **shape) for m in ("replicated", "sharded")}
        mode = "replicated" if est["replicated"]["seconds"] < est["sharded"]["seconds"] else "sharded"
        return mode, est


# --------------------------------------------------------------------------- pick agreement

def _ordered_key(value: float, bits: int) -> int:
    """An integer whose signed order is the float order of ``value`` (``-0.0`` as ``+0.0``).

    ``bits`` 32 (value rounded exactly to float32) or 64. Negative floats have their magnitude
    bits flipped so that larger magnitudes sort lower.
    """
    if bits == 32:
        raw = int(torch.tensor([value + 0.0], dtype=torch.float32).view(torch.int32))
        return raw ^ 0x7FFFFFFF if raw < 0 else raw
    raw = int(torch.tensor([value + 0.0], dtype=torch.float64).view(torch.int64))
    return raw ^ _INT64_MAX if raw < 0 else raw


class ShardedChooser:
    """The collective ``chooser`` of :func:`~ds_partitionsel.solver.greedy_select`.

    Every rank calls :meth:`choose` with the residuals of its own rows; all return the same
    ``(payload, global_index)`` as :class:`~ds_partitionsel.solver.LocalChooser` would on the
    concatenated rows. ``sizes`` (W,) rows per rank, rank-major.
    """

    def __init__(self, comm: Communicator, sizes, step_label: str = ""):
        self.comm = comm
        self.sizes = list(sizes)
        self.offsets = [sum(self.sizes[:r]) for r in range(len(self.sizes))]
        self.picks = 0
        # One int64 carries a float32 key and an index below 2**32.
        self.index_bits_ok = sum(self.sizes) < 2 ** 32

    @property
    def bytes_sent(self) -> int:
        return self.comm.bytes_sent

    def pool_rows(self, rows) -> int:
        """Rows of the whole pool over every rank."""
        return sum(self.sizes)

    def spread(self, values: torch.Tensor) -> float:
        """:func:`~ds_partitionsel.solver.spread` of every rank's ``values``: two small
        all-reduces (the max magnitude, then exact integer moments), bytes independent of N."""
        local = torch.tensor([max_abs_finite(values)], dtype=torch.float64)
        scale = float(self.comm.all_reduce(local, "max", "all-reduce of the residual scale")[0])
        moments = self.comm.all_reduce(spread_moments(values, scale), "sum",
                                       "all-reduce of the residual moments")
        return spread_from(scale, moments)

    def owner(self, index: int) -> int:
        """The rank holding global row ``index`` (empty shards own nothing)."""
        return bisect.bisect_right(self.offsets, index) - 1

    def choose(self, values, feasible, rows, remaining, rule, generator):
        self.picks += 1
        what = f"pick {self.picks}"
        if rule == "greedy":
            index = self._argmax(values, rows.offset, what)
        else:
            index = self._rrg(values, feasible, rows, remaining, generator, what)
        src = self.owner(index)
        local = index - rows.offset
        payload = rows.pick_payload(local) if src == self.comm.rank else None
        payload = self.comm.broadcast(payload, src, (rows.payload_numel,), torch.float64,
                                      f"broadcast of {what} from its owner rank {src}")
        return payload, index

    def _argmax(self, values, offset, what) -> int:
        """Global argmax of ``values`` (-inf where infeasible), ties to the lowest index."""
        if values.numel():
            local = int(torch.argmax(values))  # first maximum
            best = float(values[local])
        else:
            local, best = 0, -math.inf
        has = best > -math.inf
        index = offset + local
        if values.dtype.itemsize <= 4 and self.index_bits_ok:
            key = (_ordered_key(best, 32) << 32) | (0xFFFFFFFF - index) if has else _INT64_MIN
            top = int(self.comm.all_reduce(torch.tensor([key]), "max", f"all-reduce of {what}")[0])
            if top == _INT64_MIN:
                raise CollectiveError(f"{self.comm.context}: {what}: no rank has a feasible "
                                      f"candidate left; budgets and pool disagree")
            return 0xFFFFFFFF - (top & 0xFFFFFFFF)
        key = _ordered_key(best, 64) if has else _INT64_MIN
        top = int(self.comm.all_reduce(torch.tensor([key]), "max", f"all-reduce (value) of {what}")[0])
        mine = index if has and key == top else _INT64_MAX
        found = int(self.comm.all_reduce(torch.tensor([mine]), "min", f"all-reduce (index) of {what}")[0])
        if found == _INT64_MAX:
            raise CollectiveError(f"{self.comm.context}: {what}: no rank has a feasible "
                                  f"candidate left; budgets and pool disagree")
        return found

    def _rrg(self, values, feasible, rows, remaining, generator, what) -> int:
        """Residual random greedy over the union of every rank's per-domain shortlists."""
        vals, idx, dom = rrg_shortlist(values, feasible, rows.domains, remaining)
        width = int(remaining.sum())  # each rank lists at most remaining_j per domain
        mine = torch.full((width, 3), -1.0, dtype=torch.float64)
        mine[: idx.numel(), 0] = vals.double()
        mine[: idx.numel(), 1] = (idx + rows.offset).double()
        mine[: idx.numel(), 2] = dom.double()
        union = torch.cat(self.comm.all_gather(mine, f"all-gather of the shortlists of {what}"))
        union = union[union[:, 1] >= 0]
        return int(rrg_pick(union[:, 0], union[:, 1].long(), union[:, 2].long(), remaining,
                            generator))


# --------------------------------------------------------------------------- agreement

def _result_checksum(sel: Selection) -> int:
    """CRC32 of what must be identical on every rank: indices, weights, counts, utility."""
    c = zlib.crc32(sel.indices.to(torch.int64).contiguous().numpy().tobytes())
    c = zlib.crc32(sel.weights.to(torch.float64).contiguous().numpy().tobytes(), c)
    c = zlib.crc32(sel.domain_counts.to(torch.int64).contiguous().numpy().tobytes(), c)
    return zlib.crc32(float(sel.utility).hex().encode(), c)


def _check_agreement(comm: Communicator, sel: Selection) -> None:
    c = _result_checksum(sel)
    top = comm.all_reduce(torch.tensor([c, -c], dtype=torch.int64), "max",
                          "all-reduce of the result checksum")
    if int(top[0]) != -int(top[1]):
        raise SelectionDivergence(
            f"{comm.context}: ranks selected different batches (result checksums range from "
            f"{-int(top[1]):#010x} to {int(top[0]):#010x}; this rank: {c:#010x}). Training on "
            f"them would silently diverge. Likely causes: different inputs or arguments per rank, "
            f"different library versions or thread settings, nondeterministic kernels.")


def check_agreement(selection: Selection, *, group=None, step=None,
                    timeout: Optional[float] = None) -> None:
    """Raise :class:`SelectionDivergence` on every rank unless all ranks hold the same selection.

    One all-reduce of 16 bytes (MAX of ``(c, -c)`` for a CRC32 ``c`` of the indices, weights,
    domain counts and utility). :func:`select` already calls it; call it again after anything
    that could make ranks' batches drift.
    """
    comm = Communicator(group, timeout, _context(step))
    _check_agreement(comm, selection)


# --------------------------------------------------------------------------- select

def _context(step) -> str:
    return "selection" if step is None else f"selection step {step}"


def _fingerprint(method, rule, nonneg, lr, ridge, budgets, p, dtype, flags, target, generator):
    """CRC32 of every argument that must be identical on all ranks."""
    head = repr((method, rule, bool(nonneg), float(lr).hex(), float(ridge).hex(),
                 [int(b) for b in budgets.tolist()], int(p), str(dtype), flags))
    c = zlib.crc32(head.encode())
    c = zlib.crc32(target.detach().cpu().to(torch.float64).contiguous().numpy().tobytes(), c)
    if generator is not None:
        c = zlib.crc32(generator.get_state().numpy().tobytes(), c)
    return c


def select(method: str, local_features: torch.Tensor, local_domains: torch.Tensor,
           target: torch.Tensor, budgets: torch.Tensor, *, lr: float = 1.0, ridge: float = 0.0,
           mode: str = "auto", group=None, generator: Optional[torch.Generator] = None,
           **options) -> Selection:
    """Select ``k = sum(budgets)`` candidates from the pool sharded over the ranks of ``group``.

    Call it on every rank of ``group`` with that rank's shard. The result, identical on every
    rank, equals ``ds_partitionsel.select(method, cat(features), cat(domains), target, budgets,
    ...)`` on the rank-major concatenation of the shards, bit for bit.

    Parameters
    ----------
    method : one of :data:`ds_partitionsel.selection.METHODS`.
    local_features : (n_r, p) this rank's candidate features; ``n_r`` may be 0 (shape (0, p)).
    local_domains : (n_r,) int64 domain ids in ``[0, D)``.
    target : (p,) mean validation gradient, identical on every rank.
    budgets : (D,) int64 per-domain budgets for the global pool, identical on every rank.
    lr, ridge : as in :func:`ds_partitionsel.select`.
    mode : ``"replicated"``, ``"sharded"`` or ``"auto"`` (see the module docstring).
    group : process group (default: the world). Without an initialized process group this is
        a world of one.
    generator : seeded ``torch.Generator`` in the same state on every rank (``random``, ``rrg``).
    **options : ``rule``, ``nonneg``, ``drop_nonfinite``, ``allow_shortfall`` as in
        :func:`ds_partitionsel.select`; ``step`` (int or str, named in errors and logs);
        ``timeout`` (seconds per collective; default: the process group's timeout);
        ``cost_model`` (a :class:`CostModel` for ``mode="auto"``).

    Returns
    -------
    Selection with global (rank-major) indices. ``bytes_sent``: bytes this rank handed to
    collectives in this call; ``info`` adds ``mode``, ``world_size``, ``rounds``,
    ``bytes_received``, ``time_comm`` (seconds waiting in collectives, including for slower
    ranks), ``time_solve`` (the rest) and, for ``auto``, the cost model's ``estimates``.

    Raises
    ------
    ValueError on every rank if any rank's inputs are invalid; :class:`SelectionDivergence` on
    every rank if ranks disagree on arguments or results; :class:`CollectiveError` (naming the
    step) if a rank dies or a collective times out.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: {', '.join(_OPTIONS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    rule = options.get("rule", "greedy")
    nonneg = options.get("nonneg", True)
    temperature = options.get("temperature", 1.0)
    drop_nonfinite = bool(options.get("drop_nonfinite", False))
    allow_shortfall = bool(options.get("allow_shortfall", False))
    step = options.get("step")
    start = time.perf_counter()
    comm = Communicator(group, options.get("timeout"), _context(step))
    cost_model = options.get("cost_model") or CostModel.for_backend(comm.backend)

    # Local validation; its outcome travels in the header so every rank raises together.
    error, finite, fingerprint = None, None, 0
    try:
        domains, budgets = validate_inputs(method, local_features, local_domains, target,
                                           budgets, lr, ridge)
        rule = check_rule(rule, generator)
        temperature = check_temperature(temperature)
        if method == "random" and not isinstance(generator, torch.Generator):
            raise ValueError("method 'random' needs a seeded torch.Generator, e.g. "
                             "generator=torch.Generator().manual_seed(seed)")
        finite = torch.isfinite(local_features).all(dim=1)
        uses_generator = method == "random" or rule in ("rrg", "sample")
        fingerprint = _fingerprint(method, rule, nonneg, lr, ridge, budgets,
                                   local_features.shape[1], local_features.dtype,
                                   (drop_nonfinite, allow_shortfall, mode, float(temperature).hex()),
                                   target, generator if uses_generator else None)
    except ValueError as exc:
        error = exc
    n_r = int(local_features.shape[0]) if error is None else 0
    kept_r = int(finite.sum()) if error is None else 0
    header = torch.tensor([int(error is None), n_r, kept_r, fingerprint], dtype=torch.int64)
    rows = torch.stack(comm.all_gather(header, "all-gather of the input header")).tolist()
    failed = [r for r, h in enumerate(rows) if not h[0]]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{comm.context}: rank(s) {failed} of {comm.world} rejected their "
                         f"inputs (their error says why); nothing was selected")
    prints = sorted({h[3] for h in rows})
    if len(prints) > 1:
        raise SelectionDivergence(
            f"{comm.context}: ranks were called with different arguments (method, rule, nonneg, "
            f"lr, ridge, budgets, feature width or dtype, mode, target, or generator state): "
            f"{len(prints)} distinct fingerprints {[hex(h[3]) for h in rows]} by rank. Every rank "
            f"must pass the same arguments and a generator in the same state.")
    sizes = [h[1] for h in rows]
    kept = [h[2] for h in rows]
    n_total, n_kept = sum(sizes), sum(kept)
    dropped = n_total - n_kept
    if n_total == 0:
        raise ValueError(f"{comm.context}: empty pool: every rank's features have no rows")
    if dropped and not drop_nonfinite:
        bad = [r for r in range(comm.world) if sizes[r] != kept[r]]
        raise ValueError(f"{comm.context}: features of {dropped} candidate(s) contain NaN/Inf "
                         f"(on rank(s) {bad}); pass drop_nonfinite=True to drop them")
    if dropped and n_kept < int(budgets.sum()):  # the same numbers on every rank: all raise together
        raise ValueError(f"{comm.context}: the sketches of {dropped} of {n_total} candidates are not finite "
                         f"(NaN/Inf), which leaves {n_kept}, fewer than the batch of {int(budgets.sum())}: the "
                         f"model has probably diverged (non-finite weights or activations); lower the learning "
                         f"rate, or resume from an earlier checkpoint")

    # Mode: the same decision on every rank, from global shapes only.
    itemsize = local_features.element_size()
    shape = dict(n_total=n_kept, n_max=max(sizes), p=int(local_features.shape[1]),
                 itemsize=itemsize, k=int(budgets.sum()), world=comm.world, rule=rule,
                 method=method)
    info = {"requested_mode": mode, "world_size": comm.world, "step": step}
    if mode == "auto":
        mode, info["estimates"] = cost_model.choose(**shape)
        logger.info("%s: mode auto -> %s (modelled s: replicated %.3g, sharded %.3g; N=%d, "
                    "p=%d, k=%d, world=%d)", comm.context, mode,
                    info["estimates"]["replicated"]["seconds"],
                    info["estimates"]["sharded"]["seconds"], n_kept, shape["p"], shape["k"],
                    comm.world)
    if mode == "sharded" and method not in GREEDY_METHODS:
        mode = "replicated"  # these baselines read every row anyway
        info["fallback"] = f"{method!r} has no sharded form; ran replicated"

    if mode == "replicated":
        features = comm.all_gather_rows(local_features, sizes, "all-gather of the features")
        pool_domains = comm.all_gather_rows(domains, sizes, "all-gather of the domain ids")
        sel = select_single(method, features, pool_domains, target, budgets, lr=lr, ridge=ridge,
                            generator=generator, rule=rule, nonneg=nonneg, temperature=temperature,
                            drop_nonfinite=drop_nonfinite, allow_shortfall=allow_shortfall)
    else:
        sel = _select_sharded(comm, method, local_features, domains, finite, target, budgets,
                              sizes, kept, lr=lr, ridge=ridge, generator=generator, rule=rule,
                              temperature=temperature, nonneg=nonneg,
                              allow_shortfall=allow_shortfall or bool(dropped))
        sel.info["dropped"] = dropped
    _check_agreement(comm, sel)
    sel.bytes_sent = comm.bytes_sent
    total = time.perf_counter() - start
    sel.info.update(info, mode=mode, rounds=comm.rounds, bytes_received=comm.bytes_received,
                    time_comm=comm.seconds, time_solve=total - comm.seconds)
    return sel


def _select_sharded(comm, method, features, domains, finite, target, budgets, sizes, kept, *,
                    lr, ridge, generator, rule, nonneg, allow_shortfall, temperature=1.0) -> Selection:
    """The lockstep greedy over this rank's finite rows; indices mapped back to the full pool."""
    dropped = sum(sizes) - sum(kept)
    if dropped:
        keep = finite.nonzero().flatten()
        features, domains = features[keep], domains[keep]
    counts = torch.bincount(domains, minlength=budgets.numel())
    counts = comm.all_reduce(counts, "sum", "all-reduce of the domain counts")
    used, shortfall = check_budget_fit(budgets, counts, allow_shortfall)
    chooser = ShardedChooser(comm, kept)
    offset = chooser.offsets[comm.rank]
    sel = run_method(method, features, domains, target, used, lr=lr, ridge=ridge,
                    generator=generator, rule=rule, nonneg=nonneg, offset=offset, chooser=chooser,
                    temperature=temperature)
    sel.shortfall = shortfall
    if dropped:  # kept-pool index -> full-pool index, filled in by each pick's owner
        full_offset = sum(sizes[: comm.rank])
        local = sel.indices - offset
        mine = (local >= 0) & (local < features.shape[0])
        mapped = torch.zeros_like(sel.indices)
        mapped[mine] = full_offset + keep[local[mine]]
        sel.indices = comm.all_reduce(mapped, "sum", "all-reduce of the kept-row map")
    return sel
