"""The observer protocol's pieces on their own: the list's order and end rules, the row callback, the sync, the
checkpoint schedule."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from fedsim.metrics.observers import MirrorSync, ObserverList, RoundRecord, RowCallback, RunObserver, RunStart
from fedsim.run_state import RunState
from fedsim.server.round_checkpoints import RoundCheckpoints
from fedsim.types import RoundPlan


def _record(t: int, last: bool = False) -> RoundRecord:
    return RoundRecord(
        round=t,
        row={"round": t, "wall_s": 1.0},
        client_rows=(),
        results=(),
        plan=RoundPlan(t, {}),
        evaluation={},
        similarity=None,
        state=RunState(round=t),
        is_last=last,
    )


class Log(RunObserver):
    def __init__(self, name: str, log: list[tuple[str, str, Any]], fail: str | None = None) -> None:
        self.name, self.log, self.fail = name, log, fail

    def on_start(self, start: RunStart) -> None:
        self.log.append((self.name, "start", start.first_round))
        if self.fail == "start":
            raise RuntimeError(f"{self.name} start")

    def on_round(self, record: RoundRecord) -> None:
        self.log.append((self.name, "round", record.round))

    def on_end(self, summary: Any) -> None:
        self.log.append((self.name, "end", summary))
        if self.fail == "end":
            raise OSError(f"{self.name} end")


START = RunStart(Path("."), rounds=2, first_round=1, state=RunState())


def test_observers_are_called_in_list_order_and_every_started_one_ends_even_when_one_fails():
    log: list[tuple[str, str, Any]] = []
    chain = ObserverList([Log("a", log), Log("b", log, fail="end"), Log("c", log, fail="end")])
    chain.start(START)
    chain.round(_record(1))
    with pytest.raises(OSError, match="b end"):  # the first error, after all three ended
        chain.end({"done": True})
    assert log == [
        ("a", "start", 1), ("b", "start", 1), ("c", "start", 1),
        ("a", "round", 1), ("b", "round", 1), ("c", "round", 1),
        ("a", "end", {"done": True}), ("b", "end", {"done": True}), ("c", "end", {"done": True}),
    ]  # fmt: skip


def test_only_observers_whose_start_was_called_end_and_only_once():
    log: list[tuple[str, str, Any]] = []
    chain = ObserverList([Log("a", log), Log("b", log, fail="start"), Log("c", log)])
    with pytest.raises(RuntimeError, match="b start"):
        chain.start(START)
    chain.end(None)
    chain.end(None)  # a second end finds nothing started
    assert log == [("a", "start", 1), ("b", "start", 1), ("a", "end", None), ("b", "end", None)]
    ObserverList([Log("x", log)]).end(None)  # never started: no end
    assert ("x", "end", None) not in log


def test_a_plain_object_with_the_three_methods_is_an_observer_and_the_base_hooks_do_nothing():
    class Duck:
        def on_start(self, start: RunStart) -> None: ...
        def on_round(self, record: RoundRecord) -> None: ...
        def on_end(self, summary: Any) -> None: ...

    assert isinstance(Duck(), RunObserver)

    class Nothing(RunObserver):
        pass

    base = Nothing()  # the base hooks are no-ops
    assert (base.on_start(START), base.on_round(_record(1)), base.on_end(None)) == (None, None, None)


def test_the_record_row_is_read_only_and_the_row_callback_gets_a_fresh_dict():
    record = _record(3)
    with pytest.raises(TypeError):
        record.row["wall_s"] = 0.0  # type: ignore[index]
    seen: list[dict[str, Any]] = []
    RowCallback(seen.append).on_round(record)
    assert seen == [{"round": 3, "wall_s": 1.0}] and type(seen[0]) is dict
    seen[0]["wall_s"] = 5.0  # the caller's copy
    assert record.row["wall_s"] == 1.0
    again = pickle.loads(pickle.dumps(record))  # e.g. to another process
    assert again == record and isinstance(again.row, MappingProxyType)


def test_mirror_sync_copies_after_set_up_each_round_and_a_finished_run_only():
    calls: list[int] = []
    sync = MirrorSync(lambda: calls.append(1))
    sync.on_start(START)
    sync.on_round(_record(1))
    sync.on_end(None)  # a stopped run: nothing more is uploaded
    assert len(calls) == 2
    sync.on_end({"wall_s": 1.0})  # summary.json written: uploaded last
    assert len(calls) == 3


def test_round_checkpoints_schedule(tmp_path, monkeypatch):
    from fedsim.server import round_checkpoints as rc

    written: list[int] = []
    monkeypatch.setattr(rc, "write_checkpoint", lambda run_dir, ckpt: written.append(ckpt.round))
    snap = rc.Checkpoint(round=-1, global_state={}, server_state={})
    every3 = RoundCheckpoints(tmp_path, lambda: snap, every=3, rounds=7)
    every3.on_start(START)  # fresh start: round-000000 (the initial evaluation)
    every3.on_start(RunStart(tmp_path, 7, first_round=4, state=RunState(round=3), restored_round=3))  # resumed
    every3.on_start(RunStart(tmp_path, 7, first_round=1, state=RunState(), restored_round=0))  # from round 0: kept
    for t in range(1, 8):
        every3.on_round(_record(t, last=t == 7))
    assert written == [0, 3, 6, 7]
    written.clear()
    never = RoundCheckpoints(tmp_path, lambda: snap, every=0, rounds=4)
    never.on_start(START)
    for t in range(1, 5):
        never.on_round(_record(t))
    assert written == [4]  # checkpoint_every 0: the last round only


def test_progress_of_a_resumed_run_counts_from_its_checkpoint_and_prints_plain_lines_off_a_terminal(capsys):
    from fedsim.metrics.console import RoundProgress

    bar = RoundProgress(rounds=4, title="run", enabled=True)
    bar.on_start(RunStart(Path("."), rounds=4, first_round=3, state=RunState(round=2), restored_round=2))
    assert bar.progress.tasks[0].completed == 2
    bar.on_round(_record(3))
    bar.on_end(None)
    bar.on_end(None)  # a second end does nothing
    assert bar.progress.tasks[0].completed == 3
    assert "round 3/4" in capsys.readouterr().err


def test_tensorboard_observer_opens_at_the_first_round_and_closes_at_the_end(tmp_path):
    from fedsim.metrics.tensorboard import RoundEvents

    events = RoundEvents(tmp_path)
    with pytest.raises(RuntimeError, match="not open"):
        events.add_round({"round": 1, "wall_s": 1.0})
    events.on_start(START)
    events.on_round(_record(1))
    events.on_end({"wall_s": 2.0})
    events.close()  # closed already: nothing
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
