"""What the actors need shipped and how big they are: ``runtime.gpus_per_worker: auto`` (a one-GPU memory probe) and
the ``runtime_env`` that carries a user method's module to the actors. The nodes' resources and the refusal of a
fixed-size cluster that can never hold the workers are in :mod:`fedsim.runtime.cluster`. Used by
:mod:`fedsim.runtime.ray_backend` and the sweep pool; the arithmetic itself is pure (:mod:`fedsim.runtime.placement`,
:mod:`fedsim.runtime.gpu_share`)."""

from __future__ import annotations

import os
import sys
from typing import Any

import ray

from fedsim.errors import UserError
from fedsim.plugins import plugin_modules
from fedsim.runtime.backend import RunSetup
from fedsim.runtime.cluster import node_resources
from fedsim.runtime.gpu_share import gpu_share, workers_per_gpu
from fedsim.runtime.ray_compat import upload_py_modules


def plugin_runtime_env(method_name: str) -> dict[str, Any]:
    """The actors' ``runtime_env`` for a user method whose module is not installed (``{}`` otherwise):
    :func:`modules_runtime_env` of :func:`fedsim.plugins.plugin_modules`."""
    return modules_runtime_env(plugin_modules(method_name))


def modules_runtime_env(modules: list[str]) -> dict[str, Any]:
    """A ``runtime_env`` that makes ``modules`` (package folders or ``.py`` files) importable in a Ray worker
    (``{}`` for none): uploaded to the cluster (GCS) as Ray does for a job's ``py_modules`` (actor- and task-level
    runtime_envs take only URIs), so they import on any node. Without Ray's uploader (a Ray version that moved it):
    the modules' folders on PYTHONPATH, which reaches the driver's own node only."""
    if not modules:
        return {}
    uploaded = upload_py_modules(modules)
    if uploaded is not None:
        return uploaded
    path = [*sorted({os.path.dirname(m) for m in modules}), os.environ.get("PYTHONPATH", "")]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in path if p)}}


def resolve_gpu_share(setup: RunSetup) -> float:
    """``runtime.gpus_per_worker: auto``: 0.0 when no live node has a GPU now (the workers run on CPU; say a number
    to have an autoscaler launch GPU nodes); else the share that packs as many workers per GPU as one probe
    client's memory allows (:func:`fedsim.client.memory_probe.probe_client_memory` in a task holding one whole GPU,
    of ``runtime.accelerator_type`` when set; :mod:`fedsim.runtime.gpu_share`). Prints the decision. Raises
    ConfigError when one worker does not fit a GPU, UserError when the probe finds no room within
    ``runtime.placement_timeout_s``."""
    rt = setup.cfg.runtime
    if not any(node.get("GPU", 0.0) > 0 for node in node_resources(free=False)):
        print("runtime.gpus_per_worker: auto: no GPU in the cluster now; workers run on CPU", file=sys.stderr)
        return 0.0
    from fedsim.client.memory_probe import probe_client_memory

    options: dict[str, Any] = {"num_cpus": rt.cpus_per_worker, "num_gpus": 1}
    if rt.accelerator_type:
        options["accelerator_type"] = rt.accelerator_type
    plugin_env = plugin_runtime_env(setup.cfg.method.name)  # a user method not installed on the nodes
    if plugin_env:
        options["runtime_env"] = plugin_env
    probe_task = ray.remote(probe_client_memory).options(**options)
    ref = probe_task.remote(setup.cfg, setup.blueprint, setup.data, setup.initial_state, setup.privacy)
    ready, _ = ray.wait([ref], timeout=rt.placement_timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        raise UserError(
            f"runtime.gpus_per_worker: auto: no room for the one-GPU memory probe within runtime.placement_timeout_s"
            f" = {rt.placement_timeout_s:g} s; give runtime.gpus_per_worker a number or free a GPU"
        )
    probe = ray.get(ref)
    if probe is None:  # the GPU node's torch sees no CUDA device
        print("runtime.gpus_per_worker: auto: the probe saw no CUDA device; workers run on CPU", file=sys.stderr)
        return 0.0
    k = workers_per_gpu(probe.total_bytes, probe.peak_bytes)
    print(
        f"runtime.gpus_per_worker: auto: probe client {probe.client_id} peaked at {probe.peak_bytes / 2**20:.0f} MiB "
        f"on a {probe.total_bytes / 2**30:.1f} GiB GPU -> {k} worker(s) per GPU ({gpu_share(k)} each)",
        file=sys.stderr,
    )
    return gpu_share(k)
