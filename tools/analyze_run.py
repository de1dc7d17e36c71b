#!/usr/bin/env python
"""Plot and summarize the metrics logs of one or more training runs (methods overlaid).

    python tools/analyze_run.py runs/partitionsel runs/random --out runs/compare
    python tools/analyze_run.py runs/a/metrics.jsonl runs/b/metrics.jsonl --out report --smooth 5

Each input is a run directory holding ``metrics.jsonl`` or a jsonl file. One JSON object per
line; step records ``{"step", "method", "train_loss", "domain_counts": {domain: n},
"utility", "conflicting_pairs", "time_s": {"sketch", "solve", "comm", "train"}, "bytes_sent"}``
and eval records ``{"step", "method", "eval_loss": {domain: loss, ..., "mean": loss}}``.
Missing keys are tolerated (that quantity is just not plotted); lines that are not JSON
objects are skipped and counted. A record without ``method`` takes the run's directory name.
Every input is its own run, labelled by its directory name (more of its path where two inputs
share a name): two runs of one method are two rows, never merged. ``conflicting_pairs`` of
``null`` (or the ``-1`` of older logs) means "not measured" and is neither averaged nor plotted.
A log whose steps repeat (two runs appended into one file) is flagged in the summary.
Non-finite values (NaN or infinite losses: a diverged run; written as ``"NaN"``/``"Infinity"``
strings by ``ds_partitionsel.records``, or bare ``NaN`` by older logs) are shown as ``nan`` /
``inf``, never dropped: the run is flagged in the summary and on stderr with the first step
where a loss stopped being finite, and the plots mark that step.

Writes into ``--out``: ``domain_mix.png`` (selected domain shares over steps, one panel per
method), ``train_loss.png``, ``conflicting_pairs.png``, ``utility.png``, ``eval_loss.png``
(one panel per domain, runs overlaid), ``time_split.png`` (mean seconds per step and phase)
and ``summary.md`` (one row per run).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

PHASES = ("sketch", "solve", "comm", "train")


# ----------------------------------------------------------------------------- loading


NONFINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _value(x):
    """A number as a float, non-finite ones included (and their JSON-safe names); else None."""
    if isinstance(x, str):
        return NONFINITE_NAMES.get(x)
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _number(x):
    """A finite number as a float, else None."""
    v = _value(x)
    return v if v is not None and math.isfinite(v) else None


def _base_label(path: Path) -> list:
    """Path parts that name a run, most specific last: ``runs/a/metrics.jsonl`` -> [..., "runs", "a"]."""
    parts = list(path.resolve().parent.parts) if path.name == "metrics.jsonl" else \
        list(path.resolve().parent.parts) + [path.stem]
    return [p for p in parts if p not in ("/", "")]


def run_labels(paths) -> list:
    """Shortest distinct labels (trailing path parts) for the run logs ``paths``."""
    parts = [_base_label(p) for p in paths]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def load_runs(inputs) -> tuple:
    """Read the logs, one run per input (a run directory or a jsonl file).

    Returns ``(runs, skipped)``: ``runs`` maps a run label (its directory name, or more of its
    path where two inputs share a name; ``label:method`` when one log holds several methods) to
    ``{"method", "path", "steps": [...], "evals": [...], "repeated_steps": n}`` (records sorted by
    step; ``repeated_steps`` counts step records whose step appeared before, the mark of two runs
    written into one log). ``skipped`` counts unusable lines per file. Runs are never merged.
    """
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            path = path / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{item}: no metrics log (expected a run directory with metrics.jsonl, "
                                    f"or a .jsonl file)")
        if any(path.resolve() == p.resolve() for p in paths):
            raise ValueError(f"{item}: the same log is given twice")
        paths.append(path)
    runs, skipped = {}, {}
    for path, label in zip(paths, run_labels(paths)):
        default_method = path.parent.name if path.name == "metrics.jsonl" else path.stem
        by_method = {}
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    rec = None
                if not isinstance(rec, dict) or _number(rec.get("step")) is None:
                    skipped[str(path)] = skipped.get(str(path), 0) + 1
                    continue
                method = str(rec.get("method") or default_method)
                run = by_method.setdefault(method, {"method": method, "path": str(path), "steps": [], "evals": []})
                run["evals" if isinstance(rec.get("eval_loss"), dict) else "steps"].append(rec)
        for method, run in by_method.items():
            key = label if len(by_method) == 1 else f"{label}:{method}"
            steps = [r["step"] for r in run["steps"]]
            run["repeated_steps"] = len(steps) - len(set(steps))
            runs[key] = run
    for run in runs.values():
        run["steps"].sort(key=lambda r: r["step"])
        run["evals"].sort(key=lambda r: r["step"])
    return runs, skipped


# Counts where a negative value is the old logs' placeholder for "not measured" (new logs write
# null or leave the key out): never averaged or plotted.
NOT_NEGATIVE = ("conflicting_pairs", "bytes_sent")


def series(records, key, sub=None):
    """``(steps, values)`` arrays of a numeric field (``rec[key][sub]`` when ``sub``), missing
    skipped; NaN and infinite values are kept (a diverged run must not look finite)."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if sub is not None:
            v = v.get(sub) if isinstance(v, dict) else None
        v = _value(v)
        if v is not None and not (key in NOT_NEGATIVE and v < 0):
            xs.append(r["step"])
            ys.append(v)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    if window <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.concatenate([[0.0], y]))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def domain_names(runs) -> list:
    names = set()
    for run in runs.values():
        for r in run["steps"]:
            if isinstance(r.get("domain_counts"), dict):
                names.update(r["domain_counts"])
        for r in run["evals"]:
            names.update(k for k in r["eval_loss"] if k != "mean")
    return sorted(names)


def domain_shares(records, names):
    """``(steps (S,), shares (S, D))`` of the selected domain mix, rows summing to 1."""
    xs, rows = [], []
    for r in records:
        dc = r.get("domain_counts")
        if not isinstance(dc, dict):
            continue
        counts = np.asarray([_number(dc.get(d)) or 0.0 for d in names])
        if counts.sum() > 0:
            xs.append(r["step"])
            rows.append(counts / counts.sum())
    return np.asarray(xs, dtype=np.float64), np.asarray(rows).reshape(len(rows), len(names))


# ----------------------------------------------------------------------------- plots


def _figure(n_panels=1, width=6.5, height=3.6):
    from ds_partitionsel.extras import require

    matplotlib = require("matplotlib", "plotting a run")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n_panels, 3)
    rows = (n_panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n_panels])


def _save(plt, fig, path: Path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def first_nonfinite(x: np.ndarray, y: np.ndarray):
    """The first step whose value is NaN or infinite, or None."""
    bad = np.flatnonzero(~np.isfinite(y))
    return float(x[bad[0]]) if len(bad) else None


def _mark_nonfinite(ax, x, y, color):
    """A dashed line at the first non-finite value (matplotlib leaves NaN out silently)."""
    at = first_nonfinite(x, y)
    if at is not None:
        ax.axvline(at, color=color, ls="--", lw=1.0)
        ax.annotate("non-finite", (at, 0.95), xycoords=("data", "axes fraction"), color=color, fontsize=8,
                    rotation=90, va="top", ha="right")


def plot_lines(runs, key, sub, title, ylabel, path, window):
    plt, fig, (ax,) = _figure()
    drawn = 0
    for method, run in sorted(runs.items()):
        x, y = series(run["steps"], key, sub)
        if len(x):
            finite, at = np.isfinite(y), first_nonfinite(x, y)
            label = method if at is None else f"{method} (non-finite from step {at:g})"
            (line,) = ax.plot(x[finite], smooth(y[finite], window), label=label, lw=1.5)
            _mark_nonfinite(ax, x, y, line.get_color())
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def plot_domain_mix(runs, names, path):
    methods = [m for m, run in sorted(runs.items()) if len(domain_shares(run["steps"], names)[0])]
    if not methods or not names:
        return None
    plt, fig, axes = _figure(len(methods))
    for ax, method in zip(axes, methods):
        x, shares = domain_shares(runs[method]["steps"], names)
        ax.stackplot(x, shares.T, labels=names, alpha=0.85)
        ax.set(title=f"selected domain mix: {method}", xlabel="step", ylabel="share of batch", ylim=(0, 1))
        ax.legend(loc="upper right", fontsize=8)
    return _save(plt, fig, path)


def plot_eval(runs, names, path, window):
    keys = [d for d in names] + ["mean"]
    keys = [k for k in keys if any(len(series(run["evals"], "eval_loss", k)[0]) for run in runs.values())]
    if not keys:
        return None
    plt, fig, axes = _figure(len(keys), width=5.0)
    for ax, key in zip(axes, keys):
        for method, run in sorted(runs.items()):
            x, y = series(run["evals"], "eval_loss", key)
            if len(x):
                finite, at = np.isfinite(y), first_nonfinite(x, y)
                label = method if at is None else f"{method} (non-finite from step {at:g})"
                (line,) = ax.plot(x[finite], smooth(y[finite], window), marker="o", ms=3, label=label)
                _mark_nonfinite(ax, x, y, line.get_color())
        ax.set(title=f"held-out loss: {key}", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def mean_times(run) -> dict:
    return {ph: float(np.mean(y)) for ph in PHASES if len(y := series(run["steps"], "time_s", ph)[1])}


def plot_times(runs, path):
    times = {m: mean_times(run) for m, run in sorted(runs.items())}
    times = {m: t for m, t in times.items() if t}
    if not times:
        return None
    plt, fig, (ax,) = _figure()
    methods = list(times)
    bottom = np.zeros(len(methods))
    for ph in PHASES:
        vals = np.asarray([times[m].get(ph, 0.0) for m in methods])
        ax.bar(methods, vals, bottom=bottom, label=ph)
        bottom += vals
    ax.set(title="mean time per step by phase", ylabel="seconds")
    ax.legend()
    return _save(plt, fig, path)


# ----------------------------------------------------------------------------- summary


def _fmt(v, spec=".4g"):
    return "–" if v is None else format(v, spec)  # nan / inf print as such


def nonfinite_report(run, names) -> dict:
    """{quantity: (first step, how many records)} of a run's losses that are NaN or infinite."""
    out = {}
    checks = [("train_loss", run["steps"], "train_loss", None)] + \
        [(f"eval {k}", run["evals"], "eval_loss", k) for k in names + ["mean"]] + \
        [("utility", run["steps"], "utility", None)]
    for label, records, key, sub in checks:
        x, y = series(records, key, sub)
        at = first_nonfinite(x, y)
        if at is not None:
            out[label] = (int(at), int((~np.isfinite(y)).sum()))
    return out


def _last_mean(y: np.ndarray, frac=0.1):
    if len(y) == 0:
        return None
    k = max(1, int(round(len(y) * frac)))
    return float(np.mean(y[-k:]))


def summary_rows(runs, names) -> list:
    rows = []
    for label, run in sorted(runs.items()):
        steps = run["steps"]
        _, loss = series(steps, "train_loss")
        _, util = series(steps, "utility")
        _, conf = series(steps, "conflicting_pairs")
        _, sent = series(steps, "bytes_sent")
        sent = sent[np.isfinite(sent)]
        totals = np.zeros(len(names))
        for r in steps:
            if isinstance(r.get("domain_counts"), dict):
                totals += [_number(r["domain_counts"].get(d)) or 0.0 for d in names]
        last_eval = run["evals"][-1]["eval_loss"] if run["evals"] else {}
        rows.append({
            "run": label, "method": run["method"], "path": run["path"], "steps": len(steps),
            "repeated_steps": run["repeated_steps"],
            "train_loss_last10pct": _last_mean(loss),
            "eval_loss": {k: _value(last_eval.get(k)) for k in names + ["mean"]},
            "non_finite": nonfinite_report(run, names),
            "eval_step": run["evals"][-1]["step"] if run["evals"] else None,
            "conflicting_pairs_mean": float(conf.mean()) if len(conf) else None,
            "utility_mean": float(util.mean()) if len(util) else None,
            "domain_mix": {d: float(t / totals.sum()) for d, t in zip(names, totals)} if totals.sum() else {},
            "time_s_mean": mean_times(run),
            "bytes_sent_total": float(sent.sum()) if len(sent) else None,
        })
    return rows


def summary_markdown(rows, names, plots, skipped) -> str:
    head = ["run [method]", "steps", "train loss (last 10%)"] + [f"eval {k}" for k in names + ["mean"]] + \
        ["conflicting pairs / step", "utility / step", "domain mix", "s / step (sketch+solve+comm+train)",
         "bytes sent"]
    lines = ["# Run summary", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mix = ", ".join(f"{d} {s:.0%}" for d, s in r["domain_mix"].items()) or "–"
        t = r["time_s_mean"]
        tcell = "–" if not t else f"{sum(t.values()):.3g} (" + "+".join(_fmt(t.get(p), ".2g") for p in PHASES) + ")"
        name = r["run"] if r["run"] == r["method"] else f"{r['run']} [{r['method']}]"
        if r["non_finite"]:
            name += f" **(diverged: non-finite from step {min(s for s, _ in r['non_finite'].values())})**"
        cells = [name, str(r["steps"]), _fmt(r["train_loss_last10pct"])] + \
            [_fmt(r["eval_loss"][k]) for k in names + ["mean"]] + \
            [_fmt(r["conflicting_pairs_mean"], ".3g"), _fmt(r["utility_mean"]), mix, tcell,
             _fmt(r["bytes_sent_total"], ".3g")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "One row per run (input); runs are never merged. Eval columns: the last eval record of "
              "each run. Conflicting pairs: mean over the steps where they were measured. "
              "Plots: " + (", ".join(f"[{p.name}]({p.name})" for p in plots) or "none (no plottable data)")]
    diverged = [r for r in rows if r["non_finite"]]
    if diverged:
        lines.append("")
        lines.append("Warning: non-finite values (NaN or infinite; the run diverged), shown as nan/inf above: " +
                     "; ".join(f"{r['run']}: " + ", ".join(f"{k} from step {s} ({n} records)"
                                                          for k, (s, n) in r["non_finite"].items())
                               for r in diverged))
    repeated = {r["run"]: r["repeated_steps"] for r in rows if r["repeated_steps"]}
    if repeated:
        lines.append("")
        lines.append("Warning: steps logged more than once (two runs written into one log?): " +
                     ", ".join(f"{k}: {v}" for k, v in repeated.items()))
    if skipped:
        lines.append("")
        lines.append("Skipped lines (not JSON objects with a numeric step): " +
                     ", ".join(f"{k}: {v}" for k, v in skipped.items()))
    return "\n".join(lines) + "\n"


def analyze(inputs, out: Path, window: int = 1) -> dict:
    """Load the logs, write the plots and ``summary.md`` into ``out``; returns what was written."""
    runs, skipped = load_runs(inputs)
    if not runs:
        raise ValueError(f"no usable records in {list(map(str, inputs))}")
    out.mkdir(parents=True, exist_ok=True)
    names = domain_names(runs)
    plots = [p for p in (
        plot_domain_mix(runs, names, out / "domain_mix.png"),
        plot_lines(runs, "train_loss", None, "training loss", "loss", out / "train_loss.png", window),
        plot_lines(runs, "conflicting_pairs", None, "conflicting pairs in the selected batch", "pairs",
                   out / "conflicting_pairs.png", window),
        plot_lines(runs, "utility", None, "utility of the selected batch", "U(w)", out / "utility.png", window),
        plot_eval(runs, names, out / "eval_loss.png", window),
        plot_times(runs, out / "time_split.png"),
    ) if p is not None]
    rows = summary_rows(runs, names)
    (out / "summary.md").write_text(summary_markdown(rows, names, plots, skipped), encoding="utf-8")
    return {"plots": plots, "summary": out / "summary.md", "rows": rows, "skipped": skipped}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl) or jsonl files")
    p.add_argument("--out", required=True, type=Path, help="output directory for PNGs and summary.md")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window for line plots (default 1: off)")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error(f"--smooth must be >= 1 (1: off), got {args.smooth}")
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file, not a directory", file=sys.stderr)
        return 1
    try:
        result = analyze(args.runs, args.out, args.smooth)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for row in result["rows"]:
        if row["non_finite"]:
            print(f"warning: {row['path']}: the run diverged: " + ", ".join(
                f"{k} is not finite from step {s} ({n} records)" for k, (s, n) in row["non_finite"].items()),
                file=sys.stderr)
        if row["repeated_steps"]:
            print(f"warning: {row['path']} logs {row['repeated_steps']} step(s) more than once: two runs "
                  f"written into one log? (they are shown as one run)", file=sys.stderr)
    for path in result["plots"]:
        print(f"wrote {path}")
    print(f"wrote {result['summary']}")
    print(result["summary"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
