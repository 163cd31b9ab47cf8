"""Every registered method runs end to end (tiny-bert + synthetic) on both backends, with and without DP."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from fedsim.config.checks import VERA_METHODS
from fedsim.config.load import load_config
from fedsim.methods.base import available_methods
from fedsim.simulation import run_simulation

PRIVACY = {"no-dp": [], "dp": ["privacy.mode=sample", "privacy.epsilon=8", "privacy.accountant=rdp"]}


def _check(out, method: str, rounds: int) -> None:
    table = pq.read_table(out / "rounds.parquet").to_pylist()
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    assert [r["round"] for r in table] == list(range(1, rounds + 1))
    assert all(c["status"] == "ok" for c in clients)
    assert math.isfinite(table[-1]["eval_loss"]) and 0.0 <= table[-1]["eval_accuracy"] <= 1.0
    assert all(r["bytes_up"] > 0 for r in table)
    if method == "as_lora":
        choices = pq.read_table(out / "as_lora_choices.parquet").to_pylist()
        assert {c["round"] for c in choices} == set(range(1, rounds + 1))
        assert {c["factor"] for c in choices} <= {"A", "B"}


@pytest.mark.parametrize("privacy", sorted(PRIVACY))
@pytest.mark.parametrize("method", available_methods())
def test_method_runs_on_the_local_backend(tmp_path, method, privacy):
    cfg, _ = load_config("tiny", ["runtime.backend=local", f"method.name={method}", *PRIVACY[privacy]])
    run_simulation(cfg, tmp_path / "run", progress=False)
    _check(tmp_path / "run", method, cfg.federation.rounds)


@pytest.mark.ray
@pytest.mark.parametrize("privacy", sorted(PRIVACY))
@pytest.mark.parametrize("method", available_methods())
def test_method_runs_on_ray(tmp_path, ray_cluster, method, privacy):
    cfg, _ = load_config(
        "tiny", ["runtime.backend=ray", "runtime.workers=2", f"method.name={method}", *PRIVACY[privacy]]
    )
    run_simulation(cfg, tmp_path / "run", progress=False)
    _check(tmp_path / "run", method, cfg.federation.rounds)


@pytest.mark.parametrize("privacy", sorted(PRIVACY))
@pytest.mark.parametrize("method", VERA_METHODS)
def test_vera_variant_runs_on_the_local_backend(tmp_path, method, privacy):
    overrides = ["runtime.backend=local", f"method.name={method}", "lora.variant=vera", *PRIVACY[privacy]]
    cfg, _ = load_config("tiny", overrides)
    run_simulation(cfg, tmp_path / "run", progress=False)
    _check(tmp_path / "run", method, cfg.federation.rounds)


@pytest.mark.ray
def test_vera_variant_with_sample_dp_runs_on_ray(tmp_path, ray_cluster):
    overrides = ["runtime.backend=ray", "runtime.workers=2", "method.name=ffa_lora", "lora.variant=vera"]
    cfg, _ = load_config("tiny", [*overrides, *PRIVACY["dp"]])
    run_simulation(cfg, tmp_path / "run", progress=False)
    _check(tmp_path / "run", "ffa_lora", cfg.federation.rounds)
