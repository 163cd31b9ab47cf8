"""Per-example gradients of VeRA's lambda vectors under Opacus: exact, clipped, frozen-aware, dropout-exact."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from fedsim.config.schema import LoraConfig, ModelConfig
from fedsim.model.adapters import adapter_keys, attach_adapter, get_state, parameters_for, set_state, set_trainable
from fedsim.model.build import build_base_model, build_tokenizer
from fedsim.model.keys import factor_of
from fedsim.privacy.dpsgd import clear_dp_buffers, make_dp_optimizer, wrap_for_dp
from fedsim.privacy.vera_grad_sampler import is_vera_layer

TEXTS = [f"the {w} sat on mat {i}" for i, w in enumerate("cat cow pig hen owl ant".split())]
LABELS = torch.arange(len(TEXTS)) % 3
TOK = build_tokenizer(ModelConfig(name="tiny-bert"), TEXTS)
ENC = TOK(TEXTS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")


def _model(vera_dropout: float = 0.0):
    """Tiny VeRA bert with random (non-trivial) lambdas; the base model's own dropout off, VeRA's as given."""
    base = build_base_model(ModelConfig(name="tiny-bert"), 3, TOK, seed=0)
    model = attach_adapter(base, LoraConfig(r=4, variant="vera", dropout=vera_dropout), "bert", seed=1)
    gen = torch.Generator().manual_seed(5)
    set_state(model, {k: torch.randn(v.shape, generator=gen) for k, v in get_state(model).items()})
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and ".vera_dropout." not in _name_of(model, m):
            m.p = 0.0
    return model


def _name_of(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def _lambda_keys(model):
    return [k for k in adapter_keys(model) if factor_of(k) in ("A", "B")]


def _backward(forward, model, rows=slice(None)):
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        logits = forward(input_ids=ENC["input_ids"][rows], attention_mask=ENC["attention_mask"][rows]).logits
        F.cross_entropy(logits, LABELS[rows]).backward()


def _per_example_grads(keys):
    """Gradients of each example's own loss, one example at a time, on an unwrapped twin (plain autograd)."""
    twin = _model()
    twin.train()
    params = parameters_for(twin, keys)
    out = []
    for i in range(len(TEXTS)):
        logits = twin(input_ids=ENC["input_ids"][i : i + 1], attention_mask=ENC["attention_mask"][i : i + 1]).logits
        out.append(torch.autograd.grad(F.cross_entropy(logits, LABELS[i : i + 1]), params))
    return out


def test_grad_samples_of_both_lambdas_equal_single_example_gradients():
    model = _model()
    keys = adapter_keys(model)  # lambdas and head
    set_trainable(model, keys)
    _backward(wrap_for_dp(model), model)
    expected = _per_example_grads(keys)
    for j, (k, p) in enumerate(zip(keys, parameters_for(model, keys), strict=True)):
        assert p.grad_sample.shape == (len(TEXTS), *p.shape), k
        for i in range(len(TEXTS)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=0, atol=1e-6, msg=k)
        assert float(p.grad_sample.abs().max()) > 1e-4, k  # a real gradient, not a vacuous match


def test_ffa_style_frozen_lambda_d_and_frozen_layers_get_no_grad_sample():
    model = _model()
    set_trainable(model, adapter_keys(model))
    gsm = wrap_for_dp(model)
    b_keys = [k for k in _lambda_keys(model) if factor_of(k) == "B" and ".layer.1." in k]
    set_trainable(model, b_keys)  # after wrapping: lambda_d everywhere and all of layer 0 frozen
    _backward(gsm, model)
    expected = _per_example_grads(b_keys)
    for j, p in enumerate(parameters_for(model, b_keys)):
        torch.testing.assert_close(p.grad_sample, torch.stack([e[j] for e in expected]), rtol=0, atol=1e-6)
    for k, p in zip(adapter_keys(model), parameters_for(model, adapter_keys(model)), strict=True):
        if k not in b_keys:
            assert p.grad_sample is None and p.grad is None, k
    clear_dp_buffers(model)
    assert all(not getattr(m, "activations", []) for m in model.modules())


def test_vera_dropout_uses_the_dropped_input():
    # With dropout the forward sees dropout(x); the per-example gradients (same forward, same masks) must then
    # average to the batch gradient autograd computes in the same backward pass.
    model = _model(vera_dropout=0.5)
    keys = _lambda_keys(model)
    set_trainable(model, keys)
    gsm = wrap_for_dp(model)
    torch.manual_seed(0)
    _backward(gsm, model)
    for k, p in zip(keys, parameters_for(model, keys), strict=True):
        torch.testing.assert_close(p.grad_sample.mean(0), p.grad, rtol=1e-5, atol=1e-7, msg=k)
    # ... and they differ from the gradients without dropout, so the masks really were used
    no_drop = _per_example_grads(keys)
    p = parameters_for(model, keys[:1])[0]
    assert not torch.allclose(p.grad_sample[0], no_drop[0][0], atol=1e-4)


def test_dp_step_clips_each_example_over_the_trainable_set():
    for clip, expect_clipped in ((1e6, False), (1e-3, True)):
        model = _model()
        keys = _lambda_keys(model)
        set_trainable(model, keys)
        gsm = wrap_for_dp(model)
        params = parameters_for(model, keys)
        opt = make_dp_optimizer(torch.optim.SGD(params, lr=1.0), 0.0, clip, len(TEXTS), torch.Generator())
        _backward(gsm, model)
        opt.step()  # noise 0: p.grad = sum_i min(1, C / |g_i|) g_i / batch
        per_example = _per_example_grads(keys)
        norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in per_example])
        factors = (clip / (norms + 1e-6)).clamp(max=1.0)
        assert bool((norms > clip).all()) is expect_clipped
        assert bool(((factors * norms) <= clip * (1 + 1e-6)).all())
        for j, p in enumerate(params):
            expected = sum(f * gs[j] for f, gs in zip(factors, per_example, strict=True)) / len(TEXTS)
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-8)


def test_eval_forward_keeps_nothing_and_trainable_base_is_refused():
    model = _model()
    set_trainable(model, adapter_keys(model))
    gsm = wrap_for_dp(model)
    model.eval()
    with torch.no_grad():
        gsm(input_ids=ENC["input_ids"], attention_mask=ENC["attention_mask"])
    layers = [m for m in model.modules() if is_vera_layer(m)]
    assert len(layers) == 4 and all(not vars(m).get("activations") for m in layers)
    assert all(not hasattr(m, "_fedsim_vera_input") for m in layers)
    other = _model()
    for p in other.parameters():
        p.requires_grad_(True)  # base weights too
    with pytest.raises(NotImplementedError, match="base layer"):
        wrap_for_dp(other)
