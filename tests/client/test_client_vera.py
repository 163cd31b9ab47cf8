"""LocalTrainer on a VeRA adapter: only the chosen lambda vectors move (FFA-style: lambda_b only)."""

from __future__ import annotations

import numpy as np
import torch

from fedsim.config.schema import FederationConfig, LoraConfig, ModelConfig, PrivacyConfig
from fedsim.model.adapters import adapter_keys, attach_adapter, get_state, set_state
from fedsim.model.build import build_base_model, build_tokenizer
from fedsim.model.keys import factor_of
from tests.client.world import trainer_on

TEXTS = [f"the {w} sat on mat {i}" for i, w in enumerate("cat cow pig hen owl ant bee elk".split())]


def _setup():
    cfg = ModelConfig(name="tiny-bert")
    tok = build_tokenizer(cfg, TEXTS)
    model = attach_adapter(build_base_model(cfg, 3, tok, seed=0), LoraConfig(r=4, variant="vera"), "bert", seed=1)
    enc = tok(TEXTS, padding="max_length", max_length=12, truncation=True, return_tensors="np")
    return model, enc["input_ids"], enc["attention_mask"], np.arange(len(TEXTS)) % 3


def test_training_lambda_b_only_leaves_lambda_d_and_projections_untouched():
    model, ids, mask, labels = _setup()
    trainer = trainer_on(model, FederationConfig(local_steps=3, batch_size=4, lr=0.5), PrivacyConfig(), seed=0)
    keys = adapter_keys(model)
    b_keys = [k for k in keys if factor_of(k) == "B"]
    before = get_state(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    out = trainer.train_one(b_keys, ids, mask, labels, round=1, client_id=0)
    after = get_state(model)
    assert out.steps == 3 and np.isfinite(out.train_loss)
    for k in keys:
        if k in b_keys:
            assert not torch.equal(after[k], before[k]), k
        else:  # lambda_d (the A side) and the head: bit-identical
            assert torch.equal(after[k], before[k]), k
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert set(trainer.last.last_grads) == set(b_keys)


def test_training_both_vectors_moves_both():
    # lambda_b starts at zero (so lambda_d gets no gradient at first); start from lambda_b = 1 to see both move.
    model, ids, mask, labels = _setup()
    trainer = trainer_on(model, FederationConfig(local_steps=3, batch_size=4, lr=0.5), PrivacyConfig(), seed=0)
    ab = [k for k in adapter_keys(model) if factor_of(k) in ("A", "B")]
    set_state(model, {k: torch.ones_like(v) for k, v in get_state(model).items() if factor_of(k) == "B"})
    before = get_state(model)
    trainer.train_one(ab, ids, mask, labels, round=1, client_id=0)
    after = get_state(model)
    assert all(not torch.equal(after[k], before[k]) for k in ab)
    assert all(torch.equal(after[k], before[k]) for k in before if factor_of(k) == "head")


DP = PrivacyConfig(mode="sample", noise_multiplier=1.0, clip=1.0)


def test_dp_ffa_style_training_leaves_lambda_d_bit_identical():
    model, ids, mask, labels = _setup()
    trainer = trainer_on(model, FederationConfig(local_steps=3, batch_size=4, lr=0.5), DP, seed=0)
    keys = adapter_keys(model)
    b_keys = [k for k in keys if factor_of(k) == "B"]
    before = get_state(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    out = trainer.train_one(b_keys, ids, mask, labels, round=1, client_id=0)
    after = get_state(model)
    assert out.steps == 3
    for k in keys:
        assert torch.equal(after[k], before[k]) is (k not in b_keys), k
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert set(trainer.last.last_grads) == set(b_keys)


def test_dp_training_of_both_vectors_is_seeded_and_one_wrap_serves_other_key_sets():
    def run(seed):
        model, ids, mask, labels = _setup()
        trainer = trainer_on(model, FederationConfig(local_steps=2, batch_size=4, lr=0.5), DP, seed=seed)
        keys = adapter_keys(model)
        set_state(model, {k: torch.ones_like(v) for k, v in get_state(model).items() if factor_of(k) == "B"})
        start = get_state(model)
        trainer.train_one([k for k in keys if factor_of(k) in ("A", "B")], ids, mask, labels, round=1, client_id=0)
        first = get_state(model)
        trainer.train_one(
            [k for k in keys if factor_of(k) == "A"], ids, mask, labels, round=1, client_id=1
        )  # FedSA-ish
        return start, first, get_state(model)

    start, first, second = run(0)
    assert all(not torch.equal(first[k], start[k]) for k in start if factor_of(k) in ("A", "B"))
    for k in start:  # second client: only lambda_d moves
        assert torch.equal(second[k], first[k]) is (factor_of(k) != "A"), k
    again = run(0)
    assert all(torch.equal(again[2][k], second[k]) for k in second)  # same seeds -> same noise, same batches
