"""The user-facing cluster configs in clusters/ are valid, offline (no cloud, no Kubernetes, no Ray cluster).

* clusters/aws.yaml, clusters/gcp.yaml: Ray's own cluster-launcher validation, as Ray's test_autoscaler_yaml.py
  does it: ``prepare_config`` (merges the provider's defaults.yaml, the setup commands and the per-node-type
  worker limits, as ``ray up`` does before it contacts the cloud) then ``validate_config`` (Ray's
  ray-schema.json, closed objects, plus its cross-field checks).
* clusters/kuberay/*.yaml: the RayCluster / RayJob JSON schemas of tests/cluster/kuberay_schema.py (taken from the
  KubeRay CRD types; the file names the release), and the RayJob's runtimeEnvYAML through Ray's RuntimeEnv.

Each validation also shows that a misspelt key fails.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema  # a dependency of Ray (its launcher validates with it)
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from tests.cluster.kuberay_schema import RAY_CLUSTER, RAY_JOB

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
LAUNCHER = {"aws.yaml": ("gpu_a10g", "gpu_a100x8"), "gcp.yaml": ("gpu_l4", "gpu_a100x8")}


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def _ray_validate(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_config_passes_rays_own_validation(name):
    config = _load(name)
    prepared = _ray_validate(config)
    small, large = LAUNCHER[name]
    nodes = config["available_node_types"]
    assert config["head_node_type"] == "head" and set(nodes) == {"head", small, large}
    assert "GPU" not in nodes["head"]["resources"]
    for gpu_type, gpus in ((small, 1), (large, 8)):
        node = nodes[gpu_type]
        assert node["min_workers"] == 0 and node["max_workers"] >= 1
        assert node["resources"]["GPU"] == gpus and node["resources"]["CPU"] >= 1
        assert any(k.startswith("accelerator_type:") for k in node["resources"])
        if config["provider"]["type"] == "aws":
            assert node["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
        else:
            assert node["node_config"]["scheduling"]["preemptible"] is True
            assert node["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert "InstanceMarketOptions" not in nodes["head"]["node_config"]  # the head holds the runs: on-demand
    assert "scheduling" not in nodes["head"]["node_config"]
    # torch is pinned and installed before fedsim, on the head and on the workers
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared[key]
        torch = next(i for i, c in enumerate(cmds) if "torch==2.13.0" in c)
        fedsim = next(i for i, c in enumerate(cmds) if "fedsim[demo]" in c)
        assert torch < fedsim, key
    assert prepared["file_mounts"] == {"~/fedsim": "."}


@pytest.mark.parametrize("name", sorted(LAUNCHER))
@pytest.mark.parametrize("where", ["node type", "top level"])
def test_a_misspelt_launcher_key_fails_rays_validation(name, where):
    config = _load(name)
    if where == "node type":  # `min_worker` for `min_workers` in a GPU worker type
        node = config["available_node_types"][LAUNCHER[name][0]]
        node["min_worker"] = node.pop("min_workers")
        bad = "min_worker"
    else:  # `idle_timeout_minute` for `idle_timeout_minutes`
        config["idle_timeout_minute"] = config.pop("idle_timeout_minutes")
        bad = "idle_timeout_minute"
    with pytest.raises(jsonschema.ValidationError, match=bad):
        _ray_validate(config)


def _kuberay(name: str) -> dict:
    return _load(f"kuberay/{name}")


def _gpu_groups(cluster_spec: dict) -> list[dict]:
    return [
        g
        for g in cluster_spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]


def test_raycluster_manifest_matches_the_crd_fields():
    manifest = _kuberay("raycluster.yaml")
    jsonschema.validate(manifest, RAY_CLUSTER)
    spec = manifest["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = _gpu_groups(spec)
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]


def test_rayjob_manifest_matches_the_crd_fields_and_its_runtime_env_is_valid():
    manifest = _kuberay("rayjob.yaml")
    jsonschema.validate(manifest, RAY_JOB)
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypoint"].startswith("fedsim run ") and "/mnt/fedsim-runs/" in spec["entrypoint"]
    assert "runtime.address" not in spec["entrypoint"]  # a submitted run joins the job's cluster (RAY_ADDRESS)
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    (gpu,) = _gpu_groups(spec["rayClusterSpec"])
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= set(RuntimeEnv.known_fields)  # RuntimeEnv takes unknown keys as plugins
    RuntimeEnv(**runtime_env)  # Ray's own checks of pip, env_vars, ...
    pip = runtime_env["pip"]
    assert pip[0] == "torch==2.13.0" and any(p.startswith("fedsim[demo] @ ") for p in pip)


def _unexpected_keys(manifest: dict) -> list[str]:
    """The messages of the schema errors about keys the CRD does not have."""
    schema = RAY_CLUSTER if manifest["kind"] == "RayCluster" else RAY_JOB
    errors = jsonschema.Draft202012Validator(schema).iter_errors(manifest)
    return [e.message for e in errors if e.validator == "additionalProperties"]


@pytest.mark.parametrize(
    "name, path, good, bad",
    [
        ("rayjob.yaml", ["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        ("rayjob.yaml", ["spec", "rayClusterSpec"], "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
        ("rayjob.yaml", ["spec", "rayClusterSpec", "workerGroupSpecs", 0], "maxReplicas", "maxReplica"),
        ("raycluster.yaml", ["spec", "workerGroupSpecs", 0], "minReplicas", "minReplica"),
        ("raycluster.yaml", ["spec", "autoscalerOptions"], "idleTimeoutSeconds", "idleTimeoutSecond"),
        ("raycluster.yaml", ["spec", "headGroupSpec"], "rayStartParams", "rayStartParam"),
    ],
)
def test_a_misspelt_kuberay_key_fails_the_schema(name, path, good, bad):
    manifest = _kuberay(name)
    assert _unexpected_keys(manifest) == []
    obj = manifest
    for key in path:
        obj = obj[key]
    obj[bad] = obj.pop(good)
    assert any(f"'{bad}' was unexpected" in m for m in _unexpected_keys(manifest)), _unexpected_keys(manifest)
