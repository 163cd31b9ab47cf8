"""JSON schemas (draft 2020-12, for the `jsonschema` package) of the KubeRay ``ray.io/v1`` RayCluster and RayJob
fields that clusters/kuberay/*.yaml use, so a misspelt or misplaced key fails a test instead of being pruned or
rejected by the API server at ``kubectl apply`` time.

Source: the KubeRay CRD types from which ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml are
generated, in github.com/ray-project/kuberay:
  * RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, ScaleStrategy, AutoscalerOptions: the KubeRay v1.3 field set
    (ray-operator/apis/ray/v1/raycluster_types.go at commit 3275ee09f6a6c899c37e82ea6349785536de6bd4; it has
    v1.3.0's gcsFaultToleranceOptions and worker-group suspend);
  * RayJobSpec: the KubeRay v1.5 field set (ray-operator/apis/ray/v1/rayjob_types.go at commit
    0057210ed5a94e830c864af372577328c3542b44; it has v1.5.0's deletionStrategy, which replaced v1.3's
    deletionPolicy).
Every field the manifests set exists since KubeRay v1.1.0 (activeDeadlineSeconds and submissionMode are new in
v1.1.0, runtimeEnvYAML in v1.0.0), so the manifests work with KubeRay >= 1.1.

KubeRay's own objects are closed here (``additionalProperties: false``), as the CRD's structural schema is:
unknown fields are errors under ``kubectl apply``'s default strict field validation. Kubernetes' own types that
the CRD embeds whole (the PodSpec, Container, Service, EnvVar, ...) are left open: only the parts the manifests
rely on are checked. A KubeRay field added to a manifest must be added here (after checking the CRD).
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

# resource.Quantity: an integer or a string such as "4", "500m", "16Gi" (the CRD's pattern)
QUANTITY: Schema = {
    "anyOf": [
        {"type": "integer"},
        {
            "type": "string",
            "pattern": (
                r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
            ),
        },
    ]
}
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
INT32: Schema = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}

RESOURCE_REQUIREMENTS: Schema = {  # core/v1 ResourceRequirements (closed in the CRD too)
    "type": "object",
    "properties": {
        "claims": {"type": "array", "items": {"type": "object"}},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
        "requests": {"type": "object", "additionalProperties": QUANTITY},
    },
    "additionalProperties": False,
}

CONTAINER: Schema = {  # core/v1 Container: open, the fields used are typed
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "image": {"type": "string"},
        "resources": RESOURCE_REQUIREMENTS,
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["mountPath", "name"]}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
    },
}

POD_TEMPLATE: Schema = {  # core/v1 PodTemplateSpec has exactly these two fields
    "type": "object",
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                "tolerations": {"type": "array", "items": {"type": "object"}},
                "nodeSelector": STRING_MAP,
            },
        },
    },
    "additionalProperties": False,
}

AUTOSCALER_OPTIONS: Schema = {
    "type": "object",
    "properties": {
        "resources": RESOURCE_REQUIREMENTS,
        "image": {"type": "string"},
        "imagePullPolicy": {"type": "string"},
        "securityContext": {"type": "object"},
        "idleTimeoutSeconds": INT32,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "volumeMounts": {"type": "array"},
    },
    "additionalProperties": False,
}

HEAD_GROUP_SPEC: Schema = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "properties": {
        "template": POD_TEMPLATE,
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "rayStartParams": STRING_MAP,
        "serviceType": {"type": "string"},
    },
    "additionalProperties": False,
}

WORKER_GROUP_SPEC: Schema = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "properties": {
        "suspend": {"type": "boolean"},
        "groupName": {"type": "string"},
        "replicas": INT32,
        "minReplicas": INT32,
        "maxReplicas": INT32,
        "idleTimeoutSeconds": INT32,
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": {
            "type": "object",
            "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}},
            "additionalProperties": False,
        },
        "numOfHosts": INT32,
    },
    "additionalProperties": False,
}

RAY_CLUSTER_SPEC: Schema = {
    "type": "object",
    "required": ["headGroupSpec"],
    "properties": {
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headServiceAnnotations": STRING_MAP,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "headGroupSpec": HEAD_GROUP_SPEC,
        "rayVersion": {"type": "string"},
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP_SPEC},
    },
    "additionalProperties": False,
}

RAY_JOB_SPEC: Schema = {
    "type": "object",
    "properties": {
        "activeDeadlineSeconds": INT32,
        "backoffLimit": INT32,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submitterPodTemplate": POD_TEMPLATE,
        "metadata": STRING_MAP,
        "clusterSelector": STRING_MAP,
        "submitterConfig": {
            "type": "object",
            "properties": {"backoffLimit": INT32},
            "additionalProperties": False,
        },
        "managedBy": {"type": "string"},
        "deletionStrategy": {"type": "object"},
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "entrypointResources": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "ttlSecondsAfterFinished": INT32,
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "suspend": {"type": "boolean"},
        "schedule": {"type": "string"},
    },
    "additionalProperties": False,
}

OBJECT_META: Schema = {  # the parts of ObjectMeta a manifest sets
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}


def _resource(kind: str, spec: Schema) -> Schema:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": OBJECT_META,
            "spec": spec,
        },
        "additionalProperties": False,
    }


RAY_CLUSTER: Schema = _resource("RayCluster", RAY_CLUSTER_SPEC)
RAY_JOB: Schema = _resource("RayJob", RAY_JOB_SPEC)
