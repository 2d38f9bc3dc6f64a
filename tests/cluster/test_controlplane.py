"""Proof that the cluster harness is real: API server, KCM, scheduler, KWOK and helm all work.

Role: smoke/acceptance tests for ``tests/cluster`` itself (20 CEE-labelled fake nodes, scheduling
with node affinity, KWOK pod phases, garbage collection, Jobs, SA tokens, helm).
Must not import: the SpanTrain code under test (``spantrain_planner``, ``spantrain_worker``,
``spantrain_operator``), kopf or torch.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client as k8s_client
from kubernetes.client.rest import ApiException

from tests.cluster.controlplane import (
    KWOK_FAIL_ANNOTATION,
    ClusterHelpers,
    mark_pod_failed,
)
from tests.cluster.fixtures import pinned_versions

pytestmark = pytest.mark.cluster

T = TypeVar("T")

FAKE_IMAGE = "registry.invalid/spantrain/fake-trainer:1"  # never pulled: KWOK runs nothing


def wait_for(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last value: {last!r})")


# --------------------------------------------------------------------------------------------
# CEE (cloud / edge / end) fake nodes


def cee_node_specs() -> list[dict[str, Any]]:
    """20 nodes: 4 cloud GPU servers, 8 KubeEdge edge boxes (Jetson), 8 K3s end devices."""
    specs: list[dict[str, Any]] = []
    for i in range(4):
        specs.append(
            {
                "name": f"cloud-{i}",
                "labels": {
                    "kubernetes.io/arch": "amd64",
                    "spantrain.io/tier": "cloud",
                    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
                    "nvidia.com/gpu.memory": "81920",
                    "nvidia.com/gpu.count": "8",
                    "spantrain.io/bandwidth-mbps": "10000",
                    "spantrain.io/latency-ms": "1",
                    "spantrain.io/compute-tflops": "2496",
                },
                "allocatable": {"cpu": "96", "memory": "1Ti", "nvidia.com/gpu": "8", "pods": "110"},
            }
        )
    for i in range(8):
        specs.append(
            {
                "name": f"edge-{i}",
                "labels": {
                    "kubernetes.io/arch": "arm64",
                    "node-role.kubernetes.io/edge": "",
                    "spantrain.io/tier": "edge",
                    "nvidia.com/gpu.product": "NVIDIA-Jetson-AGX-Orin",
                    "nvidia.com/gpu.memory": "32768",
                    "nvidia.com/gpu.count": "1",
                    "spantrain.io/bandwidth-mbps": str(100 + 50 * i),
                    "spantrain.io/latency-ms": str(10 + i),
                    "spantrain.io/compute-tflops": "275",
                },
                "allocatable": {
                    "cpu": "12",
                    "memory": "32Gi",
                    "nvidia.com/gpu": "1",
                    "pods": "110",
                },
            }
        )
    for i in range(8):
        arch = "arm64" if i % 2 else "amd64"
        specs.append(
            {
                "name": f"end-{i}",
                "labels": {
                    "kubernetes.io/arch": arch,
                    "node.kubernetes.io/instance-type": "k3s",
                    "spantrain.io/tier": "end",
                    "spantrain.io/bandwidth-mbps": str(10 + 5 * i),
                    "spantrain.io/latency-ms": str(40 + 5 * i),
                    "spantrain.io/compute-tflops": "1.5" if arch == "arm64" else "3",
                },
                "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            }
        )
    return specs


@pytest.fixture(scope="module")
def cee_nodes(control_plane: ClusterHelpers, kube_api: k8s_client.ApiClient) -> Iterator[list[str]]:
    specs = cee_node_specs()
    names = control_plane.add_nodes(specs)
    control_plane.wait_nodes_ready(names, timeout=60)
    yield names
    core = k8s_client.CoreV1Api(kube_api)
    for name in names:
        try:
            core.delete_node(name)
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def namespace(control_plane: ClusterHelpers, kube_api: k8s_client.ApiClient) -> Iterator[str]:
    name = f"spantrain-t-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    yield name
    k8s_client.CoreV1Api(kube_api).delete_namespace(name)


def fake_pod(
    name: str,
    *,
    node: str | None = None,
    annotations: dict[str, str] | None = None,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "trainer",
                "image": FAKE_IMAGE,
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
            }
        ],
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
    }
    if node is not None:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": [node],
                                }
                            ]
                        }
                    ]
                }
            }
        }
    meta: dict[str, Any] = {"name": name, "annotations": annotations or {}}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def pod_phase(core: k8s_client.CoreV1Api, name: str, ns: str) -> str | None:
    pod = core.read_namespaced_pod(name, ns)
    return pod.status.phase if pod.status else None


# --------------------------------------------------------------------------------------------
# tests


def test_apiserver_healthy_and_pinned_version(
    control_plane: ClusterHelpers, kube_api: k8s_client.ApiClient
) -> None:
    body = kube_api.call_api(
        "/readyz",
        "GET",
        response_type="str",
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
    )
    assert body == "ok"
    version = k8s_client.VersionApi(kube_api).get_code()
    if getattr(control_plane, "started_here", False):
        assert version.git_version == pinned_versions()["KVER"]
        assert version.minor == pinned_versions()["KVER"].split(".")[1]
        bin_dir = control_plane.bin_dir  # type: ignore[attr-defined]
        out = subprocess.run(
            [str(bin_dir / "kubectl"), "version", "-o", "json"],
            env=control_plane.env(),
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        info = json.loads(out)
        assert info["serverVersion"]["gitVersion"] == pinned_versions()["KVER"]
        assert info["clientVersion"]["gitVersion"] == pinned_versions()["KVER"]


def test_cee_kwok_nodes_become_ready(cee_nodes: list[str], kube_api: k8s_client.ApiClient) -> None:
    assert len(cee_nodes) == 20
    core = k8s_client.CoreV1Api(kube_api)
    nodes = {n.metadata.name: n for n in core.list_node(label_selector="type=kwok").items}
    assert set(cee_nodes) <= set(nodes)
    by_tier: dict[str, int] = {}
    for name in cee_nodes:
        node = nodes[name]
        ready = [c for c in node.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True", name
        tier = node.metadata.labels["spantrain.io/tier"]
        by_tier[tier] = by_tier.get(tier, 0) + 1
        for key in (
            "spantrain.io/bandwidth-mbps",
            "spantrain.io/latency-ms",
            "spantrain.io/compute-tflops",
            "kubernetes.io/arch",
        ):
            assert key in node.metadata.labels, (name, key)
    assert by_tier == {"cloud": 4, "edge": 8, "end": 8}
    cloud = nodes["cloud-0"]
    assert cloud.status.allocatable["nvidia.com/gpu"] == "8"
    assert cloud.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    edge = core.list_node(label_selector="node-role.kubernetes.io/edge").items
    assert sorted(n.metadata.name for n in edge) == [f"edge-{i}" for i in range(8)]
    k3s = core.list_node(label_selector="node.kubernetes.io/instance-type=k3s").items
    assert len(k3s) == 8
    arm = core.list_node(label_selector="kubernetes.io/arch=arm64,type=kwok").items
    assert len(arm) == 8 + 4


def test_pod_with_node_affinity_is_scheduled_and_runs(
    cee_nodes: list[str], namespace: str, kube_api: k8s_client.ApiClient
) -> None:
    core = k8s_client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, fake_pod("affine", node="edge-3"))
    wait_for(lambda: pod_phase(core, "affine", namespace) == "Running", 60, "pod Running")
    pod = core.read_namespaced_pod("affine", namespace)
    assert pod.spec.node_name == "edge-3"
    assert pod.status.pod_ip and pod.status.pod_ip.startswith("10.244.")
    conds = {c.type: c.status for c in pod.status.conditions}
    assert conds.get("PodScheduled") == "True" and conds.get("Ready") == "True"
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=affine")
    assert any(e.reason == "Scheduled" for e in events.items)


def test_gpu_request_lands_on_a_cloud_node(
    cee_nodes: list[str], namespace: str, kube_api: k8s_client.ApiClient
) -> None:
    core = k8s_client.CoreV1Api(kube_api)
    pod = fake_pod("gpu8")
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "8"}}
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: pod_phase(core, "gpu8", namespace) == "Running", 60, "pod Running")
    node = core.read_namespaced_pod("gpu8", namespace).spec.node_name
    assert node.startswith("cloud-"), node  # only the cloud tier has 8 GPUs per node


def test_kwok_pod_forced_failed_via_status_subresource(
    cee_nodes: list[str], namespace: str, kube_api: k8s_client.ApiClient
) -> None:
    core = k8s_client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, fake_pod("doomed", node="cloud-1"))
    wait_for(lambda: pod_phase(core, "doomed", namespace) == "Running", 60, "pod Running")
    mark_pod_failed(kube_api, "doomed", namespace, reason="OOMKilled", exit_code=137)
    time.sleep(2)  # KWOK must not flip it back
    pod = core.read_namespaced_pod("doomed", namespace)
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 137 and term.reason == "OOMKilled"


def test_kwok_pod_forced_failed_via_annotation(
    cee_nodes: list[str], namespace: str, kube_api: k8s_client.ApiClient
) -> None:
    core = k8s_client.CoreV1Api(kube_api)
    pod = fake_pod("flaky", node="end-2", annotations={KWOK_FAIL_ANNOTATION: "1s"})
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: pod_phase(core, "flaky", namespace) == "Failed", 60, "pod Failed")
    status = core.read_namespaced_pod("flaky", namespace).status
    assert status.pod_ip  # it did run first
    assert status.container_statuses[0].state.terminated.exit_code == 1

    # annotating a pod that is already Running works too
    core.create_namespaced_pod(namespace, fake_pod("late", node="end-3"))
    wait_for(lambda: pod_phase(core, "late", namespace) == "Running", 60, "pod Running")
    core.patch_namespaced_pod(
        "late", namespace, {"metadata": {"annotations": {KWOK_FAIL_ANNOTATION: "0s"}}}
    )
    wait_for(lambda: pod_phase(core, "late", namespace) == "Failed", 60, "late pod Failed")


def test_owned_pod_is_garbage_collected(
    cee_nodes: list[str], namespace: str, kube_api: k8s_client.ApiClient
) -> None:
    core = k8s_client.CoreV1Api(kube_api)
    cm = core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "owner"}, "data": {"k": "v"}}
    )
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": cm.metadata.uid}
    core.create_namespaced_pod(namespace, fake_pod("owned", node="end-5", owner=owner))
    wait_for(lambda: pod_phase(core, "owned", namespace) == "Running", 60, "pod Running")
    core.delete_namespaced_config_map("owner", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("owned", namespace)
        except ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_for(gone, 60, "garbage collector to delete the owned pod")


def test_job_completes_on_kwok_node(
    cee_nodes: list[str], namespace: str, kube_api: k8s_client.ApiClient
) -> None:
    batch = k8s_client.BatchV1Api(kube_api)
    job = {
        "metadata": {"name": "train"},
        "spec": {"backoffLimit": 0, "template": {"spec": fake_pod("x", node="cloud-2")["spec"]}},
    }
    batch.create_namespaced_job(namespace, job)

    def succeeded() -> bool:
        st = batch.read_namespaced_job_status("train", namespace).status
        return bool(st and st.succeeded == 1)

    wait_for(succeeded, 90, "Job succeeded")
    pods = (
        k8s_client.CoreV1Api(kube_api)
        .list_namespaced_pod(namespace, label_selector="job-name=train")
        .items
    )
    assert [p.spec.node_name for p in pods] == ["cloud-2"]

    # a Job whose pod KWOK fails ends Failed (backoffLimit 0)
    bad = fake_pod("x", node="cloud-3", annotations={KWOK_FAIL_ANNOTATION: "0s"})
    template = {"metadata": {"annotations": bad["metadata"]["annotations"]}, "spec": bad["spec"]}
    batch.create_namespaced_job(
        namespace,
        {"metadata": {"name": "train-bad"}, "spec": {"backoffLimit": 0, "template": template}},
    )

    def job_failed() -> bool:
        st = batch.read_namespaced_job_status("train-bad", namespace).status
        conds = (st.conditions or []) if st else []
        return any(c.type == "Failed" and c.status == "True" for c in conds)

    wait_for(job_failed, 90, "Job failed")


def test_service_account_token_controller(namespace: str, kube_api: k8s_client.ApiClient) -> None:
    core = k8s_client.CoreV1Api(kube_api)
    wait_for(
        lambda: _exists(lambda: core.read_namespaced_config_map("kube-root-ca.crt", namespace)),
        30,
        "kube-root-ca.crt ConfigMap",
    )
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {
                "name": "legacy-token",
                "annotations": {"kubernetes.io/service-account.name": "default"},
            },
            "type": "kubernetes.io/service-account-token",
        },
    )

    def token() -> str | None:
        data = core.read_namespaced_secret("legacy-token", namespace).data or {}
        return data.get("token")

    jwt = base64.b64decode(wait_for(token, 30, "SA token controller to fill the secret"))
    assert jwt.count(b".") == 2
    req = core.create_namespaced_service_account_token(
        "default", namespace, {"spec": {"expirationSeconds": 600}}
    )
    assert req.status.token.count(".") == 2


def _exists(read: Callable[[], object]) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def test_helm_works(
    k8s_bin_dir: Path,
    control_plane: ClusterHelpers,
    namespace: str,
    tmp_path: Path,
    kube_api: k8s_client.ApiClient,
) -> None:
    helm = k8s_bin_dir / "helm"
    env = control_plane.env()
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(tmp_path / var.lower())
    out = subprocess.run(
        [str(helm), "version", "--short"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert out.startswith(pinned_versions()["HELM_VER"])

    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: smoke\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n"
        "data:\n  tier: {{ .Values.tier | quote }}\n"
    )
    (chart / "values.yaml").write_text("tier: edge\n")
    subprocess.run(
        [str(helm), "install", "smoke", str(chart), "-n", namespace, "--wait", "--timeout", "60s"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=90,
    )
    cm = k8s_client.CoreV1Api(kube_api).read_namespaced_config_map("smoke-cm", namespace)
    assert cm.data == {"tier": "edge"}
