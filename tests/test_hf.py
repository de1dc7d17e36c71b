"""The Hugging Face Trainer on the same selector as the DeepSpeed engine: real ranks, real
DeepSpeed (ZeRO-2), a real-data pool, the real launchers."""
import json
import os
import subprocess
import sys

import pytest
import torch

from distributed_utils import free_port, run_ranks
from real_pool import build_real_pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO, LR = 2, 3e-3


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build_real_pool(tmp_path_factory.mktemp("real_hf"))


def _config():
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 6, "gradient_clipping": 1.0,
            "optimizer": {"type": "Adam", "params": {"lr": LR, "torch_adam": True, "adam_w_mode": True,
                                                     "weight_decay": 0.0}},
            "partitionsel": {"method": "partitionsel", "pool_factor": 4, "seed": 7, "mode": "auto",
                             "sketch": {"modules": 2, "mode": "exact", "micro_batch": 8},
                             "validation": {"anchors": 4}}}


def _tiny_model(vocab, seed):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256))


def _pools(real, tok):
    from ds_partitionsel.data import CandidatePool

    return CandidatePool(real["pool"], "train", tokenizer=tok), CandidatePool(real["pool"], "valid")


def _engine_worker(rank, world, real, steps):
    import transformers

    from ds_partitionsel.engine import initialize

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    pool, valid = _pools(real, tok)
    engine, _, _, _ = initialize(_tiny_model(len(tok), 0), _config(), pool, valid, tokenizer=tok)
    return [engine.train_step()["selected"] for _ in range(steps)]


def _trainer(real, out, steps, seed=0):
    import transformers

    from ds_partitionsel.hf import PartitionSelTrainer

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    pool, valid = _pools(real, tok)
    args = transformers.TrainingArguments(
        output_dir=out, deepspeed=_config(), per_device_train_batch_size=MICRO, max_steps=steps,
        learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        report_to=[], logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True,
        disable_tqdm=True)
    return PartitionSelTrainer(model=_tiny_model(len(tok), seed), args=args, processing_class=tok,
                               candidate_pool=pool, valid_pool=valid)


def _trainer_worker(rank, world, real, out, steps, resume_to=None):
    trainer = _trainer(real, out, steps)
    trainer.train()
    info = {"deepspeed": trainer.is_deepspeed_enabled, "logged": sorted(trainer.state.log_history[0])}
    if resume_to:  # a fresh model and trainer: everything must come from the checkpoint
        trainer = _trainer(real, out, resume_to, seed=99)
        trainer.train(resume_from_checkpoint=True)
    return info


def _selected(out):
    from ds_partitionsel.records import read_metrics

    steps, _ = read_metrics(out)
    return [s.step for s in steps], [s.selected for s in steps]


def test_trainer_selects_what_the_engine_selects_and_resumes_from_its_checkpoint(real, tmp_path):
    engine = run_ranks(_engine_worker, 2, real, 4)
    assert engine[0] == engine[1]
    info = run_ranks(_trainer_worker, 2, real, str(tmp_path / "straight"), 4)
    assert info[0]["deepspeed"] and info[1]["deepspeed"]
    assert {"partitionsel/utility", "partitionsel/selected/math", "loss"} <= set(info[0]["logged"])
    steps, straight = _selected(tmp_path / "straight")
    assert steps == [0, 1, 2, 3]
    assert straight == engine[0]  # same seed, pool, model and config: the same selections
    run_ranks(_trainer_worker, 2, real, str(tmp_path / "resumed"), 2, 4)
    assert (tmp_path / "resumed" / "checkpoint-2" / "partitionsel_resume.json").exists()
    steps, resumed = _selected(tmp_path / "resumed")
    assert steps == [0, 1, 2, 3] and resumed == straight


def _bad_trainer(rank, world, real, out, case):
    import transformers

    from ds_partitionsel.config import ConfigError
    from ds_partitionsel.hf import PartitionSelTrainer

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    pool, valid = _pools(real, tok)
    cfg = _config()
    kwargs = {"max_steps": 2}
    if case == "no_block":
        cfg.pop("partitionsel")
    elif case == "no_max_steps":
        kwargs = {}
    elif case == "typo":
        cfg["partitionsel"]["pool_facter"] = 3
    args = transformers.TrainingArguments(output_dir=out, deepspeed=cfg, per_device_train_batch_size=MICRO,
                                          learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0,
                                          report_to=[], use_cpu=True, **kwargs)
    try:
        PartitionSelTrainer(model=_tiny_model(len(tok), 0), args=args, processing_class=tok,
                            candidate_pool=pool, valid_pool=valid)
    except ConfigError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case,message", [("no_block", "needs a 'partitionsel' block"),
                                          ("no_max_steps", "max_steps"),
                                          ("typo", "pool_facter")])
def test_trainer_refuses_bad_config_before_training(real, tmp_path, case, message):
    out = run_ranks(_bad_trainer, 1, real, str(tmp_path / case), case)[0]
    assert message in out, out


LAUNCHERS = {
    "torchrun": lambda py, port: [os.path.join(os.path.dirname(py), "torchrun"), "--nproc_per_node", "2",
                                  "--master_addr", "127.0.0.1", "--master_port", str(port)],
    "deepspeed": lambda py, port: [os.path.join(os.path.dirname(py), "deepspeed"), "--num_gpus", "2",
                                   "--master_addr", "127.0.0.1", "--master_port", str(port)],
    # `--cpu` would make accelerate start one process: its multi-process launcher (torchrun's) runs
    # gloo ranks on the CPU as well
    "accelerate": lambda py, port: [os.path.join(os.path.dirname(py), "accelerate"), "launch", "--multi_gpu",
                                    "--num_processes", "2", "--num_machines", "1", "--main_process_ip",
                                    "127.0.0.1", "--main_process_port", str(port), "--dynamo_backend", "no",
                                    "--mixed_precision", "no"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_train_hf_runs_two_ranks_under_each_launcher(real, tmp_path, launcher):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    cmd = LAUNCHERS[launcher](sys.executable, free_port()) + [
        "launch/train_hf.py", "--tiny", "llama", "--num-layers", "2", "--tokenizer", str(real["tokenizer"]),
        "--pool", str(real["pool"]), "--deepspeed_config", "ds_configs/zero2.json", "--steps", "2",
        "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(sum(r["domain_counts"].values()) == 4 for r in records)
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
