"""A worker actor killed mid-round (its process exits) is restarted, its lost clients are re-run, and the run's
metrics and privacy spending equal a fault-free run's (Ray, 2 CPUs, tiny-bert + synthetic)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from fedsim.runtime.actors import FAULT_ENV
from fedsim.simulation import run_simulation
from fedsim.validation import load_config

SETTINGS = [
    "runtime.backend=ray",
    "runtime.workers=2",
    "method.name=fedsa_lora",  # kept per-client state: a re-run must start from the pre-round B
    "federation.rounds=2",
    "federation.local_steps=2",
    "federation.eval_every=2",
]
METRICS = ("train_loss", "eval_loss", "eval_accuracy", "personal_accuracy", "clients", "failed_clients", "bytes_up")
DP = ["privacy.mode=sample", "privacy.epsilon=8", "privacy.accountant=rdp"]


def _run(path, overrides):
    cfg, _ = load_config("tiny", [*SETTINGS, *overrides])
    summary = run_simulation(cfg, path, progress=False)
    rounds = pq.read_table(path / "rounds.parquet").to_pylist()
    clients = pq.read_table(path / "clients.parquet").to_pylist()
    return summary, rounds, clients


def _close(a, b) -> bool:
    return (a is None and b is None) or a == pytest.approx(b, abs=1e-6, rel=0)


@pytest.mark.ray
@pytest.mark.parametrize("privacy", [[], DP], ids=["no-dp", "sample-dp"])
def test_a_worker_killed_mid_round_changes_nothing(tmp_path, ray_cluster, monkeypatch, privacy):
    _, want_rounds, want_clients = _run(tmp_path / "clean", privacy)

    marker = tmp_path / "killed-once"
    # the first worker to start its 2nd client of round 2 dies: it has already trained (and pre-summed) one
    # client of that round, whose upload is lost with it and must be re-run elsewhere
    monkeypatch.setenv(FAULT_ENV, f"2:2:{marker}")
    summary, rounds, clients = _run(tmp_path / "faulty", privacy)
    assert marker.exists(), "the fault was not injected"

    assert [r["round"] for r in rounds] == [1, 2]
    for got, want in zip(rounds, want_rounds, strict=True):
        for key in METRICS + (("epsilon_max",) if privacy else ()):
            assert _close(got[key], want[key]), (got["round"], key, got[key], want[key])
    assert all(c["status"] == "ok" for c in clients)
    key = lambda c: (c["round"], c["client_id"])  # noqa: E731
    assert sorted(map(key, clients)) == sorted(map(key, want_clients))
    by_key = {key(c): c for c in want_clients}
    for c in clients:  # same training, and (under DP) each client charged once: same epsilon
        w = by_key[key(c)]
        assert _close(c["train_loss"], w["train_loss"]) and c["steps"] == w["steps"]
        assert _close(c["epsilon"], w["epsilon"])
    if privacy:
        clean = json.loads((tmp_path / "clean" / "summary.json").read_text())
        assert summary["epsilon"] == pytest.approx(clean["epsilon"], abs=1e-9) and summary["epsilon"] > 0


@pytest.mark.ray
def test_a_client_whose_loss_is_nan_fails_alone_and_the_run_completes(tmp_path, ray_cluster, monkeypatch):
    from fedsim.runtime.actors import FAULT_NAN_ENV
    from fedsim.server.cohort import sample_cohort

    cfg, _ = load_config("tiny", SETTINGS)
    victim = int(sample_cohort(cfg.seed, 2, cfg.federation.clients, cfg.federation.clients_per_round)[0])
    monkeypatch.setenv(FAULT_NAN_ENV, f"2:{victim}")  # its worker hands it a global state of NaNs
    summary, rounds, clients = _run(tmp_path / "nan", [])
    failed = [c for c in clients if c["status"] == "failed"]
    assert [(c["round"], c["client_id"]) for c in failed] == [(2, victim)]
    assert "FloatingPointError" in failed[0]["error"] and "training loss is nan" in failed[0]["error"]
    assert failed[0]["bytes_up"] == 0
    assert [(r["clients"], r["failed_clients"]) for r in rounds] == [(4, 0), (3, 1)]
    assert summary["failed_client_rounds"] == 1 and summary["final_eval_loss"] == rounds[-1]["eval_loss"]
    last = rounds[-1]  # the NaN upload never reached the aggregate: the global model still evaluates
    assert all(isinstance(last[k], float) and last[k] == last[k] for k in ("train_loss", "eval_loss", "eval_accuracy"))


@pytest.mark.ray
def test_the_only_worker_killed_is_restarted_and_rebuilt_from_the_drivers_refs(tmp_path, ray_cluster, monkeypatch):
    # one worker: the run can only finish if Ray restarts it and the restarted process rebuilds its model from the
    # blueprint and data refs the driver holds (they come with the calls, not as constructor arguments)
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(FAULT_ENV, f"1:2:{marker}")
    summary, rounds, clients = _run(tmp_path / "one", ["runtime.workers=1", "federation.rounds=1"])
    assert marker.exists(), "the fault was not injected"
    assert [r["round"] for r in rounds] == [1] and rounds[0]["failed_clients"] == 0
    assert len(clients) == summary["clients_per_round"] and all(c["status"] == "ok" for c in clients)
