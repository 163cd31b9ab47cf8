"""Run sweep cells concurrently as Ray tasks (the Ray-specific part of grid sweeps). It knows nothing of sweeps
beyond :class:`PoolCell`: :mod:`fedsim.sweep.runner` hands it the cells and the function that runs one
(``fedsim.runtime`` sits below ``fedsim.sweep`` in the layers and never imports it).

Each cell's driver runs as a task pinned to this node (its run folder, or for a URI its staging folder, is written
here); a cell on the Ray backend starts its own worker actors on the cluster, so concurrency is capped at what the
cluster's CPUs fit, which also rules out cells waiting on each other for CPUs. A cell whose method, data source
or model is a plugin module that is not installed gets it shipped with its task's ``runtime_env`` (as the Ray
backend does for its actors), so the cell's driver imports it whatever the task process's ``sys.path``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedsim.config.schema import Config
from fedsim.plugins import run_plugin_modules
from fedsim.runtime.cluster import connect, disconnect
from fedsim.runtime.resources import modules_runtime_env


class PoolCell(Protocol):
    """What the pool reads of a sweep cell (:class:`fedsim.sweep.spec.Cell` is one): its config and its label."""

    @property
    def config(self) -> Config: ...

    @property
    def cell_id(self) -> str: ...


CellT = TypeVar("CellT", bound=PoolCell)
#: runs one cell: ``run(config, target, label)``, raising on failure (``fedsim.sweep.runner.run_cell`` without
#: progress); a module-level function or a partial of one, as it is pickled into the cell's Ray task
CellRun = Callable[[Config, str, str], None]


def cell_cpus(cfg: Config) -> float:
    """CPUs one running cell holds: its worker actors (Ray backend) or its in-process workers (local).
    ``runtime.workers: auto`` counts as one worker: such a cell takes what is free when it starts."""
    rt = cfg.runtime
    workers = 1 if rt.workers == "auto" else rt.workers
    return float(workers * rt.cpus_per_worker)


def run_cell_task(run: CellRun, cfg: Config, where: str, label: str) -> str | None:
    """The body of a cell's Ray task: ``run(cfg, where, label)``; the error text (exception line and the end of its
    traceback) when it raised, else None."""
    try:
        run(cfg, where, label)
    except Exception as exc:  # reported as the cell's error
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
    return None


def run_cells_on_ray(
    cells: Sequence[CellT],
    run: CellRun,
    target: Callable[[CellT], str],
    parallel: int | str,
    finished: Callable[[CellT, str | None], None],
    log: Callable[[str], None],
) -> None:
    """Run ``cells``, each with ``run`` into ``target(cell)`` (a folder or a URI), with at most ``parallel`` at once
    ("auto": cluster CPUs // the largest cell's CPUs, >= 1); call ``finished(cell, error_or_None)`` as each ends.
    Starts a local Ray with every CPU of this machine or joins a cluster (``runtime.address`` of the first cell, else
    ``RAY_ADDRESS``) as :func:`fedsim.runtime.cluster.connect` decides; raises its UserError for an address where
    no cluster answers."""
    connection = connect(cells[0].config.runtime.address)
    try:
        need = max(cell_cpus(c.config) for c in cells)
        fit = max(1, int(ray.cluster_resources().get("CPU", 1) // max(need, 1.0)))
        limit = fit if parallel == "auto" else min(int(parallel), fit)
        log(f"running up to {limit} cells at once on Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs)")
        node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        pending = list(cells)
        running: dict[ray.ObjectRef, CellT] = {}
        while pending or running:
            while pending and len(running) < limit:
                cell = pending.pop(0)
                local_cpus = cell_cpus(cell.config) if cell.config.runtime.backend == "local" else 0
                c = cell.config
                env = modules_runtime_env(run_plugin_modules(c.method.name, c.data.source, c.model.name))
                options = {"runtime_env": env} if env else {}
                task = ray.remote(run_cell_task).options(num_cpus=local_cpus, scheduling_strategy=node, **options)
                ref = task.remote(run, cell.config, target(cell), cell.cell_id)
                running[ref] = cell
                log(f"started {cell.cell_id}")
            ready, _ = ray.wait(list(running), num_returns=1)
            cell = running.pop(ready[0])
            try:
                error = ray.get(ready[0])
            except Exception as exc:  # the task itself died
                error = f"{type(exc).__name__}: {exc}"
            finished(cell, error)
    finally:
        disconnect(connection)  # only a Ray started here
