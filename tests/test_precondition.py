"""sketch.precondition = "adam": candidates' sketches scaled by AdamW's second moments, anchors raw.

Checked against independent computations (a per-sample autograd loop), through a real DeepSpeed
engine at ZeRO-0/2/3, and across a checkpoint resume.
"""
import pytest
import torch
from torch.nn import functional as F

from distributed_utils import run_ranks
from real_pool import build_real_pool
from test_engine import _ds_config, _engine, _tiny_model

from ds_partitionsel.config import ConfigError, PartitionSelConfig
from ds_partitionsel.precondition import (AdamMoments, ModulePreconditioner, bias_corrected, build_preconditioners,
                                          diagonal_preconditioner, rank_one_preconditioner, read_adam_moments)
from ds_partitionsel.sketch import GradientSketcher, resolve_modules


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return build_real_pool(tmp_path_factory.mktemp("real"))


def _model_and_batch(seed=0, n=3, T=12, vocab=64):
    model = _tiny_model(vocab, seed).double()  # float64: the comparison tests the math, not rounding
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (n, T), generator=gen)
    return model, ids


def _per_sample_grads(model, names, ids):
    """``{name: (n, d_out, d_in)}``: each row's mean next-token NLL differentiated by autograd alone."""
    weights = [model.get_submodule(name).weight for name in names]
    out = {name: [] for name in names}
    for i in range(ids.shape[0]):
        logits = model(input_ids=ids[i:i + 1]).logits[0, :-1].float()
        loss = F.cross_entropy(logits, ids[i, 1:])
        for name, g in zip(names, torch.autograd.grad(loss, weights)):
            out[name].append(g.double())
    return {name: torch.stack(gs) for name, gs in out.items()}


def _random_moments(sketcher, seed=3, eps=1e-3):
    gen = torch.Generator().manual_seed(seed)
    weights = {name: torch.rand(m.out_features, m.in_features, generator=gen) * 1e-2 + 1e-6
               for name, m in sketcher._modules}
    return AdamMoments(weights=weights, biases={}, eps=eps, step=1)


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("block, message", [
    ({"precondition": "sgd"}, r"sketch.precondition = 'sgd' is not valid; choose one of: none, adam"),
    ({"precondition": "adam", "mode": "head_kron"}, r"sketch.mode 'head_kron' has no hooked linears"),
    ({"precondition": "adam", "proxy_model": "/some/folder"}, r"proxy scorer .* has another optimizer"),
])
def test_bad_precondition_config_is_refused_with_the_fix(block, message):
    with pytest.raises(ConfigError, match=message):
        PartitionSelConfig.from_dict({"sketch": block})


def test_precondition_defaults_to_none():
    assert PartitionSelConfig.from_dict(None).sketch.precondition == "none"
    assert PartitionSelConfig.from_dict({"sketch": {"precondition": "adam"}}).sketch.precondition == "adam"


# --------------------------------------------------------------------------- pure kernels

def test_kernels_match_their_formulas():
    v = torch.tensor([[4e-4, 1e-4], [0.0, 9e-4]])
    assert torch.equal(bias_corrected(v, 3, 0.9), v / (1 - 0.9 ** 3))
    torch.testing.assert_close(diagonal_preconditioner(v, 1e-2), 1 / (v.sqrt() + 1e-2))
    # a rank-1 second moment is factored exactly (eps = 0): r c^T = 1 / sqrt(v)
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 4.0])
    r, c = rank_one_preconditioner(torch.outer(a * a, b * b), 0.0)
    torch.testing.assert_close(torch.outer(r, c), 1 / torch.outer(a, b))
    # Adafactor's factors, with sqrt(eps) on each side
    w = torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    r, c = rank_one_preconditioner(w, 1e-4)
    s = w.double().sum()
    torch.testing.assert_close(r.double(), 1 / (w.double().sum(1).sqrt() / s ** 0.25 + 1e-2), rtol=1e-6, atol=0)
    torch.testing.assert_close(c.double(), 1 / (w.double().sum(0).sqrt() / s ** 0.25 + 1e-2), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="step >= 1"):
        bias_corrected(v, 0, 0.9)


# --------------------------------------------------------------------------- the sketcher

def test_exact_preconditioned_rows_equal_per_sample_gradients_times_m():
    model, ids = _model_and_batch()
    sk = GradientSketcher(model, modules=1, mode="exact", normalize=False, dtype=torch.float64)
    moments = _random_moments(sk)
    pre = build_preconditioners(moments, "exact")
    got = sk.sketch(ids, preconditioner=pre)
    grads = _per_sample_grads(model, sk.module_names, ids)
    want = torch.cat([(grads[n] * diagonal_preconditioner(moments.weights[n], moments.eps).double()).flatten(1)
                      for n in sk.module_names], 1)
    # the sketcher's NLL is float32 (as the model's logits.float()): tolerance at float32's scale
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    raw = sk.sketch(ids)
    assert not torch.allclose(raw, got)  # the preconditioner changed the rows


def test_kron_preconditioned_rows_equal_projected_scaled_gradients():
    model, ids = _model_and_batch(seed=2)
    sk = GradientSketcher(model, modules=1, mode="kron", kron_dims=(8, 6), normalize=False, dtype=torch.float64)
    moments = _random_moments(sk, seed=5)
    pre = build_preconditioners(moments, "kron")
    got = sk.sketch(ids, preconditioner=pre)
    grads = _per_sample_grads(model, sk.module_names, ids)
    want = []
    for name, m in sk._modules:
        r, c = rank_one_preconditioner(moments.weights[name], moments.eps)
        p_in = sk._factor(name, "in", m.in_features, 8, ids.device)
        p_out = sk._factor(name, "out", m.out_features, 6, ids.device)
        p_in = torch.eye(m.in_features, dtype=torch.float64) if p_in is None else p_in.double()
        p_out = torch.eye(m.out_features, dtype=torch.float64) if p_out is None else p_out.double()
        scaled = r.double()[None, :, None] * grads[name] * c.double()[None, None, :]
        want.append((p_out.T @ scaled @ p_in).flatten(1))
    want = torch.cat(want, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("mode", ["exact", "kron"])
def test_unit_preconditioner_gives_the_raw_bits(mode):
    model, ids = _model_and_batch(seed=4)
    sk = GradientSketcher(model, modules=1, mode=mode, kron_dims=8)
    ones = {name: (ModulePreconditioner(weight=torch.ones(m.out_features, m.in_features)) if mode == "exact" else
                   ModulePreconditioner(row=torch.ones(m.out_features), col=torch.ones(m.in_features)))
            for name, m in sk._modules}
    assert torch.equal(sk.sketch(ids, preconditioner=ones), sk.sketch(ids))
    assert torch.equal(sk.sketch(ids, preconditioner=None), sk.sketch(ids))


def test_bad_preconditioner_is_refused():
    model, ids = _model_and_batch()
    sk = GradientSketcher(model, modules=1, mode="exact")
    name, m = sk._modules[0]
    with pytest.raises(ValueError, match="must map every hooked module"):
        sk.sketch(ids, preconditioner={name: ModulePreconditioner(weight=torch.ones(m.out_features, m.in_features))})
    bad = {n: ModulePreconditioner(weight=torch.ones(3, 3)) for n in sk.module_names}
    with pytest.raises(ValueError, match=r"weight has shape \(3, 3\), expected"):
        sk.sketch(ids, preconditioner=bad)
    kron_only = {n: ModulePreconditioner(row=torch.ones(mm.out_features), col=torch.ones(mm.in_features))
                 for n, mm in sk._modules}
    with pytest.raises(ValueError, match="has no 'weight', which mode 'exact' needs"):
        sk.sketch(ids, preconditioner=kron_only)


# --------------------------------------------------------------------------- second moments

def _moments_worker(rank, world, stage, steps):
    """Train a tiny model ``steps`` DeepSpeed steps at ZeRO-``stage`` on fixed batches; the
    hooked modules' second moments read through the engine, and a plain AdamW's reference."""
    import deepspeed

    model = _tiny_model(64, seed=0)
    ref = _tiny_model(64, seed=0)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 6,
           "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 by default; the reference does not
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    modules = resolve_modules(engine.module, 1)
    before = read_adam_moments(engine.optimizer, modules)
    gen = torch.Generator().manual_seed(11)  # the same global batch on every rank
    for _ in range(steps):
        ids = torch.randint(0, 64, (2 * world, 10), generator=gen)
        mine = ids[2 * rank:2 * rank + 2]
        out = engine(input_ids=mine, labels=mine)
        engine.backward(out.loss)
        engine.step()
        ref_opt.zero_grad()
        # all ranks' rows at once: equal-length rows, so the token mean is the mean of the ranks' means
        ref(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
    moments = read_adam_moments(engine.optimizer, modules)
    ref_moments = read_adam_moments(ref_opt, resolve_modules(ref, 1))
    return {"before": before, "step": moments.step, "eps": moments.eps,
            "weights": {k: v.cpu().numpy() for k, v in moments.weights.items()},
            "biases": sorted(moments.biases),
            "ref": {k: v.numpy() for k, v in ref_moments.weights.items()}, "ref_step": ref_moments.step}


def _close(got, want, what=""):
    """Equal up to float32 summation order (ZeRO-3 reduces gradients in another order)."""
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()), msg=what or None)


def _tensors(result):
    for key in ("weights", "ref"):
        result[key] = {k: torch.from_numpy(v) for k, v in result[key].items()}
    return result


def test_second_moments_agree_across_zero_stages_and_with_plain_adamw():
    out = {stage: _tensors(run_ranks(_moments_worker, 1, stage, 3)[0]) for stage in (0, 2, 3)}
    zero0 = out[0]
    assert zero0["before"] is None  # no optimizer step: no preconditioning
    assert zero0["step"] == zero0["ref_step"] == 3 and zero0["eps"] == pytest.approx(1e-6)
    assert zero0["biases"] == []  # Llama's linears have no bias
    for name, v in zero0["weights"].items():
        _close(v, zero0["ref"][name], name)
        assert float(v.abs().sum()) > 0
    for stage in (2, 3):
        assert out[stage]["before"] is None and out[stage]["step"] == 3, stage
        assert sorted(out[stage]["weights"]) == sorted(zero0["weights"])
        for name, v in out[stage]["weights"].items():
            assert v.shape == zero0["weights"][name].shape, (stage, name)
            _close(v, zero0["weights"][name], f"ZeRO-{stage} {name}")


@pytest.mark.slow
def test_partitioned_second_moments_are_the_same_on_every_rank():
    for stage in (2,):  # ZeRO-3 on 2 ranks: the resume test below selects identically on both
        ranks = [_tensors(r) for r in run_ranks(_moments_worker, 2, stage, 2)]
        for name, v in ranks[0]["weights"].items():
            assert torch.equal(v, ranks[1]["weights"][name]), (stage, name)
            _close(v, ranks[0]["ref"][name], f"ZeRO-{stage} {name}")


# --------------------------------------------------------------------------- the selection

ADAM = {"sketch": {"modules": 2, "mode": "exact", "micro_batch": 8, "precondition": "adam"}}


def _selection_worker(rank, world, real, ckpt, stage, total, stop, block):
    cfg = _ds_config(stage, **block)
    if stop is None:
        engine = _engine(real, cfg)
        return [engine.train_step()["selected"] for _ in range(total)]
    first = _engine(real, cfg)
    head = [first.train_step()["selected"] for _ in range(stop)]
    first.save_checkpoint(ckpt, tag="t")
    second = _engine(real, cfg, seed=99)  # another init: the optimizer state must come from the checkpoint
    second.load_checkpoint(ckpt, tag="t")
    return head + [second.train_step()["selected"] for _ in range(total - stop)]


def test_adam_selection_resumes_exactly_and_differs_from_raw(real, tmp_path):
    straight = run_ranks(_selection_worker, 1, real, None, 2, 4, None, ADAM)[0]
    resumed = run_ranks(_selection_worker, 1, real, str(tmp_path / "ckpt"), 2, 4, 2, ADAM)[0]
    assert straight == resumed
    raw = run_ranks(_selection_worker, 1, real, None, 2, 4, None, {})[0]
    assert straight[0] == raw[0]  # before the first optimizer step there are no second moments
    assert straight[1:] != raw[1:]  # afterwards the preconditioned candidates select otherwise


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-2: one rank above, and the moments on two ranks
def test_adam_selection_resumes_exactly_on_two_partitioned_ranks(real, tmp_path, stage):
    straight = run_ranks(_selection_worker, 2, real, None, stage, 4, None, ADAM)
    resumed = run_ranks(_selection_worker, 2, real, str(tmp_path / "ckpt"), stage, 4, 2, ADAM)
    assert straight[0] == straight[1] == resumed[0] == resumed[1]


def _anchors_worker(rank, world, real):
    """After one identical step (no moments at step 0), the adam and the raw run's targets and
    candidates at step 1."""
    out = {}
    for name, block in (("adam", ADAM), ("none", {"sketch": dict(ADAM["sketch"], precondition="none")})):
        engine = _engine(real, _ds_config(0, **block))
        engine.train_step()
        sel = engine.selector
        ids = sel.plan(1).local_ids.tolist()[:6]
        pre = sel.candidate_preconditioner(1)
        out[name] = {"target": sel.validation_target(1).numpy(), "pre": pre is not None,
                     "candidates": sel.sketch_records(sel.pool, ids, preconditioner=pre).numpy()}
    engine = _engine(real, _ds_config(0, **ADAM))
    engine.selector.optimizer = None
    try:
        engine.train_step()
        out["no_optimizer"] = None
    except ConfigError as e:
        out["no_optimizer"] = str(e)
    return out


def test_anchors_stay_raw_and_candidates_are_preconditioned(real):
    out = run_ranks(_anchors_worker, 1, real)[0]
    assert out["adam"]["pre"] and not out["none"]["pre"]
    assert (out["adam"]["target"] == out["none"]["target"]).all()
    adam, raw = (torch.from_numpy(out[k]["candidates"]).double() for k in ("adam", "none"))
    cos = F.cosine_similarity(adam, raw, dim=1)
    assert float(cos.max()) < 0.999, cos  # every candidate row moved
    assert "Selector.set_optimizer" in out["no_optimizer"]


def test_megatron_and_fsdp_refuse_adam_preconditioning():
    from ds_partitionsel.megatron import check_selection_config

    cfg = PartitionSelConfig.from_dict(ADAM)
    with pytest.raises(ConfigError, match="not supported by the Megatron loop"):
        check_selection_config(cfg)


# --------------------------------------------------------------------------- the HF Trainer

def _hf_worker(rank, world, real, out, steps, deepspeed):
    import copy

    import test_hf

    cfg = test_hf._config()
    cfg["partitionsel"]["sketch"]["precondition"] = "adam"
    if deepspeed:
        engine_cfg = copy.deepcopy(cfg)
        import transformers

        from ds_partitionsel.engine import initialize

        tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
        pool, valid = test_hf._pools(real, tok)
        engine, _, _, _ = initialize(test_hf._tiny_model(len(tok), 0), engine_cfg, pool, valid, tokenizer=tok)
        engine_selected = [engine.train_step()["selected"] for _ in range(steps)]
        original = test_hf._config
        test_hf._config = lambda: copy.deepcopy(cfg)
        try:
            trainer = test_hf._trainer(real, out, steps)
        finally:
            test_hf._config = original
    else:  # a plain torch AdamW inside accelerate's wrapper
        trainer = _plain_trainer(real, out, steps, cfg["partitionsel"])
    trainer.train()
    sel = trainer.selector
    return {"engine": engine_selected if deepspeed else None, "deepspeed": trainer.is_deepspeed_enabled,
            "moments": sel.candidate_preconditioner(steps) is not None}


def _plain_trainer(real, out, steps, block):
    import transformers

    import test_hf
    from ds_partitionsel.hf import PartitionSelTrainer

    tok = transformers.AutoTokenizer.from_pretrained(str(real["tokenizer"]))
    pool, valid = test_hf._pools(real, tok)
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=test_hf.MICRO, max_steps=steps, learning_rate=test_hf.LR,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return PartitionSelTrainer(model=test_hf._tiny_model(len(tok), 0), args=args, processing_class=tok,
                               candidate_pool=pool, valid_pool=valid, partitionsel=block)


@pytest.mark.parametrize("deepspeed", [True, False])
def test_hf_trainer_hands_its_optimizer_to_the_selection(real, tmp_path, deepspeed):
    out = run_ranks(_hf_worker, 1, real, str(tmp_path / "hf"), 3, deepspeed)[0]
    assert out["deepspeed"] == deepspeed
    assert out["moments"]  # the selector reads the Trainer's optimizer
    if deepspeed:
        from ds_partitionsel.records import read_metrics

        steps, _ = read_metrics(tmp_path / "hf")
        assert [s.selected for s in steps] == out["engine"]  # the engine's preconditioned selections


def test_default_modules_leave_the_output_head_and_embeddings_out():
    model, _ = _model_and_batch()
    head = model.get_output_embeddings()
    for spec in (1, 2, 3, "all_linear"):
        chosen = resolve_modules(model, spec)
        assert chosen and all(m is not head and isinstance(m, torch.nn.Linear) for _, m in chosen), spec
        assert "lm_head" not in {n for n, _ in chosen}, spec


def test_bench_tool_prints_its_table_and_writes_json(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/bench_precondition.py", "--hidden", "32", "--layers", "2",
                           "--steps", "3", "--n", "4", "--kron", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "diag vs rank1" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["pair"] for r in result["rows"]] == ["diag vs rank1", "raw vs diag", "raw vs rank1"]
    assert result["step"] == 3 and result["kron_time_ratio"] > 0


@pytest.mark.parametrize("mode", ["exact", "kron"])
def test_bias_gradients_get_their_own_elementwise_preconditioner(mode):
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64, attention_bias=True)).double()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    sk = GradientSketcher(model, modules=r"self_attn\.v_proj", mode=mode, kron_dims=8, include_bias=True,
                          normalize=False, dtype=torch.float64)
    (name, module), = sk._modules
    gen = torch.Generator().manual_seed(2)
    moments = AdamMoments(weights={name: torch.rand(module.out_features, module.in_features, generator=gen) + 0.1},
                          biases={name: torch.rand(module.out_features, generator=gen) + 0.1}, eps=1e-3, step=1)
    pre = build_preconditioners(moments, mode, with_bias=True)
    got = sk.sketch(ids, preconditioner=pre)
    grads = {}
    for i in range(ids.shape[0]):  # per-sample bias gradients by autograd
        loss = F.cross_entropy(model(input_ids=ids[i:i + 1]).logits[0, :-1].float(), ids[i, 1:])
        grads.setdefault("b", []).append(torch.autograd.grad(loss, module.bias)[0].double())
    bias = torch.stack(grads["b"]) * diagonal_preconditioner(moments.biases[name], 1e-3).double()
    if mode == "kron":
        p_out = sk._factor(name, "out", module.out_features, 8, ids.device)
        bias = bias @ (torch.eye(module.out_features, dtype=torch.float64) if p_out is None else p_out.double())
    width = bias.shape[1]
    torch.testing.assert_close(got[:, -width:], bias, rtol=1e-4, atol=1e-6 * float(bias.abs().max()))
    # without a bias preconditioner the bias block is the raw one
    raw = sk.sketch(ids)
    no_bias_pre = {name: ModulePreconditioner(weight=pre[name].weight, row=pre[name].row, col=pre[name].col)}
    torch.testing.assert_close(sk.sketch(ids, preconditioner=no_bias_pre)[:, -width:], raw[:, -width:])


def test_fsdp_loop_refuses_adam_preconditioning():
    pytest.importorskip("torch.distributed.fsdp")
    from ds_partitionsel.fsdp import PartitionSelFSDP

    model, _ = _model_and_batch()
    with pytest.raises(ConfigError, match="not supported by the FSDP2 loop"):
        PartitionSelFSDP(model, None, ADAM, None, None, batch_size=2, micro_batch=1, pad_token_id=0)


def _reload_worker(rank, world, ckpt):
    """ZeRO-2: an engine that has stepped loads another run's checkpoint; its moments must be the
    checkpoint's (DeepSpeed's state views still point at the replaced tensors until relinked)."""
    import deepspeed

    def engine_and_modules(seed):
        model = _tiny_model(64, seed=seed)
        cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 6}
        engine, _, _, _ = deepspeed.initialize(model=model, config=cfg,
                                               optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
        return engine, resolve_modules(engine.module, 1)

    def train(engine, seed, steps):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            ids = torch.randint(0, 64, (2, 10), generator=gen)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()

    saved, modules = engine_and_modules(0)
    train(saved, 1, 3)
    saved.save_checkpoint(ckpt, tag="t")
    want = read_adam_moments(saved.optimizer, modules)
    other, other_modules = engine_and_modules(5)
    train(other, 2, 1)
    before = read_adam_moments(other.optimizer, other_modules)
    other.load_checkpoint(ckpt, tag="t")
    got = read_adam_moments(other.optimizer, other_modules)
    name = modules[0][0]
    return {"want_step": want.step, "got_step": got.step, "before_step": before.step,
            "same": all(torch.equal(got.weights[n], want.weights[n]) for n in want.weights),
            "differed": not torch.equal(before.weights[name], want.weights[name])}


def test_moments_after_load_checkpoint_are_the_checkpoints(tmp_path):
    out = run_ranks(_reload_worker, 1, str(tmp_path / "ckpt"))[0]
    assert out["before_step"] == 1 and out["want_step"] == out["got_step"] == 3, out
    assert out["differed"] and out["same"], out


def test_optimizer_without_adam_moments_is_refused():
    model, ids = _model_and_batch()
    modules = resolve_modules(model, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="needs an Adam-family optimizer .* SGD has none"):
        read_adam_moments(sgd, modules)
    adam = torch.optim.AdamW([{"params": model.model.layers[0].parameters(), "eps": 1e-8},
                              {"params": model.model.layers[1].parameters(), "eps": 1e-6}])
    with pytest.raises(ValueError, match=r"one \(beta2, eps\) for all parameter groups"):
        read_adam_moments(adam, modules)
    frozen = torch.optim.AdamW(model.model.layers[0].parameters())  # does not train the sketched block
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    frozen.step()
    with pytest.raises(ValueError, match="holds no 'exp_avg_sq' for model.layers.1"):
        read_adam_moments(frozen, modules)
