"""RunState: the driver's state between rounds, updated by a pure function and saved as JSON."""

from __future__ import annotations

import json

import pytest

from fedsim.run_state import RunState
from fedsim.types import ClientResult


def _res(cid: int, status: str = "ok", up: int = 10, down: int = 30) -> ClientResult:
    return ClientResult(
        round=1, client_id=cid, worker_id=0, examples=4, steps=1, train_loss=0.5, seconds=0.1, status=status,
        bytes_up=up, bytes_down=down,
    )  # fmt: skip


def test_after_round_adds_bytes_trained_clients_and_keeps_the_last_evaluation_and_the_best():
    s0 = RunState()
    s1 = s0.after_round(1, [_res(0), _res(3, "failed", 0, 30)], {"eval_accuracy": 0.5}, {"eps": {}})
    assert (s1.round, s1.bytes_up, s1.bytes_down, s1.trained, s1.best_accuracy) == (1, 10, 60, {0}, 0.5)
    s2 = s1.after_round(2, [_res(1), _res(2, "budget_exhausted", 0, 0)], {}, {})  # not evaluated this round
    assert s2.eval == {"eval_accuracy": 0.5} and s2.best_accuracy == 0.5 and s2.trained == {0, 1}
    s3 = s2.after_round(3, [], {"eval_accuracy": 0.25}, {})
    assert s3.best_accuracy == 0.5 and s3.eval["eval_accuracy"] == 0.25
    assert s0 == RunState()  # frozen: nothing changed in place


def test_json_round_trip_and_checkpoints_written_before_run_state():
    s = RunState().after_round(2, [_res(5), _res(1)], {"eval_accuracy": 0.75, "eval_loss": 0.1}, {"eps": {"5": 1.0}})
    back = RunState.from_json(json.loads(json.dumps(s.to_json())))
    assert back == s and back.trained == frozenset({1, 5})
    old = {"privacy": {"eps": {}}, "totals": {"bytes_up": 7, "bytes_down": 9}, "best_acc": 0.4, "last_eval": {}}
    legacy = RunState.from_json(old, trained_fallback=[2, 3])
    assert (legacy.bytes_up, legacy.bytes_down, legacy.best_accuracy, legacy.trained) == (7, 9, 0.4, {2, 3})


def test_best_accuracy_ignores_rounds_without_accuracy():
    s = RunState().after_round(1, [], {"eval_accuracy": None, "eval_loss": 1.0}, {})
    assert s.best_accuracy is None
    assert s.after_round(2, [], {"eval_accuracy": 0.1}, {}).best_accuracy == pytest.approx(0.1)
