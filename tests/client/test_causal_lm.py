"""Causal-LM training pieces on tiny-llama: response-only loss, left padding, per-sequence DP gradients, greedy
evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsim.client.causal_lm import causal_lm_forward, causal_lm_losses, evaluate_lm, prompt_pass
from fedsim.config.schema import FederationConfig, LoraConfig, ModelConfig, PrivacyConfig
from fedsim.data.instruct import IGNORE, response_labels, tokenize_instruct
from fedsim.data.synthetic import make_arithmetic
from fedsim.model.adapters import adapter_keys, attach_adapter, parameters_for, set_state
from fedsim.model.build import build_base_model, build_tokenizer
from fedsim.privacy.dpsgd import make_dp_optimizer, wrap_for_dp
from tests.client.world import trainer_on

L = 32


@pytest.fixture(scope="module")
def setup():
    ds = make_arithmetic(12, 0)
    tok = build_tokenizer(ModelConfig(name="tiny-llama"), ds.texts)
    ids, mask, start = tokenize_instruct(ds, tok, L, use_chat_template=False)
    labels = response_labels(ids, start)
    return ds, tok, ids.astype(np.int64), mask.astype(np.int64), start, labels


def _model(tok, seed=0):
    base = build_base_model(ModelConfig(name="tiny-llama"), 2, tok, seed, task="causal_lm")
    model = attach_adapter(base, LoraConfig(r=4, alpha=8), "llama", seed, task="causal_lm")
    with torch.no_grad():  # a non-zero B, so every adapter tensor has a gradient
        set_state(
            model,
            {
                k: torch.randn_like(p) * 0.1
                for k, p in zip(adapter_keys(model), parameters_for(model, adapter_keys(model)), strict=True)
            },
        )
    return model


def _t(*arrays):
    return [torch.as_tensor(a) for a in arrays]


def test_causal_lm_targets_every_attention_projection(setup):
    model = _model(setup[1])
    assert {k.split(".")[-2] for k in adapter_keys(model)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any(k.startswith("head.") for k in adapter_keys(model))  # no head under causal_lm


def test_loss_is_the_mean_nll_of_each_examples_response_tokens(setup):
    _, tok, ids, mask, start, labels = setup
    model = _model(tok).eval()
    ids_t, mask_t, y = _t(ids[:4], mask[:4], labels[:4])
    per, summed, count = causal_lm_forward(model, ids_t, mask_t, y)
    for i in range(4):  # the same example alone and unpadded: the same loss
        real = ids_t[i, mask_t[i] == 1][None]
        logits = model(input_ids=real).logits[0, :-1].float()
        tgt = real[0, 1:].clone()
        tgt[: int(start[i]) - (L - real.shape[1]) - 1] = IGNORE  # score only the response tokens (and eos)
        want = F.cross_entropy(logits, tgt, ignore_index=IGNORE)
        assert torch.allclose(per[i], want, atol=1e-5)
        assert int(count[i]) == int((y[i] != IGNORE).sum())
    assert torch.allclose(summed, per * count)


def test_loss_ignores_prompt_and_padding_tokens_but_not_the_response(setup):
    *_, labels = setup
    logits = torch.randn(2, 6, 11)
    y = torch.full((2, 9), IGNORE)
    y[0, 7:], y[1, 5:] = torch.tensor([3, 4]), torch.tensor([1, 2, 5, 6])
    per, _, count = causal_lm_losses(logits, y)
    assert count.tolist() == [2, 4]
    changed = logits.clone()
    changed[:, 1, :5] += 5  # kept logit 1 = position 4, which predicts position 5: scored in row 1 only
    per2, _, _ = causal_lm_losses(changed, y)
    assert per2[0] == per[0] and per2[1] != per[1]
    with pytest.raises(ValueError):  # a scored label outside the kept logits
        causal_lm_losses(logits[:, 2:], y)


def test_dp_per_example_gradients_are_per_sequence_and_clipped(setup):
    _, tok, ids, mask, _, labels = setup
    model = _model(tok)
    keys = adapter_keys(model)
    gsm = wrap_for_dp(model)
    params = parameters_for(model, keys)
    ids_t, mask_t, y = _t(ids[:6], mask[:6], labels[:6])
    model.train()
    causal_lm_forward(gsm, ids_t, mask_t, y)[0].mean().backward()
    per_example = [torch.cat([p.grad_sample[i].flatten() for p in params]) for i in range(6)]
    for p in params:
        p.grad_sample = None
        p.grad = None
    for i in range(6):  # each per-sample gradient is that sequence's own loss gradient
        gsm.zero_grad()
        for p in params:
            p.grad = None
        one = [t[i : i + 1] for t in (ids_t, mask_t, y)]
        gsm.disable_hooks()
        try:
            loss = causal_lm_forward(model, *one)[0].mean()
            grads = torch.autograd.grad(loss, params)
        finally:
            gsm.enable_hooks()
        alone = torch.cat([g.flatten() for g in grads])
        assert torch.allclose(per_example[i], alone, atol=1e-5, rtol=1e-4)
    # the DP step: every example's contribution clipped to norm <= C, noise 0
    clip = 0.5 * min(float(g.norm()) for g in per_example)  # every example is clipped
    for p in params:
        p.grad_sample = None
        p.grad = None
    causal_lm_forward(gsm, ids_t, mask_t, y)[0].mean().backward()
    opt = make_dp_optimizer(torch.optim.SGD(params, lr=1.0), 0.0, clip, 6, torch.Generator().manual_seed(0))
    opt.pre_step()
    summed = torch.cat([p.grad.flatten() for p in params]) * 6
    clipped = [g * min(1.0, clip / float(g.norm())) for g in per_example]
    assert all(float(c.norm()) <= clip * (1 + 1e-5) for c in clipped)
    assert torch.allclose(summed, torch.stack(clipped).sum(0), atol=1e-5, rtol=1e-4)


def test_trainer_trains_the_response_and_evaluates_greedy_answers(setup):
    from fedsim.data.federated import LMData

    ds, tok, ids, mask, start, labels = setup
    model = _model(tok)
    fed = FederationConfig(local_steps=3, batch_size=4, lr=0.1)
    trainer = trainer_on(model, fed, PrivacyConfig(mode="sample", noise_multiplier=0.5), seed=0)
    out = trainer.train_one(adapter_keys(model), ids, mask, labels, round=1, client_id=0)
    assert out.steps == 3 and np.isfinite(out.train_loss)
    lm = LMData(start, tuple(ds.answers), "number", tok, tok.pad_token_id, tok.eos_token_id, False)
    loss_sum, correct, n, tok_sum, tokens = evaluate_lm(model, ids, mask, labels, start, list(ds.answers), lm, 5, 3)
    assert n == 12 and 0 <= correct <= 12 and tokens == int((labels != IGNORE).sum())
    # the one-prompt-pass evaluation equals the plain forward (loss) and HF generate (greedy answers)
    ids_t, mask_t, y = _t(ids, mask, labels)
    with torch.no_grad():
        per, summed, _ = causal_lm_forward(model.eval(), ids_t, mask_t, y)
    assert loss_sum == pytest.approx(float(per.sum()), rel=1e-5) and tok_sum == pytest.approx(float(summed.sum()))
    for s in (slice(0, 5), slice(5, 12)):
        *_, generated = prompt_pass(model, ids_t[s], mask_t[s], y[s], start[s], lm, 3)
        for row, i in zip(generated, range(s.start, s.stop), strict=True):
            prompt = ids_t[i, mask_t[i] == 1][: int(start[i]) - (L - int(mask_t[i].sum()))][None]
            out = model.generate(
                input_ids=prompt, max_new_tokens=3, do_sample=False, pad_token_id=lm.pad_id, eos_token_id=lm.eos_id
            )[0, prompt.shape[1] :].tolist()
            assert row == (out[: out.index(lm.eos_id)] if lm.eos_id in out else out)
