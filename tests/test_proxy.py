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
