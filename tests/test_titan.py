"""The torchtitan data loader (ds_partitionsel.titan) against torchtitan's own classes: built by
torchtitan's ``Config.build`` with the arguments its Trainer passes, batches its cross-entropy
takes, checkpointed through DCP as its checkpointer does, on 2 real ranks (gloo, CPU).

torchtitan 0.3.0 pins ``datasets<4.8`` (the project runs 5.x), so this module runs in an
environment of its own (``pip install torchtitan==0.3.0`` and this package) and is skipped
elsewhere; torchtitan's full Trainer needs an accelerator: ``tests/test_gpu.py``."""

import pytest
import torch

pytest.importorskip("torchtitan.components.dataloader")

from distributed_utils import run_ranks  # noqa: E402
from real_pool import build_real_pool  # noqa: E402

MICRO, ACCUM, LR = 2, 2, 3e-3
BLOCK = {"method": "partitionsel", "pool_factor": 2, "seed": 7, "sketch": {"modules": 2, "mode": "exact",
                                                                           "micro_batch": 8},
         "validation": {"anchors": 4}}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build_real_pool(tmp_path_factory.mktemp("real_titan"))


class TokensToLogits(torch.nn.Module):
    """A model called as torchtitan's decoders are: ``model(tokens) -> logits``."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, tokens):
        return self.hf(input_ids=tokens).logits


def _model(vocab):
    import transformers

    torch.manual_seed(0)
    return TokensToLogits(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=256)))


def _loader(real, rank, world, block=None):
    import transformers

    from ds_partitionsel.titan import PartitionSelDataLoader

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    config = PartitionSelDataLoader.Config(dataset_path=str(real["pool"]), partitionsel=block or BLOCK,
                                           gradient_accumulation_steps=ACCUM, pad_token_id=tok.pad_token_id)
    # the arguments torchtitan's Trainer passes to config.dataloader.build
    loader = config.build(dp_world_size=world, dp_rank=rank, tokenizer=None, seq_len=256, local_batch_size=MICRO,
                          snapshot_every_n_steps=None)
    return loader, len(tok)


def _train(rank, world, real, steps, save_to=None, resume_from=None):
    """torchtitan's train step: ACCUM micro batches, its token-sum cross-entropy over the global
    token count, DDP's gradient mean, AdamW."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel
    from torchtitan.components.loss import cross_entropy_loss

    loader, vocab = _loader(real, rank, world)
    model = _model(vocab)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loader.attach(model, lr=LR)
    start = 0
    if resume_from:
        model_state, optim_state = get_state_dict(model, optimizer)  # as torchtitan's checkpointer
        state = {"dataloader": loader, "model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=resume_from)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = loader.state_dict()["global_step"]
    batches, shapes = iter(loader), set()
    for step in range(start, steps):
        optimizer.zero_grad()
        micro = [next(batches) for _ in range(ACCUM)]
        tokens = sum(int((labels != -100).sum()) for _, labels in micro)
        for inputs, labels in micro:
            shapes.add((tuple(inputs["input"].shape), tuple(labels.shape)))
            cross_entropy_loss(ddp(inputs["input"]), labels).div(tokens).backward()
        optimizer.step()
        if save_to and step + 1 == steps // 2:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"dataloader": loader, "model": model_state, "optim": optim_state}, checkpoint_id=save_to)
    runner = loader.step_runner  # the last step's selection (closed when the next step is asked for)
    return {"start": start, "next": loader.state_dict()["global_step"], "shapes": sorted(shapes),
            "selection": runner.selection.record_ids.tolist(), "step": runner.selection.step}


def test_titan_loader_selects_identically_and_resumes_from_a_dcp_checkpoint(real, tmp_path):
    straight = run_ranks(_train, 2, real, 4, str(tmp_path / "ckpt"), deepspeed=False)
    assert straight[0]["selection"] == straight[1]["selection"]  # identical on every rank
    assert straight[0]["step"] == 3 and straight[0]["next"] == 4
    shapes = [tuple(map(tuple, s)) for r in straight for s in r["shapes"]]
    assert shapes and all(i == lab and i[0] == MICRO for i, lab in shapes)  # (local batch, T-1): torchtitan's loss
    assert (tmp_path / "ckpt" / ".metadata").exists()
    resumed = run_ranks(_train, 2, real, 4, None, str(tmp_path / "ckpt"), deepspeed=False)
    assert resumed[0]["start"] == 2  # the checkpoint after step 2 carries the selector: step 2 is next
    assert resumed[0]["selection"] == straight[0]["selection"]  # the last step selects what the straight run did


def _bad(rank, world, real, case):
    from ds_partitionsel.config import ConfigError
    from ds_partitionsel.titan import PartitionSelDataLoader

    try:
        if case == "weights":
            _loader(real, rank, world, dict(BLOCK, use_weights=True))
        elif case == "no_pool":
            PartitionSelDataLoader.Config(partitionsel=BLOCK).build(dp_world_size=world, dp_rank=rank,
                                                                    local_batch_size=MICRO, seq_len=256)
        elif case == "seq_len":
            PartitionSelDataLoader.Config(dataset_path=str(real["pool"]), partitionsel=BLOCK, pad_token_id=0).build(
                dp_world_size=world, dp_rank=rank, local_batch_size=MICRO, seq_len=4)
        elif case == "no_attach":
            next(iter(_loader(real, rank, world)[0]))
    except (ConfigError, RuntimeError) as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case,message", [("weights", "use_weights is not supported"),
                                          ("no_pool", "needs dataloader.dataset_path"),
                                          ("seq_len", "more than training.seq_len 4"),
                                          ("no_attach", "attach(model, lr) was not called")])
def test_titan_loader_refuses_bad_input(real, case, message):
    out = run_ranks(_bad, 2, real, case, deepspeed=False)
    assert message in out[0] and message in out[1], out


@pytest.mark.gpu
def test_torchtitan_trainer_trains_on_partitionsel_batches_and_checkpoints_them(real, tmp_path):
    """torchtitan's own Trainer (Llama 3 debug model) on one CUDA rank with this loader: it
    trains, and its DCP checkpoint holds the loader's state (the next step to select)."""
    import os
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("torchtitan's Trainer needs an accelerator")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "titan"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", "29561", "-m", "torchtitan.train", "--module", "ds_partitionsel.titan",
           "--config", "partitionsel_llama3_debugmodel", "--dataloader.dataset_path", str(real["pool"]),
           "--hf_assets_path", str(real["tokenizer"]), "--training.steps", "4", "--training.seq_len", "256",
           "--training.local_batch_size", "2", "--checkpoint.enable", "--checkpoint.interval", "2",
           "--dump_folder", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import torch.distributed.checkpoint as dcp

    steps = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert steps, "no checkpoint written"
    keys = dcp.FileSystemReader(str(out / "checkpoint" / steps[-1])).read_metadata().state_dict_metadata
    assert any(k.startswith("dataloader") and k.endswith("global_step") for k in keys), sorted(keys)[:20]
