"""Every use of a private or developer-only Ray / Ray Tune API, in one place (pyproject.toml bounds Ray to the
tested minor series; read this module before raising the bound).

Each function says which Ray internal it reaches, what it is used for, and what breaks (and how visibly) if a Ray
release moves or changes it. Ray is imported inside the functions only: importing this module imports no Ray (the
config checks and ``import fedsim.runtime.cluster`` stay light).
"""

from __future__ import annotations

import tempfile
from typing import Any


def resolve_auto_address() -> str | None:
    """The address ``ray.init(address="auto")`` would join (RAY_ADDRESS, then the newest ``ray start``, then a running
    GCS process), or None when this Ray has no such helper. Raises ConnectionError when no cluster is found.

    Uses ``ray._private.services.canonicalize_bootstrap_address``. If Ray moves or renames it, this returns None and
    ``fedsim.runtime.cluster`` skips its reachability probe of ``auto`` (``ray.init`` alone then reports a missing
    cluster, with Ray's own message); if Ray changes its return value, the probe may check the wrong host."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    return canonicalize_bootstrap_address("auto") or ""


#: ``ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS``: the internal-KV key under which the head's autoscaler
#: monitor writes its status (what ``ray status`` reads). If Ray renames the key, :func:`autoscaler_status` finds
#: nothing and every cluster's kind is "unknown": runs on a fixed-size cluster that can never hold their workers
#: then wait ``runtime.placement_timeout_s`` and fail, instead of being refused up front.
AUTOSCALING_STATUS_KEY = "__autoscaling_status"


def autoscaler_status() -> bytes | None:
    """The autoscaler monitor's raw status (JSON bytes), or None when none is written yet. Needs Ray initialised.

    Uses ``ray.experimental.internal_kv._internal_kv_get`` (private) and :data:`AUTOSCALING_STATUS_KEY`. If Ray
    removes the function, the ImportError is caught by ``fedsim.runtime.cluster.cluster_kind``, which then answers
    "unknown" (see :data:`AUTOSCALING_STATUS_KEY` for what that costs)."""
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(AUTOSCALING_STATUS_KEY)


def available_resources_per_node() -> dict[str, dict[str, float]]:
    """Node id -> the resources unreserved on that node now (Ray has no public per-node view of free resources).

    Uses ``ray._private.state.available_resources_per_node`` (a DeveloperAPI). If Ray moves it, ``runtime.workers:
    auto`` sizing and the growth of the worker fleet fail with an ImportError at the start of a Ray run (loud, not
    silent); if its shape changes, they may count free CPUs wrongly (too many or too few workers)."""
    from ray._private.state import available_resources_per_node as per_node

    return per_node()


def upload_py_modules(modules: list[str]) -> dict[str, Any] | None:
    """A ``runtime_env`` whose ``py_modules`` are ``modules`` (package folders or ``.py`` files) uploaded to the
    cluster's GCS as URIs, as Ray does for a job's ``py_modules`` (actor- and task-level runtime_envs take URIs only);
    None when this Ray has no such uploader.

    Uses ``ray._private.runtime_env.py_modules.upload_py_modules_if_needed``. If Ray moves it, this returns None and
    ``fedsim.runtime.resources`` falls back to PYTHONPATH, which reaches the driver's own node only: a user plugin
    (method, data source, model) that is not installed on the other nodes then fails to import there."""
    try:
        from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    except ImportError:
        return None
    return upload_py_modules_if_needed(
        {"py_modules": list(modules)}, include_gitignore=False, scratch_dir=tempfile.gettempdir()
    )


def asha_bracket(scheduler: Any, trial_id: str) -> Any:
    """The bracket an ``ASHAScheduler`` placed the trial ``trial_id`` in (its ``on_result(trial, t, value)`` records a
    result in the bracket's rungs).

    Uses the scheduler's private ``_trial_info`` mapping (trial id -> bracket; Ray 2.60). If Ray renames it, a
    restored search raises AttributeError when the restored experiment adds back its ended trials (the search stops,
    loudly); if its meaning changes, a restored search's rungs are rebuilt wrongly and ASHA may stop or keep trials it
    would not have."""
    return scheduler._trial_info[trial_id]


def asha_rung_values(scheduler: Any) -> tuple[int, float]:
    """``(max_t, metric_op)`` of an ``ASHAScheduler``: the last rung's time and the sign that turns the metric into
    a value to maximise (+1 for mode max, -1 for min).

    Uses the scheduler's private ``_max_t`` and ``_metric_op`` (Ray 2.60); renamed, they raise AttributeError as
    :func:`asha_bracket` does."""
    return int(scheduler._max_t), float(scheduler._metric_op)
