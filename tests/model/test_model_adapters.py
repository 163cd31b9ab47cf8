"""LoRA injection, canonical keys, state get/set and PEFT export (fedsim.model.adapters)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel

from fedsim.config.schema import LoraConfig, ModelConfig
from fedsim.errors import ConfigError
from fedsim.model.adapters import (
    adapter_keys,
    attach_adapter,
    export_peft,
    factor_of,
    get_state,
    layer_of,
    parameters_for,
    set_state,
    set_trainable,
    state_bytes,
)
from fedsim.model.build import blueprint_of, build_base_model, build_tokenizer, model_from_blueprint

TEXTS = [f"the {w} sat on mat {i} and the dog barked" for i, w in enumerate(["cat", "cow", "pig", "hen", "owl"])]
BERT_LAYERS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


def _base(name="tiny-bert", seed=0):
    cfg = ModelConfig(name=name)
    tok = build_tokenizer(cfg, TEXTS)
    return build_base_model(cfg, 3, tok, seed=seed), tok


def _logits(model, tok):
    enc = tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


def _random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in get_state(model).items()}


def test_keys_without_head():
    model = attach_adapter(_base()[0], LoraConfig(r=4, train_head=False), "bert", seed=1)
    keys = adapter_keys(model)
    assert keys == sorted(f"{layer}.lora_{f}" for layer in BERT_LAYERS for f in "AB")
    assert not any(k.startswith("head.") for k in keys)
    state = get_state(model)
    assert state[f"{BERT_LAYERS[0]}.lora_A"].shape == (4, 32) and state[f"{BERT_LAYERS[0]}.lora_B"].shape == (32, 4)
    # the head exists but is not trainable; only adapter tensors require grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(keys) and not any("classifier" in n for n in trainable)


@pytest.mark.parametrize(
    ("name", "family", "head"), [("tiny-bert", "bert", "classifier"), ("tiny-llama", "llama", "score")]
)
def test_keys_with_head(name, family, head):
    model = attach_adapter(_base(name)[0], LoraConfig(r=2, train_head=True), family, seed=1)
    keys = adapter_keys(model)
    head_keys = [k for k in keys if k.startswith("head.")]
    assert head_keys and all(k.startswith(f"head.{head}.") for k in head_keys)
    assert {factor_of(k) for k in keys} == {"A", "B", "head"}
    assert sum(p.requires_grad for p in model.parameters()) == len(keys)


def test_factor_and_layer_of():
    k = f"{BERT_LAYERS[1]}.lora_A"
    assert (factor_of(k), layer_of(k)) == ("A", BERT_LAYERS[1])
    assert (factor_of(f"{BERT_LAYERS[1]}.lora_B"), layer_of(f"{BERT_LAYERS[1]}.lora_B")) == ("B", BERT_LAYERS[1])
    assert (factor_of("head.classifier.weight"), layer_of("head.classifier.weight")) == ("head", "head")
    with pytest.raises(ValueError):
        factor_of("bert.pooler.dense.weight")


def test_lora_init_is_seeded_and_b_is_zero():
    cfg = LoraConfig(r=4, train_head=False)
    s1 = get_state(attach_adapter(_base()[0], cfg, "bert", seed=7))
    s2 = get_state(attach_adapter(_base()[0], cfg, "bert", seed=7))
    s3 = get_state(attach_adapter(_base()[0], cfg, "bert", seed=8))
    a_keys = [k for k in s1 if factor_of(k) == "A"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(not torch.equal(s1[k], s3[k]) for k in a_keys)
    assert all(torch.count_nonzero(s1[k]) == 0 for k in s1 if factor_of(k) == "B")


def test_targets_and_rslora_scaling():
    model = attach_adapter(_base()[0], LoraConfig(r=4, alpha=8.0, targets=["key"], variant="rslora"), "bert", seed=0)
    assert {layer_of(k) for k in adapter_keys(model) if factor_of(k) != "head"} == {
        f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)
    }
    module = model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.key")
    assert math.isclose(module.scaling["default"], 8.0 / math.sqrt(4))
    with pytest.raises(ConfigError, match="lora.targets"):
        attach_adapter(_base()[0], LoraConfig(targets=["no_such_module"]), "bert", seed=0)


def test_get_set_round_trip_and_errors():
    model = attach_adapter(_base()[0], LoraConfig(r=4, train_head=True), "bert", seed=1)
    new = _random_state(model, 3)
    set_state(model, new)
    got = get_state(model)
    assert got.keys() == new.keys() and all(torch.equal(got[k], new[k]) for k in new)
    got[next(iter(got))].add_(1.0)  # a copy: the model is not affected
    assert all(torch.equal(get_state(model)[k], new[k]) for k in new)
    some = sorted(new)[:2]
    assert list(get_state(model, some)) == some
    with pytest.raises(KeyError, match="nope"):
        set_state(model, {"nope.lora_A": torch.zeros(1)})
    first = sorted(new)[0]
    with pytest.raises(ValueError, match="shape"):
        set_state(model, {first: torch.zeros(1)})
    assert state_bytes(new) == sum(v.numel() for v in new.values()) * 4
    assert state_bytes({"x": torch.zeros(3, dtype=torch.bfloat16)}) == 6


def test_set_trainable_and_parameters_for():
    model = attach_adapter(_base()[0], LoraConfig(r=4, train_head=True), "bert", seed=1)
    keys = adapter_keys(model)
    b_keys = [k for k in keys if factor_of(k) == "B"]
    set_trainable(model, b_keys)
    params = parameters_for(model, b_keys)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    assert [tuple(p.shape) for p in params] == [tuple(get_state(model)[k].shape) for k in b_keys]
    set_trainable(model, keys)
    assert sum(p.requires_grad for p in model.parameters()) == len(keys)
    with pytest.raises(KeyError):
        set_trainable(model, ["bert.embeddings.word_embeddings.weight"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers helper
@pytest.mark.parametrize(
    ("name", "family", "train_head"),
    [
        ("tiny-bert", "bert", True),
        ("tiny-bert", "bert", False),
        ("tiny-roberta", "roberta", True),
        ("tiny-llama", "llama", False),
    ],
)
def test_export_peft_loads_back_identically(tmp_path, name, family, train_head):
    base, tok = _base(name)
    bp = blueprint_of(base)
    model = attach_adapter(base, LoraConfig(r=4, train_head=train_head), family, seed=1)
    resident = get_state(model)
    exported = _random_state(model, 11)
    export_peft(model, exported, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(torch.equal(get_state(model)[k], resident[k]) for k in resident)  # the model's own state is restored
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4

    set_state(model, exported)
    expected = _logits(model, tok)
    loaded = PeftModel.from_pretrained(model_from_blueprint(bp), tmp_path)
    loaded_state = get_state(loaded)
    assert loaded_state.keys() == exported.keys()
    assert all(torch.equal(loaded_state[k], exported[k]) for k in exported)
    assert torch.equal(_logits(loaded, tok), expected)
    assert not torch.equal(expected, _logits(model_from_blueprint(bp), tok))  # the adapter really matters


def test_export_needs_every_key(tmp_path):
    model = attach_adapter(_base()[0], LoraConfig(r=2, train_head=False), "bert", seed=1)
    state = get_state(model)
    state.pop(sorted(state)[0])
    with pytest.raises(KeyError, match="missing"):
        export_peft(model, state, tmp_path)
