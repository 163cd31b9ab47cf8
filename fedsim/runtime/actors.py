"""Ray actor wrappers around the plain worker and, in one actor, the parameter server and client store.

A :class:`WorkerActor` folds the uploads of the clients it trains in a round into ONE partial sum and sends it to
the parameter server when the driver calls :meth:`WorkerActor.flush` (one message per worker per round). The
actor is restartable: Ray re-runs ``__init__`` with the same arguments after its process dies; whatever it had not
flushed is lost, and the driver re-runs those clients.

What a worker is built from (the model blueprint and the tokenised data, both put into the object store ONCE by
the driver, and the server and store actor handles) travels as a :class:`Shared` with every call that needs it,
never as a constructor argument: Ray cannot restart an actor whose constructor arguments live in the object store
once they are gone, so it logs an error for any actor with ``max_restarts > 0`` whose constructor arguments hold
an ObjectRef or a (non-detached) actor handle (ray-project/ray#53727). ObjectRefs nested inside an argument are
passed as references, not resolved, so a call carries four ids; the worker reads the blueprint and data from
shared memory on its first call (and again on the first call after a restart). The driver holds the refs for the
whole run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import torch

from fedsim.config.schema import Config
from fedsim.partial_sum import PartialSum
from fedsim.privacy.mechanism import PrivacyMechanism
from fedsim.runtime.server_home import ServerHome
from fedsim.server.parameter_server import new_partial
from fedsim.types import AdapterState, ClientResult, ClientTask, EvalResult, EvalTask, RoundPlan

if TYPE_CHECKING:
    from fedsim.client.protocol import Worker

#: the parameter server and the client store, one actor process (see fedsim.runtime.server_home)
ServerHomeActor = ray.remote(num_cpus=0)(ServerHome)

#: Fault injection for tests: ``"ROUND:NTH:MARKER"`` makes a worker process exit abruptly (``os._exit(1)``, as if
#: killed) when it starts its NTH client of round ROUND, once: the first worker to get there creates the file
#: MARKER and dies; later workers (and the restarted one) see the file and go on. Unset in normal runs.
FAULT_ENV = "FEDSIM_FAULT_KILL_WORKER"
#: Fault injection for tests: ``"ROUND:CLIENT"`` hands client CLIENT of round ROUND a global state of NaNs, so its
#: training loss is NaN and the trainer raises (the client must come back ``failed`` and stay out of the aggregate).
FAULT_NAN_ENV = "FEDSIM_FAULT_NAN_CLIENT"
FAULT_ENVS = (FAULT_ENV, FAULT_NAN_ENV)


def import_worker_modules(cfg: Config) -> None:
    """Import what building and training a worker's model needs (torch, transformers, PEFT; Opacus under DP).

    A worker actor calls this in its constructor: the Ray backend creates the workers before the driver has built
    the data and the model (:meth:`fedsim.runtime.ray_backend.RayBackend.begin`), so these seconds of imports run
    while the driver works. This module itself does not import them: the driver imports it to create the actors."""
    import fedsim.client.worker  # noqa: F401

    if cfg.privacy.mode == "sample":
        import fedsim.privacy.dpsgd  # noqa: F401


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


@dataclass(frozen=True)
class Shared:
    """What every worker is built from, passed with each call (see the module docstring): ObjectRefs of the
    blueprint and of the data (from ``ray.put``, held by the driver) and the server and store actor handles."""

    blueprint: ray.ObjectRef
    data: ray.ObjectRef
    server: Any
    store: Any


class WorkerBase:
    """One ClientWorker (one base model); reads and writes the store itself, pre-sums its uploads per round.

    The constructor takes plain values only; the model is built from a :class:`Shared` on the first call that
    brings one (the driver calls :meth:`ready` right after creating the actor, and again after a restart).
    :data:`WorkerActor` is this class as a Ray actor; a ZeRO group's leader (:mod:`fedsim.runtime.zero_group`)
    overrides :meth:`_build`."""

    def __init__(self, worker_id: int, cfg: Config, privacy: PrivacyMechanism) -> None:
        self.worker_id = worker_id
        self.privacy = privacy  # a small frozen value, not an object-store ref
        self.cfg = cfg
        self._worker: Worker | None = None  # built by _attach
        self.server: Any = None
        self.store: Any = None
        self._partials: dict[int, PartialSum] = {}  # round -> this worker's not yet flushed uploads
        self._results: dict[int, list[ClientResult]] = {}  # round -> results of the clients in that partial sum
        self._started: dict[int, int] = {}  # round -> clients started (fault injection)
        import_worker_modules(cfg)  # now, while the driver builds the data and model (see the function)

    def _attach(self, shared: Shared) -> Worker:
        """The worker, built on first use in this process from the blueprint and data in shared memory."""
        if self._worker is None:
            self.server, self.store = shared.server, shared.store
            self._worker = self._build(shared)
        return self._worker

    def _build(self, shared: Shared) -> Worker:
        """The worker (a :class:`fedsim.client.worker.ClientWorker`), from the blueprint and data in shared
        memory."""
        from fedsim.client.worker import ClientWorker

        blueprint, data = ray.get([shared.blueprint, shared.data])
        return ClientWorker(self.worker_id, self.cfg, blueprint, data, self.privacy)

    def train(self, shared: Shared, task: ClientTask, global_state: AdapterState) -> ClientResult:
        """Train one client from its state as of the start of ``task.round`` (so a re-run after a crash starts
        from the same state and ledger); its kept state and ledger go to the store, its upload into this
        worker's partial sum for the round (sent by :meth:`flush`)."""
        self._started[task.round] = self._started.get(task.round, 0) + 1
        _maybe_die(task.round, self._started[task.round])
        worker = self._attach(shared)
        kept, ledger = ray.get(self.store.get_client.remote(task.client_id, bool(task.plan.kept), round=task.round))
        out = worker.train(task, _maybe_poison(task, global_state), kept, ledger)
        if out.keep is not None or out.ledger is not None:
            ray.get(self.store.put_client.remote(task.client_id, out.keep, out.ledger, round=task.round))
        if out.upload is not None:
            if task.round not in self._partials:
                self._partials[task.round] = new_partial(self.cfg, worker.method, task.round)
            self._partials[task.round].add(out.upload, out.keep)
            self._results.setdefault(task.round, []).append(out.result)
        return out.result

    def train_many(self, shared: Shared, tasks: list[ClientTask], global_state: AdapterState) -> list[ClientResult]:
        """:meth:`train` for several clients of one round trained together (``runtime.clients_per_pass``; see
        :meth:`ClientWorker.train_many`): states and ledgers as of the start of the round, kept states and ledgers
        to the store, uploads into this worker's partial sum. Returns the clients' results in task order."""
        for task in tasks:
            self._started[task.round] = self._started.get(task.round, 0) + 1
            _maybe_die(task.round, self._started[task.round])
        worker = self._attach(shared)
        got = ray.get([self.store.get_client.remote(t.client_id, bool(t.plan.kept), round=t.round) for t in tasks])
        starts = [_maybe_poison(t, global_state) for t in tasks]
        outs = worker.train_many(tasks, starts, [kept for kept, _ in got], [ledger for _, ledger in got])
        puts = [
            self.store.put_client.remote(t.client_id, out.keep, out.ledger, round=t.round)
            for t, out in zip(tasks, outs, strict=True)
            if out.keep is not None or out.ledger is not None
        ]
        ray.get(puts)
        for task, out in zip(tasks, outs, strict=True):
            if out.upload is not None:
                if task.round not in self._partials:
                    self._partials[task.round] = new_partial(self.cfg, worker.method, task.round)
                self._partials[task.round].add(out.upload, out.keep)
                self._results.setdefault(task.round, []).append(out.result)
        return [out.result for out in outs]

    def probe_pass(self, shared: Shared, limit: int) -> tuple[int, dict[int, float]]:
        """``runtime.clients_per_pass: auto``: the timing probe on this worker
        (:func:`fedsim.client.pass_probe.probe_clients_per_pass`; changes no state)."""
        from fedsim.client.pass_probe import probe_clients_per_pass
        from fedsim.client.worker import ClientWorker

        worker = self._attach(shared)
        if not isinstance(worker, ClientWorker):
            raise ValueError("the clients-per-pass probe needs a one-process worker (runtime.zero.stage: 0)")
        return probe_clients_per_pass(worker, limit)

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

    def ready(self, shared: Shared, reset: bool = False) -> bool:
        """Answers once the actor is up and has built its model from ``shared`` (after a restart: rebuilt it).

        ``reset``: first drop every partial sum not yet flushed (and the results it carried). The driver probes
        with it after a call to this worker failed: it then counts whatever the worker had not flushed as lost
        (and re-runs those clients), so nothing of it may reach the server later. After a restart there is
        nothing to drop."""
        if reset:
            self._partials.clear()
            self._results.clear()
        self._attach(shared)
        return True

    def node_id(self) -> str:
        """The hex id of the Ray node this worker runs on (placement checks, ``describe``)."""
        return ray.get_runtime_context().get_node_id()

    def evaluate(self, shared: Shared, task: EvalTask, global_state: AdapterState, plan: RoundPlan) -> EvalResult:
        worker = self._attach(shared)
        state = global_state
        if task.client_id is not None:
            kept = ray.get(self.store.get.remote(task.client_id))
            state = worker.personal_state(global_state, kept, plan)
        return worker.evaluate(task, state)


WorkerActor = ray.remote(WorkerBase)
