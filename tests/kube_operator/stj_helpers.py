"""Helpers shared by the operator's integration tests (API shortcuts, the CEE testbed nodes).

Imported by ``conftest.py`` and the test modules of ``tests/kube_operator`` (a plain module on the
test path, so the directory needs no ``__init__.py``; ``operator`` would shadow the stdlib).
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException
from tests.cluster.test_controlplane import (
    wait_for,  # noqa: F401  (one poller for all cluster tests)
)

from spantrain_planner import api

T = TypeVar("T")
GROUP, VERSION, PLURAL = api.GROUP, api.VERSION, api.PLURAL




def cee_node_specs(prefix: str = "") -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []

    def gpu(name: str, tier: str, product: str, mem_mib: int, count: int, arch: str,
            bw: int, lat: float, extra: dict[str, str], taints: list[dict[str, str]] | None = None,
            cpu: str = "32", memory: str = "128Gi") -> None:
        specs.append({
            "name": prefix + name,
            "labels": {
                "kubernetes.io/arch": arch, "spantrain.io/tier": tier,
                "nvidia.com/gpu.product": product, "nvidia.com/gpu.memory": str(mem_mib),
                "nvidia.com/gpu.count": str(count), "spantrain.io/bandwidth-mbps": str(bw),
                "spantrain.io/latency-ms": str(lat), **extra,
            },
            "allocatable": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(count),
                            "pods": "110"},
            "taints": taints or [],
        })

    for i in range(2):
        gpu(f"cloud-{i}", "cloud", "NVIDIA-GeForce-RTX-3090", 24576, 4, "amd64", 10000, 0.1,
            {"topology.kubernetes.io/zone": "dc-1"})
    for i in range(2):
        gpu(f"edge-gpu-{i}", "edge", "NVIDIA-GeForce-RTX-3080", 10240, 2, "amd64", 1000, 2,
            {"node-role.kubernetes.io/edge": "", "topology.kubernetes.io/zone": f"edge-{i}"})
    for i in range(3):
        gpu(f"end-orin-{i}", "end", "NVIDIA-Jetson-AGX-Orin", 0, 1, "arm64", 300, 5,
            {"node.kubernetes.io/instance-type": "k3s"}, cpu="12", memory="32Gi")
    for i in range(8):
        specs.append({
            "name": f"{prefix}edge-arm-{i}",
            "labels": {"kubernetes.io/arch": "arm64", "node-role.kubernetes.io/edge": "",
                       "spantrain.io/tier": "edge", "spantrain.io/bandwidth-mbps": "100"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "taints": [{"key": "node-role.kubernetes.io/edge", "value": "",
                        "effect": "NoSchedule"}],
        })
    for i in range(6):
        specs.append({
            "name": f"{prefix}end-k3s-{i}",
            "labels": {"kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "k3s",
                       "spantrain.io/latency-ms": "10"},
            "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
        })
    for i in range(6):
        specs.append({
            "name": f"{prefix}cpu-{i}",
            "labels": {"kubernetes.io/arch": "amd64", "spantrain.io/tier": "cloud"},
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
        })
    return specs


# --------------------------------------------------------------------------------------------
# small API helpers


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": {"preset": "gpt-mini"}, "training": {"globalBatch": 16}}
    body.update(spec)
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name},
            "spec": body}


def create_job(kube_api: k8s_client.ApiClient, ns: str, body: dict[str, Any]) -> dict[str, Any]:
    return k8s_client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, body
    )


def get_job(kube_api: k8s_client.ApiClient, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return k8s_client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name
        )
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def patch_job(kube_api: k8s_client.ApiClient, ns: str, name: str, spec: dict[str, Any]) -> None:
    k8s_client.CustomObjectsApi(kube_api).patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, name, {"spec": spec}
    )


def job_pods(kube_api: k8s_client.ApiClient, ns: str, name: str) -> list[Any]:
    pods = k8s_client.CoreV1Api(kube_api).list_namespaced_pod(
        ns, label_selector=f"spantrain.io/job-name={name}"
    )
    return list(pods.items)


def live_pods(kube_api: k8s_client.ApiClient, ns: str, name: str) -> list[Any]:
    return [p for p in job_pods(kube_api, ns, name) if not p.metadata.deletion_timestamp]


def phase_is(kube_api: k8s_client.ApiClient, ns: str, name: str, *phases: str) -> dict | None:
    job = get_job(kube_api, ns, name)
    if job and (job.get("status") or {}).get("phase") in phases:
        return job
    return None


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return cond
    return None


def env_of(pod: Any) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env if e.value is not None}


def events_of(kube_api: k8s_client.ApiClient, ns: str, name: str) -> list[str]:
    evs = k8s_client.CoreV1Api(kube_api).list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name}"
    )
    return [e.reason for e in evs.items]


def operator_args(namespace: str) -> list[str]:
    return ["run", "--standalone", "--namespace", namespace, "-m", "spantrain_operator.handlers"]


class DeletionGraces:
    """Watch a job's pods and record the grace period each was deleted with (the first
    ``metadata.deletionGracePeriodSeconds`` seen), by pod name. Use as a context manager."""

    def __init__(self, kube_api: k8s_client.ApiClient, ns: str, job: str) -> None:
        self.graces: dict[str, int] = {}
        self._core = k8s_client.CoreV1Api(kube_api)
        self._ns, self._selector = ns, f"spantrain.io/job-name={job}"
        self._watch = k8s_watch.Watch()

    def _run(self, rv: str) -> None:
        for event in self._watch.stream(self._core.list_namespaced_pod, self._ns,
                                        label_selector=self._selector, resource_version=rv,
                                        timeout_seconds=300):
            meta = event["object"].metadata
            if meta.deletion_grace_period_seconds is not None:
                self.graces.setdefault(meta.name, meta.deletion_grace_period_seconds)

    def __enter__(self) -> DeletionGraces:
        # every change after this list reaches the watch, however late its stream opens
        rv = self._core.list_namespaced_pod(
            self._ns, label_selector=self._selector).metadata.resource_version
        self._thread = threading.Thread(target=self._run, args=(rv,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._watch.stop()
