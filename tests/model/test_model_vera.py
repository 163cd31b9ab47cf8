"""VeRA (lora.variant vera): canonical lambda keys, seeded shared projections, state round trip, PEFT export."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from fedsim.config.schema import LoraConfig, ModelConfig
from fedsim.errors import ConfigError
from fedsim.model.adapters import adapter_keys, attach_adapter, export_peft, get_state, set_state
from fedsim.model.build import build_base_model, build_tokenizer
from fedsim.model.keys import factor_of, layer_of, layers_of, vera_key
from fedsim.validation import load_config

TEXTS = [f"the {w} sat on mat {i} and the dog barked" for i, w in enumerate(["cat", "cow", "pig", "hen", "owl"])]
BERT_LAYERS = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
VERA = LoraConfig(r=4, variant="vera", train_head=False)


def _base(name="tiny-bert", seed=0):
    cfg = ModelConfig(name=name)
    tok = build_tokenizer(cfg, TEXTS)
    return build_base_model(cfg, 3, tok, seed=seed), tok


def _logits(model, tok):
    enc = tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


def _projections(model):
    return {n: b.clone() for n, b in model.named_buffers() if ".vera_A." in n or ".vera_B." in n}


def test_keys_are_the_lambda_vectors_with_factors():
    model = attach_adapter(_base()[0], VERA, "bert", seed=1)
    keys = adapter_keys(model)
    assert keys == sorted(f"{layer}.vera_lambda_{s}" for layer in BERT_LAYERS for s in "db")
    for layer in BERT_LAYERS:
        assert factor_of(f"{layer}.vera_lambda_d") == "A" and factor_of(f"{layer}.vera_lambda_b") == "B"
        assert layer_of(f"{layer}.vera_lambda_d") == layer == layer_of(f"{layer}.vera_lambda_b")
        assert vera_key(layer, "A") == f"{layer}.vera_lambda_d" in keys
    assert layers_of(keys) == sorted(BERT_LAYERS)
    state = get_state(model)
    hidden = model.config.hidden_size
    assert state[f"{BERT_LAYERS[0]}.vera_lambda_d"].shape == (4,)
    assert state[f"{BERT_LAYERS[0]}.vera_lambda_b"].shape == (hidden,)
    # only the lambda vectors are trainable; the projections are buffers, the head is frozen
    assert sum(p.requires_grad for p in model.parameters()) == len(keys)
    assert _projections(model)


def test_head_keys_when_train_head():
    model = attach_adapter(_base()[0], LoraConfig(r=4, variant="vera", train_head=True), "bert", seed=1)
    keys = adapter_keys(model)
    assert {factor_of(k) for k in keys} == {"A", "B", "head"}
    assert all(k.startswith("head.classifier.") for k in keys if factor_of(k) == "head")
    assert sum(p.requires_grad for p in model.parameters()) == len(keys)


def test_same_seed_same_projections_and_lambdas():
    a = attach_adapter(_base()[0], VERA, "bert", seed=7)
    b = attach_adapter(_base()[0], VERA, "bert", seed=7)
    c = attach_adapter(_base()[0], VERA, "bert", seed=8)
    pa, pb, pc = _projections(a), _projections(b), _projections(c)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], pc[n]) for n in pa)  # the seed does reach the projections
    sa, sb = get_state(a), get_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_llama_gqa_shapes():
    model = attach_adapter(_base("tiny-llama")[0], LoraConfig(r=2, variant="vera", train_head=False), "llama", seed=1)
    state = get_state(model)
    q = next(k for k in state if k.endswith("q_proj.vera_lambda_b"))
    v = next(k for k in state if k.endswith("v_proj.vera_lambda_b"))
    cfg = model.config
    assert state[q].shape == (cfg.num_attention_heads * cfg.head_dim,)
    assert state[v].shape == (cfg.num_key_value_heads * cfg.head_dim,)


def test_get_set_round_trip_changes_output():
    model, tok = _base()
    model = attach_adapter(model, VERA, "bert", seed=1)
    before = _logits(model, tok)
    g = torch.Generator().manual_seed(3)
    new = {k: torch.randn(v.shape, generator=g) for k, v in get_state(model).items()}
    set_state(model, new)
    got = get_state(model)
    assert all(torch.equal(got[k], new[k]) for k in new)
    assert not torch.allclose(_logits(model, tok), before)  # lambda_b starts at 0: the adapter was a no-op
    with pytest.raises(ValueError):
        set_state(model, {k: torch.zeros(7) for k in new})


def test_export_and_from_pretrained_reproduce_state_and_logits(tmp_path):
    model, tok = _base()
    model = attach_adapter(model, LoraConfig(r=4, variant="vera", train_head=True), "bert", seed=1)
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in get_state(model).items()}
    set_state(model, state)
    expected = _logits(model, tok)
    export_peft(model, state, tmp_path)
    loaded = PeftModel.from_pretrained(_base()[0], str(tmp_path))
    got = get_state(loaded)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    torch.testing.assert_close(_logits(loaded, tok), expected)


@pytest.mark.parametrize("method", ["flexlora", "fedsvd"])
def test_config_rejects_vera_with_product_methods(method):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["lora.variant=vera", f"method.name={method}"])
    assert "lora.variant" in str(err.value) and "fedsa_lora" in str(err.value)


def test_config_accepts_vera_with_sample_dp_and_fedsa():
    dp = ["privacy.mode=sample", "privacy.epsilon=3"]
    cfg, _ = load_config("tiny", ["lora.variant=vera", "method.name=ffa_lora", *dp])
    assert (cfg.lora.variant, cfg.privacy.mode) == ("vera", "sample")
    for method in ("fedsa_lora", "ffa_lora", "fedavg_lora"):
        cfg, _ = load_config("tiny", ["lora.variant=vera", f"method.name={method}"])
        assert cfg.lora.variant == "vera"
