"""Fixtures for the operator's integration tests: a real control plane with KWOK nodes shaped
like the paper's CEE testbed (``stj_helpers.cee_node_specs``), the generated CRD installed,
and the operator running in-process through ``kopf.testing.KopfRunner`` on a fresh namespace.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tests.cluster is imported by path from the repository root
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# fast fake cluster: reconcile every second, delete fake workers with a 1 s grace period
os.environ.setdefault("SPANTRAIN_RECONCILE_INTERVAL", "1")
os.environ.setdefault("SPANTRAIN_POD_DELETE_GRACE_SECONDS", "1")

import yaml  # noqa: E402
from kopf.testing import KopfRunner  # noqa: E402
from kubernetes import client as k8s_client  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402
from stj_helpers import (  # noqa: E402
    GROUP,
    PLURAL,
    VERSION,
    cee_node_specs,
    operator_args,
    wait_for,
)
from tests.cluster.controlplane import ClusterHelpers  # noqa: E402
from tests.cluster.fixtures import control_plane, k8s_bin_dir, kube_api  # noqa: E402, F401

from spantrain_planner.api import crd  # noqa: E402


@pytest.fixture(scope="session")
def crd_installed(control_plane: ClusterHelpers, kube_api: k8s_client.ApiClient) -> None:  # noqa: F811
    ext = k8s_client.ApiextensionsV1Api(kube_api)
    body = yaml.safe_load(crd.render_crd_yaml())
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as err:
        if err.status != 409:
            raise
        current = ext.read_custom_resource_definition(body["metadata"]["name"])
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(body["metadata"]["name"], body)

    def established() -> bool:
        obj = ext.read_custom_resource_definition(body["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True"
                   for c in (obj.status.conditions or []))

    wait_for(established, 30, "CRD Established")
    # the API server's discovery needs a moment before custom objects can be created
    custom = k8s_client.CustomObjectsApi(kube_api)
    wait_for(lambda: _can_list(custom), 30, "SpanTrainJob served")


def _can_list(custom: k8s_client.CustomObjectsApi) -> bool:
    try:
        custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        return True
    except ApiException:
        return False


@pytest.fixture(scope="session")
def cee_nodes(control_plane: ClusterHelpers, kube_api: k8s_client.ApiClient) -> list[str]:  # noqa: F811
    specs = cee_node_specs()
    core = k8s_client.CoreV1Api(kube_api)
    existing = {n.metadata.name for n in core.list_node().items}
    names = control_plane.add_nodes([s for s in specs if s["name"] not in existing])
    names = [s["name"] for s in specs]
    control_plane.wait_nodes_ready(names, timeout=90)
    return names


@pytest.fixture(scope="session")
def kubeconfig_env(control_plane: ClusterHelpers) -> Iterator[None]:  # noqa: F811
    """KUBECONFIG for the in-process operator (kopf and the Kubernetes client read it)."""
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(control_plane.kubeconfig)
    yield
    if old is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = old


@pytest.fixture
def namespace(control_plane: ClusterHelpers, kube_api: k8s_client.ApiClient) -> Iterator[str]:  # noqa: F811
    name = f"stj-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    yield name
    core = k8s_client.CoreV1Api(kube_api)
    # force-delete the pods first: fake GPUs are scarce and a graceful delete holds them
    for pod in core.list_namespaced_pod(name).items:
        with contextlib.suppress(ApiException):
            core.delete_namespaced_pod(pod.metadata.name, name, grace_period_seconds=0)
    # the operator of this namespace is gone: drop kopf's finalizer so the namespace can go
    custom = k8s_client.CustomObjectsApi(kube_api)
    for job in custom.list_namespaced_custom_object(GROUP, VERSION, name, PLURAL)["items"]:
        with contextlib.suppress(ApiException):
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, name, PLURAL, job["metadata"]["name"],
                {"metadata": {"finalizers": None}},
            )
    with contextlib.suppress(ApiException):
        core.delete_namespace(name)


@pytest.fixture
def operator(
    namespace: str, crd_installed: None, cee_nodes: list[str], kubeconfig_env: None
) -> Iterator[KopfRunner]:
    with KopfRunner(operator_args(namespace), timeout=60) as runner:
        yield runner
    assert runner.exception is None or isinstance(runner.exception, SystemExit), runner.output


