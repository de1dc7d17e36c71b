"""A run's identity: the run id in its run directory, summary and checkpoints; a resume into
another run's directory is refused before anything is built; damaged checkpoints and unwritable
directories are one ``error:`` line (exit 2), also before anything is built."""
import json
import os
import subprocess
import sys

import pytest

from real_pool import build_real_pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build_real_pool(tmp_path_factory.mktemp("real"))


def _train(script, real, *args, steps=2):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [sys.executable, script, "--tiny", "llama", "--num-layers", "2", "--tokenizer", str(real["tokenizer"]),
           "--pool", str(real["pool"]), "--deepspeed_config", "ds_configs/zero2.json", "--steps", str(steps), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _one_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_resume_into_another_runs_directory_is_refused_and_leaves_it_untouched(real, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        proc = _train("launch/train.py", real, "--output-dir", str(run), "--save-dir", str(run / "ckpt"))
        assert proc.returncode == 0, proc.stderr[-3000:]
    id_a = json.loads((a / "summary.json").read_text())["run_id"]
    id_b = json.loads((b / "summary.json").read_text())["run_id"]
    assert id_a and id_b and id_a != id_b
    assert (a / "run_id").read_text().strip() == id_a
    record = json.loads((a / "ckpt" / "global_step2" / "partitionsel_resume.json").read_text())
    assert record["run_id"] == id_a
    before = {p: (b / p).read_bytes() for p in ("metrics.jsonl", "summary.json", "run_id")}

    proc = _train("launch/train.py", real, "--output-dir", str(b), "--resume", str(a / "ckpt"), steps=3)
    _one_error(proc, id_a, id_b, str(b))
    assert {p: (b / p).read_bytes() for p in before} == before  # nothing appended, nothing replaced

    proc = _train("launch/train.py", real, "--output-dir", str(a), "--resume", str(a / "ckpt"), steps=3)
    assert proc.returncode == 0, proc.stderr[-3000:]  # its own directory: continues
    assert json.loads((a / "summary.json").read_text())["run_id"] == id_a


def test_sink_adopts_the_checkpoints_run_id_and_refuses_another_runs_log(tmp_path):
    from ds_partitionsel.records import MetricsSink
    from ds_partitionsel.runs import RunDirError, read_run_id

    first = MetricsSink(str(tmp_path / "a"), rank=0)
    assert first.run_id and read_run_id(tmp_path / "a") == first.run_id
    first._log.write("{}\n")
    first.close()
    fresh = MetricsSink(str(tmp_path / "new"), rank=0, resume=True)  # a resume into a new directory
    fresh.adopt_run_id(first.run_id, "ckpt")
    assert read_run_id(tmp_path / "new") == first.run_id
    fresh.close()
    other = MetricsSink(str(tmp_path / "a"), rank=0, resume=True)
    with pytest.raises(RunDirError, match="holds the log of run"):
        other.adopt_run_id("0" * 32, "ckpt")
    other.adopt_run_id(first.run_id, "ckpt")  # its own run: fine
    other.close()


@pytest.mark.slow
def test_trainer_resume_into_another_runs_directory_is_refused(real, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        proc = _train("launch/train_hf.py", real, "--output-dir", str(run))
        assert proc.returncode == 0, proc.stderr[-3000:]
    id_a = json.loads((a / "summary.json").read_text())["run_id"]
    assert json.loads((a / "checkpoint-2" / "partitionsel_resume.json").read_text())["run_id"] == id_a
    before = {p: (b / p).read_bytes() for p in ("metrics.jsonl", "summary.json")}
    proc = _train("launch/train_hf.py", real, "--output-dir", str(b), "--resume", str(a / "checkpoint-2"), steps=3)
    _one_error(proc, id_a, str(b))
    assert {p: (b / p).read_bytes() for p in before} == before


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (a tmpfs mounted ro; root itself cannot write there)."""
    import shutil

    mnt = tmp_path / "ro"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


UNWRITABLE = [  # script, the flag under test, other flags
    ("launch/train.py", "--save-dir", ["--output-dir", "{tmp}/run"]),
    ("launch/train.py", "--output-dir", []),
    ("launch/train_hf.py", "--output-dir", []),
    ("launch/train_fsdp.py", "--save-dir", ["--output-dir", "{tmp}/run"]),
]


@pytest.mark.parametrize("script,flag,rest", UNWRITABLE)
def test_read_only_directory_is_refused_before_any_model_is_built(real, tmp_path, read_only_dir, script, flag, rest):
    rest = [a.format(tmp=tmp_path) for a in rest]
    proc = _train(script, real, flag, str(read_only_dir / "sub"), *rest)
    _one_error(proc, f"{flag} {read_only_dir / 'sub'} is not writable", "read-only file system")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


@pytest.mark.parametrize("script,flag,rest", UNWRITABLE[:1] + UNWRITABLE[2:3])
def test_a_file_in_the_way_of_a_directory_is_refused(real, tmp_path, script, flag, rest):
    rest = [a.format(tmp=tmp_path) for a in rest]
    (tmp_path / "file").write_text("x")
    proc = _train(script, real, flag, str(tmp_path / "file" / "sub"), *rest)
    _one_error(proc, f"{flag} {tmp_path / 'file' / 'sub'}", "is a file")
