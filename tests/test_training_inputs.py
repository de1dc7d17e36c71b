"""Training-side inputs and failures of the launch scripts: a diverged loss fails naming the step,
summaries are strict JSON, and bad inputs are one ``error:`` line (exit 2) before any model is
built."""
import json
import math
import os
import subprocess
import sys

import pytest

from real_pool import build_real_pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build_real_pool(tmp_path_factory.mktemp("real"))


def _train(script, real, *args, steps=2, config="ds_configs/zero2.json"):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [sys.executable, script, "--tiny", "llama", "--num-layers", "2", "--tokenizer", str(real["tokenizer"]),
           "--pool", str(real["pool"]), "--deepspeed_config", config, "--steps", str(steps), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _errors(proc):
    return [line for line in proc.stderr.strip().splitlines() if "error:" in line]


def _strict(text):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("script", ["launch/train.py", "launch/train_hf.py"])
def test_random_method_with_a_diverged_loss_fails_naming_the_step(real, tmp_path, script):
    # Adam's first steps move every weight by about the learning rate: 1e20 overflows within a few steps
    proc = _train(script, real, "--method", "random", "--lr", "1e20", "--output-dir", str(tmp_path / "run"),
                  steps=6)
    assert proc.returncode == 1, proc.stdout[-1000:] + proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and "training step" in errors[0] and "not finite" in errors[0], proc.stderr[-3000:]
    records = [_strict(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("kind") == "step"][-1]
    assert f"training step {last['step']} " in errors[0]  # the step whose loss the log shows diverged
    assert isinstance(last["train_loss"], str) and not math.isfinite(float(last["train_loss"]))


def test_summary_with_a_nan_loss_is_strict_json(tmp_path, capsys):
    from ds_partitionsel.cli import write_summary
    from ds_partitionsel.records import loads

    write_summary({"first_loss": 2.5, "last_loss": float("nan"), "eval_loss": {"a": float("inf")}}, str(tmp_path))
    text = (tmp_path / "summary.json").read_text()
    assert _strict(text)["last_loss"] == "NaN"
    back = loads(text)
    assert math.isnan(back["last_loss"]) and back["eval_loss"]["a"] == float("inf")
    _strict(capsys.readouterr().out)  # the printed summary too


def _start_ranks(script, args_by_rank):
    from distributed_utils import free_port

    port = free_port()
    procs = []
    for rank, args in enumerate(args_by_rank):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(args_by_rank)),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=600), *p.communicate()) for p in procs]


@pytest.mark.parametrize("script", ["launch/train.py", "launch/train_hf.py"])
def test_ranks_started_with_different_seeds_are_refused_at_the_start(real, tmp_path, script):
    common = ["--tiny", "llama", "--num-layers", "2", "--tokenizer", str(real["tokenizer"]), "--pool",
              str(real["pool"]), "--deepspeed_config", "ds_configs/zero2.json", "--steps", "2",
              "--output-dir", str(tmp_path / "run")]
    outs = _start_ranks(script, [common + ["--seed", "1"], common + ["--seed", "2"]])
    for rank, (rc, out, err) in enumerate(outs):
        errors = [line for line in err.splitlines() if "error:" in line]
        assert rc == 2 and len(errors) == 1, (rank, rc, err[-3000:])
        assert f"[rank {rank}] error: the partitionsel config differs between ranks" in errors[0]
        assert "seed by rank: [1, 2]" in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_train_hf_steps_0_says_what_to_run_instead(real, tmp_path):
    proc = _train("launch/train_hf.py", real, "--output-dir", str(tmp_path / "run"), steps=0)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and "--steps 0" in errors[0] and "launch/train.py --steps 0" in errors[0], proc.stderr


@pytest.fixture(scope="module")
def checkpoint(real, tmp_path_factory):
    """A real 2-step DeepSpeed checkpoint of launch/train.py."""
    root = tmp_path_factory.mktemp("ckpt")
    proc = _train("launch/train.py", real, "--output-dir", str(root / "run"), "--save-dir", str(root / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_truncated_resume_record_is_one_error_line(real, tmp_path, checkpoint):
    ckpt = _copy(checkpoint / "ckpt", tmp_path / "ckpt")
    record = ckpt / "global_step2" / "partitionsel_resume.json"
    record.write_text(record.read_text()[:40])  # a save cut short
    proc = _train("launch/train.py", real, "--output-dir", str(tmp_path / "run"), "--resume", str(ckpt), steps=3)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and str(record) in errors[0] and "not a valid resume record" in errors[0], proc.stderr


def test_latest_naming_a_missing_tag_is_one_error_line(real, tmp_path, checkpoint):
    ckpt = _copy(checkpoint / "ckpt", tmp_path / "ckpt")
    (ckpt / "global_step2").rename(ckpt / "moved")
    proc = _train("launch/train.py", real, "--output-dir", str(tmp_path / "run"), "--resume", str(ckpt), steps=3)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and "names the checkpoint 'global_step2', which is not in" in errors[0], proc.stderr


@pytest.mark.parametrize("script", ["launch/train.py", "launch/train_hf.py", "launch/train_fsdp.py"])
def test_sketch_modules_matching_nothing_is_one_error_line_before_training(real, tmp_path, script):
    proc = _train(script, real, "--set", "sketch.modules=no_such_module", "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and "partitionsel.sketch.modules" in errors[0] and "no_such_module" in errors[0] \
        and "Available nn.Linear names" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_truncated_trainer_resume_record_is_one_error_line_not_blamed_on_a_step(real, tmp_path):
    run = tmp_path / "run"
    proc = _train("launch/train_hf.py", real, "--output-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = run / "checkpoint-2" / "partitionsel_resume.json"
    record.write_text(record.read_text()[:30])
    proc = _train("launch/train_hf.py", real, "--output-dir", str(run), "--resume", str(run / "checkpoint-2"),
                  steps=3)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and "not a valid resume record" in errors[0] and "training step" not in errors[0], \
        proc.stderr[-3000:]


@pytest.fixture(scope="module")
def gpt2_folder(real, tmp_path_factory):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    folder = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=len(tok))
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("flag,expected", [
    (["--num-layers", "1"], "--num-layers cannot cut"),
    (["--lora"], "--lora adapts the Linear layers"),
])
def test_gpt2_model_with_llama_only_flags_is_one_error_line(real, gpt2_folder, tmp_path, flag, expected):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [sys.executable, "launch/train.py", "--model", str(gpt2_folder), "--tokenizer", str(real["tokenizer"]),
           "--pool", str(real["pool"]), "--deepspeed_config", "ds_configs/zero2.json", "--steps", "2",
           "--output-dir", str(tmp_path / "run"), *flag]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and expected in errors[0] and "gpt2" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_a_single_process_run_does_not_need_port_29500(real, tmp_path):
    # another run (here: a listening socket) holds 29500; a run without a launcher picks its own port
    import socket

    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 29500))
        except OSError:
            pytest.skip("port 29500 is taken on this machine already")
        busy.listen()
        proc = _train("launch/train.py", real, "--output-dir", str(tmp_path / "run"), steps=1)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _rank_alone(real, tmp_path, rank, port):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    cmd = [sys.executable, "launch/train.py", "--tiny", "llama", "--num-layers", "2", "--tokenizer",
           str(real["tokenizer"]), "--pool", str(real["pool"]), "--deepspeed_config", "ds_configs/zero2.json",
           "--steps", "2", "--set", "timeout_s=5", "--output-dir", str(tmp_path / "run")]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_master_port_in_use_is_one_error_line(real, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = _rank_alone(real, tmp_path, 0, busy.getsockname()[1])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and "already in use" in errors[0] and "MASTER_PORT" in errors[0], proc.stderr[-3000:]
    assert "frame #" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_master_that_never_comes_up_is_one_error_line_after_the_timeout(real, tmp_path):
    from distributed_utils import free_port

    proc = _rank_alone(real, tmp_path, 1, free_port())  # rank 0 never starts
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _errors(proc)
    assert len(errors) == 1 and "could not reach the master" in errors[0] and "5 s" in errors[0], proc.stderr[-3000:]
    # torch's own c10d log lines come before it (not ours to silence); ours is the last line, no traceback
    assert proc.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in proc.stderr
