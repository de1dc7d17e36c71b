#!/usr/bin/env python
"""PartitionSel against its baselines: same seeds, pools, steps and optimizer; table and plots.

Every (selection fraction, seed, method) is one training run of ``launch/train.py`` under the
``deepspeed`` launcher (``--ranks`` data-parallel ranks, ZeRO-2). The runs of one
(fraction, seed) differ only in ``partitionsel.method``: the per-step candidate pools, the
validation anchors, the held-out evaluation subset and the optimizer are the same. One more run
per seed evaluates the untrained model on that seed's eval subset (the step-0 reference). Then

    <out>/runs/f<percent>/<method>/seed<s>/{metrics.jsonl,summary.json,train.log}  (f12p5: 12.5%)
    <out>/runs/untrained/seed<s>/...
    <results>/runs/...            the same metrics.jsonl / summary.json, kept (small)
    <results>/table.json          per (fraction, method): mean and std over seeds
    <results>/table.md            the markdown table that docs/RESULTS.md embeds
    <results>/f<percent>/         plots and summary.md of tools/analyze_run.py on seed-mean logs

Default: the whole pretrained SmolLM2-135M-Instruct (30 blocks), LoRA rank 16 on its last 3
blocks, trained and sketched as in the paper; CPU-sized in everything else (batch 4, 4 steps,
24 held-out sequences per eval): about an hour on 2 cores. Finished runs are reused, so an
interrupted experiment continues where it stopped. Scale the same experiment up on GPUs:

    python tools/experiment.py                                   # CPU default
    python tools/experiment.py --report-only                     # table + plots from kept logs
    python tools/experiment.py --device gpu --ranks 8 --micro-batch 4 --sketch-micro-batch 8 \\
        --anchors 8 --steps 300 --eval-interval 25 --eval-samples 0 --seeds 1 2 3 4 5 \\
        --out runs/experiment_gpu --results runs/experiment_gpu/results
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ds_partitionsel.launch_env import free_port  # noqa: E402
from ds_partitionsel.records import dumps, loads, read_metrics  # noqa: E402

METHODS = ("partitionsel", "random", "greats", "greats_domain", "iwd", "gradmatch")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=".cache/models/smollm2-135m", help="local HF model folder")
    src.add_argument("--tiny", choices=["llama", "qwen2"], help="tiny model from a config (tests)")
    ap.add_argument("--pool", default=".cache/pools/demo256", help="pool directory (tools/build_pool.py)")
    ap.add_argument("--num-layers", type=int, default=0, help="keep only the first N pretrained blocks (0: all)")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                    help="LoRA (rank 16) on the last 3 blocks, sketched exactly (the paper's features); "
                         "--no-lora: full fine-tuning, last 3 blocks sketched with Kronecker projections")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.125, 0.25],
                    help="selected batch / candidate pool (0.125: pool 8x the batch)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2, help="selected sequences per rank and step")
    ap.add_argument("--lr", type=float, default=None, help="optimizer lr (default: the DeepSpeed config's)")
    ap.add_argument("--eval-interval", type=int, default=2)
    ap.add_argument("--eval-samples", type=int, default=24, help="held-out subset per eval (0: all)")
    ap.add_argument("--anchors", type=int, default=4, help="validation anchors per step (paper: 4 to 16)")
    ap.add_argument("--sketch-micro-batch", type=int, default=1,
                    help="sequences per sketch forward (1: no padding waste on CPU; raise on GPUs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="extra partitionsel override for every run")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--out", default="runs/experiment", help="run directories go here")
    ap.add_argument("--results", default="docs/results", help="table, plots and kept logs go here")
    ap.add_argument("--fresh", action="store_true", help="rerun finished runs too (default: reuse them)")
    ap.add_argument("--report-only", action="store_true",
                    help="no training: rebuild table and plots from the logs kept under --results")
    ap.add_argument("--run-timeout", type=float, default=1800.0, help="seconds before a run is killed")
    return ap.parse_args(argv)


def frac_tag(fraction: float) -> str:
    return f"f{fraction * 100:g}".replace(".", "p")


def pool_factor(fraction: float) -> int:
    factor = 1.0 / fraction
    if abs(factor - round(factor)) > 1e-9:
        raise SystemExit(f"selection fraction {fraction} must be 1/integer (pool = integer x batch)")
    return int(round(factor))




# ----------------------------------------------------------------------------- running


def write_ds_config(args, path: Path) -> Path:
    """The DeepSpeed config shared by every run: the repo's ZeRO-2 config with our batch size."""
    base = REPO / "ds_configs" / ("zero2_lora.json" if args.lora else "zero2.json")
    cfg = json.loads(base.read_text())
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
    cfg["gradient_accumulation_steps"] = 1
    cfg.pop("csv_monitor", None)  # metrics.jsonl is the log; no csv files scattered over runs/
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return path


def train_command(args, ds_config: Path, method: str, fraction, seed: int, out_dir: Path) -> list:
    """The launch/train.py command of one run; ``method="untrained"``: evaluate only, no step."""
    untrained = method == "untrained"
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(args.ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launch/train.py"]
    cmd += ["--tiny", args.tiny] if args.tiny else ["--model", args.model]
    if args.num_layers:
        cmd += ["--num-layers", str(args.num_layers)]
    if args.lora:
        cmd.append("--lora")
    cmd += ["--pool", args.pool, "--deepspeed_config", str(ds_config),
            "--steps", "0" if untrained else str(args.steps), "--method", "random" if untrained else method,
            "--seed", str(seed), "--output-dir", str(out_dir),
            "--set", f"pool_factor={pool_factor(fraction or 1)}",
            "--set", f"eval_interval={args.eval_interval}", "--set", f"eval_samples={args.eval_samples}",
            "--set", f"sketch.micro_batch={args.sketch_micro_batch}",
            "--set", f"validation.anchors={args.anchors}"]
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    for item in args.set:
        cmd += ["--set", item]
    if untrained or not args.eval_interval or args.steps % args.eval_interval:
        cmd.append("--eval-at-end")  # the last eval must be at the last step, for every method
    return cmd


def run_one(args, cmd: list, out_dir: Path) -> float:
    """Run one training to completion; returns wall seconds. Raises with the log tail on failure."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    log = out_dir / "train.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("+ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=args.run_timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - t0
    if code != 0 or not (out_dir / "summary.json").is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"run {out_dir} failed ({code}); log {log}:\n{tail}")
    return seconds


def run_all(args) -> list:
    """Run every (fraction, seed, method) not finished yet; returns the failures (and goes on)."""
    from tqdm import tqdm

    out = REPO / args.out
    ds_config = write_ds_config(args, out / "ds_config.json")
    (REPO / args.results).mkdir(parents=True, exist_ok=True)
    shutil.copy(ds_config, REPO / args.results / "ds_config.json")  # the config the kept logs came from
    (REPO / args.results / "experiment_args.json").write_text(json.dumps(vars(args), indent=2))
    jobs = [(f, s, m) for f in args.fractions for s in args.seeds for m in args.methods]
    jobs += [(None, s, "untrained") for s in args.seeds]  # held-out loss before any step, per seed
    bar = tqdm(jobs, desc="experiment", unit="run")
    failures = []
    for fraction, seed, method in bar:
        where = Path(frac_tag(fraction)) / method if fraction else Path(method)
        run_dir = out / "runs" / where / f"seed{seed}"
        bar.set_postfix_str(f"{where} seed{seed}")
        summary = run_dir / "summary.json"
        if summary.is_file() and not args.fresh:
            continue
        cmd = train_command(args, ds_config, method, fraction, seed, run_dir)
        try:
            seconds = run_one(args, cmd, run_dir)
        except RuntimeError as e:
            tqdm.write(str(e), file=sys.stderr)
            failures.append(str(run_dir))
            continue
        data = loads(summary.read_text())
        data.update(fraction=fraction, seed=seed, wall_s=round(seconds, 1))
        summary.write_text(dumps(data, indent=2))  # strict JSON: a NaN loss as "NaN"
        keep_logs(run_dir, REPO / args.results / "runs" / where / f"seed{seed}")
    return failures


def keep_logs(run_dir: Path, dest: Path) -> None:
    """Copy a run's metrics.jsonl (without the long selected-id lists) and summary.json."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "summary.json", dest / "summary.json")
    with open(run_dir / "metrics.jsonl") as src, open(dest / "metrics.jsonl", "w") as dst:
        for line in src:
            if not line.endswith("\n"):
                break  # a torn last line (the run stopped while writing it)
            rec = loads(line)
            rec.pop("selected", None)
            dst.write(dumps(rec) + "\n")


# ----------------------------------------------------------------------------- aggregation


def read_records(path: Path) -> list:
    """A run's records as plain dicts (``kind`` "step" or "eval"), through the package's one reader."""
    steps, evals = read_metrics(path)
    return [r.to_json() for r in steps] + [r.to_json() for r in evals]


def run_stats(records: list) -> dict:
    """One run's numbers: last held-out loss per domain, pairs, domain mix, seconds per step."""
    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    last_eval = max(evals, key=lambda r: r["step"]) if evals else None
    pairs = [r["conflicting_pairs"] for r in steps if r.get("conflicting_pairs") is not None]
    mix = {}
    for r in steps:
        for d, c in r["domain_counts"].items():
            mix[d] = mix.get(d, 0) + c
    total = sum(mix.values()) or 1
    # step 0 pays one-off warm-up (allocator, first collectives): time from step 1 on
    timed = [r for r in steps if r["step"] > 0] or steps
    # a diverged run: the first step whose training or held-out loss is NaN or infinite
    bad = [r["step"] for r in steps if not np.isfinite(r["train_loss"])] + \
        [r["step"] for r in evals if not all(np.isfinite(v) for v in r["eval_loss"].values())]
    times = {k: float(np.mean([r["time_s"][k] for r in timed])) for k in timed[0]["time_s"]} if timed else {}
    return {
        "eval_step": last_eval["step"] if last_eval else None,
        "eval_loss": last_eval["eval_loss"] if last_eval else {},
        "conflicting_pairs": float(np.mean(pairs)) if pairs else None,
        "mix": {d: c / total for d, c in sorted(mix.items())},
        "time_s": times,
        "non_finite_step": min(bad) if bad else None,
    }


def mean_std(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def load_results(root: Path) -> dict:
    """{fraction tag: {method: {seed: records}}} from ``root/runs``."""
    found = {}
    for path in sorted((root / "runs").glob("f*/*/seed*/metrics.jsonl")):
        seed_dir = path.parent
        tag, method, seed = seed_dir.parent.parent.name, seed_dir.parent.name, int(seed_dir.name[4:])
        found.setdefault(tag, {}).setdefault(method, {})[seed] = read_records(path)
    return found


def load_untrained(root: Path) -> dict:
    """{seed: held-out loss per domain before training} from ``root/runs/untrained``."""
    out = {}
    for path in sorted((root / "runs" / "untrained").glob("seed*/metrics.jsonl")):
        _, evals = read_metrics(path)
        if evals:
            out[int(path.parent.name[4:])] = evals[-1].eval_loss
    return out


def aggregate(found: dict, untrained: dict) -> dict:
    """Per fraction and method: mean/std over seeds of every table quantity, plus the paired
    differences of mean held-out loss against PartitionSel (same seed = same pools and eval set)
    and against the untrained model (``untrained``: {seed: eval loss}, same eval subset)."""
    table = {}
    for tag, methods in sorted(found.items()):
        stats = {m: {s: run_stats(recs) for s, recs in seeds.items()} for m, seeds in methods.items()}
        domains = sorted({d for per_seed in stats.values() for st in per_seed.values()
                          for d in st["eval_loss"] if d != "mean"})
        ref = stats.get("random", {})
        ref_time = {s: st["time_s"].get("total") for s, st in ref.items()}
        ours = stats.get("partitionsel", {})
        rows = {}
        for method in sorted(stats, key=lambda m: (METHODS.index(m) if m in METHODS else 99, m)):
            per_seed = stats[method]
            seeds = sorted(per_seed)
            row = {"seeds": seeds, "eval_step": sorted({st["eval_step"] for st in per_seed.values()})}
            row["eval_loss"] = {d: mean_std([per_seed[s]["eval_loss"].get(d) for s in seeds])
                                for d in domains + ["mean"]}
            row["conflicting_pairs"] = mean_std([per_seed[s]["conflicting_pairs"] for s in seeds])
            row["mix"] = {d: float(np.mean([per_seed[s]["mix"].get(d, 0.0) for s in seeds])) for d in domains}
            row["time_s"] = {k: mean_std([per_seed[s]["time_s"].get(k) for s in seeds])
                             for k in ("sketch", "select", "train", "total")}
            row["overhead_s"] = mean_std([per_seed[s]["time_s"]["total"] - ref_time[s] for s in seeds
                                          if ref_time.get(s) is not None and per_seed[s]["time_s"]])
            row["delta_vs_partitionsel"] = mean_std([
                per_seed[s]["eval_loss"]["mean"] - ours[s]["eval_loss"]["mean"] for s in seeds
                if s in ours and "mean" in per_seed[s]["eval_loss"] and "mean" in ours[s]["eval_loss"]])
            row["delta_vs_untrained"] = mean_std([
                per_seed[s]["eval_loss"]["mean"] - untrained[s]["mean"] for s in seeds
                if s in untrained and "mean" in per_seed[s]["eval_loss"]])
            row["diverged"] = {s: per_seed[s]["non_finite_step"] for s in seeds
                               if per_seed[s]["non_finite_step"] is not None}
            row["partitionsel_better"] = sum(
                1 for s in seeds if s in ours and per_seed[s]["eval_loss"].get("mean") is not None
                and ours[s]["eval_loss"].get("mean") is not None
                and ours[s]["eval_loss"]["mean"] < per_seed[s]["eval_loss"]["mean"])
            rows[method] = row
        seeds = sorted({s for row in rows.values() for s in row["seeds"]})
        before = {d: mean_std([untrained[s].get(d) for s in seeds if s in untrained]) for d in domains + ["mean"]}
        table[tag] = {"domains": domains, "methods": rows, "untrained": before}
    return table


def _ms(cell, spec=".3f"):
    if cell is None:
        return "–"
    if cell["n"] < 2:
        return format(cell["mean"], spec)
    return f"{format(cell['mean'], spec)} ± {format(cell['std'], spec.lstrip('+'))}"


def table_markdown(table: dict) -> str:
    lines = []
    for tag, block in table.items():
        domains, rows = block["domains"], block["methods"]
        any_row = next(iter(rows.values()))
        pct = tag[1:].replace("p", ".")
        lines += [f"#### Selection fraction {pct}% (pool = {100 / float(pct):g} x batch), "
                  f"held-out loss at step {', '.join(map(str, any_row['eval_step']))}, "
                  f"seeds {', '.join(map(str, any_row['seeds']))} (mean ± std over seeds)", ""]
        head = ["method"] + [f"eval {d}" for d in domains] + \
            ["eval mean", "Δ mean vs step 0", "Δ mean vs partitionsel (paired)", "partitionsel better (seeds)",
             "conflicting pairs / batch", "selected mix (" + "/".join(domains) + ")",
             "s / step", "overhead vs random (s / step)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        before = block.get("untrained") or {}
        if before.get("mean"):
            lines.append("| untrained (step 0) | " + " | ".join(_ms(before.get(d)) for d in domains + ["mean"]) +
                         " |" + " – |" * (len(head) - len(domains) - 2))
        for method, row in rows.items():
            mix = "/".join(f"{row['mix'][d]:.0%}" for d in domains)
            is_ref = method == "partitionsel"
            name = f"**{method}**" if is_ref else method
            if row.get("diverged"):  # NaN means stay in the cells (shown as nan), and the row says why
                name += " (diverged: " + ", ".join(f"seed {s} from step {t}" for s, t in row["diverged"].items()) + ")"
            cells = [name] + \
                [_ms(row["eval_loss"][d]) for d in domains] + [_ms(row["eval_loss"]["mean"])] + \
                [_ms(row.get("delta_vs_untrained"), "+.3f")] + \
                ["–" if is_ref else _ms(row["delta_vs_partitionsel"], "+.3f"),
                 "–" if is_ref else f"{row['partitionsel_better']}/{len(row['seeds'])}",
                 _ms(row["conflicting_pairs"], ".2f"), mix, _ms(row["time_s"]["total"], ".1f"),
                 _ms(row["overhead_s"], ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Δ vs step 0: change of the mean held-out loss from the untrained model (same seed, "
                 "same eval subset). Δ vs partitionsel > 0: the baseline's held-out loss is higher than "
                 "PartitionSel's on the same seed (same pools, anchors and eval subset). Conflicting pairs: `–` where the method "
                 "computes no gradients (`random`). Times are wall seconds per step from step 1 on, "
                 "as measured.")
    return "\n".join(lines) + "\n"


def seed_mean_records(per_seed: dict) -> list:
    """Average the logs of several seeds step by step (numbers only), for the overlay plots."""
    by_key = {}
    for recs in per_seed.values():
        for r in recs:
            by_key.setdefault(("eval" if "eval_loss" in r else "step", r["step"]), []).append(r)
    out = []
    for (kind, step), group in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rec = {"step": step, "method": group[0].get("method")}
        if kind == "eval":
            rec["eval_loss"] = {k: float(np.mean([g["eval_loss"][k] for g in group if k in g["eval_loss"]]))
                                for k in group[0]["eval_loss"]}
        else:
            for key in ("train_loss", "utility", "bytes_sent"):
                vals = [g[key] for g in group if isinstance(g.get(key), (int, float))]
                if vals:
                    rec[key] = float(np.mean(vals))
            pairs = [g["conflicting_pairs"] for g in group if g.get("conflicting_pairs") is not None]
            if pairs:
                rec["conflicting_pairs"] = float(np.mean(pairs))
            rec["domain_counts"] = {d: float(np.mean([g["domain_counts"].get(d, 0) for g in group]))
                                    for d in group[0]["domain_counts"]}
            rec["time_s"] = {k: float(np.mean([g["time_s"][k] for g in group])) for k in group[0]["time_s"]}
        out.append(rec)
    return out


def plot_eval_change(methods: dict, untrained: dict, path: Path):
    """Held-out mean loss minus the untrained model's on the same seed, mean ± std over seeds,
    per eval step and method: the eval-subset offset of each seed cancels."""
    from ds_partitionsel.extras import require

    matplotlib = require("matplotlib", "the experiment's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    drawn = 0
    for i, (method, per_seed) in enumerate(sorted(methods.items())):
        by_step = {0: [0.0] * len([s for s in per_seed if s in untrained])}
        for seed, recs in per_seed.items():
            if seed not in untrained:
                continue
            for r in recs:
                if "eval_loss" in r and "mean" in r["eval_loss"]:
                    by_step.setdefault(r["step"], []).append(r["eval_loss"]["mean"] - untrained[seed]["mean"])
        steps = sorted(s for s, v in by_step.items() if v)
        if len(steps) < 2:
            continue
        mean = [np.mean(by_step[s]) for s in steps]
        std = [np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0.0 for s in steps]
        x = np.asarray(steps, dtype=float) + (i - len(methods) / 2) * 0.04  # keep error bars apart
        ax.errorbar(x, mean, yerr=std, marker="o", ms=3, capsize=2, label=method,
                    lw=2.2 if method == "partitionsel" else 1.2)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title="held-out mean loss minus step 0, paired by seed",
           xlabel="step", ylabel="loss - loss at step 0")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(results: Path) -> dict:
    """Table (JSON + markdown) and plots from the kept logs under ``results``."""
    found = load_results(results)
    if not found:
        raise SystemExit(f"no run logs under {results / 'runs'}: run the experiment first")
    untrained = load_untrained(results)
    table = aggregate(found, untrained)
    (results / "table.json").write_text(dumps(table, indent=2))
    md = table_markdown(table)
    (results / "table.md").write_text(md)
    for tag, methods in found.items():
        mean_dir = results / tag / "seed_mean_logs"
        mean_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for method, per_seed in sorted(methods.items()):
            # the curves start at the untrained model's held-out loss (step 0, same eval subset)
            logs = {s: ([{"step": 0, "eval_loss": untrained[s]}] if s in untrained else []) + recs
                    for s, recs in per_seed.items()}
            path = mean_dir / f"{method}.jsonl"
            path.write_text("".join(dumps(dict(r, method=method)) + "\n" for r in seed_mean_records(logs)))
            paths.append(path)
        subprocess.run([sys.executable, str(REPO / "tools" / "analyze_run.py"), *map(str, paths),
                        "--out", str(results / tag)], check=True)
        plot_eval_change(methods, untrained, results / tag / "eval_change.png")
    print(md)
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    results = REPO / args.results
    if not args.report_only:
        if args.tiny is None and not (REPO / args.model / "config.json").is_file():
            raise SystemExit(f"no model at {args.model}: run python tools/fetch_demo_data.py")
        if not (REPO / args.pool / "manifest.json").is_file():
            raise SystemExit(f"no pool at {args.pool}: build it with tools/build_pool.py (see README)")
        for m in args.methods:
            if m not in METHODS:
                print(f"note: {m} is not one of the compared methods {METHODS}", file=sys.stderr)
        failures = run_all(args)
        if failures:
            print(f"{len(failures)} run(s) failed (logs: train.log in each): {failures}", file=sys.stderr)
    report(results)
    return 1 if not args.report_only and failures else 0


if __name__ == "__main__":
    sys.exit(main())
