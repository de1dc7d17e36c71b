"""Per-sample gradient sketches: exactness against torch.func, projections, ZeRO-3, bad input."""
from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ds_partitionsel.sketch import GradientSketcher, label_nll, resolve_modules

VOCAB = 97


def tiny_llama(seed=0, hidden=32, inter=64, layers=4):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=inter, vocab_size=VOCAB)
    return LlamaForCausalLM(cfg)


def tiny_qwen2(seed=0, hidden=32, inter=64, layers=4):
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=inter, vocab_size=VOCAB)
    return Qwen2ForCausalLM(cfg)


def tiny_lora(seed=0):
    import peft

    model = tiny_llama(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    return peft.get_peft_model(model, cfg)


def padded_batch(seed=0, n=5, T=12, prompt=3, lengths=None, left=False):
    """Right- (or left-) padded batch of uneven lengths; the first ``prompt`` tokens are masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    if lengths is None:
        lengths = torch.randint(prompt + 2, T + 1, (n,), generator=g)
        lengths[0] = T
    lengths = torch.as_tensor(lengths)
    attn = (torch.arange(T)[None] < lengths[:, None]).long()
    loss = attn.bool() & (torch.arange(T)[None] >= prompt)
    if left:
        ids, attn, loss = (torch.stack([r.roll(int(T - L)) for r, L in zip(t, lengths)])
                           for t in (ids, attn, loss))
    return ids, attn, loss, lengths


def func_per_sample_grads(model, names, ids, loss_mask, include_bias=False):
    """Oracle: vmap(grad) of each row's mean label NLL w.r.t. the named linears' weights (+ biases).

    Rows are right padded, so causal attention keeps padding away from real tokens and the oracle
    needs no attention mask.
    """
    model.eval()
    modules = dict(model.named_modules())
    params = {}
    for n in names:
        params[n + ".weight"] = modules[n].weight.detach()
        if include_bias and modules[n].bias is not None:
            params[n + ".bias"] = modules[n].bias.detach()

    def row_loss(p, row_ids, row_mask):
        logits = functional_call(model, p, (row_ids[None],), {"use_cache": False}).logits[0, :-1]
        w = row_mask[1:].float()
        nll = F.cross_entropy(logits.float(), row_ids[1:], reduction="none")
        return (nll * w).sum() / w.sum()

    g = vmap(grad(row_loss), in_dims=(None, 0, 0))(params, ids, loss_mask)
    blocks = []
    for n in names:
        blocks.append(g[n + ".weight"].flatten(1))
        if n + ".bias" in g:
            blocks.append(g[n + ".bias"])
    return torch.cat(blocks, dim=1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("build,include_bias", [(tiny_llama, False), (tiny_qwen2, True)],
                         ids=["llama", "qwen2+bias"])
def test_exact_equals_torch_func_per_sample_grads(build, include_bias):
    model = build()
    ids, attn, loss, _ = padded_batch(seed=1)
    sk = GradientSketcher(model, mode="exact", normalize=False, include_bias=include_bias)
    assert [n.split(".")[2] for n in sk.module_names] == ["1"] * 7 + ["2"] * 7 + ["3"] * 7
    features = sk.sketch(ids, attn, loss)
    expected = func_per_sample_grads(model, sk.module_names, ids, loss, include_bias)
    assert features.shape == expected.shape == (5, sk.feature_dim)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    # the chunked head (default: one chunk of this tiny vocabulary; 1 and 7 label positions per
    # chunk) and the model's own full logits (head_chunk=None) give the same sketch
    assert sk.head_chunk > ids.numel()
    for head_chunk in (1, 7, None):
        other = GradientSketcher(model, mode="exact", normalize=False, include_bias=include_bias,
                                 head_chunk=head_chunk)
        assert other.head_chunk == head_chunk
        torch.testing.assert_close(other.sketch(ids, attn, loss), expected, rtol=1e-5, atol=1e-6)

    unit = GradientSketcher(model, mode="exact", include_bias=include_bias).sketch(ids, attn, loss)
    torch.testing.assert_close(unit, expected / expected.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_exact_equals_torch_func_on_peft_lora():
    model = tiny_lora()
    ids, attn, loss, _ = padded_batch(seed=2)
    sk = GradientSketcher(model, mode="exact", normalize=False)
    # the paper's features: LoRA A/B of the last 3 blocks, 6 adapted linears each
    assert len(sk.module_names) == 3 * 6 * 2
    assert all(re.search(r"layers\.[123]\..*lora_[AB]\.default$", n) for n in sk.module_names)
    model.train()  # lora_dropout=0.1 must be off while sketching, and training restored after
    features = sk.sketch(ids, attn, loss)
    assert model.training
    expected = func_per_sample_grads(model, sk.module_names, ids, loss)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    for head_chunk in (3, None):
        other = GradientSketcher(model, mode="exact", normalize=False, head_chunk=head_chunk)
        torch.testing.assert_close(other.sketch(ids, attn, loss), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_label_nll_matches_cross_entropy_and_its_gradient(bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 6, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, 6, generator=g)
    b = torch.randn(VOCAB, generator=g) if bias else None
    targets = torch.randint(0, VOCAB, (11,), generator=g)
    upstream = torch.rand(11, generator=g)
    ref = F.cross_entropy(F.linear(hidden, weight, b).float(), targets, reduction="none")
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), hidden)
    for chunk in (1, 4, 11, 50):
        nll = label_nll(hidden, weight, b, targets, chunk)
        (grad_h,) = torch.autograd.grad((nll * upstream).sum(), hidden)
        torch.testing.assert_close(nll, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_h, ref_grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hidden .M, d. and targets"):
        label_nll(hidden, weight, b, targets[:3], 4)


def test_heads_that_transform_logits_use_the_full_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, intermediate_size=64, vocab_size=VOCAB, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(cfg)
    ids, attn, loss, _ = padded_batch(seed=6)
    sk = GradientSketcher(model, mode="exact", normalize=False, modules=1)
    assert sk.head_chunk is None  # soft-capping comes after the head: no chunking
    expected = func_per_sample_grads(model, sk.module_names, ids, loss)
    torch.testing.assert_close(sk.sketch(ids, attn, loss), expected, rtol=1e-5, atol=1e-6)
    # a hooked head needs its own full-logit gradient
    llama = tiny_llama()
    assert GradientSketcher(llama, modules=["lm_head"]).head_chunk is None
    assert GradientSketcher(llama, modules=1).head_chunk is not None


def test_losses_are_hf_mean_label_nll_per_row():
    model = tiny_llama().eval()
    ids, attn, loss, lengths = padded_batch(seed=3)
    _, losses = GradientSketcher(model).sketch(ids, attn, loss, return_losses=True)
    for i, L in enumerate(lengths.tolist()):
        labels = torch.where(loss[i, :L], ids[i, :L], -100)[None]
        with torch.no_grad():
            hf = model(input_ids=ids[i:i + 1, :L], labels=labels).loss
        torch.testing.assert_close(losses[i], hf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "kron"])
def test_row_does_not_depend_on_batch_or_padding(mode):
    model = tiny_qwen2()
    sk = GradientSketcher(model, mode=mode, kron_dims=8, dim=48 if mode == "kron" else None)
    ids, attn, loss, lengths = padded_batch(seed=4, n=6, T=14)
    batch = sk.sketch(ids, attn, loss)
    left = sk.sketch(*padded_batch(seed=4, n=6, T=14, left=True)[:3])
    chunked = sk.sketch(ids, attn, loss, batch_size=4)
    reordered = sk.sketch(ids.flip(0), attn.flip(0), loss.flip(0)).flip(0)
    alone = torch.cat([sk.sketch(ids[i:i + 1, :L], None, loss[i:i + 1, :L])
                       for i, L in enumerate(lengths.tolist())])
    for other in (left, chunked, reordered, alone):
        torch.testing.assert_close(other, batch, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- projections

GRAM_SEEDS = 4


def _gram_errors(model, ids, attn, loss, exact, sizes, make):
    """Mean over seeds of ||K_hat - K||_F / ||K||_F for each sketch size."""
    k_true = exact @ exact.T
    errs = []
    for size in sizes:
        e = [rel_err((f := make(size, seed).sketch(ids, attn, loss)) @ f.T, k_true)
             for seed in range(GRAM_SEEDS)]
        errs.append(float(np.mean(e)))
    return errs


def test_kron_and_dim_gram_error_shrinks_with_sketch_size():
    model = tiny_llama(hidden=64, inter=128)
    ids, attn, loss, _ = padded_batch(seed=5, n=8, T=16)
    exact = GradientSketcher(model, normalize=False).sketch(ids, attn, loss)

    kron_sizes = (2, 4, 8, 16)
    kron = _gram_errors(model, ids, attn, loss, exact, kron_sizes, lambda k, s: GradientSketcher(
        model, mode="kron", kron_dims=k, seed=s, normalize=False))
    last = r"layers\.3\."
    exact_last = GradientSketcher(model, modules=last, normalize=False).sketch(ids, attn, loss)
    dims = (16, 64, 256, 1024)
    dense = _gram_errors(model, ids, attn, loss, exact_last, dims, lambda p, s: GradientSketcher(
        model, modules=last, mode="exact", dim=p, seed=s, normalize=False))
    print("\nkron Gram rel. error (k_in=k_out=k):",
          ", ".join(f"k={k}: {e:.3f}" for k, e in zip(kron_sizes, kron)))
    print("dense dim Gram rel. error (exact, block 3):",
          ", ".join(f"p={p}: {e:.3f}" for p, e in zip(dims, dense)))
    for errs in (kron, dense):
        assert all(a > b for a, b in zip(errs, errs[1:])), errs
        assert errs[-1] < 0.35 * errs[0], errs


def test_kron_and_dim_are_unbiased_over_seeds():
    model = tiny_llama()
    ids, attn, loss, _ = padded_batch(seed=6, n=6)
    exact = GradientSketcher(model, modules=r"layers\.3\.mlp", normalize=False).sketch(ids, attn, loss)
    k_true = exact @ exact.T
    for kwargs in ({"mode": "kron", "kron_dims": 4}, {"mode": "kron", "kron_dims": 4, "dim": 16}):
        grams = []
        for seed in range(64):
            f = GradientSketcher(model, modules=r"layers\.3\.mlp", seed=seed, normalize=False,
                                 **kwargs).sketch(ids, attn, loss)
            grams.append(f @ f.T)
        grams = torch.stack(grams)
        single = np.mean([rel_err(g, k_true) for g in grams])
        averaged = rel_err(grams.mean(0), k_true)
        # unbiased: the error of the mean falls like 1/sqrt(seeds) = 1/8; a bias would stay
        assert averaged < 0.3 * single, (kwargs, single, averaged)


def test_projections_are_functions_of_seed_and_module_name():
    ids, attn, loss, _ = padded_batch(seed=7)
    a = GradientSketcher(tiny_llama(0), mode="kron", kron_dims=4, dim=32, seed=3).sketch(ids, attn, loss)
    b = GradientSketcher(tiny_llama(0), mode="kron", kron_dims=4, dim=32, seed=3).sketch(ids, attn, loss)
    c = GradientSketcher(tiny_llama(0), mode="kron", kron_dims=4, dim=32, seed=4).sketch(ids, attn, loss)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # one module's kron block is the same whichever other modules are hooked
    model = tiny_llama(0)
    name = "model.layers.3.mlp.up_proj"
    both = GradientSketcher(model, modules=[name, "model.layers.2.mlp.up_proj"], mode="kron",
                            kron_dims=4, normalize=False).sketch(ids, attn, loss)
    one = GradientSketcher(model, modules=[name], mode="kron", kron_dims=4,
                           normalize=False).sketch(ids, attn, loss)
    torch.testing.assert_close(both[:, 16:], one, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- side effects

def test_sketch_leaves_training_untouched():
    model, twin = tiny_llama(0), tiny_llama(0)
    model.train()
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    twin.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    ids, attn, loss, _ = padded_batch(seed=8)
    with torch.no_grad():  # the caller's grad mode is restored, whatever it was
        GradientSketcher(model, modules="all_linear", mode="kron").sketch(ids, attn, loss)
        assert not torch.is_grad_enabled()
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    for m in (model, twin):
        m(input_ids=ids, attention_mask=attn, labels=torch.where(loss, ids, -100)).loss.backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)


def test_backward_stays_above_the_hooked_layers():
    model = tiny_llama()
    ids, attn, loss, _ = padded_batch(seed=9)
    ran = set()
    for i, layer in enumerate(model.model.layers):
        for part in ("self_attn", "mlp"):
            getattr(layer, part).register_full_backward_hook(
                lambda m, gi, go, key=f"{part}{i}": ran.add(key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "full backward hook ... module outputs"
        GradientSketcher(model, modules=r"layers\.2\.mlp").sketch(ids, attn, loss)
    # layer 2's MLP is hooked: nothing below it (layer 2's attention, layers 0-1) runs backward
    assert ran == {"mlp2", "self_attn3", "mlp3"}


# --------------------------------------------------------------------------- module selection

def test_resolve_modules_choices_and_errors():
    model = tiny_llama(layers=5)
    names = [n for n, _ in resolve_modules(model)]
    assert len(names) == 21 and all(n.startswith(("model.layers.2.", "model.layers.3.", "model.layers.4."))
                                    for n in names)
    assert len(resolve_modules(model, 1)) == 7
    assert len(resolve_modules(model, 10)) == 35  # fewer blocks than asked: all of them
    all_linear = [n for n, _ in resolve_modules(model, "all_linear")]
    assert len(all_linear) == 35 and "lm_head" not in all_linear
    assert [n for n, _ in resolve_modules(model, r"layers\.0\.mlp\.(up|down)")] == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert [n for n, _ in resolve_modules(model, ["lm_head", "model.layers.1.mlp.up_proj"])] == [
        "model.layers.1.mlp.up_proj", "lm_head"]
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*model.layers.0.self_attn.q_proj"):
        resolve_modules(model, r"attention\.query")
    with pytest.raises(ValueError, match="not nn.Linear"):
        resolve_modules(model, ["model.layers.0.mlp"])
    with pytest.raises(ValueError, match="peft LoRA"):
        resolve_modules(model, "lora")
    lora = tiny_lora()
    assert all("lora_" in n for n, _ in resolve_modules(lora, "all_linear"))
    assert len(resolve_modules(lora, "lora")) == 4 * 6 * 2
    # names and regexes reach base layers of a peft model too
    assert [n for n, _ in resolve_modules(lora, r"layers\.3\.mlp\.up_proj\.base_layer$")]


# --------------------------------------------------------------------------- bad input

def test_bad_input_gives_clear_errors():
    model = tiny_llama()
    sk = GradientSketcher(model)
    ids, attn, loss, _ = padded_batch(seed=10)
    with pytest.raises(ValueError, match="shape of input_ids"):
        sk.sketch(ids, attn[:, :-1], loss)
    with pytest.raises(ValueError, match="shape of input_ids"):
        sk.sketch(ids, attn, loss[:3])
    with pytest.raises(ValueError, match="2-D"):
        sk.sketch(ids[0], attn[0], loss[0])
    with pytest.raises(ValueError, match="integer token ids"):
        sk.sketch(ids.float(), attn, loss)
    with pytest.raises(ValueError, match="padding"):
        sk.sketch(ids, attn, torch.ones_like(loss))
    with pytest.raises(ValueError, match="mode must be one of"):
        GradientSketcher(model, mode="dense")
    with pytest.raises(ValueError, match="kron_dims"):
        GradientSketcher(model, mode="kron", kron_dims=(4, 0))
    for bad in (0, -3, 2.5, "big", True):
        with pytest.raises(ValueError, match="head_chunk must be a positive int"):
            GradientSketcher(model, head_chunk=bad)


def test_row_without_labels_is_a_zero_row_with_a_warning():
    model = tiny_llama()
    ids, attn, loss, _ = padded_batch(seed=11)
    loss[2] = False
    loss[4, :] = False
    loss[4, 0] = True  # column 0 is never a label: nothing predicts it
    with pytest.warns(RuntimeWarning, match=r"rows \[2, 4\]"):
        features, losses = GradientSketcher(model).sketch(ids, attn, loss, return_losses=True)
    assert torch.all(features[[2, 4]] == 0) and torch.all(losses[[2, 4]] == 0)
    torch.testing.assert_close(features[[0, 1, 3]].norm(dim=1), torch.ones(3))
    # no label anywhere: still a forward (ZeRO-3 ranks must stay in step), all-zero features
    with pytest.warns(RuntimeWarning, match=r"rows \[0, 1, 2, 3, 4\]"):
        features = GradientSketcher(model, mode="kron", kron_dims=4).sketch(
            ids, attn, torch.zeros_like(loss))
    assert features.shape == (5, 21 * 16) and torch.all(features == 0)


def test_non_finite_output_raises():
    model = tiny_llama()
    ids, attn, loss, _ = padded_batch(seed=12)
    with torch.no_grad():
        model.model.embed_tokens.weight[ids[1, 4]] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite.*rows \[1"):
        GradientSketcher(model).sketch(ids, attn, loss)


# --------------------------------------------------------------------------- ZeRO-3, 2 ranks

ZERO3_CONFIG = {"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 3}, "fp16": {"enabled": False},
                "bf16": {"enabled": False}, "steps_per_print": 10**9}


def _train_losses(engine, batches, sketcher=None):
    losses = []
    for ids, attn, loss in batches:
        if sketcher is not None:
            sketcher.sketch(ids, attn, loss)
        out = engine(input_ids=ids, attention_mask=attn, labels=torch.where(loss, ids, -100))
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    return losses


def _zero3_worker(rank, world_size):
    import deepspeed

    model = tiny_llama(0)
    outside, plain = copy.deepcopy(model), copy.deepcopy(model)
    mine = padded_batch(seed=100 + rank)[:3]       # this rank's pool shard
    shared = padded_batch(seed=200)[:3]            # the same rows on every rank
    steps = [padded_batch(seed=300 + 10 * s + rank)[:3] for s in range(3)]

    def engine_of(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        return deepspeed.initialize(model=m, optimizer=opt, config=ZERO3_CONFIG)[0]

    engine = engine_of(model)
    assert engine.zero_optimization_stage() == 3
    assert all(p.numel() == 0 for p in engine.module.parameters())  # really partitioned

    kwargs = {"mode": "kron", "kron_dims": 8, "dim": 64, "seed": 5}
    exact = GradientSketcher(engine, mode="exact", normalize=False).sketch(*mine)
    kron = GradientSketcher(engine.module, **kwargs).sketch(*shared)
    grads_after = [p.grad is not None for p in engine.module.parameters()]
    z3_grads = [deepspeed.utils.safe_get_full_grad(p) for p in engine.module.parameters()]
    with_sketch = _train_losses(engine, steps, GradientSketcher(engine.module, mode="kron"))
    without = _train_losses(engine_of(plain), steps)
    return {
        "exact": exact.numpy(), "kron": kron.numpy(),
        "exact_outside": GradientSketcher(outside, mode="exact", normalize=False).sketch(*mine).numpy(),
        "kron_outside": GradientSketcher(outside, **kwargs).sketch(*shared).numpy(),
        "any_grad": any(grads_after),
        "any_z3_grad": any(g is not None and bool(g.abs().sum() > 0) for g in z3_grads),
        "with_sketch": with_sketch, "without": without,
    }


@pytest.mark.slow
def test_zero3_two_ranks_sketches_match_and_training_is_unchanged():
    from distributed_utils import run_ranks

    results = run_ranks(_zero3_worker, 2)
    for rank, r in enumerate(results):
        np.testing.assert_allclose(r["exact"], r["exact_outside"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["kron"], r["kron_outside"], rtol=1e-5, atol=1e-6)
        assert not r["any_grad"] and not r["any_z3_grad"], rank
        assert r["with_sketch"] == r["without"], (rank, r["with_sketch"], r["without"])
    # the projections need no communication: the same rows give the same sketch on every rank
    np.testing.assert_array_equal(results[0]["kron"], results[1]["kron"])
    assert not np.allclose(results[0]["exact"], results[1]["exact"])  # different shards


# ----------------------------------------------------------------------- streamed Gram


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["exact", "kron"])
def test_sketch_gram_streams_the_gram_and_scores_of_the_features(mode, normalize, tmp_path):
    """sketch_gram never holds the features, yet gives the Gram and the scores of sketch()'s
    rows (float rounding apart), for any micro-batch size, with a row that has no label."""
    model = tiny_llama(3)
    ids, attn, loss, _ = padded_batch(seed=4, n=7, T=12)
    loss[5] = False  # a row without any label: a zero row
    sk = GradientSketcher(model, modules=2, mode=mode, normalize=normalize, dtype=torch.float64)
    raw = GradientSketcher(model, modules=2, mode=mode, normalize=False, dtype=torch.float64)
    target = torch.randn(sk.feature_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for batch in (None, 3, 1):  # the forward's rounding depends on the micro-batch: compare like with like
        with pytest.warns(RuntimeWarning):
            feats, losses = sk.sketch(ids, attn, loss, return_losses=True, batch_size=batch)
            unnormalized = raw.sketch(ids, attn, loss, batch_size=batch)
        norms = unnormalized.norm(dim=1).clamp(min=1e-300)
        want_scores = unnormalized @ target / (norms if normalize else 1.0)
        with pytest.warns(RuntimeWarning):
            gram, scores, got_losses = sk.sketch_gram(ids, attn, loss, target=target, batch_size=batch,
                                                      spill_dir=str(tmp_path))
        torch.testing.assert_close(gram, feats @ feats.T, rtol=1e-9, atol=1e-12)
        assert torch.equal(gram, gram.T)  # symmetric bit for bit
        torch.testing.assert_close(scores, want_scores, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_losses, losses)
        assert not gram[5].any() and float(scores[5]) == 0.0
        assert not any(tmp_path.iterdir())  # the spilled blocks are gone


def test_sketch_gram_bad_input():
    sk = GradientSketcher(tiny_llama(0), modules=1)
    ids, attn, loss, _ = padded_batch(n=3)
    with pytest.raises(ValueError, match=r"target must have shape"):
        sk.sketch_gram(ids, attn, loss, target=torch.zeros(3))
    with pytest.raises(ValueError, match="batch_size"):
        sk.sketch_gram(ids, attn, loss, batch_size=0)
    with pytest.raises(ValueError, match="dim=None"):
        GradientSketcher(tiny_llama(0), modules=1, dim=16).sketch_gram(ids, attn, loss)
