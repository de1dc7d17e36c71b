"""Checks that need a CUDA device (``pytest -m gpu``; skipped where there is none).

They pin down what the CPU suite cannot: sketches computed on the GPU equal those on the CPU,
and the collectives layer moves CPU tensors to the NCCL device and back. (The selection itself
runs on the host: the engine hands it the sketches as CPU tensors, (pool, p) floats.)
``tools/gpu_check.sh`` runs them together with the demo and the benchmarks on a GPU machine.
"""
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _tiny_llama(vocab=128, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg)


def _batch(vocab=128, n=6, t=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    attn = torch.ones(n, t, dtype=torch.long)
    attn[1, -5:] = 0  # padded rows
    loss_mask = torch.ones(n, t, dtype=torch.bool)
    loss_mask[:, :4] = False
    return ids, attn, loss_mask


@pytest.mark.parametrize("mode", ["exact", "kron"])
def test_sketches_on_cuda_equal_sketches_on_cpu(mode):
    from ds_partitionsel.sketch import GradientSketcher

    model = _tiny_llama()
    ids, attn, mask = _batch()
    cpu = GradientSketcher(model, modules=2, mode=mode, kron_dims=8, seed=3).sketch(ids, attn, mask)
    gpu_model = _tiny_llama().cuda()
    gpu = GradientSketcher(gpu_model, modules=2, mode=mode, kron_dims=8, seed=3).sketch(
        ids.cuda(), attn.cuda(), mask.cuda())
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_communicator_uses_the_nccl_device(tmp_path):
    import torch.distributed as dist

    from ds_partitionsel.collectives import Communicator
    from ds_partitionsel.launch_env import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        comm = Communicator(timeout=60, context="gpu test")
        assert comm.backend == "nccl" and comm.device.type == "cuda"
        out = comm.all_reduce(torch.arange(4, dtype=torch.float64), "sum", "probe")
        assert out.device.type == "cpu" and out.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        dist.destroy_process_group()
