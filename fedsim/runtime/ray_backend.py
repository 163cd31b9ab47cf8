"""Ray backend: W ClientWorker actors, a ParameterServer actor and a ClientStore actor."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import ray

from fedsim.runtime.actors import ClientStoreActor, ParameterServerActor, WorkerActor
from fedsim.runtime.backend import RunSetup
from fedsim.server.checkpoint import Checkpoint
from fedsim.server.cohort import largest_first
from fedsim.server.parameter_server import AggregateInfo
from fedsim.types import AdapterState, ClientResult, ClientTask, EvalResult, EvalTask, RoundPlan


def _init_ray(address: str, cpus_needed: float) -> bool:
    """Start or join Ray. Returns True if this call started it (so shutdown should stop it)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        cpus = max(os.cpu_count() or 1, int(cpus_needed + 0.999))
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    return True


class RayBackend:
    def __init__(self, setup: RunSetup) -> None:
        rt = setup.cfg.runtime
        self._started = _init_ray(rt.address, rt.workers * rt.cpus_per_worker)
        self.sizes = [len(ix) for ix in setup.data.client_train]
        self.server = ParameterServerActor.remote(setup.cfg, setup.initial_state, setup.server_noise_multiplier)
        self.store = ClientStoreActor.remote()
        bp_ref, data_ref = ray.put(setup.blueprint), ray.put(setup.data)  # shipped once per node
        self.workers = [
            WorkerActor.options(num_cpus=rt.cpus_per_worker, num_gpus=rt.gpus_per_worker).remote(
                i, setup.cfg, bp_ref, data_ref, self.server, self.store
            )
            for i in range(rt.workers)
        ]
        self._desc = f"ray backend ({rt.workers} workers x {rt.cpus_per_worker} CPU, {rt.gpus_per_worker} GPU)"

    def _dispatch(self, items: Sequence[Any], submit: Callable[[Any, Any], Any]) -> list[tuple[Any, Any]]:
        """Hand items to idle workers in the given order; returns (item, result or exception)."""
        queue = list(items)
        in_flight: dict[Any, tuple[Any, Any]] = {}
        done: list[tuple[Any, Any]] = []
        idle = list(self.workers)
        while queue or in_flight:
            while queue and idle:
                worker = idle.pop(0)
                item = queue.pop(0)
                in_flight[submit(worker, item)] = (item, worker)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            item, worker = in_flight.pop(ready[0])
            try:
                done.append((item, ray.get(ready[0])))
            except ray.exceptions.RayError as exc:
                done.append((item, exc))
            idle.append(worker)
        return done

    def plan(self, round: int) -> RoundPlan:
        return ray.get(self.server.plan.remote(round))

    def train(self, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        g = self.server.global_state.remote()
        by_id = {t.client_id: t for t in tasks}
        order = [by_id[c] for c in largest_first(list(by_id), self.sizes)]
        results = []
        for task, res in self._dispatch(order, lambda w, t: w.train.remote(t, g)):
            if isinstance(res, Exception):
                res = ClientResult(
                    round=task.round,
                    client_id=task.client_id,
                    worker_id=-1,
                    examples=self.sizes[task.client_id],
                    steps=0,
                    train_loss=float("nan"),
                    seconds=0.0,
                    status="failed",
                    error=str(res)[:2000],
                )
            results.append(res)
        return sorted(results, key=lambda r: r.client_id)

    def aggregate(self, round: int) -> AggregateInfo:
        return ray.get(self.server.aggregate.remote(round))

    def evaluate(self, tasks: Sequence[EvalTask], round: int) -> list[EvalResult]:
        g = self.server.global_state.remote()
        plan = self.server.plan.remote(round)
        out = []
        for _, res in self._dispatch(tasks, lambda w, t: w.evaluate.remote(t, g, plan)):
            if isinstance(res, Exception):
                raise res
            out.append(res)
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

    def shutdown(self) -> None:
        for actor in [*self.workers, self.server, self.store]:
            ray.kill(actor)
        if self._started:
            ray.shutdown()
