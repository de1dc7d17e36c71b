"""tools/experiment.py end to end at a tiny scale: real 2-rank runs, then the table and plots.

A tiny Llama on a small real pool (tests/real_pool.py), 2 methods x 1 seed x 2 steps under the
deepspeed launcher; the report must be rebuilt from the kept logs alone (--report-only).
"""
import json

from real_pool import build_real_pool, load_tool


def test_experiment_runs_and_regenerates_table_and_plots(tmp_path):
    built = build_real_pool(tmp_path / "data", per_domain=24, valid_per_domain=6)
    experiment = load_tool("experiment")
    results = tmp_path / "results"
    common = ["--results", str(results)]
    argv = ["--tiny", "llama", "--num-layers", "2", "--pool", str(built["pool"]),
            "--methods", "partitionsel", "random", "--fractions", "0.25", "--seeds", "7",
            "--steps", "2", "--eval-interval", "1", "--eval-samples", "8", "--micro-batch", "1",
            "--out", str(tmp_path / "runs"), "--run-timeout", "300"] + common
    assert experiment.main(argv) == 0

    kept = results / "runs" / "f25" / "partitionsel" / "seed7"
    records = [json.loads(l) for l in open(kept / "metrics.jsonl")]
    steps = [r for r in records if "eval_loss" not in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [0, 1] and [r["step"] for r in evals] == [1, 2]
    assert all("selected" not in r for r in records)  # kept logs stay small
    assert all(r["pool_size"] == 8 and r["batch_size"] == 2 for r in steps)  # 25%: pool 4x batch
    summary = json.loads((kept / "summary.json").read_text())
    assert summary["fraction"] == 0.25 and summary["seed"] == 7 and summary["world_size"] == 2

    table = json.loads((results / "table.json").read_text())
    rows = table["f25"]["methods"]
    assert set(rows) == {"partitionsel", "random"}
    assert table["f25"]["domains"] == ["code", "math", "molecules"]
    assert rows["partitionsel"]["conflicting_pairs"] is not None and rows["random"]["conflicting_pairs"] is None
    assert rows["random"]["eval_loss"]["mean"]["mean"] > 0
    assert rows["random"]["delta_vs_partitionsel"]["n"] == 1
    assert abs(sum(rows["partitionsel"]["mix"].values()) - 1) < 1e-9
    # the untrained reference: held-out loss before any step, on the same eval subset
    untrained = [json.loads(l) for l in open(results / "runs" / "untrained" / "seed7" / "metrics.jsonl")]
    assert [r["step"] for r in untrained] == [0] and "mean" in untrained[0]["eval_loss"]
    assert table["f25"]["untrained"]["mean"]["mean"] == untrained[0]["eval_loss"]["mean"]
    assert rows["random"]["delta_vs_untrained"]["n"] == 1
    curve = [json.loads(l) for l in open(results / "f25" / "seed_mean_logs" / "random.jsonl")]
    assert [r["step"] for r in curve if "eval_loss" in r] == [0, 1, 2]

    # the report regenerates from the kept logs alone
    for path in [results / "table.json", results / "table.md", *results.glob("f25/*.png")]:
        path.unlink()
    assert experiment.main(["--report-only"] + common) == 0
    md = (results / "table.md").read_text()
    assert "| **partitionsel** |" in md and "| random |" in md and "| untrained (step 0) |" in md
    for name in ("eval_loss.png", "eval_change.png", "domain_mix.png", "conflicting_pairs.png", "time_split.png"):
        assert (results / "f25" / name).stat().st_size > 1000
    assert (results / "f25" / "summary.md").is_file()
