"""The interface the runtime calls on a worker (:class:`Worker`) and what a client's round gives back.

:class:`fedsim.client.worker.ClientWorker` satisfies it, and so does the leader of a ZeRO group
(:mod:`fedsim.runtime.zero_group`), which forwards every call to its ranks. The runtime types its workers with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from fedsim.methods.base import Method
from fedsim.types import AdapterState, ClientResult, ClientTask, ClientUpdate, EvalResult, EvalTask, RoundPlan

#: ``train_many``'s tasks, start states (one for all tasks, or one per task), kept states and ledgers (JSON) per task
Tasks = Sequence[ClientTask]
States = AdapterState | Sequence[AdapterState]
Kepts = Sequence[AdapterState | None]
Ledgers = Sequence[dict | None]


@dataclass(frozen=True)
class ClientOutput:
    """One client's round: metadata, what goes to the server, what the client keeps."""

    result: ClientResult
    upload: ClientUpdate | None
    keep: AdapterState | None
    ledger: dict | None = None  # the client's updated PrivacyLedger (JSON) when the privacy mechanism keeps one


@runtime_checkable
class Worker(Protocol):
    """One worker's model, reused for every client it is given. ``method``: the run's method (its partial sums
    are built with it). None of the calls raises for a client's own failure (a ``failed`` row instead)."""

    method: Method

    def train(
        self, task: ClientTask, global_state: AdapterState, kept: AdapterState | None, ledger_json: dict | None = None
    ) -> ClientOutput:
        """Train one client from (global, its kept state) and its ledger."""
        ...

    def train_many(self, tasks: Tasks, global_state: States, kepts: Kepts, ledgers: Ledgers) -> list[ClientOutput]:
        """Train several clients of one round (each as :meth:`train` would); one output per task, in order."""
        ...

    def evaluate(self, task: EvalTask, state: AdapterState) -> EvalResult:
        """Evaluate ``state`` on ``task``'s examples."""
        ...

    def personal_state(self, global_state: AdapterState, kept: AdapterState | None, plan: RoundPlan) -> AdapterState:
        """Client k's personalised model: the global state with its kept tensors."""
        ...
