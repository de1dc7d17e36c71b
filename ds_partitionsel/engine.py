"""The DeepSpeed integration: ``initialize`` and an engine whose ``train_step`` is one step of

    global pool -> this rank's shard -> sketches -> distributed selection
    -> this rank's share of the selected samples -> forward/backward/step (DeepSpeed).

The layers below know nothing of DeepSpeed: the sketcher works on any module, the selection on
torch.distributed, the pool reader on files. This module wires them to a ``DeepSpeedEngine``.
"""
import copy
import json
import logging
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ds_partitionsel.budgets import allocate_budgets
from ds_partitionsel.config import (ConfigError, PartitionSelConfig, check_deepspeed_config, check_pool_fit,
                                    train_batch_size)
from ds_partitionsel.metrics import conflicting_pairs
from ds_partitionsel.runs import (check_resume, check_run_dir, open_metrics_log, read_resume_record,
                                  resume_record, write_resume_record)
from ds_partitionsel.sampler import (PoolSampler, assign_owner_first, generator, lockstep_chunks,
                                     shard_bounds)

logger = logging.getLogger("ds_partitionsel")

CLIENT_STATE_KEY = "partitionsel"


def _split_config(config):
    """DeepSpeed config (dict or JSON path) -> (deepspeed dict without our block, our block)."""
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
    block = ds_config.pop("partitionsel", None)
    return ds_config, PartitionSelConfig.from_dict(block)


def initialize(model, config, pool, valid_pool, *, optimizer=None, model_parameters=None,
               lr_scheduler=None, pad_token_id: Optional[int] = None, tokenizer=None,
               output_dir: Optional[str] = None, resume: bool = False, args=None, **deepspeed_kwargs):
    """Like ``deepspeed.initialize``, plus the candidate pool and the validation split.

    Parameters
    ----------
    model : torch.nn.Module, a Hugging Face causal LM (optionally peft-wrapped).
    config : dict or path of a DeepSpeed JSON config with an optional ``"partitionsel"`` block
        (see :mod:`ds_partitionsel.config`).
    pool : ``CandidatePool`` of the training split. valid_pool : ``CandidatePool`` held out.
    optimizer, model_parameters, lr_scheduler, args : passed to ``deepspeed.initialize``.
    pad_token_id : padding id; taken from ``tokenizer.pad_token_id`` when not given.
    output_dir : where rank 0 writes ``metrics.jsonl`` (None: no JSONL log). A directory whose
        log already holds records is refused unless ``resume`` (see :mod:`ds_partitionsel.runs`).
    resume : this run continues a checkpoint (``load_checkpoint`` next): continue its log.

    Every config error (the ``"partitionsel"`` block, the batch and pool sizes) is raised here,
    before DeepSpeed builds an engine.

    Returns
    -------
    (engine, optimizer, None, lr_scheduler) as ``deepspeed.initialize`` does, with ``engine``
    a :class:`PartitionSelEngine`.
    """
    import deepspeed

    ds_config, cfg = _split_config(config)
    check_deepspeed_config(ds_config, dist.get_world_size() if dist.is_initialized() else 1)
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        raise ConfigError("no pad token id: the tokenizer has no pad_token; set tokenizer.pad_token "
                          "(e.g. to its eos token) or pass pad_token_id=")
    _check_pools(pool, valid_pool, cfg)
    world = dist.get_world_size() if dist.is_initialized() else 1
    batch_size = train_batch_size(ds_config, world)
    if batch_size is not None:
        check_pool_fit(cfg, batch_size, world, len(pool))
    if output_dir:
        check_run_dir(output_dir, resume=resume)
    if model_parameters is None and optimizer is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        lr_scheduler=lr_scheduler, config=ds_config, **deepspeed_kwargs)
    wrapped = PartitionSelEngine(engine, cfg, pool, valid_pool, pad_token_id, output_dir=output_dir,
                                 resume=resume)
    return wrapped, optimizer, None, lr_scheduler


def _check_pools(pool, valid_pool, cfg):
    counts = pool.domain_counts()
    names = pool.domain_names
    missing = [names[j] for j in range(len(names)) if int(counts[j]) == 0]
    if missing:
        raise ConfigError(f"domain(s) {missing} have no records in the training split of {pool.path}; "
                          f"rebuild the pool with data for them or drop them")
    if valid_pool is None or len(valid_pool) == 0:
        raise ConfigError("the validation split is empty: PartitionSel needs held-out anchors; "
                          "build the pool with --valid data")
    if cfg.budget.minority_domains:
        unknown = [d for d in cfg.budget.minority_domains if d not in names]
        if unknown:
            raise ConfigError(f"partitionsel.budget.minority_domains {unknown} are not domains of the "
                              f"pool; valid: {names}")
    if cfg.budget.fractions is not None and len(cfg.budget.fractions) != len(names):
        raise ConfigError(f"partitionsel.budget.fractions has {len(cfg.budget.fractions)} entries for "
                          f"{len(names)} domains {names}")


class PartitionSelEngine:
    """A ``DeepSpeedEngine`` whose :meth:`train_step` selects its own batch.

    Attributes not defined here are looked up on the wrapped DeepSpeed engine (``module``,
    ``optimizer``, ``get_lr``, ``monitor``, ...).
    """

    def __init__(self, engine, cfg: PartitionSelConfig, pool, valid_pool, pad_token_id: int,
                 output_dir: Optional[str] = None, resume: bool = False):
        from ds_partitionsel.sketch import GradientSketcher

        self.engine, self.cfg, self.pool, self.valid_pool = engine, cfg, pool, valid_pool
        self.pad_token_id = int(pad_token_id)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.micro_batch = engine.train_micro_batch_size_per_gpu()
        self.grad_accum = engine.gradient_accumulation_steps()
        self.batch_size = engine.train_batch_size()  # k: micro x accumulation x world
        if self.batch_size != self.micro_batch * self.grad_accum * self.world:
            raise ConfigError(f"train_batch_size {self.batch_size} != micro batch {self.micro_batch} x "
                              f"gradient accumulation {self.grad_accum} x world {self.world}")
        if cfg.method == "full":
            self.pool_size = self.batch_size  # train on the whole pool: the pool is the batch
        else:
            self.pool_size = cfg.pool_size or cfg.pool_factor * self.batch_size
        if self.pool_size < self.batch_size:
            raise ConfigError(f"pool of {self.pool_size} candidates is smaller than the batch of "
                              f"{self.batch_size}; raise partitionsel.pool_size / pool_factor")
        if self.pool_size % self.world:
            raise ConfigError(f"pool size {self.pool_size} must divide evenly over {self.world} ranks "
                              f"(every rank sketches the same number of candidates in lockstep)")
        self.sampler = PoolSampler(len(pool), self.pool_size, cfg.seed)
        sk = cfg.sketch
        # sketches and target come from the proxy when there is one: the main model only trains
        self.proxy = self._build_proxy(sk, engine.module)
        self.sketcher = GradientSketcher(self.proxy.model if self.proxy is not None else engine.module,
                                         modules=sk.modules, mode=sk.mode,
                                         kron_dims=tuple(sk.kron_dims) if isinstance(sk.kron_dims, list) else sk.kron_dims,
                                         dim=sk.dim, seed=cfg.seed, normalize=sk.normalize,
                                         head_chunk=sk.head_chunk)
        self.global_step = 0
        self._target, self._target_key = None, None
        self.output_dir = output_dir
        self._log = None
        if output_dir and self.rank == 0:  # owned by this run: never shared (runs.open_metrics_log)
            self._log = open_metrics_log(output_dir, resume=resume)
        self.device = next(iter(engine.module.parameters())).device

    def __getattr__(self, name):
        return getattr(self.__dict__["engine"], name)

    # ------------------------------------------------------------------ the step

    def train_step(self) -> dict:
        """One optimizer step on a selected batch; returns this step's metrics."""
        cfg, step = self.cfg, self.global_step
        t0 = time.perf_counter()
        pool_ids = self.sampler.pool(step)
        bounds = shard_bounds(self.pool_size, self.world)
        lo, hi = bounds[self.rank]

        sel, features, dropped = self._select(step, pool_ids, lo, hi)
        t_select = time.perf_counter()

        shares = assign_owner_first(sel.indices.tolist(), bounds, self.batch_size // self.world)
        mine = shares[self.rank]
        weight_of = dict(zip(sel.indices.tolist(), sel.weights.tolist()))
        train_loss = self._train_on([int(pool_ids[i]) for i in mine],
                                    [weight_of[i] for i in mine], float(sel.weights.sum()))
        proxy_loss = self._train_proxy([int(pool_ids[i]) for i in sel.indices.tolist()])
        t_end = time.perf_counter()

        record = {
            "step": step, "method": cfg.method, "train_loss": train_loss,
            "lr": self._lr(), "pool_size": self.pool_size, "batch_size": self.batch_size,
            "domain_counts": dict(zip(self.pool.domain_names, sel.domain_counts.tolist())),
            "selected": [int(pool_ids[i]) for i in sel.indices.tolist()],
            "utility": sel.utility, "dropped": dropped, "bytes_sent": int(sel.bytes_sent),
            "mode": sel.info.get("mode", "local"),
            "time_s": {"sketch": sel.info["time_sketch"], "anchors": sel.info["time_anchors"],
                       "solve": sel.info.get("time_solve", 0.0), "comm": sel.info.get("time_comm", 0.0),
                       "select": t_select - t0 - sel.info["time_sketch"],
                       "train": t_end - t_select, "total": t_end - t0},
        }
        if proxy_loss is not None:
            record["proxy_loss"] = proxy_loss
        if step % cfg.log_interval == 0:
            record["conflicting_pairs"] = self._conflicting_pairs(sel, features, lo, hi)
        self.global_step += 1
        if cfg.eval_interval and self.global_step % cfg.eval_interval == 0:
            self.evaluate()
        self._emit(record)
        return record

    def _lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ------------------------------------------------------------------ proxy scoring

    @staticmethod
    def _build_proxy(sk, main_module):
        """The ``sketch.proxy_model`` scorer (:class:`~ds_partitionsel.proxy.ProxyModel`), or None."""
        if sk.proxy_model is None:
            return None
        from ds_partitionsel.proxy import ProxyModel, vocab_size

        params = list(main_module.parameters())
        try:
            return ProxyModel(sk.proxy_model, layers=sk.proxy_layers, train=sk.proxy_train, lr=sk.proxy_lr,
                              device=params[0].device if params else None, main_vocab=vocab_size(main_module))
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise ConfigError(f"partitionsel.sketch.proxy_model: {e}") from e

    def _train_proxy(self, record_ids):
        """One proxy step on the whole selected batch, the same on every rank (no communication)."""
        if self.proxy is None or not self.proxy.train:
            return None
        mb = self.cfg.sketch.micro_batch
        batches = [self.pool.collate(record_ids[s:s + mb], self.pad_token_id)
                   for s in range(0, len(record_ids), mb)]
        return self.proxy.train_on(batches, self._per_sequence_loss)

    def _select(self, step, pool_ids, lo, hi):
        """Sketch this rank's shard and run the distributed selection over the global pool."""
        from ds_partitionsel import distributed

        cfg = self.cfg
        t0 = time.perf_counter()
        local_ids = pool_ids[lo:hi]
        local_domains = self.pool.domains[local_ids]
        budgets = self._budgets(self.pool.domains[pool_ids])
        t_anchor = 0.0
        if cfg.method in ("random", "full"):
            features = torch.zeros(len(local_ids), 1)  # no gradients needed
            target = torch.zeros(1)
        else:
            features = self._sketch_records(self.pool, local_ids.tolist())
            t1 = time.perf_counter()
            target = self._validation_target(step)
            t_anchor = time.perf_counter() - t1
        t_sketch = time.perf_counter() - t0  # pool and anchors; anchors also reported apart
        sel = distributed.select(
            cfg.method, features, local_domains, target, budgets, lr=self._lr(), ridge=cfg.ridge,
            mode=cfg.mode, generator=generator("select", cfg.seed, step), rule=cfg.rule,
            nonneg=cfg.nonneg, drop_nonfinite=True, step=step, timeout=cfg.timeout_s)
        sel.info["time_sketch"], sel.info["time_anchors"] = t_sketch, t_anchor
        dropped = int(sel.info.get("dropped", 0))
        if dropped:
            logger.warning("step %d: %d candidate(s) with non-finite sketches dropped", step, dropped)
        return sel, features, dropped

    def _budgets(self, pool_domains):
        b = self.cfg.budget
        counts = torch.bincount(pool_domains, minlength=len(self.pool.domain_names))
        names = self.pool.domain_names
        minority = [names.index(d) for d in b.minority_domains] if b.minority_domains else None
        return allocate_budgets(counts, self.batch_size, b.strategy, fractions=b.fractions,
                                minority_domains=minority)

    def _sketch_records(self, pool, ids, lockstep_rows=None):
        """Features of records ``ids`` (n, p), sketched in micro batches of ``sketch.micro_batch``.

        Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively):
        ``lockstep_rows`` pads the work to that many rows with repeats that are discarded.
        """
        total = max(len(ids), lockstep_rows or 0)
        rows = []
        for work, n_real in lockstep_chunks(ids, total, self.cfg.sketch.micro_batch, ids[0] if ids else 0):
            rows.append(self._sketch_batch(pool.collate(work, self.pad_token_id))[:n_real])
        p = self.sketcher.feature_dim
        return torch.cat(rows) if rows else torch.zeros(0, p)

    def _sketch_batch(self, batch):
        dev = self.device
        try:
            return self.sketcher.sketch(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                                        batch["loss_mask"].to(dev)).float().cpu()
        except FloatingPointError:
            # keep the step going: mark the whole chunk non-finite, it is dropped and counted
            n = batch["input_ids"].shape[0]
            return torch.full((n, self.sketcher.feature_dim), float("nan"))

    def _validation_target(self, step):
        """Mean sketch of ``validation.anchors`` held-out sequences, all-reduced over ranks."""
        v = self.cfg.validation
        key = step // v.refresh_interval
        if key == self._target_key:
            return self._target
        n_valid = len(self.valid_pool)
        count = min(v.anchors, n_valid)
        anchors = torch.randperm(n_valid, generator=generator("anchors", self.cfg.seed, key))[:count]
        mine = anchors[self.rank::self.world].tolist()
        per_rank = math.ceil(count / self.world)
        feats = self._sketch_records(self.valid_pool, mine, lockstep_rows=per_rank)
        feats = torch.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)
        total = feats.sum(0)
        if self.world > 1:
            dist.all_reduce(total)
        self._target, self._target_key = total / count, key
        return self._target

    # ------------------------------------------------------------------ training

    def _train_on(self, record_ids, weights, weight_sum):
        """Forward/backward/step through DeepSpeed on this rank's share, in micro batches."""
        mb = self.micro_batch
        scale = self.batch_size / weight_sum if self.cfg.use_weights and weight_sum > 0 else None
        losses = []
        self.engine.train()
        for start in range(0, len(record_ids), mb):
            ids = record_ids[start:start + mb]
            batch = self.pool.collate(ids, self.pad_token_id)
            w = None
            if scale is not None:
                w = torch.tensor(weights[start:start + mb], dtype=torch.float32) * scale
            loss = self._loss(batch, w)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss.detach()))
        mean = torch.tensor(sum(losses) / max(len(losses), 1), dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(mean)
            mean /= self.world
        return float(mean)

    def _per_sequence_loss(self, batch, module):
        """Mean token NLL over each sequence's label tokens (the sketch's per-sample loss), (B,)."""
        dev = self.device
        ids = batch["input_ids"].to(dev)
        out = module(input_ids=ids, attention_mask=batch["attention_mask"].to(dev))
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(dev)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=-100, reduction="none").view(labels.shape)
        count = (labels != -100).sum(1)
        return nll.sum(1) / count.clamp(min=1), count

    def _loss(self, batch, weights=None):
        per_seq, count = self._per_sequence_loss(batch, self.engine)
        if weights is not None:
            return (per_seq * weights.to(per_seq.device)).mean()
        return per_seq.mean()

    # ------------------------------------------------------------------ evaluation and metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss per domain (mean of per-sequence mean NLL) and their mean."""
        n_valid = len(self.valid_pool)
        limit = self.cfg.eval_samples or n_valid
        ids = torch.randperm(n_valid, generator=generator("eval", self.cfg.seed))[:limit].sort().values
        mine = ids[self.rank::self.world].tolist()
        per_rank = math.ceil(len(ids) / self.world)
        n_dom = len(self.valid_pool.domain_names)
        sums = torch.zeros(2, n_dom, dtype=torch.float64)
        was_training = self.engine.module.training
        self.engine.module.eval()
        for work, n_real in lockstep_chunks(mine, per_rank, self.micro_batch, int(ids[0])):
            batch = self.valid_pool.collate(work, self.pad_token_id)
            per_seq, _ = self._per_sequence_loss(batch, self.engine.module)
            per_seq = per_seq[:n_real].double().cpu()
            dom = batch["domains"][:n_real]
            sums[0].index_add_(0, dom, per_seq)
            sums[1].index_add_(0, dom, torch.ones_like(per_seq))
        self.engine.module.train(was_training)
        if self.world > 1:
            dist.all_reduce(sums)
        losses = {name: float(sums[0, j] / sums[1, j]) for j, name in enumerate(self.valid_pool.domain_names)
                  if sums[1, j] > 0}
        losses["mean"] = sum(losses.values()) / max(len(losses), 1)
        self._emit({"step": self.global_step, "method": self.cfg.method, "eval_loss": losses})
        return losses

    def _conflicting_pairs(self, sel, features, lo, hi) -> int:
        """Conflicting pairs of the selected batch, from its rows gathered by one all-reduce."""
        if self.cfg.method in ("random", "full"):
            return -1  # no gradient features were computed for these methods
        rows = torch.zeros(sel.k, features.shape[1], dtype=torch.float64)
        for pos, idx in enumerate(sel.indices.tolist()):
            if lo <= idx < hi:
                rows[pos] = features[idx - lo].double()
        if self.world > 1:
            dist.all_reduce(rows)
        return conflicting_pairs(torch.nan_to_num(rows), torch.arange(sel.k))

    def _emit(self, record: dict) -> None:
        mon = getattr(self.engine, "monitor", None)
        if mon is not None and getattr(mon, "enabled", False) and self.rank == 0:
            events = []
            step = record["step"]
            for key in ("train_loss", "utility", "conflicting_pairs", "bytes_sent"):
                if key in record:
                    events.append((f"partitionsel/{key}", float(record[key]), step))
            for name, value in record.get("domain_counts", {}).items():
                events.append((f"partitionsel/selected/{name}", float(value), step))
            for name, value in record.get("time_s", {}).items():
                events.append((f"partitionsel/time_{name}", float(value), step))
            for name, value in record.get("eval_loss", {}).items():
                events.append((f"partitionsel/eval_loss/{name}", float(value), step))
            mon.write_events(events)
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, save_dir, tag=None, client_state=None, **kwargs):
        """DeepSpeed's checkpoint plus what a resume must match (:func:`ds_partitionsel.runs.resume_record`),
        in the client state and as ``<save_dir>/<tag>/partitionsel_resume.json``."""
        record = resume_record(self)
        state = dict(client_state or {})
        state[CLIENT_STATE_KEY] = record
        tag = f"global_step{self.engine.global_steps}" if tag is None else tag  # DeepSpeed's default tag
        out = self.engine.save_checkpoint(save_dir, tag=tag, client_state=state, **kwargs)
        if self.rank == 0:  # a rank that resumes before this file exists checks the client state instead
            write_resume_record(os.path.join(save_dir, str(tag)), record)
        return out

    def load_checkpoint(self, load_dir, tag=None, allow_changes: bool = False, **kwargs):
        """Resume from a checkpoint of the same pool and selection config.

        The checkpoint's JSON record is compared before DeepSpeed loads anything; a different
        pool (by fingerprint) or selection config raises :class:`~ds_partitionsel.runs.ResumeMismatchError`
        naming every difference, unless ``allow_changes`` (then they are logged). Checkpoints
        are pickles: load only checkpoints from a trusted source.
        """
        current = resume_record(self)
        early = read_resume_record(load_dir, tag)
        if early is not None:
            check_resume(early, current, load_dir, allow_changes)
        path, client_state = self.engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint found in {load_dir} (tag {tag!r})")
        state = (client_state or {}).get(CLIENT_STATE_KEY)
        if state is None:
            raise ValueError(f"checkpoint {path} has no '{CLIENT_STATE_KEY}' client state: it was not "
                             f"saved by a PartitionSelEngine")
        diffs = check_resume(state, current, path, allow_changes)
        if diffs:
            logger.warning("resuming %s with changes (allowed): %s", path, "; ".join(diffs))
        self.global_step = int(state["global_step"])
        return path, client_state
