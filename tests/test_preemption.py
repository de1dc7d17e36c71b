"""Preemption: SIGTERM to one rank mid-run saves a checkpoint on every rank at one step boundary,
the run exits 0, and a resume continues to exactly the records of a run that was never stopped.

Real ranks: two processes of ``launch/train.py`` (the DeepSpeed engine) or ``launch/train_hf.py``
(the Hugging Face Trainer) with the process-group variables of a launcher, on 127.0.0.1."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distributed_utils import free_port
from real_pool import build_real_pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build_real_pool(tmp_path_factory.mktemp("real"))


def _start(script, args, world=2):
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
        procs.append(subprocess.Popen([sys.executable, script, *args], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs, timeout=900):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        outs.append((p.returncode, out, err))
    return outs


def _ok(outs):
    for rank, (rc, out, err) in enumerate(outs):
        assert rc == 0, f"rank {rank} exited {rc}:\n{out[-2000:]}\n{err[-4000:]}"


def _steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r.get("kind", "step") == "step"]


def _comparable(records):
    """What must equal a straight run's: step, selection, mix, loss, learning rate, utility."""
    return [(r["step"], r["selected"], r["domain_counts"], r["train_loss"], r["lr"], r["utility"]) for r in records]


def _sigterm_rank1_after(procs, run_dir, k, timeout=900):
    """SIGTERM to rank 1 only, once ``k`` step records are in the log (rank 0 never gets it: the
    ranks must agree on the stop through a collective)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return
        if os.path.isfile(path) and len(_steps(run_dir)) >= k:
            procs[1].send_signal(signal.SIGTERM)
            return
        time.sleep(0.05)
    raise AssertionError(f"no {k} step records in {path} within {timeout} s")


def _common(real):
    return ["--tiny", "llama", "--num-layers", "2", "--tokenizer", str(real["tokenizer"]), "--pool",
            str(real["pool"]), "--deepspeed_config", "ds_configs/zero2.json", "--steps", str(STEPS)]


CASES = {
    # script, extra flags of the preempted and resumed runs, the checkpoint of step k
    "engine": ("launch/train.py", lambda tmp: ["--save-dir", str(tmp / "ckpt")],
               lambda tmp, k: tmp / "ckpt" / f"global_step{k}" / "partitionsel_resume.json"),
    "trainer": ("launch/train_hf.py", lambda tmp: [],
                lambda tmp, k: tmp / "stopped" / f"checkpoint-{k}" / "partitionsel_resume.json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(CASES))
def test_sigterm_saves_on_every_rank_and_the_resume_equals_a_straight_run(real, tmp_path, path):
    script, save_flags, checkpoint = CASES[path]
    straight = tmp_path / "straight"
    _ok(_wait(_start(script, _common(real) + ["--output-dir", str(straight)])))

    stopped = tmp_path / "stopped"
    procs = _start(script, _common(real) + ["--output-dir", str(stopped)] + save_flags(tmp_path))
    _sigterm_rank1_after(procs, str(stopped), 2)
    outs = _wait(procs)
    _ok(outs)  # a clean exit on both ranks, not 143
    summary = json.loads((stopped / "summary.json").read_text())
    k = summary["stopped_by_signal_after_step"]
    assert 2 <= k < STEPS, summary
    assert len(_steps(stopped)) == k
    assert checkpoint(tmp_path, k).is_file()  # the checkpoint of the step both ranks agreed on
    assert "stopped by a signal" in outs[0][2]

    resume = ["--resume", "latest"] + save_flags(tmp_path)
    _ok(_wait(_start(script, _common(real) + ["--output-dir", str(stopped)] + resume)))
    got, want = _comparable(_steps(stopped)), _comparable(_steps(straight))
    assert [r[0] for r in got] == list(range(STEPS))
    assert got == want


def test_save_schedule_saves_every_interval_once_per_step_and_on_a_signal():
    from ds_partitionsel.preemption import SaveSchedule, StopRequest

    saved = []
    stop = StopRequest().install()
    try:
        schedule = SaveSchedule(saved.append, interval=3, stop=stop)
        stops = [schedule.after_step(s) for s in range(1, 5)]
        os.kill(os.getpid(), signal.SIGUSR1)  # a real signal: the handler sets the flag, nothing exits
        stops.append(schedule.after_step(5))
        schedule.final(5)  # already saved at step 5: not again
    finally:
        stop.restore()
    assert saved == [3, 5]
    assert stops == [False, False, False, False, True] and schedule.stopped_at == 5
    assert stop.signal_name == "SIGUSR1"


def test_latest_complete_checkpoint_skips_one_whose_save_did_not_finish(tmp_path):
    from ds_partitionsel.preemption import latest_complete_tag, latest_complete_trainer_checkpoint

    for name in ("global_step4", "global_step12", "checkpoint-4", "checkpoint-12"):
        (tmp_path / name).mkdir()
    for name in ("global_step4", "checkpoint-4"):  # the others were killed while saving: no resume record
        (tmp_path / name / "partitionsel_resume.json").write_text("{}")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text("{}")
    assert latest_complete_tag(tmp_path) == "global_step4"
    assert latest_complete_trainer_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    (tmp_path / "global_step12" / "partitionsel_resume.json").write_text("{}")
    assert latest_complete_tag(tmp_path) == "global_step12"


@pytest.mark.parametrize("script,args,message", [
    ("launch/train.py", ["--save-interval", "3"], "--save-interval 3 needs --save-dir"),
    ("launch/train.py", ["--resume", "latest"], "--resume latest continues the checkpoints of --save-dir"),
    ("launch/train_fsdp.py", ["--save-interval", "3"], "--save-interval 3 needs --save-dir"),
    ("launch/train_hf.py", ["--resume", "latest"], "no complete checkpoint-N folder"),
])
def test_save_flags_without_a_place_to_save_are_refused(tmp_path, script, args, message):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    pool = tmp_path / "pool"
    pool.mkdir()
    cmd = [sys.executable, script, "--tiny", "llama", "--pool", str(pool), "--deepspeed_config",
           "ds_configs/zero2.json", "--output-dir", str(tmp_path / "run"), *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-3000:]
