"""Local training: trainable sets, determinism, DP-SGD clipping exactness, empty Poisson batches."""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsim.client.step_loop import batch_schedule
from fedsim.config.schema import FederationConfig, LoraConfig, ModelConfig, PrivacyConfig
from fedsim.model.adapters import adapter_keys, attach_adapter, factor_of, get_state, parameters_for, set_state
from fedsim.model.build import BaseBlueprint, blueprint_of, build_base_model, build_tokenizer, model_from_blueprint
from fedsim.seeding import torch_generator
from tests.client.world import trainer_on

WORDS = ["cat", "dog", "cow", "owl", "pig", "hen", "fox", "bee"]
TEXTS = [f"the {WORDS[i % 8]} and {WORDS[(3 * i) % 8]} sat on mat {i % 5}" for i in range(24)]
LABELS = np.array([(i % 8) % 3 for i in range(24)])
SEED = 0


@functools.cache
def tiny_bert_data(no_dropout: bool) -> tuple[BaseBlueprint, np.ndarray, np.ndarray]:
    cfg = ModelConfig(name="tiny-bert")
    tok = build_tokenizer(cfg, TEXTS)
    enc = tok(TEXTS, padding="max_length", max_length=14, truncation=True, return_tensors="np")
    bp = blueprint_of(build_base_model(cfg, 3, tok, seed=SEED))
    if no_dropout:
        config = dict(bp.config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        bp = BaseBlueprint(config=config, weights=bp.weights, family=bp.family)
    return bp, enc["input_ids"], enc["attention_mask"]


def lora_model(no_dropout=False, train_head=False, lora_dropout=0.0, b_scale=0.3):
    """tiny-bert with LoRA; B set to seeded random values so that A receives gradients too."""
    bp = tiny_bert_data(no_dropout)[0]
    model = attach_adapter(
        model_from_blueprint(bp), LoraConfig(r=4, dropout=lora_dropout, train_head=train_head), "bert", seed=SEED
    )
    g = torch.Generator().manual_seed(42)
    set_state(
        model,
        {k: torch.randn(v.shape, generator=g) * b_scale for k, v in get_state(model).items() if factor_of(k) == "B"},
    )
    return model


def _keys(model, factors):
    return [k for k in adapter_keys(model) if factor_of(k) in factors]


def fed_config(**kw):
    return FederationConfig(**{"local_steps": 3, "batch_size": 6, "lr": 0.5, **kw})


def dp_config(noise=1.0, clip=0.05):
    return PrivacyConfig(mode="sample", noise_multiplier=noise, clip=clip)


def _base_weights(model):
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n
    }


@pytest.mark.parametrize(("mode", "optimizer"), [("none", "sgd"), ("none", "adamw"), ("sample", "sgd")])
def test_ffa_style_training_changes_b_only(mode, optimizer):
    model = lora_model()
    ids, mask = tiny_bert_data(False)[1:]
    privacy = dp_config() if mode == "sample" else PrivacyConfig()
    trainer = trainer_on(model, fed_config(optimizer=optimizer), privacy, SEED)
    before, base_before = get_state(model), _base_weights(model)
    out = trainer.train_one(_keys(model, "B"), ids, mask, LABELS, round=0, client_id=1)
    after = get_state(model)
    assert (out.steps, out.examples) == (3, len(LABELS)) and math.isfinite(out.train_loss) and out.seconds > 0
    for k in _keys(model, "A"):
        assert torch.equal(after[k], before[k]), k
    for k in _keys(model, "B"):
        assert not torch.equal(after[k], before[k]), k
    assert all(torch.equal(p, base_before[n]) for n, p in _base_weights(model).items())
    assert not model.training
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["none", "sample"])
def test_training_is_deterministic_per_seed_round_and_client(mode):
    ids, mask = tiny_bert_data(False)[1:]
    privacy = dp_config() if mode == "sample" else PrivacyConfig()

    def run(round, client):
        model = lora_model(lora_dropout=0.2)  # base dropout 0.1 and LoRA dropout both active
        trainer = trainer_on(model, fed_config(), privacy, SEED)
        trainer.train_one(adapter_keys(model), ids, mask, LABELS, round=round, client_id=client)
        return get_state(model)

    torch.manual_seed(1)
    rng = torch.get_rng_state()
    ref = run(2, 5)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left as it was
    torch.manual_seed(2)  # results must not depend on the global RNG (dropout is seeded per client)
    same = run(2, 5)
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    for other in (run(2, 6), run(3, 5)):
        assert any(not torch.equal(ref[k], other[k]) for k in ref)


def test_reused_trainer_equals_fresh_trainer():
    """One wrapped model serves many clients: nothing leaks, trainable sets can change per client."""
    ids, mask = tiny_bert_data(False)[1:]
    model = lora_model(train_head=True)
    init = get_state(model)
    trainer = trainer_on(model, fed_config(), dp_config(), SEED)
    trainer.train_one(_keys(model, "B"), ids[:12], mask[:12], LABELS[:12], round=0, client_id=3)
    set_state(model, init)
    trainer.train_one(_keys(model, {"A", "head"}), ids, mask, LABELS, round=0, client_id=4)
    reused = get_state(model)

    fresh_model = lora_model(train_head=True)
    trainer_on(fresh_model, fed_config(), dp_config(), SEED).train_one(
        _keys(fresh_model, {"A", "head"}), ids, mask, LABELS, round=0, client_id=4
    )
    fresh = get_state(fresh_model)
    assert all(torch.equal(reused[k], fresh[k]) for k in fresh)
    assert all(torch.equal(reused[k], init[k]) for k in _keys(model, "B"))


@pytest.mark.parametrize("mode", ["none", "sample"])
def test_gradient_copies_only_when_asked_and_training_unchanged(mode):
    """keep_gradients=False (methods without signals): the same trained tensors, no gradient copies kept, and
    the per-client clean-up leaves no gradient or Opacus buffer on any tensor."""
    ids, mask = tiny_bert_data(False)[1:]
    privacy = dp_config() if mode == "sample" else PrivacyConfig()
    states = []
    for keep in (True, False):
        model = lora_model(train_head=True)
        trainer = trainer_on(model, fed_config(), privacy, SEED, keep_gradients=keep)
        trainer.train_one(adapter_keys(model), ids, mask, LABELS, round=1, client_id=2)
        states.append(get_state(model))
        kept = (trainer.last.last_grads, trainer.last.prev_grads, trainer.last.prev_step)
        assert all(len(x) > 0 for x in kept) if keep else all(len(x) == 0 for x in kept)
        for p in model.parameters():
            assert p.grad is None and getattr(p, "grad_sample", None) is None and not hasattr(p, "_current_grad_sample")
        assert all(not getattr(m, "activations", []) for m in model.modules())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("mode", ["none", "sample"])
def test_a_non_finite_loss_raises_and_the_trainer_serves_the_next_client(mode):
    ids, mask = tiny_bert_data(False)[1:]
    model = lora_model()
    init = get_state(model)
    privacy = dp_config() if mode == "sample" else PrivacyConfig()
    trainer = trainer_on(model, fed_config(), privacy, SEED)
    set_state(model, {k: torch.full_like(v, float("nan")) for k, v in init.items()})
    with pytest.raises(FloatingPointError, match=r"round 1, client 7: training loss is nan at local step 1"):
        trainer.train_one(_keys(model, "B"), ids, mask, LABELS, round=1, client_id=7)
    assert not model.training
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in model.parameters())
    set_state(model, init)  # the same trainer, next client: as if the failed one had never run
    trainer.train_one(_keys(model, "B"), ids, mask, LABELS, round=1, client_id=8)
    fresh = lora_model()
    trainer_on(fresh, fed_config(), privacy, SEED).train_one(_keys(fresh, "B"), ids, mask, LABELS, round=1, client_id=8)
    assert all(torch.equal(get_state(model)[k], v) for k, v in get_state(fresh).items())


def _per_example_grads(model, keys, ids, mask, labels):
    """Independent reference: plain autograd on one example at a time, over ``keys`` only."""
    params = parameters_for(model, keys)
    model.train()
    grads = []
    for i in range(len(labels)):
        logits = model(
            input_ids=torch.as_tensor(ids[i : i + 1]), attention_mask=torch.as_tensor(mask[i : i + 1])
        ).logits
        loss = F.cross_entropy(logits, torch.as_tensor(labels[i : i + 1]))
        grads.append([g.detach().clone() for g in torch.autograd.grad(loss, params)])
    model.eval()
    return grads


def _norm(gs):
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs)))


def test_dp_each_example_contributes_at_most_clip():
    """Single-example shards (batch 4 > n = 1: q = 1, expected batch q * n = 1; no noise): the update is the
    clipped gradient itself."""
    ids, mask = tiny_bert_data(True)[1:]
    model = lora_model(no_dropout=True)
    keys = _keys(model, "B")
    init = get_state(model)
    grads = _per_example_grads(model, keys, ids[:6], mask[:6], LABELS[:6])
    norms = [_norm(g) for g in grads]
    clip = float(np.median(norms))
    trainer = trainer_on(model, fed_config(local_steps=1, batch_size=4, lr=1.0), dp_config(noise=0.0, clip=clip), SEED)
    for i, raw in enumerate(norms):
        set_state(model, init)
        trainer.train_one(keys, ids[i : i + 1], mask[i : i + 1], LABELS[i : i + 1], round=0, client_id=i)
        after = get_state(model)
        update = _norm([after[k] - init[k] for k in keys])
        assert update <= clip * (1 + 1e-4)
        assert update == pytest.approx(min(raw, clip), rel=1e-3)
    assert min(norms) < clip < max(norms)  # both branches (clipped / not clipped) were exercised


@pytest.mark.parametrize("factors", ["B", "AB"])
def test_dp_update_equals_sum_of_clipped_per_example_gradients(factors):
    ids, mask = tiny_bert_data(True)[1:]
    n, batch, round, client = 12, 6, 1, 2
    ids, mask, labels = ids[:n], mask[:n], LABELS[:n]
    model = lora_model(no_dropout=True)
    keys = _keys(model, factors)
    init = get_state(model)
    all_grads = _per_example_grads(model, adapter_keys(model), ids, mask, labels)
    pos = [adapter_keys(model).index(k) for k in keys]
    grads = [[g[j] for j in pos] for g in all_grads]  # the trainable set only
    norms = [_norm(g) for g in grads]
    clip = 0.5 * float(np.median(norms))
    (idx,) = batch_schedule(n, batch, 1, True, torch_generator(SEED, "batches", round, client))
    assert len(idx) >= 2 and max(norms[i] for i in idx) > clip  # clipping matters for this batch

    def expected(clip_norms):
        out = [torch.zeros_like(g) for g in grads[0]]
        for i in idx.tolist():
            factor = min(1.0, clip / (clip_norms[i] + 1e-6))  # Opacus' clip factor (its 1e-6 guards norm 0)
            for o, g in zip(out, grads[i], strict=True):
                o += factor * g
        return {k: -o / batch for k, o in zip(keys, out, strict=True)}  # the update for lr = 1

    want = expected(norms)
    lr = 0.5 / max(float(v.abs().max()) for v in want.values())  # updates of order 1: well above float rounding
    want = {k: lr * v for k, v in want.items()}
    fed = fed_config(local_steps=1, batch_size=batch, lr=lr)
    trainer = trainer_on(model, fed, dp_config(noise=0.0, clip=clip), SEED)
    trainer.train_one(keys, ids, mask, labels, round=round, client_id=client)
    after = get_state(model)
    for k in keys:
        torch.testing.assert_close(after[k] - init[k], want[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(trainer.last.last_grads[k], -want[k] / lr, rtol=1e-4, atol=1e-5 / lr)
    for k in set(adapter_keys(model)) - set(keys):
        assert torch.equal(after[k], init[k])
    if factors == "B":  # clipping by the norm over A and B as well would give a visibly different update
        wrong = expected([_norm(g) for g in all_grads])
        assert max(float((after[k] - init[k] - lr * wrong[k]).abs().max()) for k in keys) > 1e-3


def _all_empty_client(n, batch, steps, round):
    for client in range(1000):
        if all(
            len(b) == 0 for b in batch_schedule(n, batch, steps, True, torch_generator(SEED, "batches", round, client))
        ):
            return client
    raise AssertionError("no client with only empty Poisson batches")


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_empty_poisson_batches_are_noise_only_steps(noise):
    ids, mask = tiny_bert_data(False)[1:]
    fed = fed_config(local_steps=2, batch_size=1)  # q = 1/24
    client = _all_empty_client(len(LABELS), 1, 2, round=0)
    model = lora_model()
    init = get_state(model)
    trainer = trainer_on(model, fed, dp_config(noise=7.0), SEED)  # overridden per call (per-client calibration)
    out = trainer.train_one(_keys(model, "B"), ids, mask, LABELS, 0, client, noise_multiplier=noise)
    after = get_state(model)
    assert out.steps == 2 and math.isnan(out.train_loss)
    assert all(torch.equal(after[k], init[k]) for k in _keys(model, "A"))
    changed = [not torch.equal(after[k], init[k]) for k in _keys(model, "B")]
    assert all(changed) if noise > 0 else not any(changed)


def test_non_dp_batch_schedule():
    batches = batch_schedule(10, 4, 5, False, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4] * 5
    assert all(len(set(b.tolist())) == 4 for b in batches)
    assert len(set(torch.cat(batches[:2]).tolist())) == 8  # without replacement within a pass
    again = batch_schedule(10, 4, 5, False, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert [len(b) for b in batch_schedule(3, 8, 2, False, torch.Generator().manual_seed(0))] == [3, 3]


def test_evaluate_matches_direct_computation():
    ids, mask = tiny_bert_data(False)[1:]
    model = lora_model(train_head=True)
    trainer = trainer_on(model, fed_config(), PrivacyConfig(), SEED)
    model.train()  # evaluate must switch to eval mode itself
    loss_sum, correct, count = trainer.executor.live.evaluate(ids, mask, LABELS, batch_size=5)
    assert not model.training
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
    y = torch.as_tensor(LABELS)
    assert count == len(LABELS)
    assert correct == int((logits.argmax(-1) == y).sum())
    assert loss_sum == pytest.approx(float(F.cross_entropy(logits, y, reduction="sum")), rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.executor.live.evaluate(ids, mask, LABELS, batch_size=100)[1:] == (correct, count)
