"""The operator against a real control plane (kube-apiserver + etcd + KCM + scheduler + KWOK).

Each test runs the operator in-process (``kopf.testing.KopfRunner``) on its own namespace and
drives a SpanTrainJob through one behaviour: plan -> pods -> Running, restart after a failed
worker, re-plan after a lost node, suspend/resume, operator restart without duplicates,
deletion, infeasible plans, and the API server's validation of good and bad manifests.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client as k8s_client
from kubernetes.client.rest import ApiException
from stj_helpers import (
    DeletionGraces,
    condition,
    create_job,
    env_of,
    events_of,
    get_job,
    job_manifest,
    job_pods,
    live_pods,
    operator_args,
    patch_job,
    phase_is,
    wait_for,
)
from tests.cluster.controlplane import mark_pod_failed

from spantrain_planner.inputs.plan import Plan

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"


def _running(kube_api: Any, ns: str, name: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: phase_is(kube_api, ns, name, "Running"), timeout,
                    f"{name} Running")


def _plan(kube_api: Any, ns: str, job: dict[str, Any]) -> Plan:
    cm = k8s_client.CoreV1Api(kube_api).read_namespaced_config_map(
        job["status"]["plan"]["configMap"], ns
    )
    return Plan.model_validate_json(cm.data["plan.json"])


def test_apply_plans_creates_pods_and_runs(kube_api: Any, namespace: str, operator: KopfRunner
                                           ) -> None:
    ns = namespace
    create_job(kube_api, ns, job_manifest("gpt", model={"preset": "gpt2-small"},
                                          training={"globalBatch": 64, "steps": 100}))
    job = _running(kube_api, ns, "gpt")
    st = job["status"]
    summary = st["plan"]
    assert summary["numStages"] >= 1
    assert summary["numDevices"] == len(live_pods(kube_api, ns, "gpt"))
    assert summary["predictedSamplesPerSecond"] > 0 and summary["bottleneck"]
    assert condition(job, "Planned")["status"] == "True"
    assert condition(job, "Planned")["observedGeneration"] == job["metadata"]["generation"]
    assert condition(job, "Running")["status"] == "True"
    assert st["ready"] == f"{summary['numDevices']}/{summary['numDevices']}"
    assert [s["ready"] for s in st["stages"]] == [s["replicas"] for s in summary["stages"]]

    plan = _plan(kube_api, ns, job)
    assert plan.digest() == summary["hash"]
    pods = {int(p.metadata.labels["spantrain.io/rank"]): p for p in live_pods(kube_api, ns, "gpt")}
    assert sorted(pods) == list(range(plan.world_size))
    for stage in plan.stages:
        for device in stage.devices:
            pod = pods[device.rank]
            assert pod.spec.node_name == device.node  # on the planned node
            assert pod.status.phase == "Running"
            env = env_of(pod)
            assert env["RANK"] == str(device.rank) == env["PET_NODE_RANK"]
            assert env["WORLD_SIZE"] == str(plan.world_size) == env["PET_NNODES"]
            assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"]
            assert env["MASTER_ADDR"].startswith("gpt-a0-r0.gpt.")
            assert env["MASTER_PORT"] == "29500"
            assert env["LOCAL_RANK"] == "0"
            assert env["SPANTRAIN_STAGE_INDEX"] == str(stage.stage_index)
            assert env["SPANTRAIN_NUM_STAGES"] == str(plan.pp_degree)
            assert env["SPANTRAIN_PLAN_HASH"] == summary["hash"]
            assert env["SPANTRAIN_PLAN"] == "/etc/spantrain/plan/plan.json"
            limits = pod.spec.containers[0].resources.limits or {}
            assert limits.get("nvidia.com/gpu") == ("1" if device.accelerator != "cpu" else None)
            assert pod.spec.containers[0].args == ["worker"]  # through the image's tini
            mount = pod.spec.containers[0].volume_mounts[0]
            assert mount.read_only and mount.mount_path == "/etc/spantrain/plan"
            ref = pod.metadata.owner_references[0]
            assert ref.kind == "SpanTrainJob" and ref.uid == job["metadata"]["uid"]
    svc = k8s_client.CoreV1Api(kube_api).read_namespaced_service("gpt", ns)
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses
    reasons = events_of(kube_api, ns, "gpt")
    assert "PlanComputed" in reasons and "StagePodCreated" in reasons
    # nothing listens on KWOK's fake pods: no progress, and no error from trying to read it
    assert "progress" not in get_job(kube_api, ns, "gpt")["status"]


def test_failed_pod_restarts_job(kube_api: Any, namespace: str, operator: KopfRunner) -> None:
    ns = namespace
    create_job(kube_api, ns, job_manifest("fail", failurePolicy={"maxRestarts": 1}))
    _running(kube_api, ns, "fail")
    first = {p.metadata.name for p in live_pods(kube_api, ns, "fail")}
    victim = sorted(first)[-1]

    def restarted() -> dict[str, Any] | None:
        job = phase_is(kube_api, ns, "fail", "Running")
        return job if job and job["status"]["restarts"] == 1 else None

    with DeletionGraces(kube_api, ns, "fail") as deleted:
        mark_pod_failed(kube_api, victim, ns, exit_code=137, reason="OOMKilled")
        # the failed attempt's pods go at once, so the new attempt gets their GPUs right away
        job = wait_for(restarted, 60, "restart and Running again")
        wait_for(lambda: first <= deleted.graces.keys(), 30, "deletions seen")
    assert {deleted.graces[n] for n in first} == {0}
    assert job["status"]["attempt"] == 1
    names = {p.metadata.name for p in live_pods(kube_api, ns, "fail")}
    assert names and all("-a1-" in n for n in names)
    assert {"StagePodFailed", "Restarting"} <= set(events_of(kube_api, ns, "fail"))

    # a second failure is past maxRestarts=1: the job fails and running pods are cleaned up
    victim = sorted(live_pods(kube_api, ns, "fail"), key=lambda p: p.metadata.name)[0]
    mark_pod_failed(kube_api, victim.metadata.name, ns)
    job = wait_for(lambda: phase_is(kube_api, ns, "fail", "Failed"), 60, "Failed")
    assert job["status"]["reason"] == "MaxRestartsExceeded"
    assert condition(job, "Failed")["status"] == "True"
    wait_for(lambda: all(p.status.phase == "Failed" for p in live_pods(kube_api, ns, "fail"))
             or None, 30, "running pods cleaned up (cleanPodPolicy Running)")


def test_lost_node_replans_on_remaining_nodes(
    kube_api: Any, namespace: str, operator: KopfRunner, control_plane: Any
) -> None:
    ns = namespace
    # only the plain CPU nodes, so that deleting one does not disturb other tests
    sel = {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                                 "values": ["cpu-4", "cpu-5", "end-k3s-5"]}]}
    create_job(kube_api, ns, job_manifest("lost", placement=sel))
    job = _running(kube_api, ns, "lost")
    used = job["status"]["plan"]["nodes"]
    victim = used[-1]
    core = k8s_client.CoreV1Api(kube_api)
    node = core.read_node(victim)
    core.delete_node(victim)
    try:
        def replanned() -> dict[str, Any] | None:
            j = phase_is(kube_api, ns, "lost", "Running")
            return j if j and j["status"]["replans"] == 1 else None

        job = wait_for(replanned, 60, "re-plan and Running")
        assert victim not in job["status"]["plan"]["nodes"]
        assert job["status"]["plan"]["reason"] == "NodeLost"
        assert all(p.spec.node_name != victim for p in live_pods(kube_api, ns, "lost"))
        assert job["status"]["restarts"] == 0
        assert {"NodeLost", "Replanning"} <= set(events_of(kube_api, ns, "lost"))
    finally:
        labels = dict(node.metadata.labels)
        control_plane.add_nodes([{"name": victim, "labels": labels,
                                  "allocatable": node.status.allocatable}])
        control_plane.wait_nodes_ready([victim])


def test_workers_stopping_for_a_replan_restart_on_a_plan_with_their_links(
    kube_api: Any, namespace: str, operator: KopfRunner
) -> None:
    from spantrain_planner.core import contract
    from spantrain_planner.passes.adapt import ReplanInputs, ReplanRequest

    ns = namespace
    sel = {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                                 "values": ["cpu-4", "cpu-5"]}]}
    create_job(kube_api, ns, job_manifest(
        "slowlink", placement=sel,
        training={"globalBatch": 16, "checkpoint": {"path": "/ckpt", "intervalSteps": 10}}))
    job = _running(kube_api, ns, "slowlink")
    cm = k8s_client.CoreV1Api(kube_api).read_namespaced_config_map(
        job["status"]["plan"]["configMap"], ns)
    inputs = ReplanInputs.model_validate_json(cm.data[contract.REPLAN_INPUTS_FILE])
    assert {n.name for n in inputs.cluster.nodes} == {"cpu-4", "cpu-5"}
    first = live_pods(kube_api, ns, "slowlink")
    assert all(env_of(p)[contract.REPLAN_INPUTS].endswith(contract.REPLAN_INPUTS_FILE)
               for p in first)
    request = ReplanRequest(step=30, gain=0.4, restart_seconds=8.0,
                            measured_links={"cpu-4->cpu-5": 12.5, "cpu-5->cpu-4": 11.0})
    for p in first:  # every worker checkpointed and stopped for the re-plan
        mark_pod_failed(kube_api, p.metadata.name, ns, exit_code=contract.REPLAN_EXIT_CODE,
                        message=request.model_dump_json(by_alias=True))

    def replanned() -> dict[str, Any] | None:
        j = phase_is(kube_api, ns, "slowlink", "Running")
        return j if j and j["status"]["replans"] == 1 else None

    job = wait_for(replanned, 60, "re-plan and Running")
    st = job["status"]
    assert st["restarts"] == 0 and st["attempt"] == 1
    assert st["plan"]["reason"] == "Replanned"
    assert {(x["a"], x["b"], x["bandwidthMbps"]) for x in st["measuredLinks"]} == {
        ("cpu-4", "cpu-5", 12.5), ("cpu-5", "cpu-4", 11.0)}
    entry = st["adaptations"][-1]
    assert entry["kind"] == "replan" and entry["step"] == 30 and entry["attempt"] == 0
    assert "Replanned" in events_of(kube_api, ns, "slowlink")
    names = {p.metadata.name for p in live_pods(kube_api, ns, "slowlink")}
    assert names and all("-a1-" in n for n in names)
    # the new plan was made with the measured links: its workers may re-plan from them
    cm = k8s_client.CoreV1Api(kube_api).read_namespaced_config_map(
        st["plan"]["configMap"], ns)
    again = ReplanInputs.model_validate_json(cm.data[contract.REPLAN_INPUTS_FILE])
    matrix = {(e.a, e.b): e.bandwidth_mbps for e in again.cluster.links.matrix}
    assert matrix == {("cpu-4", "cpu-5"): 12.5, ("cpu-5", "cpu-4"): 11.0}


def test_suspend_deletes_pods_keeps_plan_and_resumes(
    kube_api: Any, namespace: str, operator: KopfRunner
) -> None:
    ns = namespace
    create_job(kube_api, ns, job_manifest("sus"))
    job = _running(kube_api, ns, "sus")
    plan_hash = job["status"]["plan"]["hash"]
    first = {p.metadata.name for p in live_pods(kube_api, ns, "sus")}
    with DeletionGraces(kube_api, ns, "sus") as deleted:
        patch_job(kube_api, ns, "sus", {"suspend": True})
        job = wait_for(lambda: phase_is(kube_api, ns, "sus", "Suspended"), 30, "Suspended")
        wait_for(lambda: not job_pods(kube_api, ns, "sus") or None, 30, "pods deleted")
        # the watch runs on its own thread: let it catch up with every deletion
        wait_for(lambda: first <= deleted.graces.keys(), 30, "deletions seen")
    # healthy workers stop with the operator's grace period (1 s in these tests)
    assert {deleted.graces[n] for n in first} == {1}
    assert job["status"]["plan"]["hash"] == plan_hash
    assert condition(job, "Suspended")["status"] == "True"
    patch_job(kube_api, ns, "sus", {"suspend": False})
    job = _running(kube_api, ns, "sus")
    assert job["status"]["plan"]["hash"] == plan_hash
    assert condition(job, "Suspended")["reason"] == "Resumed"


def test_operator_restart_mid_reconcile_no_duplicates(
    kube_api: Any, namespace: str, crd_installed: None, cee_nodes: list[str],
    kubeconfig_env: None,
) -> None:
    ns = namespace
    with KopfRunner(operator_args(ns), timeout=60):
        create_job(kube_api, ns, job_manifest("rs", model={"preset": "gpt2-small"},
                                              training={"globalBatch": 64}))
        # stop as soon as the first pods exist: mid-creation
        wait_for(lambda: live_pods(kube_api, ns, "rs"), 60, "first pods")
    first = {p.metadata.name for p in live_pods(kube_api, ns, "rs")}
    job = get_job(kube_api, ns, "rs")
    # and once more, restarted twice in quick succession
    with KopfRunner(operator_args(ns), timeout=60):
        time.sleep(1.0)
    with KopfRunner(operator_args(ns), timeout=60):
        job = _running(kube_api, ns, "rs")
        time.sleep(2 * 2.0)  # a few more timer ticks
        pods = live_pods(kube_api, ns, "rs")
    names = [p.metadata.name for p in pods]
    assert len(names) == len(set(names)) == job["status"]["plan"]["numDevices"]
    assert first <= set(names)  # nothing recreated or orphaned
    assert all(p.metadata.owner_references[0].uid == job["metadata"]["uid"] for p in pods)


def test_deletion_leaves_nothing(kube_api: Any, namespace: str, operator: KopfRunner) -> None:
    ns = namespace
    create_job(kube_api, ns, job_manifest("gone"))
    _running(kube_api, ns, "gone")
    k8s_client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(
        "spantrain.io", "v1alpha1", ns, "spantrainjobs", "gone"
    )
    core = k8s_client.CoreV1Api(kube_api)

    def empty() -> bool:
        sel = "spantrain.io/job-name=gone"
        return not (core.list_namespaced_pod(ns, label_selector=sel).items
                    or core.list_namespaced_config_map(ns, label_selector=sel).items
                    or core.list_namespaced_service(ns, label_selector=sel).items)

    wait_for(empty, 60, "garbage collection of pods, ConfigMaps and the Service")
    assert get_job(kube_api, ns, "gone") is None


def test_infeasible_job_fails_with_plan_infeasible(
    kube_api: Any, namespace: str, operator: KopfRunner
) -> None:
    ns = namespace
    # GPT-2 medium on two small arm64 boards cannot fit in memory
    sel = {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                                 "values": ["edge-arm-0", "edge-arm-1"]}]}
    create_job(kube_api, ns, job_manifest("huge", model={"preset": "gpt2-medium"},
                                          training={"globalBatch": 512}, placement=sel))
    job = wait_for(lambda: phase_is(kube_api, ns, "huge", "Failed"), 60, "Failed")
    assert job["status"]["reason"] == "PlanInfeasible"
    cond = condition(job, "Failed")
    assert cond["reason"] == "PlanInfeasible" and cond["message"]
    assert condition(job, "Planned")["status"] == "False"
    assert not live_pods(kube_api, ns, "huge")
    assert "PlanInfeasible" in events_of(kube_api, ns, "huge")



def test_child_refused_by_the_api_server_fails_the_job(
    kube_api: Any, namespace: str, operator: KopfRunner
) -> None:
    """A child the API server refuses (here a ResourceQuota forbids pods, 403) fails the job
    with InvalidSpec and the server's message after a few backed-off tries: never silent,
    never a hot retry loop."""
    from prometheus_client import REGISTRY

    ns = namespace
    core = k8s_client.CoreV1Api(kube_api)
    core.create_namespaced_resource_quota(ns, {
        "metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}})
    refused = {"reason": "Refused"}
    before = REGISTRY.get_sample_value("spantrain_operator_reconcile_errors_total", refused) or 0
    t0 = time.monotonic()
    create_job(kube_api, ns, job_manifest("refused"))
    job = wait_for(lambda: phase_is(kube_api, ns, "refused", "Failed"), 30, "Failed")
    took = time.monotonic() - t0
    calls = (REGISTRY.get_sample_value("spantrain_operator_reconcile_errors_total", refused)
             or 0) - before
    # (KopfRunner swaps sys.stdout while the operator runs)
    print(f"\nchild refused: Failed/{job['status']['reason']} after {took:.1f} s and "
          f"{calls:.0f} refused creation(s)", file=sys.__stdout__)
    assert job["status"]["reason"] == "InvalidSpec"
    message = job["status"]["message"]
    assert "refused Pod" in message and "exceeded quota" in message and "403" in message
    assert condition(job, "Failed")["reason"] == "InvalidSpec"
    assert 1 <= calls <= 3, calls
    time.sleep(3)  # and it stays failed, with no further tries
    again = (REGISTRY.get_sample_value("spantrain_operator_reconcile_errors_total", refused)
             or 0) - before
    assert again == calls
    assert get_job(kube_api, ns, "refused")["status"]["phase"] == "Failed"
    assert "InvalidSpec" in events_of(kube_api, ns, "refused")


def test_job_without_eligible_nodes_waits_then_starts(
    kube_api: Any, namespace: str, operator: KopfRunner, control_plane: Any
) -> None:
    """No node matches: the job waits Pending (as a pod would), and starts once one joins."""
    ns = namespace
    create_job(kube_api, ns, job_manifest(
        "nowhere", placement={"nodeSelector": {"spantrain.io/tier": "moon"}}))

    def waiting() -> dict[str, Any] | None:
        job = phase_is(kube_api, ns, "nowhere", "Pending")
        return job if job and job["status"].get("reason") == "NoEligibleNodes" else None

    job = wait_for(waiting, 60, "Pending with reason NoEligibleNodes")
    assert "no eligible node" in job["status"]["message"]
    assert condition(job, "Planned")["status"] == "False"
    assert "NoEligibleNodes" in events_of(kube_api, ns, "nowhere")
    names = control_plane.add_nodes([{
        "name": "moon-0", "labels": {"spantrain.io/tier": "moon"},
        "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"}}])
    try:
        control_plane.wait_nodes_ready(names, timeout=60)
        job = wait_for(lambda: phase_is(kube_api, ns, "nowhere", "Running"), 90, "Running")
        assert condition(job, "Planned")["status"] == "True"
    finally:
        k8s_client.CoreV1Api(kube_api).delete_node("moon-0")


# --------------------------------------------------------------------------------------------
# validation by the real API server


def _create_yaml(kube_api: Any, ns: str, path: Path) -> None:
    body = yaml.safe_load(path.read_text())
    k8s_client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        "spantrain.io", "v1alpha1", ns, "spantrainjobs", body,
        field_validation="Strict", dry_run="All",
    )


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_accepted(kube_api: Any, namespace: str, crd_installed: None, path: Path) -> None:
    _create_yaml(kube_api, namespace, path)


def _wrong_field(path: Path) -> str:
    """The field named in the manifest's leading comment (``spec.x.y`` or ``metadata.name``)."""
    import re

    comment = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    match = re.search(r"((?:spec|metadata)\.[A-Za-z.]+[A-Za-z])", comment)
    assert match, f"{path.name}: the comment must name the wrong field"
    return match.group(1)


@pytest.mark.parametrize("path", sorted((EXAMPLES / "invalid").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_malformed_rejected_naming_the_field(
    kube_api: Any, namespace: str, crd_installed: None, path: Path
) -> None:
    with pytest.raises(ApiException) as info:
        _create_yaml(kube_api, namespace, path)
    err = info.value
    assert err.status in (400, 422)
    text = err.body if isinstance(err.body, str) else json.dumps(err.body)
    field = _wrong_field(path)
    # the message names the field or its parent object (CEL rules on an object report it)
    parts = field.split(".")
    candidates = {".".join(parts[:k]) for k in range(2, len(parts) + 1)}
    candidates |= {parts[-1]}
    assert any(c in text for c in candidates), f"{path.name}: {field} not in {text}"


def test_immutable_fields(kube_api: Any, namespace: str, crd_installed: None) -> None:
    ns = namespace
    create_job(kube_api, ns, job_manifest("imm", runPolicy={"activeDeadlineSeconds": 3600}))
    for change, word in (({"model": {"preset": "gpt-tiny"}}, "model is immutable"),
                         ({"runPolicy": {"activeDeadlineSeconds": 60}}, "activeDeadlineSeconds")):
        with pytest.raises(ApiException) as info:
            patch_job(kube_api, ns, "imm", change)
        assert word in str(info.value.body)
    patch_job(kube_api, ns, "imm", {"suspend": True})  # mutable fields stay mutable


# --------------------------------------------------------------------------------------------
# measured facts (the profiler's node annotations)


def test_fresh_measurements_win_over_labels_and_expired_ones_do_not(
    kube_api: Any, namespace: str, operator: KopfRunner, control_plane: Any
) -> None:
    """Three nodes labelled 1 TFLOP/s each; one carries a fresh profiler measurement of 8,
    one an expired measurement of 8. The plan gives the fresh one most of the work and treats
    the expired one as its label says."""
    ns = namespace
    now = datetime.now(UTC)

    def profile(age: timedelta) -> str:
        return json.dumps({"computeTflops": 8.0, "layerOverheadUs": 50.0,
                           "measuredAt": (now - age).strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "source": "spantrain profile-cluster"})

    labels = {"spantrain.io/tier": "lab", "spantrain.io/compute-tflops": "1"}
    alloc = {"cpu": "8", "memory": "16Gi", "pods": "110"}
    names = control_plane.add_nodes([
        {"name": "lab-fresh", "labels": labels, "allocatable": alloc,
         "annotations": {"spantrain.io/profile": profile(timedelta(minutes=5))}},
        {"name": "lab-stale", "labels": labels, "allocatable": alloc,
         "annotations": {"spantrain.io/profile": profile(timedelta(days=3))}},
        {"name": "lab-plain", "labels": labels, "allocatable": alloc},
    ])
    try:
        control_plane.wait_nodes_ready(names, timeout=60)
        create_job(kube_api, ns, job_manifest(
            "measured", placement={"nodeSelector": {"spantrain.io/tier": "lab"}}))
        plan = _plan(kube_api, ns, _running(kube_api, ns, "measured", 90))
        work = dict.fromkeys(names, 0)
        for stage in plan.stages:
            for d in stage.devices:
                work[d.node] += (stage.layer_end - stage.layer_start) * d.microbatch_share
        print(f"\nwork (layers x rows) per node: {work}")
        assert work["lab-fresh"] > 2 * max(work["lab-stale"], work["lab-plain"]), work
    finally:
        for n in names:
            k8s_client.CoreV1Api(kube_api).delete_node(n)
