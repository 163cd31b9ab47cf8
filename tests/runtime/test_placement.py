"""The worker bundle and the worker-count arithmetic of fedsim.runtime.placement (no Ray)."""

from __future__ import annotations

import pytest

from fedsim.runtime.placement import (
    auto_workers,
    bundle_text,
    capacity_problem,
    fits_on_node,
    growth,
    worker_bundle,
    workers_fitting,
)

HEAD = {"memory": 8e9, "node:__internal_head__": 1.0}  # no CPU: room for the server and store only
CPU2 = {"CPU": 2.0, "memory": 8e9}
GPU_A100 = {"CPU": 8.0, "GPU": 2.0, "accelerator_type:A100": 1.0}
GPU_T4 = {"CPU": 4.0, "GPU": 1.0, "accelerator_type:T4": 1.0}


def test_the_bundle_asks_only_for_what_an_autoscaler_understands():
    assert worker_bundle(1, 0) == {"CPU": 1.0}
    assert worker_bundle(2, 0.25) == {"CPU": 2.0, "GPU": 0.25}
    assert worker_bundle(4, 1, "A100") == {"CPU": 4.0, "GPU": 1.0, "accelerator_type:A100": 0.001}
    assert bundle_text(worker_bundle(4, 0.5, "L4")) == "4 CPU, 0.5 GPU on a L4 node"


@pytest.mark.parametrize(
    "node, bundle, expected",
    [
        (CPU2, worker_bundle(1, 0), 2),
        (CPU2, worker_bundle(0.5, 0), 4),
        (CPU2, worker_bundle(3, 0), 0),  # never split over nodes
        (HEAD, worker_bundle(1, 0), 0),
        (GPU_A100, worker_bundle(1, 0.25), 8),  # CPU and GPU both allow 8
        (GPU_A100, worker_bundle(2, 0.25), 4),  # CPU is the limit
        (GPU_A100, worker_bundle(1, 0.3), 6),  # floor(2 / 0.3)
        (GPU_A100, worker_bundle(1, 1, "T4"), 0),  # wrong accelerator
        (GPU_T4, worker_bundle(1, 1, "T4"), 1),
        ({"CPU": 0.30000000000000004}, worker_bundle(0.1, 0), 3),  # float sums do not lose a worker
    ],
)
def test_fits_on_node_counts_whole_bundles_of_every_resource(node, bundle, expected):
    assert fits_on_node(node, bundle) == expected


def test_auto_sizes_from_the_free_resources_between_one_and_the_cohort():
    one_cpu = worker_bundle(1, 0)
    assert workers_fitting([HEAD, CPU2, CPU2], one_cpu) == 4
    assert auto_workers([HEAD, CPU2, CPU2], one_cpu, clients_per_round=10) == 4
    assert auto_workers([HEAD, CPU2, CPU2], one_cpu, clients_per_round=3) == 3  # more would idle
    assert auto_workers([HEAD], one_cpu, clients_per_round=3) == 1  # nothing free yet: one waits for a node
    assert auto_workers([GPU_A100, GPU_T4], worker_bundle(1, 1, "A100"), 16) == 2


def test_growth_adds_what_fits_now_up_to_the_limit():
    one_cpu = worker_bundle(1, 0)
    assert growth([HEAD, {"CPU": 1.0}], one_cpu, have=1, limit=4) == 1
    assert growth([HEAD, CPU2, CPU2], one_cpu, have=1, limit=4) == 3
    assert growth([HEAD, CPU2], one_cpu, have=4, limit=4) == 0
    assert growth([HEAD], one_cpu, have=1, limit=4) == 0


def test_capacity_problem_names_the_keys_and_the_largest_count_that_fits():
    nodes = [HEAD, CPU2, CPU2]
    assert capacity_problem(4, nodes, worker_bundle(1, 0)) is None
    assert capacity_problem("auto", nodes, worker_bundle(1, 0)) is None
    too_many = capacity_problem(5, nodes, worker_bundle(1, 0))
    assert too_many and too_many.startswith("runtime.workers: 5 workers of 1 CPU each")
    assert "runtime.cpus_per_worker" in too_many and "at most 4" in too_many and "3 node(s)" in too_many
    too_big = capacity_problem(1, nodes, worker_bundle(3, 0))  # 4 CPUs in all, but 2 per node
    assert too_big and "not even one worker of 3 CPU" in too_big and "runtime.cpus_per_worker" in too_big
    no_gpu = capacity_problem("auto", nodes, worker_bundle(1, 1, "A100"))
    assert no_gpu and no_gpu.startswith("runtime.workers: auto") and "runtime.accelerator_type" in no_gpu


def _status(*types: str) -> dict:
    """The autoscaler monitor's status (as `ray status` reads it) with nodes of these types."""
    mapping = {f"{i:056x}": t for i, t in enumerate(types)}
    return {"autoscaler_report": {"active_nodes": {t: 1 for t in types}, "node_type_mapping": mapping}}


def test_a_cluster_is_fixed_when_every_node_type_is_the_read_only_providers():
    from fedsim.runtime.cluster import kind_from_status

    readonly = [f"node_{i:056x}" for i in (7, 8, 9)]
    assert kind_from_status(_status(*readonly)) == "fixed"
    assert kind_from_status(_status("ray.head.default", "gpu-workers")) == "autoscaling"
    assert kind_from_status(_status(readonly[0], "node_gpu")) == "autoscaling"  # a named type, not an id
    assert kind_from_status(None) == kind_from_status({}) == kind_from_status({"autoscaler_report": {}}) == "unknown"


def test_cluster_kind_waits_for_the_monitors_first_status(monkeypatch):
    # a head's monitor writes its first status seconds after the head starts: a run that joins at once must not
    # take the cluster for one of unknown kind (and then wait runtime.placement_timeout_s instead of refusing)
    import json

    import ray.experimental.internal_kv as kv

    from fedsim.runtime import cluster

    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    answers = iter([None, None, json.dumps(_status(f"node_{7:056x}")).encode()])
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key: next(answers))
    assert cluster.cluster_kind() == "fixed"
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key: None)
    assert cluster.cluster_kind(wait_s=0.0) == "unknown"
