"""FSDP2 (``fully_shard``) and HSDP with PartitionSel: real ranks (gloo, CPU), real DCP
checkpoints, the same selections as the DeepSpeed engine, and the ``torchrun`` command line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from distributed_utils import free_port, run_ranks
from real_pool import build_real_pool
from test_hf import LR, MICRO, _config, _engine_worker, _pools, _tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build_real_pool(tmp_path_factory.mktemp("real_fsdp"))


def _fsdp_trainer(real, world, out, shape=None, mp=None, resume=False, block=None):
    import transformers

    from ds_partitionsel.fsdp import PartitionSelFSDP, data_parallel_mesh, shard_model

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    pool, valid = _pools(real, tok)
    mesh = data_parallel_mesh(shape)
    model = shard_model(_tiny_model(len(tok), 0), mesh, mp_policy=mp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)  # DeepSpeed's torch AdamW
    return PartitionSelFSDP(model, optimizer, block or _config()["partitionsel"], pool, valid,
                            batch_size=MICRO * world, micro_batch=MICRO, pad_token_id=tok.pad_token_id, mesh=mesh,
                            clip=1.0, output_dir=out, resume=resume)


def _fsdp_worker(rank, world, real, out, steps, shape=None, save_at=None, resume_from=None):
    trainer = _fsdp_trainer(real, world, out, shape, resume=resume_from is not None)
    if resume_from:
        trainer.load_checkpoint(resume_from)
    records = []
    while trainer.global_step < steps:
        records.append(trainer.train_step())
        if save_at and trainer.global_step == save_at:
            trainer.save_checkpoint(os.path.join(out, f"step{save_at}"))
    trainer.sink.close()
    return {"selected": [r["selected"] for r in records], "loss": [r["train_loss"] for r in records],
            "steps": [r["step"] for r in records]}


def test_fsdp_selects_what_the_engine_selects_and_resumes_from_a_dcp_checkpoint(real, tmp_path):
    engine = run_ranks(_engine_worker, 2, real, 4)
    straight = run_ranks(_fsdp_worker, 2, real, str(tmp_path / "straight"), 4, None, 2)
    assert straight[0]["selected"] == straight[1]["selected"]  # identical on every rank
    assert straight[0]["selected"] == engine[0]  # same seed, pool, model and config: same batches
    assert (tmp_path / "straight" / "step2" / "partitionsel_resume.json").exists()
    assert (tmp_path / "straight" / "step2" / ".metadata").exists()  # a DCP checkpoint
    resumed = run_ranks(_fsdp_worker, 2, real, str(tmp_path / "straight"), 4, None, None,
                        str(tmp_path / "straight" / "step2"))
    assert resumed[0]["steps"] == [2, 3]
    assert resumed[0]["selected"] == straight[0]["selected"][2:]
    assert resumed[0]["loss"] == pytest.approx(straight[0]["loss"][2:], rel=1e-5)  # model + optimizer restored


@pytest.mark.parametrize("shape", [(2, 1), (1, 2)])
def test_hsdp_meshes_select_what_fsdp_selects(real, tmp_path, shape):
    """HSDP on a 2-D (replicate, shard) mesh: all its ranks are data-parallel, so the selection
    and the training equal plain FSDP's over the same 2 ranks."""
    fsdp = run_ranks(_fsdp_worker, 2, real, str(tmp_path / "fsdp"), 3)
    hsdp = run_ranks(_fsdp_worker, 2, real, str(tmp_path / "hsdp"), 3, shape)
    assert hsdp[0]["selected"] == hsdp[1]["selected"] == fsdp[0]["selected"]
    assert hsdp[0]["loss"] == pytest.approx(fsdp[0]["loss"], rel=1e-4)


def _bf16_worker(rank, world, real, out):
    """bf16 parameters (MixedPrecisionPolicy), float32 reductions: the sketches stay float32 and
    close to those of the float32 model with the same weights."""
    import transformers
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from ds_partitionsel.selector import Selector

    trainer = _fsdp_trainer(real, world, out, mp=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                     reduce_dtype=torch.float32))
    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    pool, valid = _pools(real, tok)
    reference = Selector(_tiny_model(len(tok), 0), trainer.cfg, pool, valid, batch_size=trainer.batch_size,
                         pad_token_id=tok.pad_token_id)  # the same weights, unsharded, float32
    ids = list(range(rank * 4, rank * 4 + 4))
    mixed, full = trainer.selector.sketch_records(pool, ids), reference.sketch_records(pool, ids)
    cosine = torch.nn.functional.cosine_similarity(mixed.double(), full.double(), dim=1)
    records = [trainer.train_step() for _ in range(2)]
    return {"dtype": str(mixed.dtype), "cosine": cosine.tolist(), "loss": [r["train_loss"] for r in records],
            "selected": [r["selected"] for r in records], "param_dtype": str(next(trainer.model.parameters()).dtype)}


def test_bf16_mixed_precision_sketches_in_float32(real, tmp_path):
    out = run_ranks(_bf16_worker, 2, real, str(tmp_path / "bf16"))
    assert out[0]["selected"] == out[1]["selected"]
    for rank in out:
        assert rank["dtype"] == "torch.float32"
        assert rank["param_dtype"] == "torch.float32"  # sharded masters stay float32; compute is bf16
        assert min(rank["cosine"]) > 0.95, rank["cosine"]  # bf16 compute, not a different gradient
        assert max(rank["cosine"]) < 1 - 1e-7, rank["cosine"]  # ... and really computed in bf16
        assert all(torch.isfinite(torch.tensor(rank["loss"])))


def _bad_worker(rank, world, real, out, case):
    from ds_partitionsel.config import ConfigError
    from ds_partitionsel.runs import ResumeMismatchError

    try:
        if case == "batch":
            import transformers

            from ds_partitionsel.fsdp import PartitionSelFSDP, data_parallel_mesh, shard_model

            tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
            pool, valid = _pools(real, tok)
            mesh = data_parallel_mesh()
            model = shard_model(_tiny_model(len(tok), 0), mesh)
            PartitionSelFSDP(model, torch.optim.AdamW(model.parameters()), _config()["partitionsel"], pool, valid,
                             batch_size=3, micro_batch=MICRO, pad_token_id=tok.pad_token_id, mesh=mesh)
        elif case == "root":
            import transformers
            from torch.distributed.fsdp import fully_shard

            from ds_partitionsel.fsdp import PartitionSelFSDP, data_parallel_mesh

            tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
            pool, valid = _pools(real, tok)
            mesh = data_parallel_mesh()
            model = _tiny_model(len(tok), 0)
            for block in model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh, reshard_after_forward=True)
            PartitionSelFSDP(model, torch.optim.AdamW(model.parameters()), _config()["partitionsel"], pool, valid,
                             batch_size=4, micro_batch=MICRO, pad_token_id=tok.pad_token_id, mesh=mesh)
        elif case == "mesh":
            from ds_partitionsel.fsdp import data_parallel_mesh

            data_parallel_mesh((2, 2))
        elif case == "resume":
            trainer = _fsdp_trainer(real, world, None)
            trainer.train_step()
            trainer.save_checkpoint(os.path.join(out, "ckpt"))
            block = _config()["partitionsel"]
            block["seed"] = 8
            _fsdp_trainer(real, world, None, block=block).load_checkpoint(os.path.join(out, "ckpt"))
    except (ConfigError, ResumeMismatchError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize("case,message", [
    ("batch", "batch_size 3 is not a multiple of micro_batch 2 x 2"),
    ("root", "the root module was sharded with reshard_after_forward=True"),
    ("mesh", "HSDP mesh shape (2, 2) must be (replicate, shard)"),
    ("resume", "ResumeMismatchError: checkpoint"),
])
def test_fsdp_refuses_bad_input(real, tmp_path, case, message):
    out = run_ranks(_bad_worker, 2, real, str(tmp_path), case)
    assert message in out[0] and message in out[1], out
    if case == "resume":
        assert "seed: 7 -> 8" in out[0], out[0]


def _torchrun(args, tmp_path, nproc=2):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO,
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), os.path.join(REPO, "launch", "train_fsdp.py"), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_train_fsdp_under_torchrun_writes_the_records_and_resumes(real, tmp_path):
    base = ["--tiny", "llama", "--num-layers", "2", "--tokenizer", str(real["tokenizer"]), "--pool", str(real["pool"]),
            "--set", "pool_factor=4", "--set", "sketch.modules=1", "--set", "validation.anchors=2"]
    out = tmp_path / "run"
    proc = _torchrun([*base, "--steps", "2", "--output-dir", str(out), "--save-dir", str(tmp_path / "ckpt")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from ds_partitionsel.records import read_metrics

    steps, _ = read_metrics(out)
    assert [s.step for s in steps] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2 and summary["trainer"] == "fsdp2"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step2"
    resumed = _torchrun([*base, "--steps", "3", "--output-dir", str(out), "--resume", str(tmp_path / "ckpt")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps, _ = read_metrics(out)
    assert [s.step for s in steps] == [0, 1, 2]
    # a user error: one line and status 2 (one process, no launcher: torchrun would report its own failure)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    bad = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train_fsdp.py"), *base, "--steps", "3",
                          "--output-dir", str(tmp_path / "x"), "--resume", str(tmp_path / "nope")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error: --resume" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
