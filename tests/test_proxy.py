"""Proxy-model scoring: a small LM sketches the pool while the main model trains under DeepSpeed."""
import pytest
import torch

from distributed_utils import run_ranks
from real_pool import build_real_pool


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build_real_pool(tmp_path_factory.mktemp("real"))


def _llama(vocab, hidden=32, layers=2, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg)


def _proxy_folder(path, vocab):
    """A smaller real model saved as a HF folder (3 blocks of width 16)."""
    _llama(vocab, hidden=16, layers=3, seed=1).save_pretrained(path)
    return str(path)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------- unit

def test_truncation_loading_and_bad_proxies(tmp_path):
    from ds_partitionsel.proxy import ProxyModel, truncate_blocks, vocab_size

    folder = _proxy_folder(tmp_path / "proxy", 97)
    proxy = ProxyModel(folder, layers=2, main_vocab=97)
    assert len(proxy.model.model.layers) == 2 and proxy.model.config.num_hidden_layers == 2
    assert not proxy.train and proxy.optimizer is None
    assert not any(p.requires_grad for p in proxy.model.parameters())  # frozen
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():  # the truncated model still runs
        assert proxy.model(input_ids=ids).logits.shape == (2, 9, 97)
    assert vocab_size(proxy.model) == 97

    with pytest.raises(ValueError, match="main model's tokenizer"):
        ProxyModel(folder, main_vocab=128)
    with pytest.raises(ValueError, match=r"proxy_layers must be an int in \[1, 3\]"):
        ProxyModel(folder, layers=4)
    with pytest.raises(ValueError, match="proxy_layers"):
        truncate_blocks(_llama(97), 0)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        ProxyModel(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="learning rate"):
        ProxyModel(folder, train=True, lr=0.0)


def test_trained_proxy_steps_on_the_batches_and_round_trips(tmp_path):
    from ds_partitionsel.proxy import ProxyModel

    folder = _proxy_folder(tmp_path / "proxy", 97)
    trained = ProxyModel(folder, train=True, lr=1e-2)
    frozen = ProxyModel(folder)
    before = _flat(trained.model)
    ids = torch.randint(0, 97, (4, 10))

    def loss_fn(batch, module):
        logits = module(input_ids=batch["input_ids"]).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten(),
                                                reduction="none").view(4, 9)
        return nll.mean(1), None

    losses = [trained.train_on([{"input_ids": ids}], loss_fn) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert not torch.equal(_flat(trained.model), before) and trained.steps == 3
    assert frozen.train_on([{"input_ids": ids}], loss_fn) is None
    torch.testing.assert_close(_flat(frozen.model), before, rtol=0, atol=0)

    copy = ProxyModel(folder, train=True, lr=1e-2)
    copy.load_state_dict(trained.state_dict())
    assert copy.steps == 3
    torch.testing.assert_close(_flat(copy.model), _flat(trained.model), rtol=0, atol=0)


# ----------------------------------------------------------------------------- 2 ranks

def _proxy_worker(rank, world, real, folder, train):
    import transformers

    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.engine import initialize

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    model = _llama(len(tok))
    main_before = _flat(model).clone()
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 6,
              "partitionsel": {"pool_factor": 4, "seed": 7, "mode": "sharded",
                               "validation": {"anchors": 4},
                               "sketch": {"modules": 2, "mode": "kron", "kron_dims": 8, "dim": 64,
                                          "micro_batch": 4, "proxy_model": folder, "proxy_layers": 2,
                                          "proxy_train": train, "proxy_lr": 1e-2}}}
    pool = CandidatePool(real["pool"], "train", tokenizer=tok)
    valid = CandidatePool(real["pool"], "valid")
    engine, _, _, _ = initialize(model, config, pool, valid, tokenizer=tok,
                                 optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3))
    # the sketches come from the proxy, never from the model being trained
    assert engine.sketcher.model is engine.proxy.model
    assert all(n.startswith("model.layers.") for n in engine.sketcher.module_names)
    proxy_before = _flat(engine.proxy.model).clone()
    records = [engine.train_step() for _ in range(3)]
    return {"selected": [r["selected"] for r in records],
            "proxy_loss": [r.get("proxy_loss") for r in records],
            "train_loss": [r["train_loss"] for r in records],
            "proxy_changed": not torch.equal(_flat(engine.proxy.model), proxy_before),
            "proxy_sum": float(_flat(engine.proxy.model).double().sum()),
            "main_changed": not torch.equal(_flat(engine.module), main_before)}


def test_proxy_run_trains_end_to_end_on_two_ranks(real, tmp_path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    folder = _proxy_folder(tmp_path / "proxy", len(tok))
    r0, r1 = run_ranks(_proxy_worker, 2, real, folder, True, deepspeed=True)
    assert r0["selected"] == r1["selected"]           # one selection, agreed on by both ranks
    assert all(len(s) == 4 for s in r0["selected"])
    assert r0["main_changed"] and r1["main_changed"]  # the main model trains
    assert all(torch.isfinite(torch.tensor(r0["train_loss"])))
    assert r0["proxy_changed"] and r1["proxy_changed"]  # the proxy trains on the selected batches
    assert r0["proxy_sum"] == r1["proxy_sum"]         # replicated training: identical copies
    assert all(loss is not None and loss > 0 for loss in r0["proxy_loss"])


def test_bad_proxy_config_is_a_config_error(tmp_path):
    from ds_partitionsel.config import ConfigError, PartitionSelConfig
    from ds_partitionsel.selector import build_proxy

    folder = _proxy_folder(tmp_path / "proxy", 97)
    main = _llama(128)

    def build(**sketch):
        return build_proxy(PartitionSelConfig.from_dict({"sketch": sketch}).sketch, main)

    assert build() is None
    assert build(proxy_model=_proxy_folder(tmp_path / "ok", 128), proxy_layers=1).model.config.num_hidden_layers == 1
    with pytest.raises(ConfigError, match="proxy_model.*main model's tokenizer"):
        build(proxy_model=folder)
    with pytest.raises(ConfigError, match="proxy_model.*not a Hugging Face model folder"):
        build(proxy_model=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"proxy_model.*proxy_layers must be an int in \[1, 3\]"):
        build(proxy_model=_proxy_folder(tmp_path / "ok2", 128), proxy_layers=5)
    for orphan in ({"proxy_train": True}, {"proxy_layers": 2}):  # no proxy_model: refused, not ignored
        with pytest.raises(ConfigError, match="need partitionsel.sketch.proxy_model"):
            build(**orphan)


def _proxy_resume_worker(rank, world, real, folder, ckpt, stop):
    """3 steps with a trained proxy: straight (``stop`` None), or ``stop`` steps, a checkpoint, a
    fresh engine and proxy (other init), and the rest. Returns the selections and the proxy."""
    import transformers

    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.engine import initialize

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 6,
              "partitionsel": {"pool_factor": 4, "seed": 7, "mode": "sharded", "validation": {"anchors": 4},
                               "sketch": {"modules": 2, "mode": "kron", "kron_dims": 8, "micro_batch": 4,
                                          "proxy_model": folder, "proxy_train": True, "proxy_lr": 1e-2}}}

    def engine(seed):
        torch.manual_seed(seed)
        model = _llama(len(tok))
        return initialize(model, config, CandidatePool(real["pool"], "train", tokenizer=tok),
                          CandidatePool(real["pool"], "valid"), tokenizer=tok,
                          optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3))[0]

    first = engine(0)
    selected = [first.train_step()["selected"] for _ in range(stop or 3)]
    if stop:
        first.save_checkpoint(ckpt, tag="t")
        second = engine(1)
        second.load_checkpoint(ckpt, tag="t")
        selected += [second.train_step()["selected"] for _ in range(3 - stop)]
        first = second
    return selected, float(_flat(first.proxy.model).double().sum())


def test_resume_restores_the_trained_proxy(real, tmp_path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    folder = _proxy_folder(tmp_path / "proxy", len(tok))
    straight = run_ranks(_proxy_resume_worker, 2, real, folder, None, None, deepspeed=True)
    resumed = run_ranks(_proxy_resume_worker, 2, real, folder, str(tmp_path / "ckpt"), 2, deepspeed=True)
    assert resumed[0] == resumed[1]
    assert resumed[0] == straight[0]  # same selections and the same trained proxy after a resume


def _hf_proxy_worker(rank, world, real, folder, out, steps, resume):
    import transformers

    from ds_partitionsel.data import CandidatePool
    from ds_partitionsel.hf import PartitionSelTrainer

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
          "partitionsel": {"pool_factor": 4, "seed": 7, "validation": {"anchors": 4},
                           "sketch": {"modules": 2, "mode": "kron", "kron_dims": 8, "micro_batch": 4,
                                      "proxy_model": folder, "proxy_train": True, "proxy_lr": 1e-2}}}
    args = transformers.TrainingArguments(output_dir=out, deepspeed=ds, per_device_train_batch_size=2,
                                          max_steps=steps, learning_rate=3e-3, lr_scheduler_type="constant",
                                          report_to=[], save_strategy="steps", save_steps=2, use_cpu=True,
                                          disable_tqdm=True)
    torch.manual_seed(1 if resume else 0)
    trainer = PartitionSelTrainer(model=_llama(len(tok)), args=args, processing_class=tok,
                                  candidate_pool=CandidatePool(real["pool"], "train", tokenizer=tok),
                                  valid_pool=CandidatePool(real["pool"], "valid"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    return float(_flat(trainer.selector.proxy.model).double().sum())


def test_trainer_checkpoints_carry_the_trained_proxy(real, tmp_path):
    import transformers

    from ds_partitionsel.records import read_metrics

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    folder = _proxy_folder(tmp_path / "proxy", len(tok))
    straight = run_ranks(_hf_proxy_worker, 1, real, folder, str(tmp_path / "a"), 3, False)[0]
    run_ranks(_hf_proxy_worker, 1, real, folder, str(tmp_path / "b"), 2, False)
    assert (tmp_path / "b" / "checkpoint-2" / "partitionsel_selector.pt").is_file()
    resumed = run_ranks(_hf_proxy_worker, 1, real, folder, str(tmp_path / "b"), 3, True)[0]
    assert [s.selected for s in read_metrics(tmp_path / "b")[0]] == [s.selected for s in read_metrics(tmp_path / "a")[0]]
    assert resumed == straight
