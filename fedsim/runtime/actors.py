"""Ray actor wrappers around the plain worker, parameter server and client store."""

from __future__ import annotations

from typing import Any

import ray

from fedsim.client.worker import ClientWorker
from fedsim.config.schema import Config
from fedsim.data.federated import FederatedData
from fedsim.model.build import BaseBlueprint
from fedsim.server.client_store import ClientStore
from fedsim.server.parameter_server import ParameterServer
from fedsim.types import AdapterState, ClientResult, ClientTask, EvalResult, EvalTask, RoundPlan

ParameterServerActor = ray.remote(num_cpus=0)(ParameterServer)
ClientStoreActor = ray.remote(num_cpus=0)(ClientStore)


@ray.remote
class WorkerActor:
    """One ClientWorker (one base model); talks to the store and the server itself."""

    def __init__(
        self, worker_id: int, cfg: Config, blueprint: BaseBlueprint, data: FederatedData, server: Any, store: Any
    ) -> None:
        self.worker = ClientWorker(worker_id, cfg, blueprint, data)
        self.server = server
        self.store = store

    def train(self, task: ClientTask, global_state: AdapterState) -> ClientResult:
        kept, ledger = ray.get(self.store.get_client.remote(task.client_id, bool(task.plan.kept)))
        out = self.worker.train(task, global_state, kept, ledger)
        pending = []
        if out.keep is not None or out.ledger is not None:
            pending.append(self.store.put_client.remote(task.client_id, out.keep, out.ledger))
        if out.upload is not None:
            pending.append(self.server.receive.remote(out.upload))
        ray.get(pending)  # delivered before the driver asks the server to aggregate
        return out.result

    def evaluate(self, task: EvalTask, global_state: AdapterState, plan: RoundPlan) -> EvalResult:
        state = global_state
        if task.client_id is not None:
            kept = ray.get(self.store.get.remote(task.client_id))
            state = self.worker.personal_state(global_state, kept, plan)
        return self.worker.evaluate(task, state)
