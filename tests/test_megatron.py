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
}
MODULES = "all_linear"


def _sketches(tp):
    from ds_partitionsel.megatron import TensorParallelSketcher, build_gpt, initialize_parallel

    initialize_parallel(tp, seed=0)
    model = build_gpt(vocab_size=VOCAB, tp=tp, num_layers=2, hidden_size=32, num_heads=4, seq_length=SEQ, seed=3)
    ids, attention, loss_mask = _batch()
    out = {}
    for name, opts in SKETCHES.items():
        opts = {"normalize": False, **opts}
        sk = TensorParallelSketcher(model, modules=MODULES, seed=11, **opts)
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


def _sketch_worker(rank, world):
    from megatron.core import parallel_state

    from ds_partitionsel.megatron import TensorParallelSketcher

    model2, tp2 = _sketches(2)
    names = TensorParallelSketcher(model2, modules=MODULES).module_names
    tp2["autograd"] = _per_sample_grads(model2, names)
    parallel_state.destroy_model_parallel()
    _, tp1 = _sketches(1)  # the same world as two TP=1 replicas
    parallel_state.destroy_model_parallel()
    return {"tp2": tp2, "tp1": tp1, "names": names}


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


@pytest.mark.parametrize("kind", ["kron", "kron_out_identity", "kron_dim"])
def test_megatron_tp2_kron_sketch_equals_tp1(sketch_results, kind):
    """Kron sketches (projected on both sides: summed partial sketches; whole on the output
    side: concatenated shards; with the final dense projection) equal the TP=1 sketches of the
    same weights and seed up to float rounding, and are the same bits on both TP ranks."""
    a, b = sketch_results[0]["tp2"][kind], sketch_results[1]["tp2"][kind]
    ref = sketch_results[0]["tp1"][kind]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.abs(ref).max() > 0
