#!/usr/bin/env python
"""Does PartitionSel pay? Every method, several seeds, confidence intervals, time-to-target.

One command reruns everything at CPU size and regenerates the tables and plots of
``docs/RESULTS.md``; finished runs are reused, so an interrupted rerun continues::

    python tools/evidence.py                      # all phases (hours on 2 cores), then the report
    python tools/evidence.py --phase pretrain     # one phase (pretrain | ablation | sft)
    python tools/evidence.py --report-only        # tables + plots from the kept results (seconds)
    python tools/evidence.py --phase pretrain ablation --corpus my_corpus.jsonl --device cuda --jobs 4 \\
        --vocab 32000 --hidden 512 --layers 8 --heads 8 --seq 512 --batch 64 --steps 3000 \\
        --eval-interval 100 --eval-per-domain 256 --anchors 32        # the GPU scale, your corpus

Phases (every run is one process, single rank, the package's ``Selector`` with a plain AdamW
loop; the same selection code the DeepSpeed engine and the HF Trainer call):

``pretrain``  a small Llama trained from scratch on packed windows of real multi-domain text
    and code (tokenizer trained on the corpus), batch ``--batch`` chosen from pools of 8x and
    4x the batch, every method, two validation settings:

    * ``matched``: the anchors (validation gradients) follow the pool's domain mix; the score
      is the held-out loss under that mix;
    * ``target``: the anchors are 80% ``--target-domain`` (a minority of the pool) and the
      score is the held-out loss under that 80/20 mix.

    ``random`` and ``gradnorm`` never look at the anchors: one run serves both settings.
    ``partitionsel_proxy``: scored by the main model's first block, trained alongside.
    ``partitionsel_cheap``: the README's cheap configuration (a 1-block proxy of width
    ``--cheap-hidden`` trained alongside, ``head_kron`` features, ``--cheap-steps-per-pool``
    batches per scoring pass, windows of a quarter of the sequence); the tables give its wall
    clock to ``random``'s final loss over ``random``'s own (run both in one invocation).
``ablation``  PartitionSel's fidelity knobs against its default (matched, the first of
    ``--factors``): the ``rrg``
    rule of the official code, anchors per domain vs pooled, OMP weights in the loss, uniform
    budgets.
``sft``  SmolLM2-135M-Instruct, LoRA on its last blocks sketched exactly (the paper's
    features), on the demo instruction pool.

Outputs: ``<out>/<phase>/...`` one folder per run (full ``metrics.jsonl``; not kept), and
``<results>/evidence/`` the kept, small results (``runs.jsonl``: one line per run with its
eval curve and summary), tables (``tables.md``, ``tables.json``) and plots.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = ("random", "gradnorm", "greats", "greats_domain", "iwd", "gradmatch", "partitionsel",
           "partitionsel_proxy", "partitionsel_cheap")
VALIDATION_FREE = ("random", "gradnorm")  # they never read the anchors: one run serves both settings
SETTINGS = ("matched", "target")
ABLATIONS = {  # name -> overrides of the partitionsel block (the rest: the package's default)
    "old_default": {"budget": {"strategy": "proportional"}, "rule": "greedy"},
    "proportional_budgets": {"budget": {"strategy": "proportional"}},
    "greedy_rule": {"rule": "greedy"},
    "temperature_0.3": {"temperature": 0.3},
    "temperature_1": {"temperature": 1.0},
    "temperature_10": {"temperature": 10.0},
    "uniform_within_budgets": {"temperature": 1e6},  # the hot limit: the validation budgets, no gradient choice
    "adam_preconditioned": {"sketch": {"precondition": "adam"}},
    "curriculum_budgets": {"budget": {"strategy": "curriculum"}},
    "stochastic_rounding": {"budget": {"rounding": "stochastic"}},
    "shrink_target": {"validation": {"shrink": True}},
    "ema_target": {"validation": {"ema": 0.9}},
    "rrg": {"rule": "rrg"},
    "anchors_per_domain": {"validation": {"mix": "per_domain"}},
    "weighted_loss": {"use_weights": True},
    "uniform_budgets": {"budget": {"strategy": "uniform"}},
}
SFT_METHODS = ("random", "greats", "greats_domain", "iwd", "gradmatch", "partitionsel")
TARGET_SHARE = 0.8


# --------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--phase", nargs="+", choices=["pretrain", "ablation", "sft"],
                    default=["pretrain", "ablation", "sft"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--factors", nargs="+", type=int, default=[8, 4], help="pool = factor x batch")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS),
                    help="variants of the ablation phase (each against the default, in every setting)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    ap.add_argument("--device", default="cpu", help="torch device of every run (cpu, cuda)")
    ap.add_argument("--out", default="runs/evidence", help="run folders go here")
    ap.add_argument("--results", default="docs/results", help="kept results, tables and plots: <results>/evidence")
    ap.add_argument("--cache", default=".cache", help="data, tokenizer and pools (created as needed)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from kept results")
    ap.add_argument("--fresh", action="store_true", help="rerun finished runs too")
    g = ap.add_argument_group("pretraining from scratch")
    g.add_argument("--corpus", help="raw-text jsonl ({\"text\", \"domain\"} per line) to pretrain on "
                   "(default: the demo data's documents plus this Python's standard library sources)")
    g.add_argument("--corpora", nargs="+", metavar="JSONL",
                   help="run the whole comparison on each corpus in turn (\"demo\" names the default "
                        "corpus); results under <results>/evidence/<corpus>/ and a summary table across them "
                        "(<results>/evidence/summary.md); --target-domain defaults to auto here")
    g.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the corpus")
    g.add_argument("--seq", type=int, default=32, help="packed window length (tokens)")
    g.add_argument("--hidden", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--batch", type=int, default=16, help="selected windows per step")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--lr", type=float, default=3e-3, help="peak lr (10%% warmup, cosine to 10%%)")
    g.add_argument("--anchors", type=int, default=16, help="validation anchors per step")
    g.add_argument("--cheap-hidden", type=int, default=8,
                   help="partitionsel_cheap: width of its 1-block proxy (8: about 20x fewer FLOPs per token "
                        "than the default main model)")
    g.add_argument("--cheap-steps-per-pool", type=int, default=4,
                   help="partitionsel_cheap: batches selected per scoring pass (the m of steps_per_pool)")
    g.add_argument("--eval-interval", type=int, default=10)
    g.add_argument("--eval-per-domain", type=int, default=64, help="held-out windows per domain per eval")
    g.add_argument("--sketch", choices=["exact", "kron"], default="kron",
                   help="kron: Kronecker sketches (16 x 16 per linear) of every block; exact: whole per-sample gradients")
    g.add_argument("--target-domain", nargs="+", default=["code"],
                   help="domain(s) the target setting asks for; several: one target setting each "
                        "(target:DOMAIN); auto: the pool's smallest domain and its domain nearest a 30%% share")
    g.add_argument("--measure-interval", type=int, default=10,
                   help="steps between pool-wide conflicting-pair measurements (random runs)")
    s = ap.add_argument_group("SFT (SmolLM2-135M-Instruct, LoRA)")
    s.add_argument("--sft-model", default=".cache/models/smollm2-135m")
    s.add_argument("--sft-steps", type=int, default=40)
    s.add_argument("--sft-batch", type=int, default=4)
    s.add_argument("--sft-factor", type=int, default=2, help="pool = factor x batch (CPU default: 2)")
    s.add_argument("--sft-max-tokens", type=int, default=128, help="records truncated to this many tokens")
    s.add_argument("--sft-methods", nargs="+", default=list(SFT_METHODS), choices=list(METHODS))
    s.add_argument("--sft-lr", type=float, default=5e-4)
    s.add_argument("--sft-eval-interval", type=int, default=20)
    s.add_argument("--sft-eval-per-domain", type=int, default=8)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- data

class PoolView:
    """The records ``ids`` of a ``CandidatePool`` as a pool of their own (index ``i`` is
    ``ids[i]``): the anchor set of a validation setting, or an evaluation subset."""

    def __init__(self, pool, ids):
        import torch

        self.base, self.ids = pool, [int(i) for i in ids]
        self.path, self.domain_names = pool.path, pool.domain_names
        self.domains = pool.domains[torch.as_tensor(self.ids, dtype=torch.int64)]

    def __len__(self):
        return len(self.ids)

    def domain_counts(self):
        import torch

        return torch.bincount(self.domains, minlength=len(self.domain_names))

    def collate(self, indices, pad_token_id):
        return self.base.collate([self.ids[int(i)] for i in indices], pad_token_id)


def split_valid(valid, seed: int = 0):
    """Held-out records per domain, shuffled once (``seed``), halved: ``(anchors, evaluation)``
    dicts {domain id: [record ids]}; the two halves never share a record."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    anchors, evaluation = {}, {}
    for d in range(len(valid.domain_names)):
        members = (valid.domains == d).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=gen)].tolist()
        half = len(members) // 2
        anchors[d], evaluation[d] = members[:half], members[half:]
    return anchors, evaluation


def setting_mix(setting: str, train_mix: dict, names: list, target_domain: str) -> dict:
    """Domain weights of a validation setting: the pool's mix (``matched``) or ``TARGET_SHARE``
    on the target domain and the rest in the pool's proportions (``target``, the domain of
    ``--target-domain``; ``target:DOMAIN`` names its own)."""
    if setting == "matched":
        return dict(train_mix)
    if setting.startswith("target:"):
        target_domain = setting.split(":", 1)[1]
    if target_domain not in names:
        raise SystemExit(f"--target-domain {target_domain!r} is not a domain of the pool; valid: {names}")
    rest = sum(v for d, v in train_mix.items() if d != target_domain)
    return {d: (TARGET_SHARE if d == target_domain else (1 - TARGET_SHARE) * v / rest) for d, v in train_mix.items()}


def anchor_ids(anchors: dict, names: list, mix: dict) -> list:
    """Anchor records whose domain shares follow ``mix`` as closely as the held-out half allows:
    the largest set with ``count_d ~ mix_d * total`` and ``count_d <= available_d``."""
    total = min(int(len(anchors[d]) / mix[names[d]]) for d in anchors if mix[names[d]] > 0)
    ids = []
    for d in sorted(anchors):
        ids += anchors[d][:max(1, round(mix[names[d]] * total))] if mix[names[d]] > 0 else []
    return ids


def eval_ids(evaluation: dict, per_domain: int) -> list:
    return [i for d in sorted(evaluation) for i in evaluation[d][:per_domain]]


def weighted_loss(losses: dict, mix: dict) -> float:
    return float(sum(mix[d] * losses[d] for d in mix))


# --------------------------------------------------------------------------- one run

def lr_at(step: int, steps: int, peak: float) -> float:
    """10% linear warmup, cosine decay to 10% of the peak."""
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def pair_counts(features, domains) -> dict:
    """Pairs ``i<j`` of a batch split by within/cross domain, and how many of each conflict
    (``<g_i, g_j> < 0``)."""
    import torch

    g = torch.nan_to_num(features.double())
    gram = g @ g.T
    upper = torch.triu(torch.ones_like(gram, dtype=torch.bool), diagonal=1)
    same = domains[:, None] == domains[None, :]
    neg = gram < 0
    return {"within": int((upper & same).sum()), "cross": int((upper & ~same).sum()),
            "within_conflict": int((upper & same & neg).sum()), "cross_conflict": int((upper & ~same & neg).sum())}



def evaluate(model, view, pad_id: int, device, micro: int = 64) -> dict:
    """Held-out loss per domain name: mean per-sequence loss over the records of ``view``."""
    import torch

    from ds_partitionsel.loss import per_sequence_loss

    sums, counts = {}, {}
    was = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(view), micro):
            batch = view.collate(range(s, min(s + micro, len(view))), pad_id)
            per_seq, _ = per_sequence_loss(model, batch, device)
            for d, v in zip(batch["domains"].tolist(), per_seq.double().cpu().tolist()):
                name = view.domain_names[d]
                sums[name] = sums.get(name, 0.0) + v
                counts[name] = counts.get(name, 0) + 1
    model.train(was)
    return {d: sums[d] / counts[d] for d in sorted(sums)}


def tiny_llama(spec: dict, vocab: int, pad_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=spec["hidden"], intermediate_size=4 * spec["hidden"],
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["heads"], max_position_embeddings=spec["seq"],
                      tie_word_embeddings=True, pad_token_id=pad_id, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(cfg)


def partitionsel_block(spec: dict) -> dict:
    """The ``"partitionsel"`` config block of a run (the same keys a DeepSpeed config holds)."""
    method = spec["method"]
    block = {"method": "partitionsel" if method == "partitionsel_proxy" else method,
             "pool_factor": spec["factor"], "seed": spec["seed"], "mode": "replicated",
             "validation": {"anchors": spec["anchors"], "refresh_interval": 1},
             "sketch": {"mode": spec["sketch"], "modules": spec.get("modules", 3),
                        "micro_batch": spec.get("sketch_micro", 32), "normalize": method != "gradnorm"}}
    if spec["sketch"] == "kron":
        block["sketch"]["kron_dims"] = spec.get("kron_dims", 16)
    if method == "partitionsel_proxy":
        block["sketch"].update(proxy_model=spec["proxy_dir"], proxy_layers=1, proxy_train=True,
                               proxy_lr=spec["lr"])
    if method == "partitionsel_cheap":  # the README's recommended cheap configuration, sized to this model
        block.update(method="partitionsel", steps_per_pool=spec.get("cheap_steps_per_pool", 4))
        block["sketch"] = {"mode": "head_kron", "micro_batch": spec.get("sketch_micro", 32),
                           "score_len": max(1, spec["seq"] // 4), "proxy_train": True, "proxy_lr": spec["lr"],
                           "proxy_config": {"hidden_size": spec["cheap_hidden"], "layers": 1, "heads": 2}}
    for key, value in spec.get("overrides", {}).items():
        if isinstance(value, dict):
            block.setdefault(key, {}).update(value)
        else:
            block[key] = value
    return block


def run_one(spec: dict) -> dict:
    """Train one run; write ``<dir>/metrics.jsonl`` and ``<dir>/summary.json``; return the summary.

    The loop: ``Selector.select`` picks the step's batch from its pool, AdamW trains on it (plain
    mean loss unless ``use_weights``), the held-out loss is measured every ``eval_interval``
    steps. Wall time counts selection + training only (not evaluation or measurements).
    """
    import torch

    torch.set_num_threads(1)
    from ds_partitionsel.config import PartitionSelConfig
    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.loop import TrainStep
    from ds_partitionsel.selector import Selector

    out = Path(spec["dir"])
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(spec["device"])
    pool = CandidatePool(spec["pool"], "train")
    valid = CandidatePool(spec["pool"], "valid")
    anchors, evaluation = split_valid(valid)
    names = pool.domain_names
    counts = pool.domain_counts().double()
    train_mix = {n: float(c / counts.sum()) for n, c in zip(names, counts)}
    mix = setting_mix(spec["setting"], train_mix, names, spec["target_domain"])
    anchor_view = PoolView(valid, anchor_ids(anchors, names, mix))
    eval_view = PoolView(valid, eval_ids(evaluation, spec["eval_per_domain"]))

    torch.manual_seed(spec["seed"])  # the same initial weights for every method of a seed
    if spec["kind"] == "sft":
        model, pad_id = sft_model(spec)
    else:
        pad_id = spec["pad_id"]
        model = tiny_llama(spec, spec["vocab"], pad_id)
        if spec["method"] == "partitionsel_proxy":
            spec["proxy_dir"] = str(out / "proxy_init")
            model.save_pretrained(spec["proxy_dir"])
    model.to(device)
    cfg = PartitionSelConfig.from_dict(partitionsel_block(spec))
    selector = Selector(model, cfg, pool, anchor_view, batch_size=spec["batch"], pad_token_id=pad_id)
    runner = TrainStep(selector, micro_batch=spec["batch"])  # the product's step; evaluation is eval_now's
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.95), weight_decay=spec.get("weight_decay", 0.0))
    selector.set_optimizer(opt)  # sketch.precondition "adam" reads its second moments
    main_over_proxy = None
    if selector.proxy is not None:
        from ds_partitionsel.proxy import flops_per_token

        main_over_proxy = flops_per_token(model, spec["seq"]) / flops_per_token(selector.proxy.model, spec["seq"])
    steps = spec["steps"]
    metrics = open(out / "metrics.jsonl.tmp", "w")
    wall = 0.0
    evals = []

    def eval_now(step):
        losses = evaluate(model, eval_view, pad_id, device)
        rec = {"kind": "eval", "step": step, "wall_s": round(wall, 3), "loss": losses}
        evals.append(rec)
        metrics.write(json.dumps(rec) + "\n")

    eval_now(0)
    totals = {"within": 0, "cross": 0, "within_conflict": 0, "cross_conflict": 0}
    pool_pairs = dict(totals)
    mix_counts = {n: 0 for n in names}
    sel_time = train_time = 0.0
    shrinks = []
    for step in range(steps):
        lr = lr_at(step, steps, spec["lr"])
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        sel = runner.begin(lr, step)
        t1 = time.perf_counter()
        for batch, weights in runner.micro_batches(sel):  # one: the whole batch
            loss = runner.loss(model, batch, weights, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        runner.finish(lr)  # the proxy's step
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        sel_time += t1 - t0
        train_time += t2 - t1
        wall += t2 - t0
        doms = pool.domains[sel.record_ids]
        for n, c in sel.domain_counts.items():
            mix_counts[n] += c
        rec = {"kind": "step", "step": step, "lr": lr, "loss": loss.item(), "select_s": round(t1 - t0, 4),
               "train_s": round(t2 - t1, 4), "domain_counts": sel.domain_counts}
        if selector.last_shrink is not None:  # validation.shrink: the step's lambda
            rec["shrink"] = selector.last_shrink
            shrinks.append(selector.last_shrink)
        if sel.selected_features is not None:
            pairs = pair_counts(sel.selected_features, doms)
            for key in totals:
                totals[key] += pairs[key]
            rec["pairs"] = pairs
        if spec["method"] == "random" and spec["kind"] == "pretrain" and step % spec["measure_interval"] == 0:
            # pool-wide base rates, and the random batch's own conflicts (random sketches nothing)
            feats = selector.sketch_records(pool, sel.plan.pool_ids.tolist())
            pool_doms = pool.domains[sel.plan.pool_ids]
            for key, v in pair_counts(feats, pool_doms).items():
                pool_pairs[key] += v
            pairs = pair_counts(feats[sel.indices], doms)
            for key in totals:
                totals[key] += pairs[key]
            rec["pairs"] = pairs
        metrics.write(json.dumps(rec) + "\n")
        if (step + 1) % spec["eval_interval"] == 0 or step + 1 == steps:
            eval_now(step + 1)
        if spec.get("progress") and (step + 1) % 50 == 0:
            print(f"  {spec['name']}: step {step + 1}/{steps}  loss {loss.item():.3f}  {wall:.0f}s", flush=True)
    metrics.close()
    os.replace(out / "metrics.jsonl.tmp", out / "metrics.jsonl")
    total_mix = sum(mix_counts.values()) or 1
    summary = {key: spec[key] for key in ("name", "kind", "method", "factor", "seed", "variant")}
    summary["setting"] = spec["setting_tag"]
    summary.update(evals=[{"step": e["step"], "wall_s": e["wall_s"], "loss": e["loss"]} for e in evals],
                   setting_mix=mix, train_mix=train_mix, selected_mix={n: c / total_mix for n, c in mix_counts.items()},
                   pairs=totals, pool_pairs=pool_pairs if spec["method"] == "random" else None,
                   select_s=sel_time / steps, train_s=train_time / steps, steps=steps, batch=spec["batch"],
                   anchors=len(anchor_view), eval_records=len(eval_view))
    if shrinks:
        summary["shrink_mean"] = sum(shrinks) / len(shrinks)
    if main_over_proxy is not None:
        summary["main_over_proxy"] = main_over_proxy
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


def sft_model(spec: dict):
    """SmolLM2-135M-Instruct from its local folder with LoRA (rank 16) on the last 3 blocks."""
    from ds_partitionsel.extras import require

    peft = require("peft", "the SFT phase of tools/evidence.py (LoRA)")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype="float32")
    n = model.config.num_hidden_layers
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, layers_to_transform=list(range(n - 3, n)),
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return get_peft_model(model, lora), pad


# --------------------------------------------------------------------------- data preparation

def prepare_pretrain(args) -> dict:
    """Corpus, tokenizer and packed pool of the pretraining phase (each built once)."""
    import subprocess

    from ds_partitionsel.corpus import train_tokenizer, write_corpus

    cache = (REPO / args.cache).resolve()
    work = cache / "evidence"
    work.mkdir(parents=True, exist_ok=True)
    if not args.corpus and not (cache / "demo_data" / "train.jsonl").exists():
        subprocess.run([sys.executable, str(REPO / "tools/fetch_demo_data.py"), "--data-only", "--cache", str(cache)],
                       check=True)
    if args.corpus:
        corpus = Path(args.corpus).resolve()
        if not corpus.is_file():
            raise SystemExit(f"--corpus {args.corpus}: no such file (a jsonl with \"text\" and \"domain\" per line)")
        work = work / corpus.stem  # tokenizer and pool of this corpus, apart from the demo's
        work.mkdir(parents=True, exist_ok=True)
    else:
        corpus = work / "corpus.jsonl"
        if not corpus.exists():
            print(f"corpus documents per domain: {write_corpus(str(cache / 'demo_data'), str(corpus))}", flush=True)
    tok = work / f"tokenizer{args.vocab}"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(str(corpus), str(tok), args.vocab)
    pool = work / f"pool_pack{args.seq}_v{args.vocab}"
    if not (pool / "manifest.json").exists():
        subprocess.run([sys.executable, str(REPO / "tools/build_pool.py"), "--tokenizer", str(tok), "--train",
                        str(corpus), "--text-field", "text", "--pack", str(args.seq), "--valid-fraction", "0.05",
                        "--out", str(pool)], check=True)
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tok))
    return {"pool": str(pool), "vocab": len(t), "pad_id": t.pad_token_id}


def prepare_sft(args) -> str:
    """The demo instruction pool (prompt masked) at ``--sft-max-tokens``, built once."""
    import subprocess

    cache = (REPO / args.cache).resolve()
    model = REPO / args.sft_model
    if not (model / "config.json").exists() or not (cache / "demo_data" / "train.jsonl").exists():
        subprocess.run([sys.executable, str(REPO / "tools/fetch_demo_data.py"), "--cache", str(cache)], check=True)
    pool = cache / "evidence" / f"sft_pool{args.sft_max_tokens}"
    if not (pool / "manifest.json").exists():
        data = cache / "demo_data"
        subprocess.run([sys.executable, str(REPO / "tools/build_pool.py"), "--tokenizer", str(model), "--train",
                        str(data / "train.jsonl"), "--valid", str(data / "valid.jsonl"), "--max-length",
                        str(args.sft_max_tokens), "--out", str(pool)], check=True)
    return str(pool)


# --------------------------------------------------------------------------- run lists

def auto_targets(pool_dir: str) -> list:
    """The pool's minority domain (smallest share) and its mid-size domain (share nearest 30%)."""
    from ds_partitionsel.data import CandidatePool

    pool = CandidatePool(pool_dir, "train")
    counts = pool.domain_counts().double()
    share = {n: float(c / counts.sum()) for n, c in zip(pool.domain_names, counts)}
    minority = min(share, key=share.get)
    mid = min((n for n in share if n != minority), key=lambda n: abs(share[n] - 0.3))
    return [minority, mid]


def setting_tags(args, data: dict) -> list:
    """The validation settings of a run list: ``matched`` and one target setting per target domain
    (``target`` for a single named one, as the kept results name it; else ``target:DOMAIN``)."""
    targets = args.target_domain
    if targets == ["auto"]:
        targets = auto_targets(data["pool"])
    tags = []
    for setting in args.settings:
        if setting == "matched":
            tags.append("matched")
        elif len(targets) == 1 and not args.corpora:
            tags.append("target")
        else:
            tags += [f"target:{d}" for d in targets]
    return tags


def pretrain_specs(args, data: dict) -> list:
    base = {"kind": "pretrain", "device": args.device, "pool": data["pool"], "vocab": data["vocab"],
            "pad_id": data["pad_id"], "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
            "seq": args.seq, "batch": args.batch, "steps": args.steps, "lr": args.lr, "anchors": args.anchors,
            "cheap_hidden": args.cheap_hidden, "cheap_steps_per_pool": args.cheap_steps_per_pool,
            "eval_interval": args.eval_interval, "eval_per_domain": args.eval_per_domain, "sketch": args.sketch,
            "target_domain": args.target_domain[0], "measure_interval": args.measure_interval,
            "weight_decay": 0.1, "variant": "default"}
    specs = []
    for factor in args.factors:
        for seed in args.seeds:
            for method in args.methods:
                settings = ["any"] if method in VALIDATION_FREE else setting_tags(args, data)
                for setting in settings:
                    name = f"pretrain/{setting.replace(':', '-')}/x{factor}/{method}/seed{seed}"
                    specs.append(dict(base, name=name, method=method, factor=factor, seed=seed,
                                      setting="matched" if setting == "any" else setting, setting_tag=setting))
    return specs


def ablation_specs(args, data: dict) -> list:
    specs = []
    for spec in pretrain_specs(argparse.Namespace(**dict(vars(args), factors=args.factors[:1],
                                                         methods=["partitionsel"])), data):
        for variant in args.ablations:
            overrides = ABLATIONS[variant]
            specs.append(dict(spec, name=spec["name"].replace("pretrain/", f"ablation/{variant}/"),
                              variant=variant, overrides=overrides))
    return specs


def sft_specs(args, pool: str) -> list:
    base = {"kind": "sft", "device": args.device, "pool": pool, "model": str(REPO / args.sft_model),
            "batch": args.sft_batch, "steps": args.sft_steps, "lr": args.sft_lr, "anchors": 4,
            "eval_interval": args.sft_eval_interval, "eval_per_domain": args.sft_eval_per_domain,
            "sketch": "exact", "target_domain": None, "measure_interval": 10 ** 9, "variant": "default",
            "sketch_micro": 4, "modules": 3}
    return [dict(base, name=f"sft/matched/x{args.sft_factor}/{m}/seed{s}", method=m, factor=args.sft_factor,
                 seed=s, setting="matched", setting_tag="any" if m in VALIDATION_FREE else "matched")
            for s in args.seeds for m in args.sft_methods]


def kept_names(results: Path) -> dict:
    """The runs already kept in ``<results>/runs.jsonl`` by name (a later session reuses them)."""
    kept = results / "runs.jsonl"
    if not kept.exists():
        return {}
    records = (json.loads(line) for line in kept.read_text().splitlines() if line.strip())
    return {rec["name"]: rec for rec in records}


# what a run's name does not say but its summary records: two runs that differ here are not one run
RUN_IDENTITY = ("kind", "method", "seed", "factor", "steps", "batch")


def other_run(spec: dict, record: dict) -> Optional[str]:
    """How ``record`` (a summary of the run folder or kept result named like ``spec``) differs
    from ``spec`` (e.g. ``"steps 300, not 2000"``), or None when it is the same run."""
    diff = [f"{key} {record[key]!r}, not {spec[key]!r}" for key in RUN_IDENTITY
            if key in spec and key in record and record[key] != spec[key]]
    return ", ".join(diff) or None


def run_specs(args, specs: list, kept: Optional[dict] = None) -> None:
    """Run what is not finished yet (no ``summary.json`` in its folder and not in ``kept``),
    ``--jobs`` at a time, with progress and an ETA. A folder or kept result of the same name
    from another experiment (other steps, batch, ...) stops it: names do not say those."""
    out = REPO / args.out
    kept = kept or {}
    # seed by seed: an interrupted experiment leaves whole seeds behind
    specs = sorted(specs, key=lambda spec: spec["seed"])
    todo = []
    for spec in specs:
        spec["dir"] = str(out / spec["name"])
        summary = Path(spec["dir"]) / "summary.json"
        found = [(f"run folder {spec['dir']}", json.loads(summary.read_text()))] if summary.exists() else []
        if spec["name"] in kept:
            found.append((f"kept results ({args.results})", kept[spec["name"]]))
        for where, record in found:
            if not args.fresh and other_run(spec, record):
                raise SystemExit(f"{where} holds another experiment's {spec['name']} ({other_run(spec, record)}); "
                                 f"give this one its own --out and --results")
        if args.fresh or not found:
            todo.append(spec)
    print(f"{len(specs) - len(todo)} of {len(specs)} runs already finished; {len(todo)} to run "
          f"({args.jobs} at a time)", flush=True)
    if not todo:
        return
    start = time.time()
    done = 0
    if args.jobs == 1:  # in this process (also how tests import the tool)
        for spec in todo:
            run_one(spec)
            done += 1
            print(f"[{done}/{len(todo)}] {spec['name']} done  ({time.time() - start:.0f}s)", flush=True)
        return
    # spawned workers import this file as the main script: run it as `python tools/evidence.py`
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = {ex.submit(run_one, spec): spec for spec in todo}
        for fut in as_completed(futures):
            spec = futures[fut]
            fut.result()  # a failed run stops the experiment with its traceback
            done += 1
            eta = (time.time() - start) / done * (len(todo) - done)
            print(f"[{done}/{len(todo)}] {spec['name']} done  ({time.time() - start:.0f}s, ETA {eta / 60:.0f} min)",
                  flush=True)



# --------------------------------------------------------------------------- results

def keep_results(out: Path, results: Path, names: Optional[set] = None) -> Path:
    """Merge every finished run's ``summary.json`` into ``<results>/runs.jsonl`` (one line per run,
    sorted by name; runs kept earlier and not rerun stay); with ``names``, only those runs (this
    experiment's: another one may share the run folder)."""
    results.mkdir(parents=True, exist_ok=True)
    kept = results / "runs.jsonl"
    runs = {}
    if kept.exists():
        for line in kept.read_text().splitlines():
            rec = json.loads(line)
            runs[rec["name"]] = rec
    for path in sorted(out.glob("**/summary.json")):
        rec = _rounded(json.loads(path.read_text()))
        if names is None or rec["name"] in names:
            runs[rec["name"]] = rec
    tmp = kept.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(runs[k], sort_keys=True) + "\n" for k in sorted(runs)))
    os.replace(tmp, kept)
    return kept


def _rounded(value, digits: int = 5):
    """Floats cut to ``digits`` decimals (kept results stay small; losses differ in the 2nd-3rd)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def ci95(values) -> dict:
    """Mean and the half-width of its 95% t-interval (n - 1 degrees of freedom) of the finite
    values; ``nonfinite`` counts the NaN/inf ones (a diverged run), which the tables flag.
    None (not measured, e.g. a target never reached) is left out silently."""
    from scipy import stats

    given = [float(v) for v in values if v is not None]
    vals = np.asarray([v for v in given if np.isfinite(v)], dtype=float)
    bad = {"nonfinite": len(given) - len(vals)} if len(given) > len(vals) else {}
    n = len(vals)
    if n == 0:
        return {"mean": None, "ci": None, "n": 0, **bad}
    half = float(stats.t.ppf(0.975, n - 1) * vals.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(vals.mean()), "ci": half, "n": n, **bad}


def score_mix(setting: str, train_mix: dict, target_domain: str) -> dict:
    return setting_mix(setting, train_mix, sorted(train_mix), target_domain)


def curve(run: dict, mix: dict) -> list:
    """``[(step, wall_s, score)]`` of a run, the score being the ``mix``-weighted held-out loss."""
    return [(e["step"], e["wall_s"], weighted_loss(e["loss"], mix)) for e in run["evals"]]


def time_to_target(points: list, target: float):
    """First eval ``(step, wall_s)`` whose score is at or below ``target``; ``(None, None)`` if none."""
    for step, wall, score in points:
        if step > 0 and score <= target:
            return step, wall
    return None, None


def group_runs(runs: list) -> dict:
    """{(kind, variant, factor, setting): {method: {seed: run}}}, the validation-free runs under
    every setting that other methods ran in."""
    groups = {}
    seen = sorted({run["setting"] for run in runs if run["setting"] != "any"}) or list(SETTINGS)
    for run in runs:
        settings = seen if run["setting"] == "any" else [run["setting"]]
        for setting in settings:
            key = (run["kind"], run["variant"], run["factor"], setting)
            groups.setdefault(key, {}).setdefault(run["method"], {})[run["seed"]] = run
    # a setting that no anchor-reading method ran in has nothing to compare
    return {key: methods for key, methods in groups.items() if set(methods) - set(VALIDATION_FREE)}


def method_table(methods: dict, setting: str, target_domain: str, reference: str = "partitionsel") -> dict:
    """Per method: final score, paired differences to ``reference`` and to ``random``, time to
    random's final score, per-domain losses, selected mix, conflicting pairs, seconds per step."""
    rows = {}
    ref = methods.get(reference, {})
    rnd = methods.get("random", {})

    def final(run):
        mix = score_mix(setting, run["train_mix"], target_domain)
        return curve(run, mix)[-1][2]

    for method, seeds in methods.items():
        finals = {s: final(r) for s, r in seeds.items()}
        row = {"score": ci95(finals.values()), "seeds": sorted(seeds)}
        for other, name in ((ref, "vs_ref"), (rnd, "vs_random")):
            common = sorted(set(seeds) & set(other))
            diffs = [finals[s] - final(other[s]) for s in common]
            row[name] = dict(ci95(diffs), lower=sum(d < 0 for d in diffs), seeds=len(common))
        steps, walls, ratios, reached = [], [], [], 0
        for s, run in seeds.items():
            if s not in rnd:
                continue
            step, wall = time_to_target(curve(run, score_mix(setting, run["train_mix"], target_domain)), final(rnd[s]))
            if step is not None:
                reached += 1
                steps.append(step)
                walls.append(wall)
                ratios.append(wall / max(rnd[s]["evals"][-1]["wall_s"], 1e-9))
        row["steps_to_target"] = dict(ci95(steps), reached=reached, of=len(set(seeds) & set(rnd)))
        row["wall_to_target"] = ci95(walls)
        # wall (selection + training) to random's final loss over random's own wall for its 300
        # steps, paired by seed; comparable only when both ran under the same load (one invocation)
        row["wall_over_random"] = ci95(ratios)
        domains = sorted(next(iter(seeds.values()))["evals"][-1]["loss"])
        row["domain_loss"] = {d: ci95([r["evals"][-1]["loss"][d] for r in seeds.values()])["mean"] for d in domains}
        row["selected_mix"] = {d: float(np.mean([r["selected_mix"][d] for r in seeds.values()])) for d in domains}
        row["select_s"] = float(np.mean([r["select_s"] for r in seeds.values()]))
        row["train_s"] = float(np.mean([r["train_s"] for r in seeds.values()]))
        pairs = [r["pairs"] for r in seeds.values() if r["pairs"]["within"] + r["pairs"]["cross"] > 0]
        if pairs:
            row["pairs"] = pair_summary(pairs, seeds)
        rows[method] = row
    return rows


def conflict_rate(pairs: dict, kind: str):
    """Share of a run's ``kind`` ("within" / "cross") pairs that conflict; None without such pairs."""
    return pairs[f"{kind}_conflict"] / pairs[kind] if pairs and pairs[kind] else None


def conflicts_per_batch(run: dict):
    """Conflicting pairs per selected batch of ``run`` (its measured pairs over its batches)."""
    k, p = run["batch"], run["pairs"]
    total = p["within"] + p["cross"]
    return (p["within_conflict"] + p["cross_conflict"]) / (total / (k * (k - 1) / 2)) if total else None


def pair_summary(pairs: list, seeds: dict) -> dict:
    """Conflicting pairs per batch and conflict rates within / across domains (means over seeds)."""
    def rates(measured):
        return {"within_rate": ci95([conflict_rate(p, "within") for p in measured]),
                "cross_rate": ci95([conflict_rate(p, "cross") for p in measured]),
                "cross_share": ci95([p["cross"] / (p["within"] + p["cross"]) for p in measured])}

    out = dict(per_batch=ci95([conflicts_per_batch(r) for r in seeds.values()]), **rates(pairs))
    pool = [r["pool_pairs"] for r in seeds.values() if r.get("pool_pairs") and r["pool_pairs"]["within"]]
    if pool:
        out["pool"] = rates(pool)
    return out



CLAIMS = (  # (claim, reference method, baselines it must beat)
    ("better than per-domain selection", ("greats_domain", "iwd")),
    ("better than domain-agnostic selection", ("greats", "gradmatch")),
    ("better than random", ("random",)),
)


def _pm(cell, spec=".3f") -> str:
    flag = f" (**{cell['nonfinite']} diverged**)" if cell and cell.get("nonfinite") else ""
    if not cell or cell.get("mean") is None:
        return "–" + flag
    ci = cell.get("ci")
    return f"{cell['mean']:{spec}}" + (f" ± {ci:{spec}}" if ci is not None and np.isfinite(ci) else "") + flag


def verdict(cell) -> str:
    """Reading of a paired difference (reference minus baseline; negative: the reference is better)."""
    if cell and cell.get("nonfinite"):
        return "diverged runs"
    if not cell or cell.get("mean") is None or cell.get("ci") is None or not np.isfinite(cell["ci"]):
        return "n/a"
    lo, hi = cell["mean"] - cell["ci"], cell["mean"] + cell["ci"]
    if hi < 0:
        return "supported"
    if lo > 0:
        return "reversed"
    return "not resolved"


def table_markdown(title: str, rows: dict, order: list, reference: str) -> str:
    domains = sorted(next(iter(rows.values()))["domain_loss"])
    head = (f"| method | held-out loss (setting mix) | Δ vs {reference} (paired) | {reference} lower (seeds) | "
            f"Δ vs random (paired) | steps to random's final | wall s to it | "
            + " | ".join(f"{d}" for d in domains) + " | selected mix (" + "/".join(domains) +
            ") | conflicting pairs / batch | select s / step | train s / step |")
    lines = [f"#### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for method in order:
        if method not in rows:
            continue
        r = rows[method]
        st = r["steps_to_target"]
        reached = f"{_pm(st, '.0f')} ({st['reached']}/{st['of']})" if st["of"] else "–"
        pairs = _pm(r["pairs"]["per_batch"], ".1f") if "pairs" in r else "–"
        lines.append(
            f"| {method} | {_pm(r['score'])} | {_pm(r['vs_ref']) if method != reference else '–'} | "
            + ("– | " if method == reference else f"{r['vs_ref']['seeds'] - r['vs_ref']['lower']}/{r['vs_ref']['seeds']} | ")
            + f"{_pm(r['vs_random']) if method != 'random' else '–'} | {reached} | {_wall(r)} | "
            + " | ".join(f"{r['domain_loss'][d]:.3f}" for d in domains)
            + " | " + "/".join(f"{100 * r['selected_mix'][d]:.0f}" for d in domains) + "% | "
            + f"{pairs} | {r['select_s']:.3f} | {r['train_s']:.3f} |")
    return "\n".join(lines) + "\n"


def _wall(row: dict) -> str:
    """Wall seconds to random's final loss, and that over random's whole wall (paired)."""
    if not row["wall_to_target"].get("n"):
        return _pm(row["wall_to_target"], ".1f")
    return f"{_pm(row['wall_to_target'], '.1f')} ({_pm(row['wall_over_random'], '.2f')} of random's)"


def pairs_markdown(rows: dict, order: list) -> str:
    head = ("| method | conflicting pairs / batch | conflict rate within a domain | conflict rate across domains | "
            "cross-domain share of pairs |")
    lines = [head, "|---|---|---|---|---|"]
    pool = next((r["pairs"]["pool"] for r in rows.values() if "pairs" in r and "pool" in r["pairs"]), None)
    if pool:
        lines.append(f"| *the whole pool (base rate)* | – | {_pm(pool['within_rate'])} | {_pm(pool['cross_rate'])} | "
                     f"{_pm(pool['cross_share'])} |")
    for method in order:
        if method in rows and "pairs" in rows[method]:
            p = rows[method]["pairs"]
            lines.append(f"| {method} | {_pm(p['per_batch'], '.1f')} | {_pm(p['within_rate'])} | "
                         f"{_pm(p['cross_rate'])} | {_pm(p['cross_share'])} |")
    return "\n".join(lines) + "\n"


def paired_pairs(methods: dict, reference: str, other: str):
    """Paired difference of conflicting pairs per batch (reference minus other) over common seeds."""
    a, b = methods.get(reference, {}), methods.get(other, {})
    pairs = [(conflicts_per_batch(a[s]), conflicts_per_batch(b[s])) for s in sorted(set(a) & set(b))]
    diffs = [x - y for x, y in pairs if x is not None and y is not None]
    return dict(ci95(diffs), lower=sum(d < 0 for d in diffs), seeds=len(diffs))


def conflict_rate_diffs(methods: dict, reference: str = "partitionsel") -> dict:
    """The conflicting-pairs hypothesis as paired differences of conflict rates (reference minus
    other, per seed): within a domain and across domains, against the other selectors and
    against the pool's own rate (measured in the ``random`` run of the same seed)."""
    ref = methods.get(reference, {})
    out = {}
    for other in [m for m in ("iwd", "greats_domain", "greats", "random") if m in methods] + ["pool"]:
        source = methods.get("random", {}) if other == "pool" else methods[other]
        key = "pool_pairs" if other == "pool" else "pairs"
        row = {}
        for kind in ("within", "cross"):
            pairs = [(conflict_rate(ref[s]["pairs"], kind), conflict_rate(source[s].get(key), kind))
                     for s in sorted(set(ref) & set(source))]
            row[kind] = ci95([x - y for x, y in pairs if x is not None and y is not None])
        out[other] = row
    return out


def plot_curves(methods: dict, setting: str, target_domain: str, path: Path, title: str) -> None:
    from ds_partitionsel.extras import require

    require("matplotlib", "the plots of tools/evidence.py").use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    rnd = methods.get("random", {})
    for method, seeds in methods.items():
        common = sorted(set(seeds) & set(rnd))
        if not common:
            continue
        curves = [curve(seeds[s], score_mix(setting, seeds[s]["train_mix"], target_domain)) for s in common]
        base = [curve(rnd[s], score_mix(setting, rnd[s]["train_mix"], target_domain)) for s in common]
        n = min(len(c) for c in curves + base)
        steps = [c[0] for c in curves[0][:n]]
        score = np.array([[p[2] for p in c[:n]] for c in curves])
        diff = score - np.array([[p[2] for p in c[:n]] for c in base])
        style = dict(lw=2.2 if method.startswith("partitionsel") else 1.2,
                     ls="--" if method in VALIDATION_FREE else "-")
        axes[0].plot(steps, score.mean(0), label=method, **style)
        mean, half = diff.mean(0), np.array([ci95(diff[:, j])["ci"] or 0.0 for j in range(n)])
        axes[1].plot(steps, mean, label=method, **style)
        if method == "partitionsel":  # one band keeps the plot readable; the tables hold every CI
            axes[1].fill_between(steps, mean - half, mean + half, alpha=0.15, color=axes[1].lines[-1].get_color())
    axes[0].set(xlabel="step", ylabel="held-out loss (setting mix)", yscale="log")
    axes[0].set_title(title, fontsize=9)
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(xlabel="step", ylabel="Δ vs random (paired by seed)")
    axes[1].set_title("difference to random, same seed (band: PartitionSel's 95% CI)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_domains(methods: dict, path: Path, title: str, show=("random", "greats", "greats_domain", "partitionsel")) -> None:
    from ds_partitionsel.extras import require

    require("matplotlib", "the plots of tools/evidence.py").use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted(next(iter(next(iter(methods.values())).values()))["evals"][-1]["loss"])
    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.6))
    for ax, d in zip(np.atleast_1d(axes), domains):
        for method in show:
            if method not in methods:
                continue
            runs = list(methods[method].values())
            n = min(len(r["evals"]) for r in runs)
            steps = [e["step"] for e in runs[0]["evals"][:n]]
            ax.plot(steps, np.mean([[e["loss"][d] for e in r["evals"][:n]] for r in runs], 0), label=method)
        ax.set(title=f"{d}", xlabel="step", ylabel="held-out loss", yscale="log")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: Path, target_domain: str = "code") -> dict:
    """Tables (``tables.md``, ``tables.json``) and plots from ``<results>/runs.jsonl``."""
    kept = results / "runs.jsonl"
    if not kept.exists():
        raise SystemExit(f"no kept results at {kept}: run the experiment first (python tools/evidence.py)")
    runs = [json.loads(line) for line in kept.read_text().splitlines()]
    groups = group_runs(runs)
    md, out = [], {}
    for (kind, variant, factor, setting), methods in sorted(groups.items()):
        if variant != "default":
            continue
        tag = f"{kind}_{setting}_x{factor}"
        rows = method_table(methods, setting, target_domain)
        order = [m for m in METHODS if m in rows]
        seeds = sorted({s for m in methods.values() for s in m})
        steps = next(iter(next(iter(methods.values())).values()))["steps"]
        title = (f"{kind}, {setting} validation, pool {factor}x the batch ({100 / factor:.1f}% selected), "
                 f"{steps} steps, seeds {seeds}")
        md.append(table_markdown(title, rows, order, "partitionsel"))
        claims = {}
        for claim, baselines in CLAIMS:
            # the rows hold baseline minus reference; a claim reads reference minus baseline
            cells = {b: dict(rows[b]["vs_ref"], mean=-rows[b]["vs_ref"]["mean"]) for b in baselines
                     if b in rows and rows[b]["vs_ref"]["mean"] is not None}
            claims[claim] = {b: {"diff": c, "verdict": verdict(c)} for b, c in cells.items()}
        pairs = {b: paired_pairs(methods, "partitionsel", b) for b in ("greats", "greats_domain", "iwd", "random")
                 if b in methods}
        claims["fewer conflicting pairs"] = {b: {"diff": c, "verdict": verdict(c)} for b, c in pairs.items()}
        md.append("Claims (Δ = partitionsel minus baseline, paired by seed, 95% CI; "
                  "supported = the whole interval favours PartitionSel):\n")
        for claim, cells in claims.items():
            md.append(f"- {claim}: " + "; ".join(f"vs {b} {_pm(c['diff'], '.4f')} → {c['verdict']}"
                                                  for b, c in cells.items()))
        md.append("")
        if any("pairs" in r for r in rows.values()):
            md.append(pairs_markdown(rows, order))
            rates = conflict_rate_diffs(methods)
            md.append("Conflict rates of PartitionSel minus another selector's (paired by seed, 95% CI; "
                      "`pool`: the rate among all pairs of the pool, measured in the random run):\n")
            md.append("| vs | within a domain | across domains |\n|---|---|---|")
            md += [f"| {other} | {_pm(r['within'], '.3f')} | {_pm(r['cross'], '.3f')} |" for other, r in rates.items()]
            md.append("")
            claims["conflict rates"] = rates
        plot_curves(methods, setting, target_domain, results / f"{tag.replace(':', '-')}.png", title)
        plot_domains(methods, results / f"{tag.replace(':', '-')}_domains.png", title)
        out[tag] = {"rows": rows, "claims": claims}
    # ablations: each variant against the default PartitionSel of the same seeds
    abl = {}
    for (kind, variant, factor, setting), methods in sorted(groups.items()):
        if variant == "default" or kind != "pretrain":
            continue
        ref = groups.get(("pretrain", "default", factor, setting), {})
        both = {"partitionsel (default)": ref.get("partitionsel", {}), variant: methods.get("partitionsel", {}),
                "random": ref.get("random", {})}
        rows = method_table(both, setting, target_domain, reference="partitionsel (default)")
        abl[f"{variant} @ {setting}"] = dict(rows[variant], variant=variant, setting=setting)
    if abl:
        factor = next(iter({k[2] for k in groups if k[1] != "default"}))
        md.append(f"#### Ablations: PartitionSel variants vs the default (pretrain, pool {factor}x)\n")
        md.append("| variant | setting | held-out loss | Δ variant − default (paired) | Δ variant − random | "
                  "default lower (seeds) | conflicting pairs / batch | selected mix |")
        md.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(abl.values(), key=lambda r: (r["variant"], r["setting"])):
            pairs = _pm(r["pairs"]["per_batch"], ".1f") if "pairs" in r else "–"
            mix = "/".join(f"{100 * v:.0f}" for _, v in sorted(r["selected_mix"].items()))
            md.append(f"| {r['variant']} | {r['setting']} | {_pm(r['score'])} | {_pm(r['vs_ref'], '.4f')} | "
                      f"{_pm(r['vs_random'], '.4f')} | "
                      f"{r['vs_ref']['seeds'] - r['vs_ref']['lower']}/{r['vs_ref']['seeds']} | {pairs} | {mix}% |")
        md.append("")
        out["ablations"] = abl
    (results / "tables.md").write_text("\n".join(md) + "\n")
    (results / "tables.json").write_text(json.dumps(out, indent=1, sort_keys=True))
    print("\n".join(md))
    return out


SUMMARY_BASELINES = ("random", "gradmatch", "iwd", "greats_domain")


def corpus_name(corpus: str) -> str:
    return "demo" if corpus == "demo" else Path(corpus).stem


def summary(root: Path, names: list) -> str:
    """One table across corpora: per corpus and setting, PartitionSel minus each baseline (final
    held-out loss under the setting's mix, paired by seed, 95% CI), and the target domain's share
    of the selected batches. Written to ``<root>/summary.md`` and ``summary.json``."""
    lines = ["| corpus | setting | " + " | ".join(f"Δ vs {b}" for b in SUMMARY_BASELINES)
             + " | target share: random / partitionsel / gradmatch |",
             "|---|---|" + "---|" * len(SUMMARY_BASELINES) + "---|"]
    data = {}
    for name in names:
        path = root / name / "tables.json"
        if not path.exists():
            continue
        tables = json.loads(path.read_text())
        for tag, table in sorted(tables.items()):
            if tag == "ablations" or not tag.startswith("pretrain_"):
                continue
            rows = table["rows"]
            setting = tag[len("pretrain_"):].rsplit("_x", 1)[0]
            cells = {}
            for b in SUMMARY_BASELINES:
                if b in rows and rows[b]["vs_ref"]["mean"] is not None:
                    d = rows[b]["vs_ref"]
                    cells[b] = dict(d, mean=-d["mean"], verdict=verdict(dict(d, mean=-d["mean"])))
            share = "–"
            if setting.startswith("target"):
                dom = setting.split(":", 1)[1] if ":" in setting else None
                if dom:
                    share = " / ".join(f"{100 * rows[m]['selected_mix'].get(dom, 0):.0f}%" if m in rows else "–"
                                       for m in ("random", "partitionsel", "gradmatch"))
            data[f"{name} {setting}"] = {"corpus": name, "setting": setting, "vs": cells}
            lines.append(f"| {name} | {setting} | " + " | ".join(
                f"{_pm(cells[b], '.3f')} ({cells[b]['verdict']})" if b in cells else "–" for b in SUMMARY_BASELINES)
                + f" | {share} |")
    text = ("Δ = final held-out loss of the default `partitionsel` minus the baseline's, paired by seed, "
            "95% CI (negative: PartitionSel better).\n\n" + "\n".join(lines) + "\n")
    (root / "summary.md").write_text(text)
    (root / "summary.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    return text


def run_corpora(args) -> int:
    """The whole comparison on each of ``--corpora`` in turn, then the table across them."""
    root = REPO / args.results / "evidence"
    names = []
    for corpus in args.corpora:
        name = corpus_name(corpus)
        names.append(name)
        print(f"=== corpus {name}", flush=True)
        sub = argparse.Namespace(**dict(vars(args), corpus=None if corpus == "demo" else corpus,
                                        out=str(Path(args.out) / name),
                                        target_domain=args.target_domain if args.target_domain != ["code"] else ["auto"]))
        results = root / name
        if not args.report_only:
            data = prepare_pretrain(sub)
            specs = (pretrain_specs(sub, data) if "pretrain" in args.phase else []) + \
                (ablation_specs(sub, data) if "ablation" in args.phase else [])
            run_specs(sub, specs, kept_names(results))
            keep_results(REPO / sub.out, results, {spec["name"] for spec in specs})
        report(results, sub.target_domain[0])
    print(summary(root, names))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.corpora:
        return run_corpora(args)
    results = REPO / args.results / "evidence"
    if not args.report_only:
        specs = []
        if "pretrain" in args.phase or "ablation" in args.phase:
            data = prepare_pretrain(args)
            if "pretrain" in args.phase:
                specs += pretrain_specs(args, data)
            if "ablation" in args.phase:
                specs += ablation_specs(args, data)
        if "sft" in args.phase:
            specs += sft_specs(args, prepare_sft(args))
        run_specs(args, specs, kept_names(results))
        keep_results(REPO / args.out, results, {spec["name"] for spec in specs})
    report(results, args.target_domain[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
