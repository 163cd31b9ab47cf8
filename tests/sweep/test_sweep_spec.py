"""Sweep files: grid expansion, named axes, rules, ids and all-at-once validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.errors import ConfigError
from fedsim.sweep.spec import load_sweep


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


GRID = """
base: tiny
set: {federation.rounds: 2}
grid:
  method.name: [fedavg_lora, ffa_lora, fedsa_lora]
  privacy:
    - {label: none, privacy.mode: none}
    - {label: eps3, privacy.mode: sample, privacy.epsilon: 3}
  seed: [0, 1]
rules:
  - when: {method.name: ffa_lora, privacy.mode: sample}
    set: {federation.lr: 2.0}
"""


def test_grid_is_the_product_in_axis_order_with_rules_applied(tmp_path):
    spec = load_sweep(_write(tmp_path, GRID))
    assert spec.name == "grid" and spec.axes == ("method.name", "privacy", "seed")
    assert len(spec.cells) == 3 * 2 * 2
    assert spec.cells[0].cell_id == "method.name=fedavg_lora__privacy=none__seed=0"
    assert spec.cells[-1].cell_id == "method.name=fedsa_lora__privacy=eps3__seed=1"
    for cell in spec.cells:
        cfg = cell.config
        assert cfg.federation.rounds == 2  # set: applies to every cell
        assert cfg.method.name == cell.values["method.name"] and cfg.seed == cell.values["seed"]
        assert cfg.privacy.mode == ("none" if cell.values["privacy"] == "none" else "sample")
        want_lr = 2.0 if (cfg.method.name == "ffa_lora" and cfg.privacy.mode == "sample") else 0.5  # tiny's lr
        assert cfg.federation.lr == want_lr


def test_base_may_be_a_file_next_to_the_sweep(tmp_path):
    (tmp_path / "mybase.yaml").write_text("model: {name: tiny-bert}\ndata: {source: synthetic}\nseed: 4\n")
    spec = load_sweep(_write(tmp_path, "base: mybase.yaml\ngrid: {federation.rounds: [1, 2]}\n"))
    assert [c.config.federation.rounds for c in spec.cells] == [1, 2]
    assert all(c.config.seed == 4 for c in spec.cells)


def test_every_problem_is_reported_at_once(tmp_path):
    text = """
base: tiny
colour: blue
grid:
  method.name: [fedavg_lora, no_such_method]
  federation.rouds: [1]
  privacy: [none]
parallel: 0
"""
    with pytest.raises(ConfigError) as err:
        load_sweep(_write(tmp_path, text))
    msg = str(err.value)
    for part in ("colour: unknown sweep key", "grid.privacy: a plain value list", "parallel: expected"):
        assert part in msg
    with pytest.raises(ConfigError) as err:  # config problems of the cells, each once, with an example cell
        load_sweep(
            _write(
                tmp_path,
                text.replace("colour: blue\n", "").replace("  privacy: [none]\n", "").replace("parallel: 0\n", ""),
            )
        )
    msg = str(err.value)
    assert "no_such_method" in msg and "federation.rouds" in msg and "e.g. method.name=" in msg


def test_missing_file_and_base(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="base: missing"):
        load_sweep(_write(tmp_path, "grid: {seed: [0]}\n"))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_sweep(_write(tmp_path, "base: no-such-preset\ngrid: {seed: [0]}\n"))
