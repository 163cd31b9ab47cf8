"""The multi-client layer: a fused pass applies each row's own client's LoRA factors and head; its per-example
gradients equal Opacus' on each client alone, its summed gradients equal autograd's; what it cannot batch is
refused (tiny-bert, tiny-roberta, tiny-llama)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsim.client.causal_lm import causal_lm_forward
from fedsim.client.multi_adapter import Group, MultiAdapter
from fedsim.config.schema import LoraConfig, ModelConfig
from fedsim.data.instruct import response_labels, tokenize_instruct
from fedsim.data.synthetic import make_arithmetic
from fedsim.model.adapters import adapter_keys, attach_adapter, get_state, parameters_for, set_state, set_trainable
from fedsim.model.build import build_base_model, build_tokenizer
from fedsim.model.train_mode import set_train_mode
from fedsim.privacy.dpsgd import clear_dp_buffers, wrap_for_dp

WORDS = ["cat", "dog", "cow", "owl", "pig", "hen", "fox", "bee"]
TEXTS = [f"the {WORDS[i % 8]} and {WORDS[(3 * i) % 8]} sat on mat {i % 5}" for i in range(12)]
GROUPS = [Group(0, 0, 2), Group(1, 2, 7), Group(2, 7, 8)]  # three clients of unequal batch sizes


@functools.cache
def _tokens(name: str) -> tuple:
    if name == "tiny-llama-lm":
        ds = make_arithmetic(8, 0)
        tok = build_tokenizer(ModelConfig(name="tiny-llama"), ds.texts)
        ids, mask, start = tokenize_instruct(ds, tok, 32, use_chat_template=False)
        return tok, ids.astype(np.int64), mask.astype(np.int64), response_labels(ids, start)
    tok = build_tokenizer(ModelConfig(name=name), TEXTS)
    enc = tok(TEXTS[:8], padding="max_length", max_length=14, truncation=True, return_tensors="np")
    return tok, enc["input_ids"], enc["attention_mask"], np.arange(8) % 3


def _model(name: str, **lora):
    tok = _tokens(name)[0]
    if name == "tiny-llama-lm":
        base = build_base_model(ModelConfig(name="tiny-llama"), 2, tok, 0, task="causal_lm")
        return attach_adapter(base, LoraConfig(r=4, alpha=8, **lora), "llama", 0, task="causal_lm")
    base = build_base_model(ModelConfig(name=name), 3, tok, 0)
    family = {"tiny-bert": "bert", "tiny-roberta": "roberta", "tiny-llama": "llama"}[name]
    return attach_adapter(base, LoraConfig(r=4, alpha=8, train_head=True, **lora), family, 0)


def _states(model, count=3):
    g = torch.Generator().manual_seed(7)
    init = get_state(model)
    return [{k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(count)]


def _batch(name):
    _, ids, mask, labels = _tokens(name)
    return torch.as_tensor(ids[:8]), torch.as_tensor(mask[:8]), torch.as_tensor(labels[:8])


def _losses(model, batch):
    """Per-example losses (cross-entropy, or the per-sequence response NLL)."""
    ids, mask, labels = batch
    if labels.dim() == 2:
        return causal_lm_forward(model, ids, mask, labels)[0]
    return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.float(), labels, reduction="none")


def _rows(batch, g):
    return tuple(t[g.start : g.stop] for t in batch)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta", "tiny-llama", "tiny-llama-lm"])
def test_a_fused_pass_gives_each_row_its_own_clients_model(name):
    model = _model(name).eval()
    states, batch = _states(model), _batch(name)
    live = get_state(model)
    multi = MultiAdapter(model)
    multi.load(states, [])
    with torch.no_grad(), multi.pass_over(GROUPS, per_example=False):
        fused = _losses(model, batch)
    assert all("forward" not in m.__dict__ for m in model.modules())  # the class forwards are back
    assert all(torch.equal(v, get_state(model)[k]) for k, v in live.items())  # the live tensors are not used
    with torch.no_grad():
        for g in GROUPS:
            set_state(model, states[g.slot])
            torch.testing.assert_close(fused[g.start : g.stop], _losses(model, _rows(batch, g)), rtol=1e-5, atol=1e-6)
            set_state(model, states[(g.slot + 1) % 3])  # another client's model gives other losses
            assert not torch.allclose(fused[g.start : g.stop], _losses(model, _rows(batch, g)), atol=1e-4)


def _mean_losses_backward(model, multi, batch, groups, per_example):
    with multi.pass_over(groups, per_example=per_example):
        per = _losses(model, batch)
        torch.stack([per[g.start : g.stop].mean() for g in groups]).sum().backward()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus' hooks on the first adapted layer
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama-lm"])
def test_per_example_gradients_equal_opacus_on_each_client_alone(name):
    model = _model(name)
    keys = adapter_keys(model)
    trained = [k for i, k in enumerate(keys) if i % 3 != 1]  # some factors (and head tensors) frozen
    gsm = wrap_for_dp(model)  # every adapter tensor requires grad at wrap time
    states, batch = _states(model), _batch(name)
    want = []
    set_train_mode(model, base_dropout=False)
    for g in GROUPS:  # Opacus, one client at a time
        set_state(model, states[g.slot])
        set_trainable(model, trained)
        clear_dp_buffers(model)
        ids, mask, labels = _rows(batch, g)
        if labels.dim() == 2:
            causal_lm_forward(gsm, ids, mask, labels)[0].mean().backward()
        else:
            F.cross_entropy(gsm(input_ids=ids, attention_mask=mask).logits.float(), labels).backward()
        pairs = zip(trained, parameters_for(model, trained), strict=True)
        want.append({k: p.grad_sample.detach().clone() for k, p in pairs})
    clear_dp_buffers(model)
    set_trainable(model, [])
    multi = MultiAdapter(model)
    params = multi.load(states, trained)
    gsm.disable_hooks()
    _mean_losses_backward(model, multi, batch, GROUPS, per_example=True)
    for g in GROUPS:
        got = multi.take_grad_samples(g.slot)
        assert sorted(got) == sorted(trained)
        for k in trained:
            assert got[k].shape == (g.rows, *states[0][k].shape)
            torch.testing.assert_close(got[k], want[g.slot][k], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for slot in params for p in slot)  # nothing summed under DP


def test_summed_gradients_equal_autograd_on_each_client_alone():
    name = "tiny-roberta"  # a head of two Linear modules (dense, out_proj)
    model = _model(name)
    keys = adapter_keys(model)
    states, batch = _states(model), _batch(name)
    set_train_mode(model, base_dropout=False)
    want = []
    for g in GROUPS:
        set_state(model, states[g.slot])
        params = parameters_for(model, keys)
        loss = _losses(model, _rows(batch, g)).mean()
        want.append(dict(zip(keys, torch.autograd.grad(loss, params), strict=True)))
    set_trainable(model, [])
    multi = MultiAdapter(model)
    params = multi.load(states, keys)
    _mean_losses_backward(model, multi, batch, GROUPS, per_example=False)
    assert any(k.startswith("head.classifier.dense") for k in keys)
    for g in GROUPS:
        for k, p in zip(keys, params[g.slot], strict=True):
            torch.testing.assert_close(p.grad, want[g.slot][k], rtol=1e-4, atol=1e-6)
    assert multi.take_grad_samples(0) == {}


def test_adapters_a_fused_pass_cannot_batch_are_refused():
    with pytest.raises(ValueError, match="dropout"):
        MultiAdapter(_model("tiny-bert", dropout=0.1))
    with pytest.raises(ValueError, match="neither LoRA Linear factors"):
        MultiAdapter(_model("tiny-bert", variant="vera"))


def test_row_groups_must_be_contiguous_and_match_the_batch():
    model = _model("tiny-bert").eval()
    multi = MultiAdapter(model)
    multi.load(_states(model), [])
    with pytest.raises(ValueError, match="contiguous"):
        with multi.pass_over([Group(0, 0, 2), Group(1, 3, 5)], per_example=False):
            pass
    ids, mask, _ = _batch("tiny-bert")
    with pytest.raises(RuntimeError, match="batch"), torch.no_grad():
        with multi.pass_over(GROUPS, per_example=False):
            model(input_ids=ids[:5], attention_mask=mask[:5])  # 5 rows, groups over 8
    assert all("forward" not in m.__dict__ for m in model.modules())
