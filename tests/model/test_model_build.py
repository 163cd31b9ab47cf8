"""Base-model registry, blueprints and tokenizers (fedsim.model.build, fedsim.model.registry)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fedsim.config.schema import ModelConfig
from fedsim.errors import UserError
from fedsim.model import build, registry
from fedsim.model.build import (
    blueprint_of,
    build_base_model,
    build_tokenizer,
    model_from_blueprint,
)
from fedsim.model.registry import model_family, model_name_problem

TEXTS = [f"The {c} cat sat on mat {i} while dog {i % 3} barked, loudly!" for i, c in enumerate("abcdefgh")]


def _logits(model, tok, texts=TEXTS, length=20):
    enc = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


@pytest.mark.parametrize("name", registry.TINY_MODELS)
def test_tiny_model_builds_frozen_and_blueprint_rebuilds_identically(name):
    cfg = ModelConfig(name=name)
    tok = build_tokenizer(cfg, TEXTS)
    rng_before = torch.get_rng_state()
    model = build_base_model(cfg, 3, tok, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.num_labels == 3 and model.config.pad_token_id == tok.pad_token_id
    logits = _logits(model, tok)
    assert logits.shape == (len(TEXTS), 3)

    bp = blueprint_of(model)
    assert bp.family == model_family(name)
    assert all(t.device.type == "cpu" for t in bp.weights.values())
    rebuilt = model_from_blueprint(bp)
    assert type(rebuilt) is type(model)
    want = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # non-persistent buffers too
    got = {**dict(rebuilt.named_parameters()), **dict(rebuilt.named_buffers())}
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not rebuilt.training and not any(p.requires_grad for p in rebuilt.parameters())
    assert torch.equal(_logits(rebuilt, tok), logits)

    again = build_base_model(cfg, 3, tok, seed=5)
    assert torch.equal(_logits(again, tok), logits)
    other = build_base_model(cfg, 3, tok, seed=6)
    assert not torch.equal(_logits(other, tok), logits)


def test_tiny_roberta_accepts_full_length_inputs():
    cfg = ModelConfig(name="tiny-roberta")
    tok = build_tokenizer(cfg, TEXTS)
    model = build_base_model(cfg, 2, tok, seed=0)
    long_text = [" ".join(["cat"] * 600)]
    logits = _logits(model, tok, long_text, length=512)  # position ids run up to pad_token_id + 512
    assert torch.isfinite(logits).all()


def test_blueprint_is_a_copy():
    cfg = ModelConfig(name="tiny-bert")
    tok = build_tokenizer(cfg, TEXTS)
    model = build_base_model(cfg, 2, tok, seed=0)
    bp = blueprint_of(model)
    key = next(iter(bp.weights))
    with torch.no_grad():
        model.state_dict()[key].add_(1.0)
    assert not torch.equal(model.state_dict()[key], bp.weights[key])


def test_tokenizer_is_deterministic_frequency_ordered_and_capped():
    cfg = ModelConfig(name="tiny-bert")
    t1, t2 = build_tokenizer(cfg, TEXTS), build_tokenizer(cfg, list(reversed(TEXTS)))
    assert t1.get_vocab() == t2.get_vocab()
    assert t1(TEXTS)["input_ids"] == t2(TEXTS)["input_ids"]
    vocab = t1.get_vocab()
    assert [vocab[s] for s in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")] == [0, 1, 2, 3]
    assert t1.pad_token_id == 0
    ids = t1("THE zebra")["input_ids"]  # lower-cased; unknown word -> [UNK]; [CLS] ... [SEP]
    assert ids == [vocab["[CLS]"], vocab["the"], vocab["[UNK]"], vocab["[SEP]"]]

    # by descending count (b: 4, a: 2), then alphabetically among ties (c, d, e: 1 each)
    small = build_tokenizer(cfg, ["B b b A", "e a c b", "d"]).get_vocab()
    assert sorted(small, key=small.get)[4:] == ["b", "a", "c", "d", "e"]

    many = [" ".join(f"w{i}" for i in range(j, j + 50)) for j in range(0, 5000, 50)]
    big = build_tokenizer(cfg, many)
    assert len(big) == build.VOCAB_CAP


def test_tokenizer_pads_right():
    tok = build_tokenizer(ModelConfig(name="tiny-llama"), TEXTS)
    enc = tok(["cat"], padding="max_length", max_length=6)
    assert enc["input_ids"][0][-1] == tok.pad_token_id and enc["attention_mask"][0] == [1, 1, 1, 0, 0, 0]


def test_model_name_problem(tmp_path):
    for ok in ("tiny-bert", "minilm", "sentence-transformers/all-MiniLM-L6-v2", str(tmp_path)):
        assert model_name_problem(ok) is None
    problem = model_name_problem("no-such-model")
    assert problem is not None and "model.name" in problem and "tiny-bert" in problem
    assert model_name_problem(str(tmp_path / "missing" / "dir")) is not None


def test_model_family_of_names_and_configs():
    assert [model_family(n) for n in ("tiny-bert", "tiny-roberta", "tiny-llama", "minilm")] == [
        "bert",
        "roberta",
        "llama",
        "bert",
    ]
    assert model_family({"model_type": "xlm-roberta"}) == "roberta"
    with pytest.raises(UserError, match="model.name"):
        model_family({"model_type": "t5"})


def test_minilm_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"model\.name.*\[demo\]"):
        build_tokenizer(ModelConfig(name="minilm"), TEXTS)


@pytest.mark.skipif(importlib.util.find_spec(registry.MINILM_PACKAGE) is None, reason="[demo] extra not installed")
def test_minilm_builds_from_bundled_folder_with_seeded_head():
    cfg = ModelConfig(name="minilm")
    tok = build_tokenizer(cfg, TEXTS)
    model = build_base_model(cfg, 4, tok, seed=1)
    assert model_family(model.config) == "bert" and model.config.hidden_size == 384
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    logits = _logits(model, tok)
    assert logits.shape == (len(TEXTS), 4)
    again = build_base_model(cfg, 4, tok, seed=1)
    assert torch.equal(_logits(again, tok), logits)  # the random head is seeded
    other = build_base_model(cfg, 4, tok, seed=2)
    assert torch.equal(other.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(other.classifier.weight, model.classifier.weight)
