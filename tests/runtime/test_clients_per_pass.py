"""Whole runs with runtime.clients_per_pass: the metrics and every client's row do not depend on K nor on the
backend / worker count (local K=1 and K=4, Ray 2 workers K=4 with a worker killed mid-round), causal LM included;
``auto`` probes without touching any state, or falls back to 1 (tiny-bert / tiny-llama, synthetic data)."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch

from fedsim.client.pass_probe import CANDIDATES
from fedsim.runtime.actors import FAULT_ENV
from fedsim.simulation import run_simulation
from fedsim.validation import load_config
from tests.runtime.test_streaming_aggregation import _setup

ROUND_METRICS = ("train_loss", "eval_loss", "eval_accuracy", "personal_accuracy", "bytes_up", "epsilon_max")
CLIENT_FIELDS = ("examples", "steps", "train_loss", "epsilon", "status", "bytes_up", "bytes_down")
DETERMINISTIC = ["model.base_dropout=false", "federation.rounds=2", "federation.local_steps=2"]


def _run(path, preset, overrides):
    cfg, _ = load_config(preset, [*DETERMINISTIC, *overrides])
    run_simulation(cfg, path, progress=False)
    rounds = pq.read_table(path / "rounds.parquet").to_pylist()
    clients = pq.read_table(path / "clients.parquet").to_pylist()
    return rounds, sorted(clients, key=lambda c: (c["round"], c["client_id"]))


def _close(a, b) -> bool:
    if a is None or b is None or isinstance(a, str):
        return a == b
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-5)


def _assert_same_run(got, want):
    (rounds, clients), (want_rounds, want_clients) = got, want
    assert len(rounds) == len(want_rounds) and len(clients) == len(want_clients)
    for a, b in zip(rounds, want_rounds, strict=True):
        for key in ROUND_METRICS:
            assert _close(a[key], b[key]), (a["round"], key, a[key], b[key])
    for a, b in zip(clients, want_clients, strict=True):
        assert (a["round"], a["client_id"]) == (b["round"], b["client_id"])
        for key in CLIENT_FIELDS:
            assert _close(a[key], b[key]), (a["round"], a["client_id"], key, a[key], b[key])


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny", ["method.name=as_lora", "privacy.mode=sample", "privacy.noise_multiplier=1.0"]),
        ("tiny", ["method.name=fedsa_lora"]),
        ("tiny-lm", ["method.name=ffa_lora", "privacy.mode=sample", "privacy.noise_multiplier=1.0"]),
    ],
    ids=["as_lora-dp", "fedsa", "causal-lm-dp"],
)
def test_a_run_does_not_depend_on_clients_per_pass(tmp_path, preset, overrides):
    one = _run(tmp_path / "k1", preset, overrides)
    four = _run(tmp_path / "k4", preset, [*overrides, "runtime.clients_per_pass=4"])
    assert all(c["status"] == "ok" for c in one[1])
    _assert_same_run(four, one)


def test_auto_probes_without_touching_any_state(tmp_path, capsys):
    from fedsim.model.adapters import get_state
    from fedsim.runtime.local import LocalBackend

    setup = _setup(tmp_path, "runtime.backend=local", "runtime.clients_per_pass=auto", "model.base_dropout=false")
    backend = LocalBackend(setup)
    assert backend.clients_per_pass in CANDIDATES and backend.clients_per_pass <= 4  # 4 clients per round
    assert "runtime.clients_per_pass auto -> " in capsys.readouterr().err
    live = get_state(backend.worker.model)
    assert all(torch.equal(live[k], v) for k, v in setup.initial_state.items())
    assert backend.kept_client_ids() == [] and backend.store.get_client(0, tensors=True, round=1) == (None, None)
    assert backend.server.global_state().keys() == setup.initial_state.keys()

    setup = _setup(tmp_path, "runtime.backend=local", "runtime.clients_per_pass=auto")  # base dropout on
    assert LocalBackend(setup).clients_per_pass == 1
    assert "auto uses 1 client per pass: model.base_dropout: true" in capsys.readouterr().err


@pytest.mark.ray
def test_ray_workers_training_chunks_of_clients_equal_one_local_worker(tmp_path, ray_cluster, monkeypatch):
    """10 clients per round, K = 4, 2 workers: chunks of 4, 4 and 2; the worker that takes the third chunk (its
    5th client of round 2) dies after pre-summing its first chunk: both chunks are re-run elsewhere."""
    common = ["method.name=fedsa_lora", "federation.clients=10", "federation.clients_per_round=10"]
    common += ["privacy.mode=sample", "privacy.noise_multiplier=1.0"]
    want = _run(tmp_path / "local", "tiny", common)
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(FAULT_ENV, f"2:5:{marker}")
    ray_overrides = ["runtime.backend=ray", "runtime.workers=2", "runtime.clients_per_pass=4"]
    got = _run(tmp_path / "ray", "tiny", [*common, *ray_overrides])
    assert marker.exists(), "the fault was not injected"
    assert {c["worker_id"] for c in got[1]} == {0, 1}
    _assert_same_run(got, want)
