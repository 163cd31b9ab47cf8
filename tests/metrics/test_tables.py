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
