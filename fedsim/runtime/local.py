"""In-process backend: one worker, the server and the store in this process (debugging, tests).

Each upload is folded into the server's running sum as soon as its client finishes (the one in-process worker's
"pre-sum" is the server's own), so no round's uploads are ever held together for linear methods."""

from __future__ import annotations

from collections.abc import Sequence

from fedsim.client.pass_probe import probe_clients_per_pass, resolve_clients_per_pass
from fedsim.client.worker import ClientWorker
from fedsim.runtime.backend import RunSetup
from fedsim.server.checkpoint import Checkpoint
from fedsim.server.client_store import ClientStore
from fedsim.server.parameter_server import AggregateInfo, ParameterServer
from fedsim.types import AdapterState, ClientResult, ClientTask, EvalResult, EvalTask, RoundPlan


class LocalBackend:
    def __init__(self, setup: RunSetup) -> None:
        cfg = setup.cfg
        self.server = ParameterServer(cfg, setup.initial_state, setup.privacy)
        self.store = ClientStore(*setup.client_store_args())
        self.worker = ClientWorker(0, cfg, setup.blueprint, setup.data, setup.privacy)
        #: clients trained together per call (runtime.clients_per_pass; auto: probed on this worker)
        self.clients_per_pass = resolve_clients_per_pass(
            cfg, 1, lambda limit: probe_clients_per_pass(self.worker, limit)
        )

    def plan(self, round: int) -> RoundPlan:
        return self.server.plan(round)

    def train(self, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        results = []
        g = self.server.global_state()
        ordered, k = sorted(tasks, key=lambda t: t.client_id), self.clients_per_pass
        for chunk in (ordered[i : i + k] for i in range(0, len(ordered), k)):  # k clients per call, in id order
            got = [self.store.get_client(t.client_id, tensors=bool(t.plan.kept), round=t.round) for t in chunk]
            if k == 1:
                outs = [self.worker.train(chunk[0], g, *got[0])]
            else:
                outs = self.worker.train_many(chunk, g, [kept for kept, _ in got], [ledger for _, ledger in got])
            for task, out in zip(chunk, outs, strict=True):
                self.store.put_client(task.client_id, out.keep, out.ledger, round=task.round)
                if out.upload is not None:
                    self.server.receive(out.upload, round=task.round, kept=out.keep)
                results.append(out.result)
        return results

    def aggregate(self, round: int) -> AggregateInfo:
        return self.server.aggregate(round)

    def evaluate(self, tasks: Sequence[EvalTask], round: int) -> list[EvalResult]:
        g = self.server.global_state()
        plan = self.server.plan(round)
        out = []
        for task in tasks:
            state = g
            if task.client_id is not None:
                state = self.worker.personal_state(g, self.store.get(task.client_id), plan)
            out.append(self.worker.evaluate(task, state))
        return out

    def global_state(self) -> AdapterState:
        return self.server.global_state()

    def kept_client_ids(self) -> list[int]:
        return self.store.client_ids()

    def kept_state(self, client_id: int) -> AdapterState | None:
        return self.store.get(client_id)

    def checkpoint_state(self) -> Checkpoint:
        g, server_state = self.server.export_state()
        states, ledgers = self.store.snapshot()
        return Checkpoint(0, g, server_state, states, ledgers)

    def restore(self, ckpt: Checkpoint) -> None:
        self.server.import_state(ckpt.global_state, ckpt.server_state)
        self.store.restore(ckpt.client_states, ckpt.ledgers)

    def describe(self) -> str:
        k = self.clients_per_pass
        return f"local backend (1 in-process worker{f', {k} clients per pass' if k > 1 else ''})"

    @property
    def worker_count(self) -> int:
        return 1

    def shutdown(self) -> None:
        pass
