"""An opt-in that leaves the DP guarantee (AS-LoRA's reference curvature) warns and is recorded in summary.json."""

from __future__ import annotations

import json

from fedsim.cli import main

BASE = [
    "run",
    "tiny",
    "--set",
    "method.name=as_lora",
    "--set",
    "privacy.mode=sample",
    "--set",
    "privacy.noise_multiplier=1.0",
    "--set",
    "method.as_lora.curvature=true",
    "--set",
    "method.as_lora.curvature_window=2",
]


def test_reference_curvature_warns_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "ref"
    assert main([*BASE, "--set", "method.as_lora.reference_curvature=true", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "WARNING (privacy): method.as_lora.reference_curvature" in err and "epsilon does NOT cover" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon_covers_uploads"] is False
    assert len(summary["privacy_caveats"]) == 1 and "RAW minibatch losses" in summary["privacy_caveats"][0]


def test_default_curvature_has_no_caveat(tmp_path, capsys):
    out = tmp_path / "clean"
    assert main([*BASE, "--out", str(out)]) == 0
    assert "WARNING (privacy)" not in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon_covers_uploads"] is True and summary["privacy_caveats"] == []
