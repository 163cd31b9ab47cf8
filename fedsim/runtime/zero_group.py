"""ZeRO worker groups on Ray: one worker = G rank actors in ONE placement group (PACK) sharing one frozen base.

Rank 0 (the *leader*, a :class:`ZeroLeaderActor`) is what the Ray backend sees as a worker: it talks to the
ClientStore and ParameterServer and folds its clients' uploads into a partial sum exactly as a
:class:`fedsim.runtime.actors.WorkerActor` does (it is one). Ranks 1..G-1 (:class:`ZeroRankActor`) only compute:
for every call the leader makes on its :class:`fedsim.client.worker.ClientWorker` (built with the ZeRO engine of
:mod:`fedsim.client.zero`: build, train, train_many, evaluate)
it first sends the same call, with the same arguments, to every peer, then computes its own share, then waits for
the peers; the torch.distributed collectives inside make the G processes compute together. The group's process
group is formed on the leader's first call: the leader picks its node address and a free port, every rank joins
(gloo on CPU, NCCL when the ranks have GPUs).

Faults: a group is not restarted (``max_restarts=0``): a rank that dies takes the group's collectives with it, so
the leader's calls fail and the Ray backend drops the worker and re-runs its clients on the other workers.

Sizing: every rank takes ``runtime.cpus_per_worker`` CPUs and ``runtime.gpus_per_worker`` GPUs;
:func:`fedsim.runtime.placement.zero_capacity_problem` refuses a fixed-size cluster that can never hold
``runtime.workers x runtime.zero.ranks`` such bundles (before the run folder is written when the run starts its own
Ray: :func:`fedsim.runtime.cluster.check`).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fedsim.client.protocol import ClientOutput, Kepts, Ledgers, States, Tasks, Worker
from fedsim.config.schema import Config
from fedsim.privacy.mechanism import PrivacyMechanism
from fedsim.runtime.actors import Shared, WorkerBase
from fedsim.types import AdapterState, ClientTask, EvalResult, EvalTask, RoundPlan

if TYPE_CHECKING:  # torch and the model code load in the actors, not where this module is imported
    from fedsim.client.worker import ClientWorker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def shareable_blueprint(bp: Any) -> Any:
    """``bp`` with its weights as numpy arrays where numpy has the dtype (float32, float16): Ray deserialises numpy
    arrays zero-copy from the node's shared memory, so a rank copies its slices of float32/float16 weights without a
    private copy of the whole tensor (torch tensors would be copied whole into every rank). bfloat16 weights stay
    tensors and ARE copied whole into every rank; the shared-memory pages a rank reads count in its RSS either way."""
    import dataclasses

    import torch

    weights = {
        k: v.detach().cpu().numpy() if v.dtype in (torch.float32, torch.float16) else v for k, v in bp.weights.items()
    }
    return dataclasses.replace(bp, weights=weights)


def _build_rank(
    rank: int, world: int, addr: str, port: int, worker_id: int, cfg: Config, privacy: PrivacyMechanism, shared: Shared
) -> ClientWorker:
    """Join the group and build this rank's ClientWorker over the ZeRO engine (blueprint and data from shared
    memory)."""
    import torch

    from fedsim.client.worker import ClientWorker
    from fedsim.client.zero import init_group

    use_cuda = torch.cuda.is_available() and not (cfg.runtime.gpus_per_worker == 0)
    init_group(rank, world, addr, port, use_cuda)
    blueprint, data = ray.get([shared.blueprint, shared.data])
    worker = ClientWorker(worker_id, cfg, blueprint, data, privacy)  # cfg.runtime.zero: the ZeRO engine
    del blueprint  # the whole base's weights: only this rank's partitions stay
    return worker


@ray.remote
class ZeroRankActor:
    """Rank ``rank`` > 0 of a ZeRO group: builds its share of the base and computes what the leader asks."""

    def __init__(self, worker_id: int, rank: int, world: int, cfg: Config, privacy: PrivacyMechanism) -> None:
        self.worker_id, self.rank, self.world, self.cfg, self.privacy = worker_id, rank, world, cfg, privacy
        self.worker: ClientWorker | None = None

    def build(self, addr: str, port: int, shared: Shared) -> bool:
        """Join the leader's process group at ``addr:port`` and build this rank's model."""
        self.worker = _build_rank(self.rank, self.world, addr, port, self.worker_id, self.cfg, self.privacy, shared)
        return True

    def train(self, task: ClientTask, global_state: AdapterState, kept: AdapterState | None, ledger: Any) -> None:
        """This rank's share of one client's training (the leader keeps the result)."""
        self._built().train(task, global_state, kept, ledger)

    def train_many(self, tasks: list[ClientTask], global_state: Any, kepts: list[Any], ledgers: list[Any]) -> None:
        """This rank's share of several clients' training (the leader keeps the results)."""
        self._built().train_many(tasks, global_state, kepts, ledgers)

    def evaluate(self, task: EvalTask, state: AdapterState) -> None:
        """This rank's share of an evaluation (the leader keeps the result)."""
        self._built().evaluate(task, state)

    def resident_bytes(self) -> int:
        """Bytes of the base this rank holds (its partitions)."""
        return self._built().resident_bytes()

    def _built(self) -> ClientWorker:
        if self.worker is None:
            raise RuntimeError("ZeRO rank used before build()")
        return self.worker


class GroupWorker:
    """The leader's view of its group, a :class:`fedsim.client.protocol.Worker`: every training and evaluation call
    is sent to the peers first, then computed by the leader's own rank (the collectives inside make the G
    processes compute together), then the peers are waited for; the leader's result is the group's."""

    def __init__(self, local: ClientWorker, peers: list[Any]) -> None:
        self.local, self.peers = local, peers
        self.method = local.method

    def _together(self, name: str, *args: Any) -> Any:
        refs = [getattr(p, name).remote(*args) for p in self.peers]
        try:
            return getattr(self.local, name)(*args)
        finally:
            ray.get(refs)

    def train(
        self, task: ClientTask, global_state: AdapterState, kept: AdapterState | None, ledger_json: dict | None = None
    ) -> ClientOutput:
        return self._together("train", task, global_state, kept, ledger_json)

    def train_many(self, tasks: Tasks, global_state: States, kepts: Kepts, ledgers: Ledgers) -> list[ClientOutput]:
        return self._together("train_many", list(tasks), global_state, list(kepts), list(ledgers))

    def evaluate(self, task: EvalTask, state: AdapterState) -> EvalResult:
        return self._together("evaluate", task, state)

    def personal_state(self, global_state: AdapterState, kept: AdapterState | None, plan: RoundPlan) -> AdapterState:
        return self.local.personal_state(global_state, kept, plan)


class ZeroLeader(WorkerBase):
    """Rank 0 of a ZeRO group: a worker (store, partial sums, flush) whose model is the group's."""

    def __init__(self, worker_id: int, cfg: Config, privacy: PrivacyMechanism, peers: list[Any]) -> None:
        super().__init__(worker_id, cfg, privacy)
        self.peers = peers

    def _build(self, shared: Shared) -> Worker:
        addr, port, world = ray.util.get_node_ip_address(), _free_port(), len(self.peers) + 1
        refs = [p.build.remote(addr, port, shared) for p in self.peers]
        local = _build_rank(0, world, addr, port, self.worker_id, self.cfg, self.privacy, shared)
        ray.get(refs)
        return GroupWorker(local, self.peers)

    def resident_bytes(self, shared: Shared) -> list[int]:
        """Bytes of the base each rank holds (rank order)."""
        self._attach(shared)
        local = self._group().local
        return [local.resident_bytes(), *ray.get([p.resident_bytes.remote() for p in self.peers])]

    def _group(self) -> GroupWorker:
        if not isinstance(self._worker, GroupWorker):
            raise RuntimeError("the ZeRO leader has not built its group yet")
        return self._worker


ZeroLeaderActor = ray.remote(ZeroLeader)


class GroupsPlaced:
    """The placement groups of several ZeRO groups, waited for together (``wait`` as a placement group's)."""

    def __init__(self, groups: list[Any]) -> None:
        self.groups = groups

    def wait(self, timeout_seconds: float) -> bool:
        ready, _ = ray.wait([g.ready() for g in self.groups], num_returns=len(self.groups), timeout=timeout_seconds)
        return len(ready) == len(self.groups)


def add_zero_groups(
    count: int, first_id: int, cfg: Config, privacy: PrivacyMechanism, bundle: Mapping[str, float], extra: dict
) -> tuple[GroupsPlaced, list[Any], list[Any]]:
    """``count`` ZeRO groups of ``runtime.zero.ranks`` bundles each (one placement group per worker, PACK): returns
    (their placement groups, the leaders (the workers), every rank actor (for shutdown)). Nothing is waited for."""
    world = cfg.runtime.zero.ranks
    groups, leaders, actors = [], [], []
    for w in range(count):
        group = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        groups.append(group)

        def opts(i: int, g: Any = group) -> dict[str, Any]:
            return dict(
                num_cpus=bundle.get("CPU", 1.0),
                num_gpus=bundle.get("GPU", 0.0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(g, placement_group_bundle_index=i),
                max_restarts=0,
                **extra,
            )

        peers = [ZeroRankActor.options(**opts(i)).remote(first_id + w, i, world, cfg, privacy) for i in range(1, world)]
        leader = ZeroLeaderActor.options(**opts(0), max_task_retries=0).remote(first_id + w, cfg, privacy, peers)
        leaders.append(leader)
        actors.extend([leader, *peers])
    return GroupsPlaced(groups), leaders, actors
