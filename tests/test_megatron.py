"""Megatron-core: tensor-parallel sketches equal the TP=1 ones, the TP x DP training loop
(launch/train_megatron.py) trains, agrees on every selection and resumes; unsupported layouts
are refused. Real megatron-core modules on gloo CPU ranks (tiny GPT models)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from distributed_utils import free_port, run_ranks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB = 200
SEQ = 24


def _batch():
    """4 rows of random tokens, one right-padded, labels on the second half of each row."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(2, VOCAB, (4, SEQ), generator=gen)
    attention = torch.ones(4, SEQ, dtype=torch.long)
    attention[1, 17:] = 0
    ids[1, 17:] = 0
    loss_mask = torch.zeros(4, SEQ, dtype=torch.bool)
    loss_mask[:, SEQ // 2:] = True
    loss_mask &= attention.bool()
    loss_mask[3, 3:6] = True
    return ids, attention, loss_mask


SKETCHES = {  # name -> GradientSketcher options
    "exact": dict(mode="exact"),
    "kron": dict(mode="kron", kron_dims=(8, 8)),            # both sides projected: summed over TP
    "kron_out_identity": dict(mode="kron", kron_dims=(8, 1024)),  # output side whole: concatenated
    "kron_dim": dict(mode="kron", kron_dims=(8, 8), dim=64, normalize=True),
    # the LM head (a column-parallel linear over the vocabulary), named explicitly
    "exact_head": dict(mode="exact", modules=["output_layer", "decoder.layers.1.mlp.linear_fc2"]),
}
MODULES = "all_linear"


def _sketches(tp):
    from ds_partitionsel.megatron import TensorParallelSketcher, build_gpt, initialize_parallel

    initialize_parallel(tp, seed=0)
    model = build_gpt(vocab_size=VOCAB, tp=tp, num_layers=2, hidden_size=32, num_heads=4, seq_length=SEQ, seed=3)
    ids, attention, loss_mask = _batch()
    out = {}
    for name, opts in SKETCHES.items():
        opts = {"normalize": False, "modules": MODULES, **opts}
        sk = TensorParallelSketcher(model, seed=11, **opts)
        feats, losses = sk.sketch(ids, attention, loss_mask, return_losses=True, batch_size=3)
        out[name] = feats.double().numpy()
        out[name + "_losses"] = losses.double().numpy()
    return model, out


def _per_sample_grads(model, names):
    """Whole per-sample weight gradients of ``names`` by autograd (one backward per row), the TP
    shards all-gathered and concatenated along the partition dimension."""
    from ds_partitionsel.collectives import Communicator
    from ds_partitionsel.megatron import current_layout, megatron_sequence_loss

    ids, attention, loss_mask = _batch()
    labels = torch.where(loss_mask, ids, torch.full_like(ids, -100))
    labels[:, 1:] = torch.where(attention[:, :-1].bool(), labels[:, 1:], torch.full_like(ids[:, 1:], -100))
    comm = Communicator(current_layout().tp_group)
    modules = dict(model.named_modules())
    rows = []
    model.eval()
    for i in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        batch = {"input_ids": ids[i:i + 1], "attention_mask": attention[i:i + 1], "labels": labels[i:i + 1]}
        loss, _ = megatron_sequence_loss(model, batch)
        loss.sum().backward()
        parts = []
        for n in names:
            w = modules[n].weight
            shards = comm.all_gather(w.grad.detach().double(), "gather")
            parts.append(torch.cat(shards, dim=getattr(w, "partition_dim", 0)).flatten())
        rows.append(torch.cat(parts))
    return torch.stack(rows).numpy()


def _check_agreement(rank):
    """check_tp_agreement on agreeing TP peers (no error), then on peers whose ids differ: the message."""
    from types import SimpleNamespace

    from ds_partitionsel.megatron import MegatronSelector, current_layout

    owner = SimpleNamespace(layout=current_layout(), cfg=SimpleNamespace(timeout_s=60.0))
    same = SimpleNamespace(step=3, record_ids=torch.tensor([5, 9, 1]), weights=torch.tensor([1.0, 0.5, 0.25]))
    MegatronSelector.check_tp_agreement(owner, same)
    other = SimpleNamespace(step=4, record_ids=torch.tensor([5, 9, 1 + rank]), weights=same.weights)
    try:
        MegatronSelector.check_tp_agreement(owner, other)
    except RuntimeError as e:
        return str(e)
    return ""


def _sketch_worker(rank, world):
    from megatron.core import parallel_state

    from ds_partitionsel.megatron import TensorParallelSketcher

    model2, tp2 = _sketches(2)
    names = TensorParallelSketcher(model2, modules=MODULES).module_names
    tp2["autograd"] = _per_sample_grads(model2, names)
    disagree = _check_agreement(rank)
    parallel_state.destroy_model_parallel()
    _, tp1 = _sketches(1)  # the same world as two TP=1 replicas
    parallel_state.destroy_model_parallel()
    return {"tp2": tp2, "tp1": tp1, "names": names, "disagree": disagree}


@pytest.fixture(scope="module")
def sketch_results():
    return run_ranks(_sketch_worker, 2, deepspeed=False, timeout=240)


def test_megatron_tp2_exact_sketch_equals_tp1_and_autograd(sketch_results):
    """TP=2 exact sketches = TP=1 exact sketches = whole per-sample gradients by autograd (relative
    Gram error < 1e-5, and elementwise in the TP=1 layout), identical on both TP ranks; column and
    row linears both hooked."""
    names = sketch_results[0]["names"]
    assert any("linear_qkv" in n for n in names) and any("linear_fc2" in n for n in names)
    assert "output_layer" not in names
    a, b = sketch_results[0]["tp2"], sketch_results[1]["tp2"]
    np.testing.assert_array_equal(a["exact"], b["exact"])  # TP peers: the same bits
    g2, g1, ga = a["exact"], sketch_results[0]["tp1"]["exact"], a["autograd"]
    for other in (g1, ga):
        gram, ref = g2 @ g2.T, other @ other.T
        assert np.abs(gram - ref).max() / np.abs(ref).max() < 1e-5
    for other in (g1, ga):  # and the TP=1 layout itself (row-major vec(W.grad) per module)
        assert np.abs(g2 - other).max() <= 1e-5 * np.abs(other).max()
    np.testing.assert_allclose(a["exact_losses"], sketch_results[0]["tp1"]["exact_losses"], rtol=1e-5)
    assert np.abs(g2).max() > 0


@pytest.mark.parametrize("kind", ["kron", "kron_out_identity", "kron_dim", "exact_head"])
def test_megatron_tp2_kron_sketch_equals_tp1(sketch_results, kind):
    """Kron sketches (projected on both sides: summed partial sketches; whole on the output
    side: concatenated shards; with the final dense projection), and the exact sketch of the LM
    head, equal the TP=1 sketches of the same weights and seed up to float rounding, and are the
    same bits on both TP ranks."""
    a, b = sketch_results[0]["tp2"][kind], sketch_results[1]["tp2"][kind]
    ref = sketch_results[0]["tp1"][kind]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.abs(ref).max() > 0


def test_megatron_tp_peers_that_disagree_are_caught(sketch_results):
    """MegatronSelector.check_tp_agreement passes agreeing TP peers and raises on every peer
    when one selected another batch (run in the sketch workers, TP=2)."""
    assert all("step 4" in r["disagree"] and "selected another batch" in r["disagree"] for r in sketch_results)


# ----------------------------------------------------------------------- the training loop

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from real_pool import build_real_pool

    return build_real_pool(tmp_path_factory.mktemp("real_megatron"))


@pytest.fixture(scope="module")
def indexed_pool(real, tmp_path_factory):
    """A pretraining pool built by tools/build_pool.py from Megatron indexed datasets (one per
    domain, written with megatron-core's IndexedDatasetBuilder from the real records), packed in
    48-token windows, 10% of the documents held out."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from transformers import AutoTokenizer

    from real_pool import load_tool

    root = tmp_path_factory.mktemp("indexed")
    tok = AutoTokenizer.from_pretrained(real["tokenizer"])
    docs = {}
    for line in open(real["train"]):
        rec = json.loads(line)
        docs.setdefault(rec["domain"], []).append(rec["prompt"] + "\n" + rec["response"])
    sources = []
    for domain, texts in sorted(docs.items()):
        builder = IndexedDatasetBuilder(str(root / f"{domain}.bin"), dtype=DType.optimal_dtype(len(tok)))
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)
            builder.add_document(torch.tensor(ids), [len(ids)])
        builder.finalize(str(root / f"{domain}.idx"))
        sources += ["--megatron", f"{domain}={root / domain}"]
    pool = root / "pool"
    code = load_tool("build_pool").main(["--tokenizer", str(real["tokenizer"]), *sources, "--pack", "48",
                                        "--valid-fraction", "0.1", "--out", str(pool), "--quiet"])
    assert code == 0
    return pool


def _torchrun(args, tmp_path, nproc=4, accelerator="cpu"):
    env = {**os.environ, "DS_ACCELERATOR": accelerator, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(REPO / "launch" / "train_megatron.py"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(run_dir):
    from ds_partitionsel.records import read_metrics

    return read_metrics(run_dir)


def test_megatron_tp2_dp2_trains_agrees_and_resumes(indexed_pool, tmp_path):
    """torchrun 4 ranks, TP=2 x DP=2, on a pool from Megatron indexed datasets: metrics.jsonl as
    launch/train.py writes it, every rank applies the step's selection (TP peers the same share,
    DP ranks disjoint shares covering the batch), the held-out loss falls; the same run at
    TP=1 x DP=2 selects the same batches with the same losses; the checkpoint saved after 2
    steps, resumed, selects and trains step 2 exactly as the uninterrupted run."""
    common = ["--tp", "2", "--pool", str(indexed_pool), "--lr", "3e-3"]
    straight, ckpt = tmp_path / "straight", tmp_path / "ckpt"
    _torchrun([*common, "--steps", "3", "--output-dir", str(straight), "--eval-at-start", "--eval-at-end",
               "--save-dir", str(ckpt), "--save-interval", "2"], tmp_path)
    steps, evals = _records(straight)
    assert [s.step for s in steps] == [0, 1, 2]
    assert all(s.batch_size == 4 and s.pool_size == 32 and len(s.selected) == 4 for s in steps)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["tensor_parallel"] == 2 and summary["data_parallel"] == 2
    assert evals[-1].eval_loss["mean"] < evals[0].eval_loss["mean"] - 0.05, evals

    per_rank = {}
    for r in range(4):
        per_rank[r] = [json.loads(line) for line in (straight / "ranks" / f"rank{r}.jsonl").read_text().splitlines()]
    for step in steps:
        rows = [per_rank[r][step.step] for r in range(4)]
        assert all(row["selected"] == step.selected for row in rows)
        by_dp = {}
        for row in rows:
            by_dp.setdefault(row["dp_rank"], []).append(tuple(row["my_records"]))
        assert sorted(by_dp) == [0, 1] and all(len(set(shares)) == 1 and len(shares) == 2 for shares in by_dp.values())
        assert sorted(by_dp[0][0] + by_dp[1][0]) == sorted(step.selected)

    # the same run without tensor parallelism (TP=1 x DP=2): the same batches, the same losses
    whole = tmp_path / "tp1"
    _torchrun([*common[2:], "--tp", "1", "--steps", "3", "--output-dir", str(whole)], tmp_path, nproc=2)
    for a, b in zip(steps, _records(whole)[0]):
        assert a.selected == b.selected
        assert abs(a.train_loss - b.train_loss) <= 1e-5 * abs(a.train_loss)

    # saved at step 2 (interval) and at the end; resume the step-2 checkpoint in a new run directory
    assert (ckpt / "latest").read_text() == "global_step3"
    assert sorted(p.name for p in (ckpt / "global_step2").iterdir()) == ["partitionsel_resume.json", "tp0.pt", "tp1.pt"]
    resumed_dir = tmp_path / "resumed"
    _torchrun([*common, "--steps", "3", "--output-dir", str(resumed_dir), "--resume", str(ckpt / "global_step2")],
              tmp_path)
    resumed, _ = _records(resumed_dir)
    assert [s.step for s in resumed] == [2]
    assert resumed[0].selected == steps[2].selected
    assert abs(resumed[0].train_loss - steps[2].train_loss) <= 1e-6 * abs(steps[2].train_loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_megatron_trains_on_cuda_with_nccl(indexed_pool, tmp_path):
    """One rank on CUDA (NCCL, Megatron's own CUDA buffer and RNG tracker): trains and logs as on the CPU."""
    out = tmp_path / "cuda"
    _torchrun(["--tp", "1", "--pool", str(indexed_pool), "--steps", "2", "--output-dir", str(out), "--eval-at-end"],
              tmp_path, nproc=1, accelerator="cuda")
    steps, evals = _records(out)
    assert [s.step for s in steps] == [0, 1] and len(evals) == 1
    assert json.loads((out / "summary.json").read_text())["device"].startswith("cuda")


# ----------------------------------------------------------------------- refused layouts and flags

def _launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_megatron_under_test", REPO / "launch" / "train_megatron.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("flags, world, message", [
    (["--tp", "3"], 4, "does not divide the world of 4 ranks"),
    (["--tp", "2", "--pp", "2"], 4, "pipeline parallelism (2 stages) is not supported"),
    (["--tp", "2", "--sequence-parallel"], 4, "sequence parallelism is not supported"),
    (["--tp", "2", "--set", "sketch.proxy_model=proxy"], 2, "proxy_model is not supported"),
    (["--tp", "2", "--set", "sketch.modules=lora"], 2, "needs a peft LoRA model"),
    (["--tp", "2", "--num-heads", "3", "--hidden-size", "48"], 2, "--num-heads 3 must be a multiple of"),
    (["--tp", "3", "--num-heads", "6", "--hidden-size", "48", "--ffn-hidden-size", "192"], 3, "must divide 128"),
])
def test_megatron_launcher_refuses_bad_layouts(real, tmp_path, monkeypatch, capsys, flags, world, message):
    """Refused with one line and status 2, before any process group or model exists (the world
    is only announced: no other rank runs), nothing written."""
    mod = _launcher()
    for key, value in {"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    code = mod.main(["--pool", str(real["pool"]), "--steps", "1", "--output-dir", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists()


def test_megatron_launcher_refuses_a_checkpoint_of_another_model(real, tmp_path, monkeypatch, capsys):
    """--resume of a checkpoint whose model has another --tp / size: refused before any process
    group exists, naming each difference; a folder that is no checkpoint: refused too."""
    mod = _launcher()
    for key, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    ckpt = tmp_path / "ckpt"
    (ckpt / "global_step2").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step2")
    shape = {"tp": 4, "num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 256,
             "seq_length": 80, "vocab_size": 999}
    (ckpt / "global_step2" / "partitionsel_resume.json").write_text(json.dumps({"megatron": shape}))
    args = ["--pool", str(real["pool"]), "--steps", "3", "--tp", "2"]
    assert mod.main([*args, "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "tp: 4 -> 2" in err and "vocab_size: 999 -> " in err, err
    assert mod.main([*args, "--resume", str(tmp_path)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    (ckpt / "latest").write_text("global_step9")  # latest names a folder without a record
    assert mod.main([*args, "--resume", str(ckpt)]) == 2
    assert "has no partitionsel_resume.json" in capsys.readouterr().err


def test_megatron_sketcher_refuses_pipeline_and_sequence_parallel_models():
    from types import SimpleNamespace

    from ds_partitionsel.config import ConfigError
    from ds_partitionsel.megatron import check_megatron_model

    base = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False,
                context_parallel_size=1, num_moe_experts=None)
    for change, message in (({"pipeline_model_parallel_size": 2}, "pipeline parallelism"),
                            ({"sequence_parallel": True}, "sequence parallelism"),
                            ({"num_moe_experts": 4}, "MoE")):
        model = torch.nn.Module()
        model.config = SimpleNamespace(**{**base, **change})
        with pytest.raises(ConfigError, match=message):
            check_megatron_model(model)
    with pytest.raises(TypeError, match="not a Megatron-core model"):
        check_megatron_model(torch.nn.Linear(2, 2))
