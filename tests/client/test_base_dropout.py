"""``model.base_dropout: false``: the frozen base runs in eval mode during training while the adapter parts (LoRA
layers and their dropout, a trained head's Linear modules) train; one client's training then equals training on a
base without dropout, LoRA dropout still applies, and nothing depends on the global RNG."""

from __future__ import annotations

import torch

from fedsim.config.schema import LoraConfig, ModelConfig, PrivacyConfig
from fedsim.model.adapters import adapter_keys, attach_adapter, get_state
from fedsim.model.build import build_base_model, build_tokenizer
from fedsim.model.train_mode import set_train_mode
from tests.client.test_client_trainer import LABELS, SEED, TEXTS, dp_config, fed_config, lora_model, tiny_bert_data
from tests.client.world import trainer_on


def test_only_the_adapter_parts_train_without_base_dropout():
    tok = build_tokenizer(ModelConfig(name="tiny-roberta"), TEXTS)
    base = build_base_model(ModelConfig(name="tiny-roberta"), 3, tok, 0)
    model = attach_adapter(base, LoraConfig(r=4, dropout=0.2, train_head=True), "roberta", 0)
    set_train_mode(model, base_dropout=True)
    assert all(m.training for m in model.modules())
    set_train_mode(model, base_dropout=False)
    modes = {name: m.training for name, m in model.named_modules()}
    lora = [n for n in modes if ".lora_" in n]
    head = [n for n in modes if ".modules_to_save.default" in n]
    assert lora and all(modes[n] for n in lora)  # lora_A / lora_B / lora_dropout (a Dropout of p 0.2) train
    assert {n.rsplit(".", 1)[-1] for n in head if modes[n]} == {"default", "dense", "out_proj"}
    assert not modes[next(n for n in head if n.endswith(".dropout"))]  # the head's own dropout: base behaviour
    training = {n for n, on in modes.items() if on and ".lora_" not in n and ".modules_to_save" not in n}
    adapted = {n for n in modes if n.endswith(("attention.self.query", "attention.self.value"))}
    assert training == adapted | {"base_model.model.classifier"}  # the LoRA layers and the head's PEFT wrapper
    assert not modes["base_model.model.roberta.encoder.layer.0.attention.self"]  # (SDPA dropout: self.training)
    model.eval()
    assert not any(m.training for m in model.modules())


def test_a_deterministic_base_trains_as_a_base_without_dropout():
    ids, mask = tiny_bert_data(False)[1:]
    results = []
    for no_dropout, base_dropout in ((False, False), (True, True)):
        model = lora_model(no_dropout=no_dropout, train_head=True)
        trainer = trainer_on(model, fed_config(), dp_config(), SEED, base_dropout=base_dropout)
        trainer.train_one(adapter_keys(model), ids, mask, LABELS, round=1, client_id=2)
        results.append(get_state(model))
    for k, v in results[1].items():
        torch.testing.assert_close(results[0][k], v, rtol=1e-6, atol=1e-7)


def test_lora_dropout_still_applies_and_draws_nothing_from_the_global_rng():
    ids, mask = tiny_bert_data(False)[1:]

    def run(lora_dropout, global_seed):
        torch.manual_seed(global_seed)
        model = lora_model(lora_dropout=lora_dropout)
        trainer = trainer_on(model, fed_config(), PrivacyConfig(), SEED, base_dropout=False)
        trainer.train_one(adapter_keys(model), ids, mask, LABELS, round=1, client_id=2)
        return get_state(model)

    plain, dropped, again = run(0.0, 1), run(0.5, 1), run(0.5, 2)
    assert any(not torch.allclose(plain[k], dropped[k]) for k in plain)
    assert all(torch.equal(dropped[k], again[k]) for k in dropped)
