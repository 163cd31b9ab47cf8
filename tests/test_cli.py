"""The command line: exit codes, messages, output-folder safety. No training: run_simulation is faked."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from fedsim import __version__
from fedsim.cli import main
from fedsim.config.load import list_presets
from fedsim.errors import DataError
from fedsim.validation import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


class FakeSim:
    """Stands in for fedsim.simulation; records calls, returns a summary or raises ``error``."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.error: BaseException | None = None
        self.summary = {"final_eval_accuracy": 0.8125, "wall_s": 3.5, "epsilon": None, "method": "fedavg_lora"}

    def run_simulation(self, cfg, out_dir, label="run"):
        self.calls.append((cfg, Path(out_dir), label))
        if self.error is not None:
            raise self.error
        return dict(self.summary)


@pytest.fixture
def sim(monkeypatch, tmp_path) -> FakeSim:
    fake = FakeSim()
    module = types.ModuleType("fedsim.simulation")
    module.run_simulation = fake.run_simulation  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fedsim.simulation", module)
    monkeypatch.chdir(tmp_path)
    return fake


def _available(module: str, func: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), func)
    except ImportError:
        return False


def test_run_calls_simulation_and_prints_summary(sim, tmp_path, capsys):
    out = tmp_path / "myrun"
    assert main(["run", "tiny", "--out", str(out), "--set", "federation.rounds=2"]) == 0
    ((cfg, out_dir, label),) = sim.calls
    assert out_dir == out and label == "tiny"
    assert cfg == load_config("tiny", ["federation.rounds=2"])[0]
    stdout = capsys.readouterr().out
    assert f"outputs: {out}" in stdout
    assert re.search(r"final_eval_accuracy\s+0\.8125", stdout)
    assert re.search(r"wall_s\s+3\.5", stdout)
    assert "epsilon" not in stdout  # None values are not printed


def test_run_default_out_dir(sim, tmp_path):
    assert main(["run", "tiny"]) == 0
    ((_, out_dir, label),) = sim.calls
    assert label == "tiny"
    assert out_dir.parent == Path("runs")
    assert re.fullmatch(r"tiny-\d{8}-\d{6}", out_dir.name)


def test_run_without_config_uses_quickstart(sim):
    assert main(["run", "--out", "o"]) == 0
    assert sim.calls[0][2] == "quickstart"


def _run_error_cases() -> list:
    cases = [
        pytest.param(["--set", "federation.clinets=3"], "did you mean 'federation.clients'", id="unknown-key"),
        pytest.param(
            ["--set", "federation.clients=4", "--set", "federation.clients_per_round=5"],
            "federation.clients_per_round must be between 1 and federation.clients",
            id="cohort-too-big",
        ),
        pytest.param(["--set", "data.partition.alpha=0"], "data.partition.alpha must be > 0", id="alpha-0"),
        pytest.param(["--set", "data.partition.alpha=-1"], "data.partition.alpha must be > 0", id="alpha-neg"),
        pytest.param(["--set", "federation.clients=ten"], "expected an integer, got 'ten'", id="wrong-type"),
    ]
    skip_methods = pytest.mark.skipif(
        not _available("fedsim.methods.base", "available_methods"), reason="method registry not available"
    )
    skip_sources = pytest.mark.skipif(
        not _available("fedsim.data.registry", "source_path_problem"), reason="data sources not available"
    )
    cases.append(pytest.param(["--set", "method.name=nope"], "method.name", id="unknown-method", marks=skip_methods))
    cases.append(
        pytest.param(["--set", "data.source=csv:/nonexistent.csv"], "data.source", id="no-data", marks=skip_sources)
    )
    return cases


@pytest.mark.parametrize(("extra", "fragment"), _run_error_cases())
def test_run_user_errors_exit_2_and_write_nothing(sim, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    assert main(["run", "tiny", "--out", str(out), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert fragment in captured.err
    assert "Traceback" not in captured.err
    assert not sim.calls
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_config_error_is_one_heading_with_bullets(sim, capsys):
    assert main(["run", "tiny", "--set", "federation.clinets=3", "--set", "lora.r=0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "error: 2 problem(s) in the config:"
    assert [ln[:4] for ln in lines[1:]] == ["  - ", "  - "]


def test_unknown_method_lists_known(sim, capsys):
    if not _available("fedsim.methods.base", "available_methods"):
        pytest.skip("method registry not available")
    from fedsim.methods.base import available_methods

    assert main(["run", "tiny", "--set", "method.name=nope"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in available_methods())


def test_data_error_from_simulation_exits_2(sim, tmp_path, capsys):
    sim.error = DataError("data.label_field: column 'label' not found; set data.label_field")
    assert main(["run", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {sim.error}\n"


def test_other_exceptions_propagate(sim):
    sim.error = RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug"):
        main(["run", "tiny", "--out", "o"])


def test_existing_nonempty_out_is_refused(sim, tmp_path, capsys):
    out = tmp_path / "previous"
    out.mkdir()
    keep = out / "summary.json"
    keep.write_text('{"final_eval_accuracy": 0.5}')
    assert main(["run", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and str(out) in err
    assert keep.read_text() == '{"final_eval_accuracy": 0.5}'
    assert [p.name for p in out.iterdir()] == ["summary.json"]
    assert not sim.calls


def test_out_that_is_a_file_is_refused(sim, tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main(["run", "tiny", "--out", str(target)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert target.read_text() == "x" and not sim.calls


def test_existing_empty_out_is_used(sim, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["run", "tiny", "--out", str(out)]) == 0
    assert sim.calls[0][1] == out


def test_presets_command_lists_all_aligned(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    presets = list_presets()
    assert len(lines) == len(presets)
    names = [ln.split()[0] for ln in lines]
    assert {"quickstart", "tiny"} <= set(names)
    starts = {ln.index(desc) for ln, (_, desc) in zip(lines, presets, strict=True)}
    assert len(starts) == 1  # descriptions start in one column


def test_validate_prints_resolved_config(capsys):
    assert main(["validate", "tiny", "--set", "federation.rounds=2"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first == "ok: tiny"
    assert config_from_dict(yaml.safe_load(rest)) == load_config("tiny", ["federation.rounds=2"])[0]


def test_validate_errors_exit_2(capsys):
    assert main(["validate", "tiny", "--set", "data.partition.alpha=-1"]) == 2
    captured = capsys.readouterr()
    assert "data.partition.alpha must be > 0" in captured.err and "ok:" not in captured.out


def test_unknown_preset_exit_2(capsys):
    assert main(["validate", "tinny"]) == 2
    assert "did you mean 'tiny'" in capsys.readouterr().err


def test_version_and_usage_errors(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedsim {__version__}"
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["validate"]) == 2  # missing config argument


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "presets"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "quickstart" in proc.stdout


def test_methods_command_lists_each_method_with_its_declared_capabilities(capsys):
    from fedsim.methods.base import all_capabilities

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    caps = all_capabilities()
    assert [line.split()[0] for line in lines] == list(caps)
    for line in lines:
        name, modes, variants, aggregation = line.split()[:4]
        c = caps[name]
        assert set(modes.split(",")) == c.privacy_modes and set(variants.split(",")) == c.variants
        assert aggregation == ("linear" if c.linear else "buffered")
        assert ("per-layer choices" in line) == c.per_layer_choices
