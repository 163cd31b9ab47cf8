"""Ray backend: W ClientWorker actors, a ParameterServer actor and a ClientStore actor.

A round: the driver hands clients (largest first) to whichever worker is free; each worker folds its clients'
uploads into one partial sum; then the driver calls ``flush(round)`` on every worker (one message each to the
server) and compares the clients that trained against ``server.received_ids(round)``.

Faults: a worker process that dies is restarted by Ray (``max_restarts``; ``__init__`` re-runs with the same
arguments, which are plain values: the blueprint and data refs come with the calls, see
:mod:`fedsim.runtime.actors`; the restarted worker rebuilds its model from them on the driver's ``ready`` probe).
Its in-flight client, and the clients whose uploads sat in its unflushed partial sum, are re-run on
the live workers (up to :data:`CLIENT_ATTEMPTS` times); each re-run starts from the client's state and ledger as
of the start of the round (the ClientStore is round-versioned) with the same seeds, so the round's result equals
a fault-free one and no privacy budget is charged twice. A client whose training raises is a ``failed`` row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from fedsim.runtime.actors import FAULT_ENVS, ClientStoreActor, ParameterServerActor, Shared, WorkerActor
from fedsim.runtime.backend import RunSetup
from fedsim.runtime.cluster import connect, disconnect
from fedsim.server.checkpoint import Checkpoint
from fedsim.server.cohort import largest_first
from fedsim.server.parameter_server import AggregateInfo
from fedsim.types import AdapterState, ClientResult, ClientTask, EvalResult, EvalTask, RoundPlan

#: Ray restarts a dead worker actor this many times over the run
WORKER_MAX_RESTARTS = 8
_PROBE = object()  # marks a worker.ready() call in flight in _dispatch

#: a client is tried this many times when worker processes die under it (then it is a failed row)
CLIENT_ATTEMPTS = 3


def _settle(worker: Any, ref: Any, shared: Shared) -> bool:
    """Wait for a ``ready`` probe of ``worker``; False if the actor is dead for good."""
    for _ in range(100):
        try:
            ray.get(ref)
            return True
        except ray.exceptions.ActorDiedError:
            return False
        except ray.exceptions.RayActorError:  # still restarting
            time.sleep(0.1)
            ref = worker.ready.remote(shared)
    return False


class RayBackend:
    def __init__(self, setup: RunSetup) -> None:
        rt = setup.cfg.runtime
        # start a local Ray or join the cluster (runtime.address, RAY_ADDRESS): fedsim.runtime.cluster decides
        self._connection = connect(rt.address, rt.workers * rt.cpus_per_worker)
        self.sizes = [len(ix) for ix in setup.data.client_train]
        self.server = ParameterServerActor.remote(setup.cfg, setup.initial_state, setup.privacy)
        self.store = ClientStoreActor.remote(*setup.client_store_args())
        # put into the object store once (read from shared memory by every worker on a node); held here for the
        # whole run, as a restarted worker is rebuilt from them. They go with the calls, not to the constructor
        # (see fedsim.runtime.actors): Ray cannot restart an actor whose constructor refs are gone.
        self.shared = Shared(ray.put(setup.blueprint), ray.put(setup.data), self.server, self.store)
        env = {k: os.environ[k] for k in FAULT_ENVS if os.environ.get(k)} or None  # tests only
        self.workers = [
            WorkerActor.options(
                num_cpus=rt.cpus_per_worker,
                num_gpus=rt.gpus_per_worker,
                max_restarts=WORKER_MAX_RESTARTS,
                max_task_retries=0,  # the driver decides what to re-run (after comparing with the server)
                **({"runtime_env": {"env_vars": env}} if env else {}),
            ).remote(i, setup.cfg, setup.privacy)
            for i in range(rt.workers)
        ]
        ray.get([w.ready.remote(self.shared) for w in self.workers])  # build the models now (errors surface here)
        self._desc = f"ray backend ({rt.workers} workers x {rt.cpus_per_worker} CPU, {rt.gpus_per_worker} GPU)"

    def _dispatch(self, items: Sequence[Any], submit: Callable[[Any, Any], Any]) -> list[tuple[Any, Any]]:
        """Hand items to idle workers in the given order; returns (item, result or exception).

        A worker whose call fails because its process died (RayActorError) gets no new item until a ``ready``
        probe answers (Ray is restarting it); one that is dead for good is dropped from ``self.workers``.
        Raises RuntimeError when no worker is left."""
        queue = list(items)
        in_flight: dict[Any, tuple[Any, Any]] = {}
        probes: dict[Any, int] = {}  # worker -> probes sent since it failed
        done: list[tuple[Any, Any]] = []
        idle = list(self.workers)
        while queue or any(item is not _PROBE for item, _ in in_flight.values()):
            while queue and idle:
                worker = idle.pop(0)
                item = queue.pop(0)
                in_flight[submit(worker, item)] = (item, worker)
            if not in_flight:
                raise RuntimeError("every Ray worker actor died and could not be restarted")
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            item, worker = in_flight.pop(ready[0])
            try:
                res, alive = ray.get(ready[0]), True
            except ray.exceptions.RayActorError as exc:
                res, alive = exc, False
            except ray.exceptions.RayError as exc:  # the call raised; the worker is fine
                res, alive = exc, True
            if item is not _PROBE:
                done.append((item, res))
            if alive:
                probes.pop(worker, None)
                idle.append(worker)
            elif isinstance(res, ray.exceptions.ActorDiedError) and item is _PROBE or probes.get(worker, 0) > 100:
                self.workers.remove(worker)  # out of restarts
            else:
                probes[worker] = probes.get(worker, 0) + 1
                in_flight[worker.ready.remote(self.shared)] = (_PROBE, worker)
        for ref, (_, worker) in in_flight.items():  # leftover probes: let them finish (or fail) quietly
            _settle(worker, ref, self.shared)
        return done

    def _flush(self, round: int) -> list[ClientResult]:
        """Every worker sends its partial sum of ``round`` to the server; returns the results of the clients whose
        uploads those carried. On return no live worker holds anything of ``round`` (a worker whose flush call
        failed is flushed again once it answers: after a restart it holds nothing, so nothing arrives twice)."""
        out: list[ClientResult] = []
        for worker in list(self.workers):
            for _ in range(100):
                try:
                    out.extend(ray.get(worker.flush.remote(round)))
                    break
                except ray.exceptions.ActorDiedError:
                    if not _settle(worker, worker.ready.remote(self.shared), self.shared):
                        self.workers.remove(worker)
                        break
                except ray.exceptions.RayActorError:
                    time.sleep(0.1)
        return out

    def plan(self, round: int) -> RoundPlan:
        return ray.get(self.server.plan.remote(round))

    def train(self, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        """Train the round's clients; on return every ``ok`` client's upload is at the server (re-running the
        clients a dead worker lost). Results sorted by client id."""
        if not tasks:
            return []
        round = tasks[0].round
        g = self.server.global_state.remote()
        by_id = {t.client_id: t for t in tasks}
        results: dict[int, ClientResult] = {}
        deaths: dict[int, str] = {}
        todo = list(by_id)
        for _ in range(CLIENT_ATTEMPTS):
            order = [by_id[c] for c in largest_first(todo, self.sizes)]
            for task, res in self._dispatch(order, lambda w, t: w.train.remote(self.shared, t, g)):
                if isinstance(res, ray.exceptions.RayActorError):  # its worker died under it
                    deaths[task.client_id] = str(res)
                elif isinstance(res, Exception):
                    results[task.client_id] = self._failed(task, str(res))
                else:
                    results[task.client_id] = res
            for res in self._flush(round):  # also the results of calls that failed after the client trained
                results[res.client_id] = res
            received = set(ray.get(self.server.received_ids.remote(round)))
            todo = []
            for c in sorted(by_id):
                if c not in results:
                    todo.append(c)
                elif results[c].status == "ok" and by_id[c].plan.uploaded and c not in received:
                    deaths[c] = "its worker died before sending the round's uploads"
                    del results[c]
                    todo.append(c)
            if not todo:
                break
        for c in todo:
            results[c] = self._failed(by_id[c], f"worker processes died {CLIENT_ATTEMPTS} times: {deaths.get(c, '?')}")
        return [results[c] for c in sorted(results)]

    def _failed(self, task: ClientTask, error: str) -> ClientResult:
        return ClientResult(
            round=task.round,
            client_id=task.client_id,
            worker_id=-1,
            examples=self.sizes[task.client_id],
            steps=0,
            train_loss=float("nan"),
            seconds=0.0,
            status="failed",
            error=error[:2000],
        )

    def aggregate(self, round: int) -> AggregateInfo:
        return ray.get(self.server.aggregate.remote(round))

    def evaluate(self, tasks: Sequence[EvalTask], round: int) -> list[EvalResult]:
        g = self.server.global_state.remote()
        plan = self.server.plan.remote(round)
        out: list[EvalResult] = []
        todo = list(tasks)
        for attempt in range(CLIENT_ATTEMPTS):
            lost = []
            for task, res in self._dispatch(todo, lambda w, t: w.evaluate.remote(self.shared, t, g, plan)):
                if isinstance(res, ray.exceptions.RayActorError) and attempt + 1 < CLIENT_ATTEMPTS:
                    lost.append(task)  # the worker died: evaluate the chunk again elsewhere
                elif isinstance(res, Exception):
                    raise res
                else:
                    out.append(res)
            if not lost:
                break
            todo = lost
        return out

    def global_state(self) -> AdapterState:
        return ray.get(self.server.global_state.remote())

    def checkpoint_state(self) -> Checkpoint:
        (g, server_state), (states, ledgers) = ray.get(
            [self.server.export_state.remote(), self.store.snapshot.remote()]
        )
        return Checkpoint(0, g, server_state, states, ledgers)

    def restore(self, ckpt: Checkpoint) -> None:
        ray.get(
            [
                self.server.import_state.remote(ckpt.global_state, ckpt.server_state),
                self.store.restore.remote(ckpt.client_states, ckpt.ledgers),
            ]
        )

    def kept_client_ids(self) -> list[int]:
        return ray.get(self.store.client_ids.remote())

    def kept_state(self, client_id: int) -> AdapterState | None:
        return ray.get(self.store.get.remote(client_id))

    def describe(self) -> str:
        return self._desc

    @property
    def worker_count(self) -> int:
        return len(self.workers)

    def shutdown(self) -> None:
        for actor in [*self.workers, self.server, self.store]:
            ray.kill(actor)
        disconnect(self._connection)  # stops only a Ray this run started; a joined cluster stays up
