"""The driver's evaluation tasks: fixed global chunks, and local evaluation capped at a seeded client sample."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from fedsim.simulation import eval_tasks


def _data(clients: int, holdout: int = 3) -> SimpleNamespace:
    hold = [np.arange(c * 10, c * 10 + (holdout if c % 4 else 0)) for c in range(clients)]  # every 4th: none
    return SimpleNamespace(test_indices=np.arange(1000, 1010), client_holdout=hold)


def _local(tasks) -> list[int]:
    return [t.client_id for t in tasks if t.client_id is not None]


def test_global_chunks_cover_the_test_set_in_order() -> None:
    tasks = eval_tasks(_data(4), chunk=4, local_clients=0, seed=0)
    glob = [t for t in tasks if t.client_id is None]
    assert [len(t.indices) for t in glob] == [4, 4, 2]
    assert [i for t in glob for i in t.indices] == list(range(1000, 1010))
    assert _local(tasks) == []  # 0 turns local evaluation off


def test_all_clients_with_a_holdout_when_under_the_cap() -> None:
    tasks = eval_tasks(_data(8), chunk=64, local_clients=100, seed=0)
    assert _local(tasks) == [1, 2, 3, 5, 6, 7]
    (t5,) = [t for t in tasks if t.client_id == 5]
    assert t5.indices == (50, 51, 52)


def test_capped_sample_is_seeded_sorted_and_only_clients_with_a_holdout() -> None:
    data = _data(1000)
    a = _local(eval_tasks(data, 64, local_clients=20, seed=7))
    assert len(a) == 20 == len(set(a)) and a == sorted(a) and all(c % 4 for c in a)
    assert a == _local(eval_tasks(data, 64, local_clients=20, seed=7))
    assert a != _local(eval_tasks(data, 64, local_clients=20, seed=8))


def test_local_evaluation_covers_only_clients_that_have_trained(tmp_path) -> None:
    """With 2 of 6 clients per round, after round 1 only its cohort has trained: the local (personalised)
    accuracy is over those clients, and rounds.parquet says how many."""
    import pyarrow.parquet as pq

    from fedsim.simulation import run_simulation
    from fedsim.validation import load_config

    over = ["runtime.backend=local", "method.name=fedsa_lora", "federation.clients_per_round=2", "federation.rounds=2"]
    cfg, _ = load_config("tiny", over)
    run_simulation(cfg, tmp_path / "run", progress=False)
    rounds = pq.read_table(tmp_path / "run" / "rounds.parquet").to_pylist()
    clients = pq.read_table(tmp_path / "run" / "clients.parquet").to_pylist()
    for t in (1, 2):
        trained = {c["client_id"] for c in clients if c["round"] <= t and c["status"] == "ok"}
        assert rounds[t - 1]["personal_clients"] == len(trained) < cfg.federation.clients
