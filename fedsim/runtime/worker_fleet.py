"""The Ray backend's worker actors and the placement groups that hold them: sized, placed, grown, released.

Placement: one bundle per worker (:func:`fedsim.runtime.placement.worker_bundle`: CPU, GPU and, with
``runtime.accelerator_type``, the node resource ``accelerator_type:<X>``: only what an autoscaler understands) in
ONE placement group with strategy SPREAD or PACK (``runtime.placement``). The soft strategies: one node still takes
every worker, and a lost node's bundles can be rescheduled onto nodes that already hold workers (STRICT_SPREAD
could not reschedule them while every other node holds one, STRICT_PACK not at all once its node is gone).
``runtime.workers: auto`` adds one more group per growth step (a placement group cannot grow). With ZeRO
(``runtime.zero.stage > 0``) each worker is a group of ``runtime.zero.ranks`` rank actors
(:mod:`fedsim.runtime.zero_group`).

Sizing: ``runtime.workers: N`` on a fixed-size cluster (:func:`fedsim.runtime.cluster.cluster_kind`) that can never
hold N workers is a UserError naming the keys, before any training. ``auto`` starts with the workers that fit in
the nodes' free resources (at least 1, at most ``federation.clients_per_round``), asks an autoscaling cluster for
``clients_per_round`` workers' worth (``ray.autoscaler.sdk.request_resources``, withdrawn at release), and at the
start of each round adds a group for the workers that fit in the free resources then (new nodes); the new workers
take clients once their models are built. Growth never waits: a group that is not placed yet only delays the next
growth.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fedsim.config.schema import Config
from fedsim.errors import UserError
from fedsim.privacy.mechanism import PrivacyMechanism
from fedsim.runtime.actors import FAULT_ENVS, WorkerActor
from fedsim.runtime.cluster import ClusterKind, Connection, node_resources, refuse_if_never_fits
from fedsim.runtime.placement import auto_workers, bundle_text, growth, worker_bundle, zero_capacity_problem
from fedsim.runtime.resources import plugin_runtime_env
from fedsim.runtime.worker_pool import WorkerPool

#: Ray restarts a dead worker actor this many times over the run
WORKER_MAX_RESTARTS = 8
#: runtime.placement -> Ray placement-group strategy (the soft ones; see the module docstring)
STRATEGY = {"spread": "SPREAD", "pack": "PACK"}


class WorkerFleet:
    """Places the run's worker actors into ``pool`` and grows it (``runtime.workers: auto``); :meth:`release`
    removes what it placed. ``limit``: the most workers the run uses (``runtime.workers``, or
    ``federation.clients_per_round`` for auto)."""

    def __init__(self, privacy: PrivacyMechanism, connection: Connection, pool: WorkerPool, limit: int) -> None:
        self._privacy, self._connection, self._pool, self.limit = privacy, connection, pool, limit
        self.cfg: Config | None = None  # set by place (gpus_per_worker resolved)
        self.bundle: dict[str, float] = {}  # one worker's resources, set by place
        self.plugin_env: dict[str, Any] = {}  # ships a user method's module to the actors, set by place
        self.placed: tuple[int, ClusterKind, Any] | None = None  # (count, cluster kind, first group) once placed
        self._groups: list[Any] = []  # placement groups, removed at release
        self._zero_actors: list[Any] = []  # every rank actor of the ZeRO groups (runtime.zero.stage > 0)
        self._growing: list[Any] = []  # the workers of the newest growth group
        self._next_id = 0
        self._requested = False  # request_resources was called (withdrawn at release)

    @property
    def groups(self) -> list[Any]:
        """The placement groups made so far (the first, then one per growth; with ZeRO one per worker)."""
        return list(self._groups)

    def place(self, cfg: Config) -> None:
        """Refuse (UserError) a fixed-size cluster that can never hold the workers; create the first placement
        group and its worker actors (not waited for: they start their processes and import while the caller goes
        on). ``cfg.runtime.gpus_per_worker`` must be a number (``auto`` resolved)."""
        self.cfg = cfg
        rt = cfg.runtime
        auto = rt.workers == "auto"
        self.bundle = worker_bundle(rt.cpus_per_worker, rt.gpus_per_worker, rt.accelerator_type)
        kind = refuse_if_never_fits(rt, self._connection.started)  # before anything is started on the cluster
        if rt.zero.stage > 0 and kind == "fixed":  # ZeRO groups: workers x ranks bundles
            problem = zero_capacity_problem(rt, node_resources(free=False), self.bundle)
            if problem:
                raise UserError(problem)
        self.plugin_env = plugin_runtime_env(cfg.method.name)  # a user method not installed: shipped
        count = auto_workers(node_resources(free=True), self.bundle, self.limit) if auto else self.limit
        if auto and kind != "fixed":  # tell an autoscaler what the run could use
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[dict(self.bundle) for _ in range(self.limit)])
            self._requested = True
        self.placed = (count, kind, self._add_group(count))

    def wait_placed(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the first group; returns its worker count, or raises UserError naming the
        keys to change when it was not placed in time."""
        assert self.placed is not None and self.cfg is not None, "place first"
        count, kind, group = self.placed
        if not group.wait(timeout_s):
            raise UserError(self._no_room(count, kind))
        return count

    def _no_room(self, count: int, kind: ClusterKind) -> str:
        assert self.cfg is not None
        rt = self.cfg.runtime
        accel = ", runtime.accelerator_type" if rt.accelerator_type else ""
        what = {"fixed": "fixed-size", "autoscaling": "autoscaling", "unknown": ""}[kind]
        return (
            f"runtime.workers: no room for {count} worker(s) of {bundle_text(self.bundle)} each (runtime."
            f"cpus_per_worker, runtime.gpus_per_worker{accel}) on this {what + ' ' if what else ''}cluster within "
            f"runtime.placement_timeout_s = {rt.placement_timeout_s:g} s; lower runtime.workers (or use auto) or "
            "the per-worker resources, free the cluster, or raise runtime.placement_timeout_s while an autoscaler "
            "is still adding nodes"
        )

    def _add_group(self, count: int, building: bool = False) -> Any:
        """A placement group of ``count`` worker bundles and one new worker actor per bundle (not waited for);
        ``building``: they join the pool down and take items once their models are built."""
        assert self.cfg is not None
        add = self._pool.add_building if building else self._pool.add
        rt = self.cfg.runtime
        env = {k: os.environ[k] for k in FAULT_ENVS if os.environ.get(k)} or None  # tests only
        plugin_env = dict(self.plugin_env)
        runtime_env = {**plugin_env, **({"env_vars": {**plugin_env.get("env_vars", {}), **env}} if env else {})}
        extra: dict[str, Any] = {"runtime_env": runtime_env} if runtime_env else {}
        if rt.accelerator_type:
            extra["accelerator_type"] = rt.accelerator_type
        if rt.zero.stage > 0:  # one placement group of runtime.zero.ranks bundles per worker
            from fedsim.runtime.zero_group import add_zero_groups

            placed, leaders, actors = add_zero_groups(count, self._next_id, self.cfg, self._privacy, self.bundle, extra)
            self._groups.extend(placed.groups)
            self._zero_actors.extend(actors)
            self._next_id += count
            add(leaders)
            return placed
        group = placement_group([dict(self.bundle) for _ in range(count)], strategy=STRATEGY[rt.placement])
        self._groups.append(group)
        new = [
            WorkerActor.options(
                num_cpus=rt.cpus_per_worker,
                num_gpus=rt.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
                max_restarts=WORKER_MAX_RESTARTS,
                max_task_retries=0,  # the driver decides what to re-run (after comparing with the server)
                **extra,
            ).remote(self._next_id + i, self.cfg, self._privacy)
            for i in range(count)
        ]
        self._next_id += count
        add(new)
        return group

    def grow(self) -> None:
        """``auto``: add the workers that fit in the free resources now (nodes that joined), up to the limit.
        They join the pool as their models are built; nothing waits for them. Does nothing for a fixed count,
        before :meth:`place`, or while the previous growth is not placed and built yet."""
        if self.cfg is None or self.cfg.runtime.workers != "auto" or len(self._pool.workers) >= self.limit:
            return
        if any(self._pool.is_down(w) for w in self._growing):  # the last growth is not placed / built yet
            return
        count = growth(node_resources(free=True), self.bundle, len(self._pool.workers), self.limit)
        if count <= 0:
            return
        before = len(self._pool.workers)
        self._add_group(count, building=True)
        self._growing = self._pool.workers[before:]

    def release(self) -> None:
        """Kill the worker actors (ZeRO ranks included), remove the placement groups and withdraw the autoscaler
        request. Safe to call after a failed start and more than once."""
        for actor in [*self._pool.workers, *self._zero_actors]:
            ray.kill(actor)
        for group in self._groups:
            try:
                remove_placement_group(group)
            except Exception:  # already gone with its cluster
                pass
        self._groups, self._zero_actors = [], []
        if self._requested:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])
            self._requested = False
