"""``pip install .`` into a clean virtual environment, without extras, then use the library.

This is what a user who installs the package gets: every import of the library proper must be
declared in ``setup.py`` (a missing one fails here, not on their machine), and an optional part
must fail with an error that names its extra.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USE = textwrap.dedent('''
    import importlib, json, sys
    import torch, transformers
    import ds_partitionsel, ds_partitionsel.solver, ds_partitionsel.sketch, ds_partitionsel.distributed
    import ds_partitionsel.extras
    from ds_partitionsel import allocate_budgets, select
    from ds_partitionsel.sketch import GradientSketcher

    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1)
    domains = torch.arange(64) % 3
    budgets = allocate_budgets(torch.bincount(domains), 8)
    sel = ds_partitionsel.distributed.select("partitionsel", feats, domains, torch.randn(16, generator=gen),
                                             budgets, lr=0.5)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64))
    ids = torch.randint(0, 64, (3, 10), generator=gen)
    sketch = GradientSketcher(model, modules=1, mode="kron", kron_dims=4).sketch(ids)
    missing = {}
    for module, purpose in [("matplotlib", "plots"), ("peft", "LoRA"), ("mpi4py", "MPI builds")]:
        try:
            ds_partitionsel.extras.require(module, purpose)
            missing[module] = "installed"
        except ImportError as e:
            missing[module] = str(e)
    print(json.dumps({"k": sel.k, "counts": sel.domain_counts.tolist(), "sketch": list(sketch.shape),
                      "finite": bool(torch.isfinite(sketch).all()), "missing": missing,
                      "where": ds_partitionsel.__file__}))
''')


@pytest.mark.slow
def test_plain_pip_install_runs_a_selection_and_a_sketch(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "ds_partitionsel"), src / "ds_partitionsel",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [py, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    # the CPU torch of these machines first, so that the package's unpinned torch is satisfied
    torch_pin = f"torch=={__import__('torch').__version__.split('+')[0]}"
    for args in ([torch_pin], [torch_pin, str(src)]):
        proc = subprocess.run(pip + args, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode and "No matching distribution" in proc.stderr + proc.stdout:
            pytest.skip(f"package registry unreachable: {proc.stderr[-300:]}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([py, "-c", USE], env=dict(env, HF_HUB_OFFLINE="1"), cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["where"].startswith(str(venv)), out["where"]  # the installed copy, not the tree
    assert out["k"] == 8 and sum(out["counts"]) == 8
    assert out["sketch"] == [3, 7 * 16] and out["finite"]  # kron 4x4 on each of the 7 linears of a block
    for module, extra in [("matplotlib", "plots"), ("peft", "lora"), ("mpi4py", "mpi")]:
        assert f"ds_partitionsel[{extra}]" in out["missing"][module], out["missing"]
