"""fedsim.model.scale.lora_scale: the s of W0 + s B A, checked against the scaling PEFT applies."""

from __future__ import annotations

import math

import pytest

from fedsim.config.schema import LoraConfig, ModelConfig
from fedsim.model.adapters import attach_adapter
from fedsim.model.build import build_base_model, build_tokenizer
from fedsim.model.scale import lora_scale

TEXTS = ["the cat sat on the mat", "the dog barked at the owl"]


@pytest.mark.parametrize(("variant", "want"), [("lora", 8.0 / 4), ("rslora", 8.0 / math.sqrt(4))])
def test_lora_scale_follows_the_variant(variant, want):
    assert lora_scale(LoraConfig(r=4, alpha=8.0, variant=variant)) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_lora_scale_is_the_scaling_peft_applies(variant):
    cfg = LoraConfig(r=4, alpha=6.0, variant=variant, train_head=False)
    tok = build_tokenizer(ModelConfig(name="tiny-bert"), TEXTS)
    model = attach_adapter(build_base_model(ModelConfig(name="tiny-bert"), 2, tok, seed=0), cfg, "bert", seed=0)
    scalings = [m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert scalings and all(s == pytest.approx(lora_scale(cfg), rel=1e-12) for s in scalings)


def test_lora_scale_rejects_a_non_positive_rank_and_other_variants():
    with pytest.raises(ValueError, match="lora.r"):
        lora_scale(LoraConfig(r=0, alpha=4.0))
    with pytest.raises(ValueError, match="lora.variant"):
        lora_scale(LoraConfig(r=4, alpha=4.0, variant="vera"))
