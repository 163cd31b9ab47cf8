"""Where the Ray workers go: the per-worker resource bundle and the worker-count arithmetic.

Pure functions of resource mappings (``{"CPU": 2.0, "GPU": 1.0, "accelerator_type:A100": 1.0, ...}``, one per
node, as Ray reports them); no Ray import, so they are unit-tested without a cluster. The Ray backend
(:mod:`fedsim.runtime.ray_backend`) feeds them the nodes' total or free resources.

A worker asks only for what an autoscaler understands: ``CPU``, ``GPU`` and, with ``runtime.accelerator_type``,
the node resource ``accelerator_type:<X>`` (of which Ray's ``accelerator_type`` actor option takes 0.001). A bundle
never spans nodes, so what fits is counted node by node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

#: prefix of the node resource Ray sets for a node's accelerator (``accelerator_type:A100``)
ACCELERATOR_PREFIX = "accelerator_type:"
#: how much of that resource one worker takes (what Ray's ``accelerator_type`` actor option asks for)
ACCELERATOR_SHARE = 0.001
_EPS = 1e-6  # Ray keeps resources to 1e-4; absorbs float error in 0.1 + 0.2 style sums


def worker_bundle(cpus: float, gpus: float, accelerator_type: str | None = None) -> dict[str, float]:
    """One worker's placement-group bundle: ``CPU`` (always > 0), ``GPU`` when ``gpus`` > 0, and
    ``accelerator_type:<X>`` when an accelerator type is asked for."""
    bundle = {"CPU": float(cpus)}
    if gpus > 0:
        bundle["GPU"] = float(gpus)
    if accelerator_type:
        bundle[ACCELERATOR_PREFIX + accelerator_type] = ACCELERATOR_SHARE
    return bundle


def fits_on_node(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of ``bundle`` fit in one node's resources ``node`` (0 when it lacks one of them)."""
    counts = [math.floor((node.get(key, 0.0) + _EPS) / need) for key, need in bundle.items() if need > 0]
    return max(0, min(counts)) if counts else 0


def workers_fitting(nodes: Iterable[Mapping[str, float]], bundle: Mapping[str, float]) -> int:
    """How many workers of ``bundle`` fit in ``nodes`` (one resource mapping per node), node by node."""
    return sum(fits_on_node(node, bundle) for node in nodes)


def auto_workers(free: Iterable[Mapping[str, float]], bundle: Mapping[str, float], clients_per_round: int) -> int:
    """``runtime.workers: auto`` at the start of a run: the workers that fit in the nodes' FREE resources now, at
    least 1 (on an autoscaling cluster with no room yet, the one worker waits for a node) and at most
    ``clients_per_round`` (more would idle: a round has that many clients)."""
    return max(1, min(clients_per_round, workers_fitting(free, bundle)))


def growth(free: Iterable[Mapping[str, float]], bundle: Mapping[str, float], have: int, limit: int) -> int:
    """Workers to add between rounds (``auto``): as many as fit in the free resources now, up to ``limit`` in
    all (``have`` exist); 0 when none fits or the pool is full."""
    return max(0, min(limit - have, workers_fitting(free, bundle)))


def bundle_text(bundle: Mapping[str, float]) -> str:
    """``{"CPU": 1, "GPU": 0.5, "accelerator_type:T4": 0.001}`` -> ``"1 CPU, 0.5 GPU on a T4 node"``."""
    parts = [f"{bundle[k]:g} {k}" for k in ("CPU", "GPU") if k in bundle]
    accel = [k[len(ACCELERATOR_PREFIX) :] for k in bundle if k.startswith(ACCELERATOR_PREFIX)]
    return ", ".join(parts) + (f" on a {accel[0]} node" if accel else "")


def capacity_problem(
    requested: int | Literal["auto"], total: Iterable[Mapping[str, float]], bundle: Mapping[str, float]
) -> str | None:
    """The problem with ``runtime.workers = requested`` on a FIXED-size cluster whose nodes have the ``total``
    resources (no autoscaler will add nodes), or None when it can hold them. One line naming the keys and the
    fix. Only what could ever fit counts here; free room is the placement group's business (it waits)."""
    nodes = list(total)
    fit = workers_fitting(nodes, bundle)
    per_node = ", ".join(str(fits_on_node(n, bundle)) for n in nodes)
    what = f"{bundle_text(bundle)} each (runtime.cpus_per_worker, runtime.gpus_per_worker"
    what += ", runtime.accelerator_type)" if any(k.startswith(ACCELERATOR_PREFIX) for k in bundle) else ")"
    where = f"this fixed-size cluster (no autoscaler; {len(nodes)} node(s), holding {per_node or 'no'} worker(s))"
    if requested == "auto":
        if fit >= 1:
            return None
        return (
            f"runtime.workers: auto, but no node of {where} has room for one worker of {what}; lower "
            "runtime.cpus_per_worker / runtime.gpus_per_worker, drop runtime.accelerator_type, or add nodes"
        )
    if requested <= fit:
        return None
    return (
        f"runtime.workers: {requested} workers of {what} can never fit {where}: set runtime.workers to at most "
        f"{fit} (or auto), lower runtime.cpus_per_worker / runtime.gpus_per_worker, or add nodes"
        if fit >= 1
        else f"runtime.workers: not even one worker of {what} fits a node of {where}; lower "
        "runtime.cpus_per_worker / runtime.gpus_per_worker, drop runtime.accelerator_type, or add nodes"
    )


def zero_capacity_problem(rt: Any, total: Iterable[Mapping[str, float]], bundle: Mapping[str, float]) -> str | None:
    """The problem with ``runtime.workers`` ZeRO groups of ``runtime.zero.ranks`` ranks on a FIXED-size cluster
    whose nodes have ``total`` resources, or None when it can hold them."""
    nodes = list(total)
    need = int(rt.workers) * rt.zero.ranks
    fit = workers_fitting(nodes, bundle)
    if need <= fit:
        return None
    return (
        f"runtime.zero.ranks: {rt.workers} worker group(s) x {rt.zero.ranks} ranks of {bundle_text(bundle)} each "
        f"(runtime.cpus_per_worker, runtime.gpus_per_worker) = {need} ranks, but this fixed-size cluster can place "
        f"{fit}: lower runtime.zero.ranks or runtime.workers, lower the per-rank resources, or add nodes"
    )
