"""The Helm chart: ``helm lint``, ``helm template`` and ``helm install`` into the real control
plane (the helm binary is the one ``scripts/k8s-binaries`` builds next to kube-apiserver).

Checks that the chart ships the generated CRD, RBAC that grants what the operator does (asked
of the API server with SubjectAccessReviews for the chart's service account), a Deployment
running ``spantrain operator`` with the chosen flags, and that ``values.schema.json`` rejects
bad values with a message naming them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s_client
from kubernetes.client.rest import ApiException
from stj_helpers import wait_for

from spantrain_planner import api
from spantrain_planner.api import crd

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "helm" / "spantrain"
CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
RELEASE = "stj-chart"

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def helm(k8s_bin_dir: Path, control_plane: Any, tmp_path: Path) -> Helm:
    """Run the helm binary against the test cluster, with its caches in a temporary dir."""
    binary = k8s_bin_dir / "helm"
    env = {
        **os.environ,
        "KUBECONFIG": str(control_plane.kubeconfig),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    return run


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_lint_and_template(helm: Helm) -> None:
    lint = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in lint.stdout

    docs = _docs(helm("template", RELEASE, str(CHART), "--namespace", "spantrain-system").stdout)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "CustomResourceDefinition", "ClusterRole",
                            "ClusterRoleBinding", "Service", "Deployment"])
    (chart_crd,) = _by_kind(docs, "CustomResourceDefinition")
    generated = yaml.safe_load(crd.render_crd_yaml())
    assert chart_crd["spec"] == generated["spec"]  # the chart ships the generated CRD
    assert chart_crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (deploy,) = _by_kind(docs, "Deployment")
    assert deploy["metadata"]["namespace"] == "spantrain-system"
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["operator", "--all-namespaces", "--standalone"]
    assert "--metrics-port=8080" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SPANTRAIN_RECONCILE_INTERVAL"] == "2"
    assert container["image"] == env["SPANTRAIN_WORKER_IMAGE"] == (
        "ghcr.io/spantrain/spantrain:0.1.0")

    assert "SPANTRAIN_NETWORK_POLICY_SCRAPERS" not in env  # no NetworkPolicy by default
    (role,) = _by_kind(docs, "ClusterRole")
    assert any("networkpolicies" in r["resources"] and "create" in r["verbs"]
               for r in role["rules"])
    docs = _docs(helm("template", RELEASE, str(CHART), "--set", "networkPolicy.enabled=true")
                 .stdout)
    (deploy,) = _by_kind(docs, "Deployment")
    env = {e["name"]: e.get("value") for e in
           deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["SPANTRAIN_NETWORK_POLICY_SCRAPERS"]) == [{
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]

    # namespaced, two replicas with peering, no metrics, no CRD
    docs = _docs(helm(
        "template", RELEASE, str(CHART), "--set", "clusterWide=false",
        "--set", "watchNamespaces={ml,research}", "--set", "replicaCount=2",
        "--set", "peering.enabled=true", "--set", "metrics.enabled=false",
        "--set", "crds.install=false",
    ).stdout)
    (deploy,) = _by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--namespace=ml", "--namespace=research", "--peering=spantrain",
            "--metrics-port=0"} <= set(args)
    assert "--all-namespaces" not in args and "--standalone" not in args
    # kopf's peering CRDs, and not SpanTrain's
    assert {d["metadata"]["name"] for d in _by_kind(docs, "CustomResourceDefinition")} == {
        "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}


@pytest.mark.parametrize(("setting", "named"), [
    ("replicaCount=-1", "replicaCount"),
    ("logLevel=loud", "logLevel"),
    ("metrics.port=70000", "metrics.port"),
    ("reconcileInterval=0", "reconcileInterval"),
    ("image.pullPolicy=Sometimes", "image.pullPolicy"),
    ("noSuchValue=1", "noSuchValue"),
])
def test_schema_rejects_bad_values(helm: Helm, setting: str, named: str) -> None:
    proc = helm("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert named.split(".")[-1] in proc.stderr, proc.stderr


def _allowed(auth: k8s_client.AuthorizationV1Api, user: str, verb: str, resource: str,
             group: str = "", subresource: str = "", namespace: str = "default") -> bool:
    review = auth.create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "resourceAttributes": {
            "verb": verb, "resource": resource, "group": group, "subresource": subresource,
            "namespace": namespace}},
    })
    return bool(review.status.allowed)


def _adopt_crd(ext: k8s_client.ApiextensionsV1Api, namespace: str) -> None:
    """Let the release take over a CRD that other tests installed without Helm (Helm adopts
    an object that carries its ownership label and annotations)."""
    with contextlib.suppress(ApiException):
        ext.patch_custom_resource_definition(CRD_NAME, {"metadata": {
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": RELEASE,
                            "meta.helm.sh/release-namespace": namespace},
        }})


def test_install_into_the_cluster(helm: Helm, kube_api: Any, namespace: str) -> None:
    ext = k8s_client.ApiextensionsV1Api(kube_api)
    rbac = k8s_client.RbacAuthorizationV1Api(kube_api)
    apps = k8s_client.AppsV1Api(kube_api)
    core = k8s_client.CoreV1Api(kube_api)
    _adopt_crd(ext, namespace)
    helm("install", RELEASE, str(CHART), "--namespace", namespace,
         "--set", "workerImage=registry.local/spantrain-worker:test")
    try:
        status = helm("status", RELEASE, "--namespace", namespace).stdout
        assert "STATUS: deployed" in status

        obj = ext.read_custom_resource_definition(CRD_NAME)
        assert obj.spec.names.short_names == list(api.SHORT_NAMES)
        assert obj.metadata.annotations["meta.helm.sh/release-name"] == RELEASE
        wait_for(lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(CRD_NAME).status.conditions or []
        ), 30, "CRD Established")

        role = rbac.read_cluster_role("spantrain-operator")
        assert any("spantrainjobs/status" in (r.resources or []) for r in role.rules)
        binding = rbac.read_cluster_role_binding("spantrain-operator")
        (subject,) = binding.subjects
        assert subject.name == "spantrain-operator" and subject.namespace == namespace
        core.read_namespaced_service_account("spantrain-operator", namespace)
        core.read_namespaced_service("spantrain-operator-metrics", namespace)

        # what the operator does, asked of the API server's authorizer
        auth = k8s_client.AuthorizationV1Api(kube_api)
        sa = f"system:serviceaccount:{namespace}:spantrain-operator"
        for verb, resource, group, sub in [
            ("watch", "spantrainjobs", api.GROUP, ""),
            ("patch", "spantrainjobs", api.GROUP, "status"),
            ("list", "nodes", "", ""),
            ("create", "pods", "", ""),
            ("delete", "pods", "", ""),
            ("create", "configmaps", "", ""),
            ("create", "services", "", ""),
            ("create", "events", "", ""),
        ]:
            assert _allowed(auth, sa, verb, resource, group, sub), f"{verb} {resource}"
        assert not _allowed(auth, sa, "delete", "nodes")  # least privilege
        assert not _allowed(auth, sa, "get", "secrets")

        deploy = apps.read_namespaced_deployment("spantrain-operator", namespace)
        (container,) = deploy.spec.template.spec.containers
        assert container.args[0] == "operator"
        env = {e.name: e.value for e in container.env}
        assert env["SPANTRAIN_WORKER_IMAGE"] == "registry.local/spantrain-worker:test"
        assert deploy.spec.template.spec.service_account_name == "spantrain-operator"
    finally:
        helm("uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "60s")
    # the CRD (and with it every job) outlives the release; the rest is gone
    ext.read_custom_resource_definition(CRD_NAME)
    with pytest.raises(ApiException) as info:
        rbac.read_cluster_role("spantrain-operator")
    assert info.value.status == 404
    assert not apps.list_namespaced_deployment(namespace).items
