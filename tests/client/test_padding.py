"""Dynamic padding (fedsim.client.padding): a batch loses the columns no row uses, and training on it is training
on the padded batch up to float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.client.padding import trim_padding
from fedsim.config.schema import FederationConfig, LoraConfig, ModelConfig, PrivacyConfig
from fedsim.model.adapters import adapter_keys, attach_adapter, get_state
from fedsim.model.build import blueprint_of, build_base_model, build_tokenizer, model_from_blueprint
from tests.client.world import trainer_on

TEXTS = [f"the cat {'and dog ' * (i % 4)}sat on mat {i}" for i in range(16)]
LABELS = np.array([i % 2 for i in range(16)])


def test_right_and_left_padding_lose_the_columns_no_row_uses():
    ids = torch.arange(12).view(2, 6)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    out = trim_padding(ids, right, torch.tensor([0, 1]))
    assert (
        torch.equal(out[0], ids[:, :3])
        and torch.equal(out[1], right[:, :3])
        and torch.equal(out[2], torch.tensor([0, 1]))
    )
    left = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    labels = torch.full((2, 6), -100)
    labels[:, 5] = 7
    out = trim_padding(ids, left, labels)  # token-level labels (causal LM) lose the same columns
    assert torch.equal(out[0], ids[:, 3:]) and torch.equal(out[1], left[:, 3:]) and torch.equal(out[2], labels[:, 3:])
    full = torch.ones(2, 6, dtype=torch.long)
    assert all(a is b for a, b in zip(trim_padding(ids, full, labels), (ids, full, labels), strict=True))


def _setup(max_length: int):
    cfg = ModelConfig(name="tiny-bert")
    tok = build_tokenizer(cfg, TEXTS)
    enc = tok(TEXTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    bp = blueprint_of(build_base_model(cfg, 2, tok, seed=0))
    model = attach_adapter(model_from_blueprint(bp), LoraConfig(r=4, dropout=0.0), "bert", seed=0)
    return model, enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("mode", ["none", "sample"])
def test_training_sees_only_the_used_columns_and_equals_the_padded_batch(mode):
    privacy = PrivacyConfig(mode=mode, noise_multiplier=1.0, clip=0.5)
    fed = FederationConfig(local_steps=3, batch_size=4, lr=0.5)
    states, widths = [], []
    for max_length in (16, 40):
        model, ids, mask = _setup(max_length)
        assert int(mask.sum(1).max()) < 16  # every text fits 16 tokens: the extra columns are padding
        seen: list[int] = []
        base = model.get_base_model()
        hook = base.register_forward_pre_hook(
            lambda m, a, kw, seen=seen: seen.append(kw["input_ids"].shape[1]), with_kwargs=True
        )
        trainer = trainer_on(model, fed, privacy, seed=0)
        trainer.train_one(adapter_keys(model), ids, mask, LABELS, round=1, client_id=2)
        hook.remove()
        assert seen and max(seen) <= int(mask.sum(1).max())  # never the padded width
        states.append(get_state(model))
        widths.append(seen)
    assert widths[0] == widths[1]
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=1e-5, atol=1e-6)
