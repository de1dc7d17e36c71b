"""Cheap selection: amortized pools (steps_per_pool), short scoring windows (sketch.score_len),
forward-only LM-head features (sketch.mode head / head_kron) and proxies built from a config,
each against an independent computation."""
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


def _pools(real):
    import transformers

    from ds_partitionsel.data import CandidatePool

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    return tok, CandidatePool(real["pool"], "train", tokenizer=tok), CandidatePool(real["pool"], "valid")


def _selector(real, block, batch_size=4, model=None):
    from ds_partitionsel.config import PartitionSelConfig
    from ds_partitionsel.selector import Selector

    tok, pool, valid = _pools(real)
    model = model if model is not None else _llama(len(tok))
    cfg = PartitionSelConfig.from_dict(block)
    return Selector(model, cfg, pool, valid, batch_size=batch_size, pad_token_id=tok.pad_token_id)


BLOCK = {"pool_factor": 4, "seed": 11, "validation": {"anchors": 4},
         "sketch": {"modules": 1, "mode": "kron", "kron_dims": 8, "micro_batch": 8}}


def _independent_amortized(features, domains, target, counts_of, k, m, first_step, cfg, lr):
    """m selections on the same features, each without the rows chosen before it: the
    single-process selection of ds_partitionsel.select on explicit subsets."""
    from ds_partitionsel import select
    from ds_partitionsel.sampler import generator

    n = features.shape[0]
    chosen, out = [], []
    for j in range(m):
        left = [i for i in range(n) if i not in set(chosen)]
        budgets = counts_of(domains[left])
        sel = select(cfg.method, features[left], domains[left], target, budgets, lr=lr, ridge=cfg.ridge,
                     generator=generator("select", cfg.seed, first_step + j), rule=cfg.rule, nonneg=cfg.nonneg,
                     temperature=cfg.temperature, drop_nonfinite=True)
        picked = [left[i] for i in sel.indices.tolist()]
        chosen += picked
        out.append((picked, sel.weights.double()))
    return out


@pytest.mark.parametrize("m", [2, 3])
def test_amortized_batches_equal_m_selections_minus_the_chosen_rows(real, m):
    from ds_partitionsel.budgets import allocate_budgets

    block = dict(BLOCK, steps_per_pool=m)
    sel = _selector(real, block)
    cfg = sel.cfg
    got = [sel.select(s, lr=1e-3) for s in range(2 * m)]  # two groups
    for g in range(2):
        steps = got[g * m:(g + 1) * m]
        pool_ids = steps[0].plan.pool_ids
        assert all(torch.equal(s.plan.pool_ids, pool_ids) for s in steps)  # one pool per group
        assert torch.equal(pool_ids, sel.sampler.pool(g))                  # a function of (seed, group)
        # the independent computation: a fresh selector (same model and config) for the features
        fresh = _selector(real, block, model=sel.model)
        feats = fresh.sketch_records(fresh.pool, pool_ids.tolist())
        target = fresh.validation_target(g * m)
        domains = fresh.pool.domains[pool_ids]
        n_dom = len(fresh.pool.domain_names)

        def counts_of(doms):
            c = torch.bincount(doms, minlength=n_dom)
            return allocate_budgets(c, 4, cfg.budget.strategy, target_counts=fresh.target_counts(),
                                    gains=[0.0] * n_dom, floor=cfg.budget.floor, lam=cfg.budget.curriculum_lambda)

        want = _independent_amortized(feats, domains, target, counts_of, 4, m, g * m, cfg, 1e-3)
        for s, (picked, weights) in zip(steps, want):
            assert s.indices.tolist() == picked
            torch.testing.assert_close(s.weights.double(), weights, rtol=1e-6, atol=1e-9)
        all_picked = sum((s.indices.tolist() for s in steps), [])
        assert len(set(all_picked)) == m * 4  # disjoint batches
    # the scoring pass is paid once per group: later steps of a group neither sketch nor solve
    assert all(s.timings.sketch > 0 for s in got[::m])
    assert all(s.timings.sketch == 0 and s.bytes_sent == 0 for j, s in enumerate(got) if j % m)


def _train_on(model, pool, records, pad):
    """A real SGD step of the scorer on its batch, so that the state moves between steps."""
    from ds_partitionsel.loss import per_sequence_loss

    batch = pool.collate(list(records), pad)
    per_seq, _ = per_sequence_loss(model, batch, torch.device("cpu"))
    model.zero_grad()
    per_seq.mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    model.zero_grad()


def _run(real, block, steps, stop=None):
    """``steps`` selections that each train the scored model; with ``stop``: after ``stop`` steps,
    the state goes through state_dict into a new selector (and a copy of the model), as a resume."""
    tok, _, _ = _pools(real)
    sel = _selector(real, block)
    out = []
    for s in range(steps):
        if s == stop:
            state = sel.state_dict()
            model = _llama(len(tok), seed=5)
            model.load_state_dict(sel.model.state_dict())
            sel = _selector(real, block, model=model)
            sel.load_state_dict(state)
        chosen = sel.select(s, lr=1e-3)
        out.append(chosen.record_ids.tolist())
        _train_on(sel.model, sel.pool, chosen.record_ids.tolist(), sel.pad_token_id)
    return out, sel


def test_resume_in_the_middle_of_a_group_selects_what_a_straight_run_selects(real):
    block = dict(BLOCK, steps_per_pool=3, validation={"anchors": 4, "ema": 0.5})
    straight, _ = _run(real, block, 6)
    for stop in (1, 2, 4):
        resumed, sel = _run(real, block, 6, stop=stop)
        assert resumed == straight, stop
    # at a group boundary nothing is carried: the next group is selected from the pool
    _, sel = _run(real, block, 3)
    assert "group" not in sel.state_dict()
    # a carried group of another shape is refused
    _, mid = _run(real, block, 2)
    state = mid.state_dict()
    other = _selector(real, dict(block, steps_per_pool=2))
    with pytest.raises(ValueError, match="another configuration"):
        other.load_state_dict(state)


def _two_rank_worker(rank, world, real, block):
    sel = _selector(real, block)
    got = [sel.select(s, lr=1e-3) for s in range(4)]
    return [s.record_ids.tolist() for s in got], [list(s.my_records) for s in got]


def test_two_ranks_select_what_one_rank_selects(real):
    block = dict(BLOCK, steps_per_pool=2, mode="sharded", sketch=dict(BLOCK["sketch"], score_len=24))
    (ids0, mine0), (ids1, mine1) = run_ranks(_two_rank_worker, 2, real, block, deepspeed=False)
    (ids_one, _), = run_ranks(_two_rank_worker, 1, real, block, deepspeed=False)
    assert ids0 == ids1 == ids_one
    for a, b, whole in zip(mine0, mine1, ids0):  # each rank trains its half of the same batch
        assert sorted(a + b) == sorted(whole) and len(a) == len(b) == 2


def test_amortization_and_windows_bad_input(real):
    from ds_partitionsel.config import ConfigError, PartitionSelConfig, check_pool_fit

    with pytest.raises(ConfigError, match="cannot hold partitionsel.steps_per_pool = 3"):
        _selector(real, dict(BLOCK, pool_size=8, steps_per_pool=3))
    with pytest.raises(ConfigError, match="raise pool_factor to at least 5"):
        PartitionSelConfig.from_dict({"pool_factor": 4, "steps_per_pool": 5})
    with pytest.raises(ConfigError, match="method 'full'"):
        PartitionSelConfig.from_dict({"method": "full", "steps_per_pool": 2})
    with pytest.raises(ConfigError, match="steps_per_pool must be a positive integer"):
        PartitionSelConfig.from_dict({"steps_per_pool": 0})
    with pytest.raises(ConfigError, match="steps_per_pool must be a positive integer"):
        PartitionSelConfig.from_dict({"steps_per_pool": 2.0})
    with pytest.raises(ConfigError, match="score_len must be null"):
        PartitionSelConfig.from_dict({"sketch": {"score_len": 1}})
    with pytest.raises(ConfigError, match="cannot hold"):
        check_pool_fit(PartitionSelConfig.from_dict({"pool_size": 8, "steps_per_pool": 3}), 4, 1, 100)


# ----------------------------------------------------------------------------- windows

def test_score_windows_are_seeded_hold_a_label_and_equal_sketching_the_cut_records(real):
    from ds_partitionsel.sketch import label_mask
    from ds_partitionsel.windows import crop_windows, window_starts

    tok, pool, _ = _pools(real)
    ids = list(range(12))
    batch = pool.collate(ids, tok.pad_token_id)
    W = 16
    seed = BLOCK["seed"]
    cut = crop_windows(batch, ids, W, seed=seed, key=("train", "pool", 0))
    assert cut["input_ids"].shape == (12, W)
    labels = label_mask(cut["attention_mask"], cut["loss_mask"])
    assert bool(labels.any(1).all())  # every window holds a label and its predecessor
    lengths = batch["attention_mask"].sum(1)
    starts = window_starts(lengths, label_mask(batch["attention_mask"], batch["loss_mask"]), ids, W, seed,
                           ("train", "pool", 0))
    for row, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        want = batch["input_ids"][row, s:s + min(W, n)]
        assert cut["input_ids"][row, :want.numel()].tolist() == want.tolist()
    # a function of (seed, key, record): the same in another batch order, another with another key
    again = crop_windows(pool.collate(ids[::-1], tok.pad_token_id), ids[::-1], W, seed, ("train", "pool", 0))
    assert torch.equal(again["input_ids"].flip(0), cut["input_ids"])
    other = window_starts(lengths, label_mask(batch["attention_mask"], batch["loss_mask"]), ids, W, seed,
                          ("train", "pool", 1))
    assert not torch.equal(other, starts)
    with pytest.raises(ValueError, match="score_len must be >= 2"):
        window_starts(lengths, labels, ids, 1, 3, "k")

    # the selector scores exactly the windows: the sketch of the cut batch, row by row
    sel = _selector(real, dict(BLOCK, sketch=dict(BLOCK["sketch"], score_len=W)))
    got = sel.sketch_records(pool, ids, window=("pool", 0))
    want = sel.sketcher.sketch(cut["input_ids"], cut["attention_mask"], cut["loss_mask"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    whole = sel.sketch_records(pool, ids)  # without a key: whole sequences
    assert not torch.allclose(whole, got)


def _engine_resume_worker(rank, world, real, ckpt, stop):
    """4 steps of the DeepSpeed engine with steps_per_pool 2 (straight, or a checkpoint after
    ``stop`` steps, in the middle of a group, and a fresh engine of another init)."""
    from ds_partitionsel.engine import initialize

    tok, _, _ = _pools(real)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 6,
              "partitionsel": dict(BLOCK, steps_per_pool=2, mode="sharded")}

    def engine(seed):
        torch.manual_seed(seed)
        model = _llama(len(tok), seed=seed)
        _, pool, valid = _pools(real)
        return initialize(model, config, pool, valid, tokenizer=tok,
                          optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3))[0]

    first = engine(0)
    selected = [first.train_step()["selected"] for _ in range(stop or 4)]
    if stop:
        first.save_checkpoint(ckpt, tag="t")
        second = engine(1)
        second.load_checkpoint(ckpt, tag="t")
        selected += [second.train_step()["selected"] for _ in range(4 - stop)]
    return selected


def test_engine_resume_in_the_middle_of_a_group(real, tmp_path):
    straight = run_ranks(_engine_resume_worker, 2, real, None, None, deepspeed=True)
    resumed = run_ranks(_engine_resume_worker, 2, real, str(tmp_path / "ckpt"), 1, deepspeed=True)
    assert straight[0] == straight[1] and resumed[0] == resumed[1]
    assert resumed[0] == straight[0]
    assert len({i for step in straight[0][:2] for i in step}) == 8  # the group's 2 batches are disjoint


# ----------------------------------------------------------------------------- forward-only head features

def _autograd_head_grads(model, batch):
    """Each sample's ``d L_i / d W_head`` by autograd, one sample at a time (the oracle)."""
    from ds_partitionsel.sketch import label_mask

    head = model.get_output_embeddings()
    labels = label_mask(batch["attention_mask"], batch["loss_mask"])
    out = []
    for i in range(batch["input_ids"].shape[0]):
        logits = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1],
                       use_cache=False).logits[0].float()
        t = labels[i].nonzero().flatten()
        nll = torch.nn.functional.cross_entropy(logits[t - 1], batch["input_ids"][i, t])
        out.append(torch.autograd.grad(nll, head.weight)[0].flatten())
    return torch.stack(out)


def test_head_features_equal_autograds_lm_head_gradient(real):
    from ds_partitionsel.head_features import HeadSketcher
    from ds_partitionsel.sketch import GradientSketcher, make_sketcher

    tok, pool, _ = _pools(real)
    model = _llama(len(tok), hidden=16)
    batch = pool.collate([0, 1, 2, 20, 30, 50, 52], tok.pad_token_id)  # several domains
    want = _autograd_head_grads(model, batch)
    for chunk in (len(tok), 37):  # one vocabulary chunk, and chunks that do not divide it
        exact = HeadSketcher(model, mode="head", normalize=False, vocab_chunk=chunk)
        got = exact.sketch(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        assert got.shape == want.shape and exact.feature_dim == len(tok) * 16
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not any(p.grad is not None for p in model.parameters())  # a forward only: no .grad

    # Kronecker-projected: P_out^T G_i P_in of autograd's gradients, with the factors that the
    # autograd sketcher's kron mode draws for the module "lm_head" (same seed and key)
    from ds_partitionsel.projection import gaussian_matrix

    p_in = gaussian_matrix(16, 8, seed=0, key=("lm_head", "in"), std=8 ** -0.5)
    p_out = gaussian_matrix(len(tok), 12, seed=0, key=("lm_head", "out"), std=12 ** -0.5)
    projected = torch.stack([(p_out.T @ g.view(len(tok), 16) @ p_in).flatten() for g in want])
    for chunk in (len(tok), 37):
        raw = HeadSketcher(model, mode="head_kron", kron_dims=(8, 12), normalize=False, vocab_chunk=chunk).sketch(
            batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        torch.testing.assert_close(raw, projected, rtol=1e-4, atol=1e-6)
    unit = make_sketcher(model, mode="head_kron", kron_dims=(8, 12)).sketch(
        batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    torch.testing.assert_close(unit, projected / projected.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-6)
    # the factors are the autograd sketcher's kron factors of that module
    kron = GradientSketcher(model, modules=["lm_head"], mode="kron", kron_dims=(8, 12), head_chunk=None)
    torch.testing.assert_close(kron._factor("lm_head", "in", 16, 8, "cpu"), p_in, rtol=0, atol=0)


def test_head_modes_in_the_selector_and_bad_heads(real):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from ds_partitionsel.config import ConfigError
    from ds_partitionsel.head_features import HeadSketcher

    block = dict(BLOCK, steps_per_pool=2, sketch={"mode": "head_kron", "kron_dims": 8, "score_len": 24})
    sel = _selector(real, block)
    assert isinstance(sel.sketcher, HeadSketcher)
    first, second = sel.select(0, lr=1e-3), sel.select(1, lr=1e-3)
    assert first.k == second.k == 4 and not set(first.indices.tolist()) & set(second.indices.tolist())
    assert first.selected_features.shape == (4, 64)

    tok, _, _ = _pools(real)
    cfg = Gemma2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, intermediate_size=32, vocab_size=len(tok), final_logit_softcapping=30.0)
    with pytest.raises(ConfigError, match="sketch.mode 'head_kron'.*transforms its logits"):
        _selector(real, block, model=Gemma2ForCausalLM(cfg))
    with pytest.raises(ValueError, match="vocab_chunk must be a positive int"):
        HeadSketcher(_llama(len(tok)), vocab_chunk=0)


# ----------------------------------------------------------------------------- proxies from a config

def test_proxy_from_config_has_the_asked_shape_trains_and_resumes(real):
    from ds_partitionsel.config import ConfigError
    from ds_partitionsel.proxy import flops_per_token

    block = dict(BLOCK, sketch={"mode": "head_kron", "kron_dims": 8, "proxy_lr": 1e-2, "proxy_train": True,
                                "proxy_config": {"hidden_size": 16, "layers": 1, "heads": 2}})
    tok, _, _ = _pools(real)
    main = _llama(len(tok), hidden=32, layers=2)
    torch.manual_seed(123)  # the global seed does not change the proxy: it is drawn from the config's seed
    a = _selector(real, block, model=main)
    torch.manual_seed(456)
    b = _selector(real, block, model=main)
    proxy = a.proxy.model
    assert proxy.config.hidden_size == 16 and proxy.config.num_hidden_layers == 1
    assert proxy.config.vocab_size == len(tok) and proxy.config.intermediate_size == 32
    assert a.scorer is proxy and a.sketcher.model is proxy and a.proxy.train
    assert torch.equal(torch.cat([p.flatten() for p in proxy.parameters()]),
                       torch.cat([p.flatten() for p in b.proxy.model.parameters()]))
    assert flops_per_token(main, 64) > 3 * flops_per_token(proxy, 64)
    before = [p.detach().clone() for p in proxy.parameters()]
    sel = a.select(0, lr=1e-3)
    loss = a.after_step(sel)
    assert loss is not None and loss > 0
    assert any(not torch.equal(x, y) for x, y in zip(before, proxy.parameters()))  # trained on the batch
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.proxy.model.parameters(), b.proxy.model.parameters()))

    with pytest.raises(ConfigError, match="proxy_config builds an untrained proxy"):
        _selector(real, dict(block, sketch=dict(block["sketch"], proxy_train=False)))
    with pytest.raises(ConfigError, match="proxy_config and proxy_model"):
        _selector(real, dict(block, sketch=dict(block["sketch"], proxy_model="x")))
    with pytest.raises(ConfigError, match="heads = 3 does not divide hidden_size = 16"):
        _selector(real, dict(block, sketch=dict(block["sketch"], proxy_config={"hidden_size": 16, "layers": 1,
                                                                                 "heads": 3})))


def _hf_worker(rank, world, real, out, steps, resume):
    import transformers

    from ds_partitionsel.hf import PartitionSelTrainer

    tok, pool, valid = _pools(real)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
          "partitionsel": dict(BLOCK, steps_per_pool=3)}
    args = transformers.TrainingArguments(output_dir=out, deepspeed=ds, per_device_train_batch_size=2,
                                          max_steps=steps, learning_rate=3e-3, lr_scheduler_type="constant",
                                          report_to=[], save_strategy="steps", save_steps=2, use_cpu=True,
                                          disable_tqdm=True)
    trainer = PartitionSelTrainer(model=_llama(len(tok), seed=1 if resume else 0), args=args, processing_class=tok,
                                  candidate_pool=pool, valid_pool=valid)
    trainer.train(resume_from_checkpoint=True if resume else None)


def test_trainer_resume_in_the_middle_of_a_group(real, tmp_path):
    from ds_partitionsel.records import read_metrics

    run_ranks(_hf_worker, 1, real, str(tmp_path / "a"), 4, False)
    run_ranks(_hf_worker, 1, real, str(tmp_path / "b"), 2, False)  # checkpoint-2: step 2 is mid-group
    carried = torch.load(tmp_path / "b" / "checkpoint-2" / "partitionsel_selector.pt", weights_only=True)
    assert carried["group"]["group"] == 0 and tuple(carried["group"]["indices"].shape) == (3, 2)
    run_ranks(_hf_worker, 1, real, str(tmp_path / "b"), 4, True)
    straight = [s.selected for s in read_metrics(tmp_path / "a")[0]]
    resumed = [s.selected for s in read_metrics(tmp_path / "b")[0]]
    assert len(straight) == 4 and resumed == straight


STREAM_BLOCK = {"pool_factor": 4, "seed": 5, "validation": {"anchors": 4}, "steps_per_pool": 2,
                "budget": {"strategy": "curriculum"},
                "sketch": {"modules": 1, "mode": "exact", "micro_batch": 3}}


@pytest.mark.parametrize("rule", ["sample", "greedy"])
def test_streamed_gram_selects_what_the_held_features_select(real, rule, monkeypatch):
    """sketch.stream never holds the pool's features: the Gram and scores streamed micro-batch
    by micro-batch give the batches, weights, budgets (curriculum gains from the scores) and
    conflicting pairs of the features path, up to the Gram's rounding."""
    from ds_partitionsel.sketch import GradientSketcher

    block = dict(STREAM_BLOCK, rule=rule)
    vocab = len(_pools(real)[0])
    held = _selector(real, block, model=_llama(vocab, seed=3))
    streamed = _selector(real, dict(block, sketch=dict(block["sketch"], stream=True)), model=_llama(vocab, seed=3))
    calls = []
    real_gram = GradientSketcher.sketch_gram

    def spy(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return real_gram(self, *args, **kwargs)

    monkeypatch.setattr(GradientSketcher, "sketch_gram", spy)
    for step in range(4):  # two groups of two batches
        a, b = held.select(step, lr=1e-3), streamed.select(step, lr=1e-3)
        assert torch.equal(a.indices, b.indices), step
        assert torch.allclose(a.weights, b.weights, rtol=1e-4, atol=1e-6)
        assert torch.equal(a.plan.budgets, b.plan.budgets)
        assert b.selected_features is None and b.selected_gram.shape == (4, 4)
        assert a.conflicting_pairs() == b.conflicting_pairs()
        assert abs(a.utility - b.utility) <= 1e-4 * max(1.0, abs(a.utility))
    assert calls == [16, 16]  # one streamed pass per group, over the whole pool
    assert held._gains == pytest.approx(streamed._gains, rel=1e-5, abs=1e-9)


def _stream_refusal_worker(rank, world, real, block):
    from ds_partitionsel.config import ConfigError

    try:
        _selector(real, block)
    except ConfigError as e:
        return str(e)
    return None


def test_stream_bad_input(real):
    from ds_partitionsel.config import ConfigError, PartitionSelConfig

    for sketch, match in (({"mode": "kron", "stream": True}, "needs sketch.mode 'exact' and sketch.dim null"),
                          ({"dim": 64, "stream": True}, "needs sketch.mode 'exact' and sketch.dim null"),
                          ({"stream": "yes"}, "stream")):
        with pytest.raises(ConfigError, match=match):
            PartitionSelConfig.from_dict({"sketch": sketch})
    with pytest.raises(ConfigError, match="shrink needs the pool's mean sketch"):
        PartitionSelConfig.from_dict({"sketch": {"stream": True}, "validation": {"shrink": True}})
    with pytest.raises(ConfigError, match="'gradnorm' has no Gram form"):
        PartitionSelConfig.from_dict({"sketch": {"stream": True}, "method": "gradnorm"})
    # more than one data-parallel rank (real ranks): refused on each when the selector is built
    block = dict(STREAM_BLOCK, sketch=dict(STREAM_BLOCK["sketch"], stream=True))
    for message in run_ranks(_stream_refusal_worker, 2, real, block, deepspeed=False):
        assert message is not None and "sharded over 2 ranks needs them" in message, message


def test_streamed_gram_drops_nonfinite_sketches_as_the_held_features_do(real):
    """A NaN in one sketched micro-batch: sketch.stream drops those candidates and selects from
    the rest, as the held features do (the same batch, the same count dropped)."""
    vocab = len(_pools(real)[0])
    block = dict(STREAM_BLOCK, steps_per_pool=1, rule="greedy", budget={"strategy": "uniform"})
    out = []
    for stream in (False, True):
        model = _llama(vocab, seed=4)
        sel = _selector(real, dict(block, sketch=dict(block["sketch"], stream=stream)), model=model)
        sel.validation_target(0)  # the anchors' target first, unpoisoned

        def poison(module, args, output):  # NaN activations in the pool's first micro-batch
            if poison.calls == 0:
                output = output.clone()
                output[:] = float("nan")
            poison.calls += 1
            return output

        poison.calls = 0
        handle = model.get_input_embeddings().register_forward_hook(poison)
        try:
            out.append(sel.select(0, lr=1e-3))
        finally:
            handle.remove()
    held, streamed = out
    assert held.dropped == streamed.dropped == 3  # micro_batch 3
    assert torch.equal(held.indices, streamed.indices)
    assert not set(held.indices.tolist()) & {0, 1, 2}
