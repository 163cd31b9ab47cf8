"""Ray actor wrappers around the plain worker, parameter server and client store.

A :class:`WorkerActor` folds the uploads of the clients it trains in a round into ONE partial sum and sends it to
the parameter server when the driver calls :meth:`WorkerActor.flush` (one message per worker per round). The
actor is restartable: Ray re-runs ``__init__`` with the same arguments after its process dies, so the restarted
actor rebuilds the same model; whatever it had not flushed is lost, and the driver re-runs those clients.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch

from fedsim.client.worker import ClientWorker
from fedsim.config.schema import Config
from fedsim.data.federated import FederatedData
from fedsim.methods.partial_sum import PartialSum
from fedsim.model.build import BaseBlueprint
from fedsim.privacy.mechanism import PrivacyMechanism
from fedsim.server.client_store import ClientStore
from fedsim.server.parameter_server import ParameterServer, new_partial
from fedsim.types import AdapterState, ClientResult, ClientTask, EvalResult, EvalTask, RoundPlan

ParameterServerActor = ray.remote(num_cpus=0)(ParameterServer)
ClientStoreActor = ray.remote(num_cpus=0)(ClientStore)

#: Fault injection for tests: ``"ROUND:NTH:MARKER"`` makes a worker process exit abruptly (``os._exit(1)``, as if
#: killed) when it starts its NTH client of round ROUND, once: the first worker to get there creates the file
#: MARKER and dies; later workers (and the restarted one) see the file and go on. Unset in normal runs.
FAULT_ENV = "FEDSIM_FAULT_KILL_WORKER"
#: Fault injection for tests: ``"ROUND:CLIENT"`` hands client CLIENT of round ROUND a global state of NaNs, so its
#: training loss is NaN and the trainer raises (the client must come back ``failed`` and stay out of the aggregate).
FAULT_NAN_ENV = "FEDSIM_FAULT_NAN_CLIENT"
FAULT_ENVS = (FAULT_ENV, FAULT_NAN_ENV)


def _maybe_die(round: int, nth: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    want_round, want_nth, marker = spec.split(":", 2)
    if (round, nth) != (int(want_round), int(want_nth)):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


def _maybe_poison(task: ClientTask, global_state: AdapterState) -> AdapterState:
    spec = os.environ.get(FAULT_NAN_ENV, "")
    if not spec or tuple(map(int, spec.split(":"))) != (task.round, task.client_id):
        return global_state
    return {k: torch.full_like(v, float("nan")) for k, v in global_state.items()}


@ray.remote
class WorkerActor:
    """One ClientWorker (one base model); reads and writes the store itself, pre-sums its uploads per round."""

    def __init__(
        self,
        worker_id: int,
        cfg: Config,
        blueprint: BaseBlueprint,
        data: FederatedData,
        server: Any,
        store: Any,
        privacy: PrivacyMechanism,
    ) -> None:
        self.worker = ClientWorker(worker_id, cfg, blueprint, data, privacy)
        self.cfg = cfg
        self.server = server
        self.store = store
        self._partials: dict[int, PartialSum] = {}  # round -> this worker's not yet flushed uploads
        self._results: dict[int, list[ClientResult]] = {}  # round -> results of the clients in that partial sum
        self._started: dict[int, int] = {}  # round -> clients started (fault injection)

    def train(self, task: ClientTask, global_state: AdapterState) -> ClientResult:
        """Train one client from its state as of the start of ``task.round`` (so a re-run after a crash starts
        from the same state and ledger); its kept state and ledger go to the store, its upload into this
        worker's partial sum for the round (sent by :meth:`flush`)."""
        self._started[task.round] = self._started.get(task.round, 0) + 1
        _maybe_die(task.round, self._started[task.round])
        kept, ledger = ray.get(self.store.get_client.remote(task.client_id, bool(task.plan.kept), round=task.round))
        out = self.worker.train(task, _maybe_poison(task, global_state), kept, ledger)
        if out.keep is not None or out.ledger is not None:
            ray.get(self.store.put_client.remote(task.client_id, out.keep, out.ledger, round=task.round))
        if out.upload is not None:
            if task.round not in self._partials:
                self._partials[task.round] = new_partial(self.cfg, self.worker.method, task.round)
            self._partials[task.round].add(out.upload, out.keep)
            self._results.setdefault(task.round, []).append(out.result)
        return out.result

    def flush(self, round: int) -> list[ClientResult]:
        """Send this worker's partial sum of ``round`` to the server (one message) and forget it; returns the
        results of the clients it carried (none after a restart: those uploads are lost; the driver re-runs them).
        Older rounds' leftovers are dropped."""
        partial = self._partials.pop(round, None)
        results = self._results.pop(round, [])
        self._partials = {r: p for r, p in self._partials.items() if r > round}
        self._results = {r: x for r, x in self._results.items() if r > round}
        self._started = {r: n for r, n in self._started.items() if r >= round}
        if partial is None or not len(partial):
            return []
        ray.get(self.server.receive_partial.remote(partial))
        return results

    def ready(self) -> bool:
        """A no-op call: answers once the actor is up (after a restart, once it has rebuilt itself)."""
        return True

    def evaluate(self, task: EvalTask, global_state: AdapterState, plan: RoundPlan) -> EvalResult:
        state = global_state
        if task.client_id is not None:
            kept = ray.get(self.store.get.remote(task.client_id))
            state = self.worker.personal_state(global_state, kept, plan)
        return self.worker.evaluate(task, state)
