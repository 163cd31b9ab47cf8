"""Run sweep cells concurrently as Ray tasks (the only Ray-specific part of sweeps).

Each cell's driver runs as a task pinned to this node (its run folder, or for a URI its staging folder, is written
here); a cell on the Ray backend starts its own worker actors on the cluster, so concurrency is capped at what the
cluster's CPUs fit, which also rules out cells waiting on each other for CPUs. A cell whose method, data source
or model is a plugin module that is not installed gets it shipped with its task's ``runtime_env`` (as the Ray
backend does for its actors), so the cell's driver imports it whatever the task process's ``sys.path``.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedsim.config.schema import Config
from fedsim.plugins import run_plugin_modules
from fedsim.runtime.cluster import connect, disconnect
from fedsim.runtime.resources import modules_runtime_env
from fedsim.sweep.spec import Cell


def cell_cpus(cfg: Config) -> float:
    """CPUs one running cell holds: its worker actors (Ray backend) or its in-process workers (local).
    ``runtime.workers: auto`` counts as one worker: such a cell takes what is free when it starts."""
    rt = cfg.runtime
    workers = 1 if rt.workers == "auto" else rt.workers
    return float(workers * rt.cpus_per_worker)


def _run_cell(cfg: Config, where: str, label: str) -> str | None:
    from fedsim.sweep.runner import run_cell

    try:
        run_cell(cfg, where, label, progress=False)
    except Exception as exc:  # reported as the cell's error
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
    return None


def run_cells_on_ray(
    cells: Sequence[Cell],
    target: Callable[[Cell], str],
    parallel: int | str,
    finished: Callable[[Cell, str | None], None],
    log: Callable[[str], None],
) -> None:
    """Run ``cells`` (each into ``target(cell)``: a folder or a URI) with at most ``parallel`` at once ("auto":
    cluster CPUs // the largest cell's CPUs, >= 1); call ``finished(cell, error_or_None)`` as each ends. Starts a
    local Ray with every CPU of this machine or joins a cluster (``runtime.address`` of the first cell, else
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
        running: dict[ray.ObjectRef, Cell] = {}
        while pending or running:
            while pending and len(running) < limit:
                cell = pending.pop(0)
                local_cpus = cell_cpus(cell.config) if cell.config.runtime.backend == "local" else 0
                c = cell.config
                env = modules_runtime_env(run_plugin_modules(c.method.name, c.data.source, c.model.name))
                options = {"runtime_env": env} if env else {}
                task = ray.remote(_run_cell).options(num_cpus=local_cpus, scheduling_strategy=node, **options)
                ref = task.remote(cell.config, target(cell), cell.cell_id)
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
