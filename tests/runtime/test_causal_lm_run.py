"""A causal_lm run end to end: the initial evaluation is recorded and the exported adapter loads with PEFT over
``AutoModelForCausalLM`` of the same tiny-llama."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedsim.data.sources import load_source
from fedsim.model.adapters import get_state
from fedsim.model.build import build_base_model, build_tokenizer
from fedsim.server.checkpoint import latest_checkpoint_dir
from fedsim.simulation import run_simulation
from fedsim.validation import load_config


def test_causal_lm_run_records_initial_eval_and_exports_a_loadable_adapter(tmp_path):
    cfg, _ = load_config("tiny-lm", ["data.synthetic_examples=60", "federation.local_steps=2", "federation.lr=2.0"])
    seen = {}
    summary = run_simulation(
        cfg, tmp_path / "run", progress=False, inspect=lambda b: seen.update(state=b.global_state())
    )
    newest = latest_checkpoint_dir(tmp_path / "run")
    initial = json.loads((newest / "state.json").read_text())["driver"]["initial_eval"]  # kept in every checkpoint
    assert summary["initial_eval_loss"] == initial["eval_loss"] and initial["eval_perplexity"] > 1
    assert summary["initial_eval_loss"] != summary["final_eval_loss"]  # training moved the model
    # the same tiny-llama, saved as a plain HF folder and read back by transformers
    ds = load_source(cfg.data, cfg.seed, cfg.task.kind)
    tok = build_tokenizer(cfg.model, ds.texts)
    build_base_model(cfg.model, 2, tok, cfg.seed, task="causal_lm").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    got = get_state(loaded)  # fedsim's canonical keys: the same key set as the run's global state
    assert set(got) == set(seen["state"]) and any(k.endswith("o_proj.lora_B") for k in got)
    for key, value in seen["state"].items():
        assert torch.allclose(got[key], value), key
    ids = torch.tensor([[5, 6, 7, 8]])
    assert loaded(input_ids=ids).logits.shape[-1] == len(tok)
