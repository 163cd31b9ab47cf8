"""rounds.parquet columns: worker_busy_frac."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fedsim.metrics.tables import MetricTables, worker_busy_frac
from fedsim.types import ClientResult


def _res(cid: int, worker: int, seconds: float) -> ClientResult:
    return ClientResult(
        round=1, client_id=cid, worker_id=worker, examples=4, steps=1, train_loss=0.5, seconds=seconds, status="ok"
    )


def test_busy_fraction_is_the_mean_over_workers_of_their_training_seconds_over_the_phase_wall():
    results = [_res(0, 0, 1.0), _res(1, 0, 2.0), _res(2, 1, 1.5)]
    assert worker_busy_frac(results, workers=2, train_wall_s=4.0) == pytest.approx((3.0 / 4 + 1.5 / 4) / 2)
    # a third worker that got no client counts as idle
    assert worker_busy_frac(results, workers=3, train_wall_s=4.0) == pytest.approx((3.0 / 4 + 1.5 / 4 + 0) / 3)
    # a result lost with its worker (worker_id -1) is not time anyone spent
    lost = [*results, _res(3, -1, 9.0)]
    assert worker_busy_frac(lost, workers=2, train_wall_s=4.0) == worker_busy_frac(results, 2, 4.0)
    assert worker_busy_frac(results, workers=2, train_wall_s=0.0) is None


def test_busy_fraction_is_written_to_rounds_parquet(tmp_path):
    tables = MetricTables(tmp_path)
    tables.add_round({"round": 1, "method": "m", "worker_busy_frac": 0.75}, [])
    tables.add_round({"round": 2, "method": "m"}, [])  # e.g. rows of a run written before the column existed
    tables.flush()
    assert pq.read_table(tmp_path / "rounds.parquet").column("worker_busy_frac").to_pylist() == [0.75, None]


def test_round_row_is_built_from_results_evaluation_and_privacy_columns_alone():
    from fedsim.metrics.tables import ROUND_SCHEMA, round_row

    results = [
        _res(0, 0, 1.0),
        ClientResult(1, 1, 0, examples=12, steps=1, train_loss=1.5, seconds=1.0, status="ok", bytes_up=5),
        ClientResult(1, 2, 1, examples=4, steps=0, train_loss=float("nan"), seconds=0.0, status="failed"),
        ClientResult(1, 3, 1, examples=4, steps=0, train_loss=float("nan"), seconds=0.0, status="budget_exhausted"),
    ]
    ev = {"eval_loss": 0.9, "eval_accuracy": 0.6, "personal_accuracy": 0.7, "personal_clients": 2}
    row = round_row(3, "ffa_lora", results, ev, {"epsilon_max": 1.0, "epsilon_median": 0.5}, 2.0, 0.4)
    assert set(row) == set(ROUND_SCHEMA.names)  # every column, nothing method-specific
    assert row["train_loss"] == pytest.approx((0.5 * 4 + 1.5 * 12) / 16)  # ok clients, weighted by examples
    assert (row["clients"], row["failed_clients"], row["budget_exhausted"]) == (2, 1, 1)
    assert (row["bytes_up"], row["personal_clients"], row["epsilon_max"]) == (5, 2, 1.0)
    assert round_row(4, "m", results, {}, {}, 1.0, None)["eval_accuracy"] is None  # not evaluated


def test_summarise_eval_pools_global_chunks_and_counts_local_clients():
    from fedsim.metrics.tables import summarise_eval
    from fedsim.types import EvalResult

    out = summarise_eval(
        [
            EvalResult("global", 2.0, 3, 4),
            EvalResult("global", 1.0, 1, 4),
            EvalResult("client:1", 0.0, 1, 2),
            EvalResult("client:4", 0.0, 3, 3),
            EvalResult("client:7", 0.0, 0, 0),  # no held-out examples: not a local client
        ]
    )
    assert out["eval_loss"] == pytest.approx(3.0 / 8) and out["eval_accuracy"] == pytest.approx(4 / 8)
    assert out["personal_accuracy"] == pytest.approx(4 / 5)
    assert out["personal_accuracy_unweighted"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["personal_clients"] == 2
