"""Ray backend: W ClientWorker actors in placement groups, a ParameterServer actor and a ClientStore actor.

A round: the driver hands clients (largest first) to whichever worker is free; each worker folds its clients'
uploads into one partial sum; then the driver calls ``flush(round)`` on every worker that answers (one message
each to the server) and compares the clients that trained against ``server.received_ids(round)``.

Workers: :class:`fedsim.runtime.worker_fleet.WorkerFleet` places them (one bundle each, SPREAD or PACK, grown
per round with ``runtime.workers: auto``; a fixed-size cluster that can never hold them is a UserError before any
training) and releases them at shutdown. The ParameterServer and ClientStore, one actor (no CPU;
:mod:`fedsim.runtime.server_home`), are pinned to the driver's node (NodeAffinity, hard): the store spills into the
run folder there and checkpoints rename its snapshot folder into the run folder, and a node that holds only workers
can then be lost. The blueprint and data are put into the object store once (:class:`Shared`). Results do not
depend on the worker count.

Faults and node loss: a worker process that dies (a crash, or its node lost as in a spot preemption) is restarted
by Ray (``max_restarts``; ``__init__`` re-runs with the same plain arguments, in the same bundle; when its node is
gone Ray reschedules the group's lost bundles together, once some node(s) have room for all of them, e.g. a
replacement node the autoscaler starts for the pending group; the restarted worker rebuilds its model from the refs
that come with the calls, see :mod:`fedsim.runtime.actors`). Meanwhile the worker is *down* in the
:class:`fedsim.runtime.worker_pool.WorkerPool`: probed every ``PROBE_INTERVAL_S`` seconds (``ready(reset=True)``:
whatever it had not flushed is dropped) while the round goes on with the workers that answer. Its in-flight client,
and the clients whose uploads sat in its unflushed partial sum, are re-run on the live workers (up to
:data:`CLIENT_ATTEMPTS` times); each re-run starts from the client's state and ledger as of the start of the round
(the ClientStore is round-versioned) with the same seeds, so the round's result equals a fault-free one and no
privacy budget is charged twice. A worker that Ray reports dead for good (out of restarts) is dropped. A client
whose training raises is a ``failed`` row.

A run never waits forever: the first placement group must be placed within ``runtime.placement_timeout_s`` (else
UserError, exit 2); while at least one worker answers, down workers hold nothing up; when none does, the driver
waits up to ``runtime.placement_timeout_s`` for one to come back and then stops the run (RunStopped; resumable
from its newest checkpoint). Growth never waits: a group that is not placed yet only delays the next growth.
The design assumes a worker that stops answering has lost its process (node loss, crash): a flush that fails
while the process lives on (a network partition) could still reach the server after the driver counted it lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedsim.config.schema import Config
from fedsim.privacy.mechanism import PrivacyMechanism
from fedsim.runtime.actors import ServerHomeActor, Shared
from fedsim.runtime.backend import RunSetup
from fedsim.runtime.cluster import connect, disconnect
from fedsim.runtime.placement import bundle_text
from fedsim.runtime.resources import resolve_gpu_share
from fedsim.runtime.worker_fleet import WorkerFleet
from fedsim.runtime.worker_pool import WorkerPool
from fedsim.server.checkpoint import Checkpoint
from fedsim.server.cohort import largest_first
from fedsim.server.parameter_server import AggregateInfo
from fedsim.types import AdapterState, ClientResult, ClientTask, EvalResult, EvalTask, RoundPlan

#: a client is tried this many times when worker processes die under it (then it is a failed row)
CLIENT_ATTEMPTS = 3


class RayBackend:
    def __init__(self, setup: RunSetup) -> None:
        """Start (or join) Ray, the server and store actors and the first workers; raises UserError when the
        cluster cannot hold them (see the module docstring), after releasing whatever it started. The same as
        :meth:`begin` followed by :meth:`complete`."""
        self._begin(setup.cfg, setup.privacy, setup.run_dir)
        self.complete(setup)

    @classmethod
    def begin(cls, cfg: Config, privacy: PrivacyMechanism, run_dir: Path | None) -> RayBackend:
        """The start-up steps that need only the config, run while the caller builds the data and base model: start
        (or join) Ray and, unless ``runtime.gpus_per_worker: auto`` (the share comes from a probe client) or ZeRO
        groups (``runtime.zero.stage > 0``), place the workers and create their actors, whose processes then import
        torch, transformers and PEFT (seconds each) before any data exists. Their models are built by
        :meth:`complete`, which the caller must call next (or :meth:`shutdown`). Raises UserError when the cluster
        cannot hold the workers, after releasing whatever it started."""
        backend = cls.__new__(cls)
        backend._begin(cfg, privacy, run_dir)
        return backend

    def _begin(self, cfg: Config, privacy: PrivacyMechanism, run_dir: Path | None) -> None:
        rt = cfg.runtime
        self._cfg, self._privacy, self._run_dir = cfg, privacy, run_dir
        limit = cfg.federation.clients_per_round if rt.workers == "auto" else int(rt.workers)
        self.sizes: list[int] = []  # set in complete: each client's training examples
        self.pool = WorkerPool(rt.placement_timeout_s, self._stopped)  # the workers, up or down
        self._k = 1  # clients per train call (runtime.clients_per_pass; auto: probed on a worker in complete)
        self.server: Any = None
        self.store: Any = None
        self._global_ahead: Any = None  # ObjectRef of the server's current global state, once asked for
        self._plan_ahead: tuple[int, Any] | None = None  # (round, ObjectRef of its plan), asked for by aggregate
        # start a local Ray or join the cluster (runtime.address, RAY_ADDRESS): fedsim.runtime.cluster decides
        self._connection = connect(rt.address, 0.0 if rt.workers == "auto" else limit * rt.cpus_per_worker)
        self.fleet = WorkerFleet(privacy, self._connection, self.pool, limit)
        try:
            self._home = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            if rt.gpus_per_worker != "auto" and rt.zero.stage == 0:
                self.fleet.place(cfg)
        except BaseException:
            self.shutdown()
            raise

    def complete(self, setup: RunSetup) -> RayBackend:
        """Finish the start :meth:`begin` made, now that the data, blueprint and initial adapter exist (``setup``
        must carry the config, privacy mechanism and run folder given to :meth:`begin`): the parameter server, the
        workers (placed now if :meth:`begin` could not), their models built. Returns self; raises UserError when
        the cluster cannot hold the workers, after releasing whatever it started."""
        try:
            self._complete(setup)
        except BaseException:
            self.shutdown()
            raise
        return self

    def _complete(self, setup: RunSetup) -> None:
        if (setup.cfg, setup.privacy, setup.run_dir) != (self._cfg, self._privacy, self._run_dir):
            raise ValueError("RayBackend.complete: the setup does not match the config given to begin")
        self.sizes = [int(n) for n in setup.data.client_sizes]
        if self._cfg.runtime.gpus_per_worker == "auto":
            share = resolve_gpu_share(setup)
            self._cfg = dataclasses.replace(
                self._cfg, runtime=dataclasses.replace(self._cfg.runtime, gpus_per_worker=share)
            )
        if self.fleet.placed is None:
            self.fleet.place(self._cfg)
        rt = self._cfg.runtime
        # the server and store (one actor process, pinned to the driver's node: the run folder is there) start now,
        # not in begin: the store creates its spill folder in the run folder, which nothing may touch before the
        # inputs are checked
        self.server = self.store = ServerHomeActor.options(
            scheduling_strategy=self._home, **({"runtime_env": self.fleet.plugin_env} if self.fleet.plugin_env else {})
        ).remote(setup.client_store_args(), self._cfg, setup.initial_state, setup.privacy)
        # put into the object store once (read from shared memory by every worker on a node); held here for the
        # whole run, as a restarted worker is rebuilt from them. They go with the calls, not to the constructor
        # (see fedsim.runtime.actors): Ray cannot restart an actor whose constructor refs are gone.
        blueprint = setup.blueprint
        if rt.zero.stage > 0:  # numpy weights: every rank maps them from shared memory and copies only its slices
            from fedsim.runtime.zero_group import shareable_blueprint

            blueprint = shareable_blueprint(blueprint)
        self.shared = Shared(ray.put(blueprint), ray.put(setup.data), self.server, self.store)
        self.pool.shared = self.shared
        count = self.fleet.wait_placed(rt.placement_timeout_s)
        ray.get([w.ready.remote(self.shared) for w in self.workers])  # build the models now (errors surface here)
        from fedsim.client.pass_probe import resolve_clients_per_pass  # torch & co.: imported once workers exist

        self._k = resolve_clients_per_pass(
            self._cfg, count, lambda limit: ray.get(self.workers[0].probe_pass.remote(self.shared, limit))
        )
        nodes = set(self.worker_nodes())
        how = f"auto: {count} now, up to {self.fleet.limit}" if rt.workers == "auto" else str(count)
        if rt.zero.stage > 0:
            how += f" ZeRO-{rt.zero.stage} group(s) of {rt.zero.ranks} ranks,"
        self._desc = (
            f"ray backend ({how} workers x {bundle_text(self.fleet.bundle)}; placement {rt.placement} over "
            f"{len(nodes)} node(s){f'; {self._k} clients per pass' if self._k > 1 else ''})"
        )

    def _stopped(self, why: str) -> str:
        where = f"`fedsim resume {self._run_dir}`" if self._run_dir else "`fedsim resume`"
        return (
            f"{why} (worker nodes lost and no room to restart their workers?); the run stopped: once the cluster "
            f"has room for runtime.workers, {where} continues from the newest checkpoint"
        )

    def _flush(self, round: int) -> list[ClientResult]:
        """Every worker that is up sends its partial sum of ``round`` to the server; returns the results of the
        clients whose uploads those carried. A worker whose flush fails is down: what it held is lost (its probe
        drops it, so it never reaches the server later) and the comparison with the server re-runs its clients."""
        return [res for _, results in self.pool.call_up(lambda w: w.flush.remote(round)) for res in results]

    def plan(self, round: int) -> RoundPlan:
        ahead, self._plan_ahead = self._plan_ahead, None
        ref = ahead[1] if ahead is not None and ahead[0] == round else self.server.plan.remote(round)
        return ray.get(ref)

    def _global_ref(self) -> Any:
        """The ObjectRef of the server's current global state, asked for once per state (aggregate asks for the
        next one right behind the aggregation; restore drops it)."""
        if self._global_ahead is None:
            self._global_ahead = self.server.global_state.remote()
        return self._global_ahead

    def train(self, tasks: Sequence[ClientTask]) -> list[ClientResult]:
        """Train the round's clients; on return every ``ok`` client's upload is at the server (re-running the
        clients a dead worker lost). Results sorted by client id."""
        if not tasks:
            return []
        self.fleet.grow()  # auto: nodes that joined since the last round take workers
        round = tasks[0].round
        g = self._global_ref()
        by_id = {t.client_id: t for t in tasks}
        results: dict[int, ClientResult] = {}
        deaths: dict[int, str] = {}
        todo, k = list(by_id), self._k
        for _ in range(CLIENT_ATTEMPTS):
            order = [by_id[c] for c in largest_first(todo, self.sizes)]
            chunks = [order[i : i + k] for i in range(0, len(order), k)]  # k clients per call (clients_per_pass)
            for chunk, res in self.pool.dispatch(chunks, self._submit_train(g)):
                for task, one in zip(chunk, res if isinstance(res, list) else [res] * len(chunk), strict=True):
                    if isinstance(one, ray.exceptions.RayActorError):  # its worker died under it (the whole chunk)
                        deaths[task.client_id] = str(one)
                    elif isinstance(one, Exception):
                        results[task.client_id] = self._failed(task, str(one))
                    else:
                        results[task.client_id] = one
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

    def _submit_train(self, g: Any) -> Callable[[Any, list[ClientTask]], Any]:
        """How a chunk of clients goes to a worker: one client with ``train`` (its result), several with
        ``train_many`` (a list of results)."""
        if self._k == 1:
            return lambda w, chunk: w.train.remote(self.shared, chunk[0], g)
        return lambda w, chunk: w.train_many.remote(self.shared, chunk, g)

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
        """Aggregate ``round``; the new global state and (unless it was the last round) the next round's plan are
        asked for in the same breath (the server runs calls in order), so the next round starts without waiting
        for them."""
        ref = self.server.aggregate.remote(round)
        self._global_ahead = self.server.global_state.remote()
        if round < self._cfg.federation.rounds:  # past the last round a method may have no plan
            self._plan_ahead = (round + 1, self.server.plan.remote(round + 1))
        return ray.get(ref)

    def evaluate(self, tasks: Sequence[EvalTask], round: int) -> list[EvalResult]:
        g = self._global_ref()
        plan = self.server.plan.remote(round)
        out: list[EvalResult] = []
        todo = list(tasks)
        for attempt in range(CLIENT_ATTEMPTS):
            lost = []
            for task, res in self.pool.dispatch(todo, lambda w, t: w.evaluate.remote(self.shared, t, g, plan)):
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
        return ray.get(self._global_ref())

    def checkpoint_state(self) -> Checkpoint:
        (g, server_state), (states, ledgers) = ray.get(
            [self.server.export_state.remote(), self.store.snapshot.remote()]
        )
        return Checkpoint(0, g, server_state, states, ledgers)

    def restore(self, ckpt: Checkpoint) -> None:
        self._global_ahead = self._plan_ahead = None
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

    def worker_nodes(self, settle_s: float = 0.0) -> list[str]:
        """The node id of each worker that is up (for tests and tools), after waiting up to ``settle_s`` seconds
        for down (restarting, joining) workers to come back."""
        self.pool.settle(settle_s)
        return [node for _, node in self.pool.call_up(lambda w: w.node_id.remote())]

    @property
    def worker_count(self) -> int:
        return len(self.pool.up)

    @property
    def workers(self) -> list[Any]:
        """Every worker actor not dead for good (up, or down: see :class:`WorkerPool`)."""
        return self.pool.workers

    def shutdown(self) -> None:
        """Kill the actors, remove the placement groups, withdraw the autoscaler request; stop Ray only if this
        run started it (a joined cluster stays up)."""
        self.fleet.release()
        if self.server is not None:  # the store is the server's actor
            ray.kill(self.server)
        disconnect(self._connection)  # stops only a Ray this run started; a joined cluster stays up
