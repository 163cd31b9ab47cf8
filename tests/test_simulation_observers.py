"""run_simulation's observers: when each hook runs, what it sees on disk, what a failing observer does, and the
meaning of a round's wall_s (local backend, tiny preset)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from fedsim.metrics.observers import RoundRecord, RunObserver, RunStart
from fedsim.server.checkpoint import latest_checkpoint_dir
from fedsim.simulation import run_simulation
from fedsim.validation import load_config

SLEEP_S = 0.6  # what the watcher spends recording round 1: it must show in round 2's wall_s


def _cfg():
    cfg, _ = load_config(
        "tiny", ["federation.rounds=3", "federation.eval_every=1", "runtime.checkpoint_every=1", "seed=3"]
    )
    return cfg


class Watcher(RunObserver):
    """Logs every hook with what was on disk when it ran; optionally sleeps in or raises from a round."""

    def __init__(self, out: Path, sleep_round: int | None = None, fail_round: int | None = None) -> None:
        self.out, self.sleep_round, self.fail_round = out, sleep_round, fail_round
        self.log: list[tuple[str, Any]] = []
        self.seen: list[dict[str, Any]] = []  # per round: the record's row, the table's last row, the checkpoint
        self.clock: list[float] = []  # perf_counter at each on_start / on_round

    def on_start(self, start: RunStart) -> None:
        self.log.append(("start", (start.first_round, start.restored_round, start.rounds)))
        self.clock.append(time.perf_counter())

    def on_round(self, record: RoundRecord) -> None:
        self.log.append(("round", record.round))
        self.clock.append(time.perf_counter())
        on_disk = pq.read_table(self.out / "rounds.parquet").to_pylist()
        newest = latest_checkpoint_dir(self.out)
        self.seen.append({"row": dict(record.row), "table_last": on_disk[-1], "checkpoint": newest and newest.name})
        assert record.state.round == record.round and len(record.results) == len(record.client_rows) == 4
        if record.round == self.sleep_round:
            time.sleep(SLEEP_S)
        if record.round == self.fail_round:
            raise KeyError("observer broke")

    def on_end(self, summary: Any) -> None:
        on_disk = (self.out / "summary.json").is_file()
        self.log.append(("end", (summary is not None, on_disk)))


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("obs") / "full"
    watcher = Watcher(out, sleep_round=1)
    rows: list[dict[str, Any]] = []
    calls: list[str] = []

    class Second(RunObserver):
        def on_round(self, record: RoundRecord) -> None:
            calls.append("observer")

    def on_round(row: dict[str, Any]) -> None:
        calls.append("on_round")
        rows.append(row)

    summary = run_simulation(_cfg(), out, progress=False, observers=[watcher, Second()], on_round=on_round)
    return {"out": out, "watcher": watcher, "rows": rows, "calls": calls, "summary": summary}


def test_an_observer_sees_start_once_each_round_in_order_with_its_files_written_and_the_end_once(full):
    w = full["watcher"]
    assert w.log == [("start", (1, None, 3)), ("round", 1), ("round", 2), ("round", 3), ("end", (True, True))]
    table = pq.read_table(full["out"] / "rounds.parquet").to_pylist()
    for t, seen in enumerate(w.seen, start=1):
        assert seen["row"] == seen["table_last"] == table[t - 1]  # rounds.parquet holds the row it is given
        assert seen["checkpoint"] == f"round-{t:06d}"  # and the round's checkpoint is written before it
    # the observers in the order given, then on_round, which gets the same rows as plain dicts
    assert full["calls"] == ["observer", "on_round"] * 3
    assert full["rows"] == table
    assert json.loads((full["out"] / "summary.json").read_text()) == full["summary"]


def test_a_rounds_wall_s_holds_the_previous_rounds_recording_and_the_rounds_tile_the_loop(full):
    walls = [r["wall_s"] for r in pq.read_table(full["out"] / "rounds.parquet").to_pylist()]
    assert walls[1] >= SLEEP_S  # round 1's slow recording is in round 2's wall_s
    # the rows tile the loop: from after on_start to round 3's row, which the watcher sees after both ends
    clock = full["watcher"].clock
    assert sum(walls) <= clock[-1] - clock[0]
    assert sum(walls) < full["summary"]["wall_s"]  # set-up, the last recording and the export come on top


def test_an_observer_that_raises_stops_the_run_cleanly_and_a_resume_finishes_it(full, tmp_path):
    out = tmp_path / "stopped"
    watcher = Watcher(out, fail_round=2)
    late: list[int] = []
    with pytest.raises(KeyError, match="observer broke"):
        run_simulation(_cfg(), out, progress=False, observers=[watcher], on_round=lambda row: late.append(1))
    assert watcher.log[-1] == ("end", (False, False))  # on_end(None); no summary.json
    assert late == [1]  # round 2 never reached the observers after the one that raised
    assert latest_checkpoint_dir(out).name == "round-000002"  # written before the observer saw round 2
    again = Watcher(out)
    summary = run_simulation(_cfg(), out, progress=False, resume=True, observers=[again])
    assert again.log == [("start", (3, 2, 3)), ("round", 3), ("end", (True, True))]
    assert summary["resumed_from_round"] == 2
    metrics = ("round", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "clients")
    got, want = ([{k: r[k] for k in metrics} for r in pq.read_table(d / "rounds.parquet").to_pylist()]
                 for d in (out, full["out"]))  # fmt: skip
    assert got == want
