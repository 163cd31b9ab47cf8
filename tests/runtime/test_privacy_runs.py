"""Whole DP runs (tiny-bert + synthetic, local backend): epsilon columns, calibration, budget, client-level DP."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from fedsim.errors import ConfigError
from fedsim.privacy.dpsgd import poisson_rate
from fedsim.simulation import run_simulation
from fedsim.validation import load_config


def _run(tmp_path, *overrides: str):
    cfg, _ = load_config("tiny", ["runtime.backend=local", "privacy.accountant=rdp", *overrides])
    out = tmp_path / "run"
    summary = run_simulation(cfg, out, progress=False)
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    clients = pq.read_table(out / "clients.parquet").to_pylist()
    return summary, rounds, clients


def test_calibrated_full_participation_spends_just_under_the_target(tmp_path):
    summary, rounds, clients = _run(
        tmp_path,
        "privacy.mode=sample",
        "privacy.epsilon=3",
        "federation.clients=4",
        "federation.clients_per_round=4",
        "method.name=ffa_lora",
    )
    assert 2.7 <= rounds[-1]["epsilon_max"] <= 3.0
    assert [r["epsilon_max"] for r in rounds] == sorted(r["epsilon_max"] for r in rounds)  # grows
    assert summary["budget_respected"] is True and summary["epsilon"] == rounds[-1]["epsilon_max"]
    assert summary["steps_basis"] == "full"
    assert all(c["noise_multiplier"] > 0 and 0 < c["sample_rate"] <= 1 for c in clients)
    assert all(c["steps"] == 3 and c["epsilon"] <= 3.0 for c in clients)
    # the rate each client is accounted at is the rate the trainer samples at (one definition: poisson_rate)
    batch = 16
    assert all(c["sample_rate"] == poisson_rate(batch, c["examples"]) for c in clients)
    # clients of equal size got the same sigma; epsilon after round t is the same for same-size clients
    by_rate = {}
    for c in clients:
        by_rate.setdefault(c["sample_rate"], set()).add(round(c["noise_multiplier"], 12))
    assert all(len(s) == 1 for s in by_rate.values())


def test_budget_exhausted_clients_skip_training_and_nobody_exceeds_the_target(tmp_path):
    summary, rounds, clients = _run(
        tmp_path,
        "privacy.mode=sample",
        "privacy.epsilon=2",
        "privacy.steps_basis=expected",
        "federation.clients=6",
        "federation.clients_per_round=3",
        "federation.rounds=8",
        "federation.local_steps=2",
        "data.partition.kind=iid",
    )
    exhausted = [c for c in clients if c["status"] == "budget_exhausted"]
    assert exhausted, "with expected-participation noise, clients sampled more often than expected must stop"
    assert all(c["steps"] == 0 and c["bytes_up"] == 0 for c in exhausted)
    assert all(c["epsilon"] <= 2.0 + 1e-9 for c in clients)
    assert max(r["epsilon_max"] for r in rounds) <= 2.0 + 1e-9
    assert sum(r["budget_exhausted"] for r in rounds) == len(exhausted) == summary["budget_exhausted_client_rounds"]
    assert summary["budget_respected"] is True


def test_client_level_dp_reports_epsilon_per_round(tmp_path):
    summary, rounds, clients = _run(
        tmp_path,
        "privacy.mode=client",
        "privacy.epsilon=5",
        "privacy.client_clip=0.5",
        "method.name=fedavg_lora",
    )
    eps = [r["epsilon_max"] for r in rounds]
    assert eps == sorted(eps) and 0 < eps[0] < eps[-1] <= 5.0
    assert summary["noise_multiplier"] > 0 and summary["budget_respected"] is True
    assert all(c["epsilon"] == rounds[c["round"] - 1]["epsilon_max"] for c in clients)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["privacy_mode"] == "client"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["privacy.mode=sample", "privacy.epsilon=3", "privacy.delta=0.5"], "privacy.delta"),
        (["privacy.mode=client", "privacy.epsilon=3", "method.name=as_lora"], "privacy.mode"),
        (
            ["privacy.mode=sample", "privacy.epsilon=1e-9", "privacy.accountant=rdp", "federation.rounds=50"],
            "privacy.epsilon",
        ),
    ],
)
def test_privacy_misconfiguration_found_before_training(tmp_path, overrides, key):
    """Found by the config check where the config alone shows it (a method that does not support the mode), else
    when the data is known (delta vs the smallest client, an unreachable target): never after training started."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg, _ = load_config("tiny", ["runtime.backend=local", *overrides])
        run_simulation(cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
