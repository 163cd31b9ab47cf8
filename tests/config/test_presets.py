"""The shipped presets: headers, validity, and the settings their descriptions promise."""

from __future__ import annotations

import pytest
import yaml

from fedsim.config.load import PRESETS_DIR, config_to_dict, known_keys, list_presets
from fedsim.validation import load_config, validate

PRESETS = [name for name, _ in list_presets()]
METHOD_PRESETS = ["fedavg_lora", "ffa_lora", "fedsa_lora"]


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.extend(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])
    return out


def test_expected_presets_are_shipped():
    assert {"quickstart", "tiny", *METHOD_PRESETS} <= set(PRESETS)
    assert all(desc for _, desc in list_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_header_and_keys(name):
    lines = (PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 3
    assert lines[1] == f"# run: fedsim run {name}"
    raw = yaml.safe_load("\n".join(lines))
    unknown = set(_flatten(raw)) - set(known_keys())
    assert not unknown


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_validates(name):
    # runs the method-registry / model / data-source checks when those packages are importable
    cfg, label = load_config(name)
    assert label == name
    assert validate(cfg) == []


@pytest.mark.parametrize("name", METHOD_PRESETS)
def test_method_presets_are_quickstart_with_that_method(name):
    quick = config_to_dict(load_config("quickstart")[0])
    cfg = config_to_dict(load_config(name)[0])
    assert cfg["method"]["name"] == name
    quick["method"]["name"] = name
    assert cfg == quick


def test_quickstart_matches_its_description():
    cfg = load_config("quickstart")[0]
    assert (cfg.model.name, cfg.data.source, cfg.method.name, cfg.privacy.mode) == (
        "minilm",
        "bbc-news",
        "ffa_lora",
        "none",
    )
    assert cfg.federation.clients == 10 and cfg.data.partition.kind == "dirichlet"
    assert cfg.data.partition.alpha == 0.5


def test_tiny_is_small_and_local():
    cfg = load_config("tiny")[0]
    assert (cfg.model.name, cfg.data.source, cfg.runtime.backend) == ("tiny-bert", "synthetic", "local")
    assert cfg.data.synthetic_examples <= 1000 and cfg.federation.rounds <= 5
