"""The worker interface the runtime calls (:class:`fedsim.client.protocol.Worker`) is what the one-process worker
and a ZeRO group's leader both offer: same methods, same parameters."""

from __future__ import annotations

import inspect

import pytest

from fedsim.client.protocol import Worker
from fedsim.client.worker import ClientWorker

pytest.importorskip("ray")

from fedsim.runtime.zero_group import GroupWorker  # noqa: E402

CALLS = ("train", "train_many", "evaluate", "personal_state")


@pytest.mark.parametrize("cls", [ClientWorker, GroupWorker], ids=["ClientWorker", "GroupWorker"])
def test_workers_offer_the_protocol_calls_with_its_parameters(cls) -> None:
    for name in CALLS:
        want = list(inspect.signature(getattr(Worker, name)).parameters)
        assert list(inspect.signature(getattr(cls, name)).parameters) == want, name


def test_a_group_leader_is_a_worker_and_forwards_every_call_to_its_ranks() -> None:
    calls: list[tuple[str, tuple]] = []

    class Local:
        method = "the method"

        def __getattr__(self, name):
            return lambda *args: calls.append(("local", name, args)) or name

    group = GroupWorker(Local(), [])
    assert isinstance(group, Worker) and group.method == "the method"
    assert group.train("task", "state", None, None) == "train"
    assert group.train_many(["t"], "state", [None], [None]) == "train_many"
    assert group.evaluate("task", "state") == "evaluate"
    assert [c[1] for c in calls] == ["train", "train_many", "evaluate"]
