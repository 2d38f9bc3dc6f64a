"""Rendering of the job's objects: ConfigMap, headless Service, one pod per device, PodGroup."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spantrain_operator import inventory, render
from spantrain_planner import api
from spantrain_planner.inputs.cluster import ClusterSpec, resolve
from spantrain_planner.inputs.plan import Plan
from spantrain_planner.inputs.profiles import preset
from spantrain_planner.passes.assemble import StageLayout, assemble

JOB = render.JobRef(name="gpt", namespace="ml", uid="uid-1")


def cluster() -> ClusterSpec:
    return ClusterSpec.model_validate({"nodes": [
        {"name": "cloud-0", "devices": [{"count": 2, "accelerator": "RTX-3090",
                                         "computeTflops": 18, "memoryBytes": "24Gi"}]},
        {"name": "edge-0", "tier": "edge", "arch": "arm64", "platform": "kubeedge",
         "devices": [{"computeTflops": 0.1, "memoryBytes": "8Gi"}]},
    ]})


def make_plan() -> Plan:
    """2 stages: layers 0-5 on both GPUs (shares 3+1), layers 5-8 on the edge CPU."""
    topo = resolve(cluster())
    layouts = [StageLayout(0, 5, (0, 1), (3, 1)), StageLayout(5, 8, (2,), (4,))]
    plan, _ = assemble(layouts, topo, preset("gpt-mini"), schedule="1f1b", num_microbatches=4)
    return plan


def facts() -> dict[str, inventory.NodeFacts]:
    def mk(name: str, labels: dict[str, str], taints: list[dict[str, str]], gpus: int) -> Any:
        return inventory.read_node({
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": taints},
            "status": {"allocatable": {"cpu": "8", "memory": "16Gi",
                                       **({"nvidia.com/gpu": str(gpus)} if gpus else {})},
                       "addresses": [{"type": "InternalIP", "address": f"10.0.0.{gpus}"}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        })

    return {
        "cloud-0": mk("cloud-0", {"kubernetes.io/arch": "amd64",
                                  "nvidia.com/gpu.product": "RTX-3090"}, [], 2),
        "edge-0": mk("edge-0", {"kubernetes.io/arch": "arm64", "node-role.kubernetes.io/edge": ""},
                     [{"key": "node-role.kubernetes.io/edge", "value": "",
                       "effect": "NoSchedule"}], 0),
    }


def spec(**kw: Any) -> api.SpanTrainJobSpec:
    data: dict[str, Any] = {"model": {"preset": "gpt-mini"}, "training": {"globalBatch": 16}}
    data.update(kw)
    return api.parse_spec(data)


def env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_one_pod_per_device_with_rendezvous_env() -> None:
    plan = make_plan()
    s = spec(rendezvous={"addressMode": "dns"}, images={"arm64": "img:arm"}, image="img:amd",
             env=[{"name": "EXTRA", "value": "1"}],
             training={"globalBatch": 16, "checkpoint": {"path": "/ck", "claimName": "pvc"}})
    pods = render.worker_pods(JOB, s, plan, facts(), attempt=2)
    assert [p["metadata"]["name"] for p in pods] == ["gpt-a2-r0", "gpt-a2-r1", "gpt-a2-r2"]
    e0, e2 = env(pods[0]), env(pods[2])
    assert e0["MASTER_ADDR"] == "gpt-a2-r0.gpt.ml.svc" == e2["PET_MASTER_ADDR"]
    assert (e0["RANK"], e2["RANK"], e2["WORLD_SIZE"], e2["PET_NNODES"]) == ("0", "2", "3", "3")
    assert e0["LOCAL_RANK"] == "0" and e0["MASTER_PORT"] == "29500"
    assert e0["SPANTRAIN_STAGE_INDEX"] == "0" and e2["SPANTRAIN_STAGE_INDEX"] == "1"
    assert e0["SPANTRAIN_NEXT_RANKS"] == "2" and e2["SPANTRAIN_PREV_RANKS"] == "0,1"
    assert e0["SPANTRAIN_PLAN_HASH"] == plan.digest() and e0["EXTRA"] == "1"
    assert e0["SPANTRAIN_CHECKPOINT_DIR"] == "/ck" and e0["SPANTRAIN_DEVICE"] == "cuda"
    assert e2["SPANTRAIN_DEVICE"] == "cpu"
    c0, c2 = pods[0]["spec"]["containers"][0], pods[2]["spec"]["containers"][0]
    assert c0["image"] == "img:amd" and c2["image"] == "img:arm"
    assert c0["args"] == ["worker"] and "command" not in c0
    assert c0["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "resources" not in c2 or "nvidia.com/gpu" not in c2["resources"].get("limits", {})
    assert c0["volumeMounts"][0] == {"name": "plan", "mountPath": "/etc/spantrain/plan",
                                     "readOnly": True}
    volumes = {v["name"]: v for v in pods[0]["spec"]["volumes"]}
    assert volumes["checkpoint"]["persistentVolumeClaim"]["claimName"] == "pvc"
    term = pods[2]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchFields"] == [{"key": "metadata.name", "operator": "In",
                                    "values": ["edge-0"]}]
    tols = pods[2]["spec"]["tolerations"]
    assert {"key": "node-role.kubernetes.io/edge", "effect": "NoSchedule",
            "operator": "Exists"} in tols
    assert any(t["key"] == "node.kubernetes.io/unreachable" and t["tolerationSeconds"] == 300
               for t in tols)
    meta = pods[1]["metadata"]
    assert meta["ownerReferences"][0]["uid"] == "uid-1" and meta["ownerReferences"][0]["controller"]
    assert meta["labels"][render.L_RANK] == "1" and meta["labels"][render.L_ATTEMPT] == "2"
    assert meta["labels"][render.L_STAGE] == "0" and meta["labels"][render.L_REPLICA] == "1"
    assert pods[0]["spec"]["restartPolicy"] == "Never"
    assert pods[0]["spec"]["subdomain"] == "gpt"


def test_rendering_is_deterministic() -> None:
    plan, s = make_plan(), spec()
    assert render.worker_pods(JOB, s, plan, facts(), attempt=0) == render.worker_pods(
        JOB, s, plan, facts(), attempt=0)


def test_auto_mode_puts_only_edge_pods_on_the_host_network() -> None:
    """Ranks 0, 1 on the cloud node keep DNS rendezvous; rank 2 on the KubeEdge node runs on
    the host network and still finds rank 0 by its name (ClusterFirstWithHostNet)."""
    plan = make_plan()
    pods = render.worker_pods(JOB, spec(), plan, facts(), attempt=0)
    assert render.address_mode(spec(), plan, facts()) == "mixed"
    cloud, edge = pods[0]["spec"], pods[2]["spec"]
    assert "hostNetwork" not in cloud and cloud["hostname"] == "gpt-a0-r0"
    assert cloud["subdomain"] == "gpt"
    assert edge["hostNetwork"] is True and edge["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "hostname" not in edge and "subdomain" not in edge
    assert {env(p)["MASTER_ADDR"] for p in pods} == {"gpt-a0-r0.gpt.ml.svc"}
    assert [env(p)["SPANTRAIN_ADDRESS_MODE"] for p in pods] == ["dns", "dns", "hostNetwork"]
    # rank 2 alone on its node: the default metrics port; no rendezvous host port (rank 0's)
    ports = {p["name"]: p["containerPort"] for p in edge["containers"][0]["ports"]}
    assert ports == {"metrics": 9400}
    # explicit modes apply to every pod alike
    dns = render.worker_pods(JOB, spec(rendezvous={"addressMode": "dns"}), plan, facts(),
                             attempt=0)
    assert not any(p["spec"].get("hostNetwork") for p in dns)


def test_auto_mode_with_rank0_on_an_edge_node_uses_its_internal_ip() -> None:
    """Stages swapped: rank 0 on the edge node, so every rank meets it at the node's
    InternalIP; the cloud pods stay on the pod network."""
    topo = resolve(cluster())
    layouts = [StageLayout(0, 3, (2,), (4,)), StageLayout(3, 8, (0, 1), (3, 1))]
    plan, _ = assemble(layouts, topo, preset("gpt-mini"), schedule="1f1b", num_microbatches=4)
    assert plan.stages[0].devices[0].node == "edge-0"
    pods = render.worker_pods(JOB, spec(), plan, facts(), attempt=0)
    assert {env(p)["MASTER_ADDR"] for p in pods} == {"10.0.0.0"}  # edge-0's InternalIP
    by_node = {p["metadata"]["annotations"][render.A_NODE]: p["spec"] for p in pods}
    assert by_node["edge-0"]["hostNetwork"] is True
    assert not by_node["cloud-0"].get("hostNetwork")
    assert render.address_mode(spec(), plan, facts()) == "mixed"


def test_host_network_mode_gives_each_pod_of_a_node_its_own_metrics_port() -> None:
    plan = make_plan()
    s = spec(rendezvous={"addressMode": "hostNetwork"})
    pods = render.worker_pods(JOB, s, plan, facts(), attempt=0)
    assert render.address_mode(s, plan, facts()) == "hostNetwork"
    assert all(p["spec"]["hostNetwork"] for p in pods)
    assert env(pods[1])["MASTER_ADDR"] == "10.0.0.2"  # rank 0's node InternalIP
    ports = [{q["name"]: q["containerPort"] for q in p["spec"]["containers"][0]["ports"]}
             for p in pods]
    # ranks 0 and 1 share cloud-0: 9400 and 9401; only rank 0 reserves the rendezvous port
    assert ports == [{"rendezvous": 29500, "metrics": 9400}, {"metrics": 9401},
                     {"metrics": 9400}]
    assert [env(p)["SPANTRAIN_METRICS_PORT"] for p in pods] == ["9400", "9401", "9400"]


def test_worker_pods_are_hardened() -> None:
    plan = make_plan()
    s = spec(env=[{"name": "HOME", "value": "/data"}],
             training={"globalBatch": 16, "checkpoint": {"path": "/ck", "claimName": "pvc"}})
    for pod in render.worker_pods(JOB, s, plan, facts(), attempt=0):
        ps = pod["spec"]
        assert ps["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
        c = ps["containers"][0]
        assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                        "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}
        assert ps["automountServiceAccountToken"] is False
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts == {"/etc/spantrain/plan": "plan", "/tmp": "scratch", "/ck": "checkpoint"}
        volumes = {v["name"]: v for v in ps["volumes"]}
        assert volumes["scratch"] == {"name": "scratch", "emptyDir": {}}
        e = env(pod)
        assert (e["TMPDIR"], e["MPLCONFIGDIR"], e["TORCHINDUCTOR_CACHE_DIR"]) == (
            "/tmp", "/tmp/matplotlib", "/tmp/torchinductor")
        names = [x["name"] for x in c["env"]]
        assert names.count("HOME") == 1 and e["HOME"] == "/data"  # the job's env wins, once
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod is not None and ps["securityContext"] is not render.POD_SECURITY_CONTEXT
    # a checkpoint path without a claim still gets a writable (emptyDir) mount; under /tmp none
    nopvc = render.worker_pods(JOB, spec(training={"globalBatch": 16,
                                                   "checkpoint": {"path": "/ck"}}),
                               plan, facts(), attempt=0)[0]["spec"]
    assert {v["name"]: v for v in nopvc["volumes"]}["checkpoint"] == {
        "name": "checkpoint", "emptyDir": {}}
    intmp = render.worker_pods(JOB, spec(training={"globalBatch": 16,
                                                   "checkpoint": {"path": "/tmp/ck"}}),
                               plan, facts(), attempt=0)[0]["spec"]
    assert "checkpoint" not in {v["name"] for v in intmp["volumes"]}


def test_ip_mode_waits_for_rank0_ip() -> None:
    plan, s = make_plan(), spec(rendezvous={"addressMode": "ip"})
    first = render.worker_pods(JOB, s, plan, facts(), attempt=0)
    assert [p["metadata"]["name"] for p in first] == ["gpt-a0-r0"]
    later = render.worker_pods(JOB, s, plan, facts(), attempt=0, rank0_pod_ip="10.244.1.7")
    assert len(later) == 3 and env(later[2])["MASTER_ADDR"] == "10.244.1.7"


def test_config_map_service_and_pod_group() -> None:
    plan, s = make_plan(), spec(scheduling={"gang": "volcano", "queue": "q"})
    cm = render.config_map(JOB, s, plan)
    name = f"gpt-plan-{render.config_digest(s, plan)[:10]}"
    assert cm["metadata"]["name"] == name and cm["immutable"]
    assert Plan.model_validate_json(cm["data"]["plan.json"]) == plan
    assert api.parse_spec(json.loads(cm["data"]["job.json"])) == s
    svc = render.service(JOB, s)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    pg = render.pod_group(JOB, s, plan, attempt=1)
    assert pg is not None and pg["spec"]["minMember"] == 3 and pg["spec"]["queue"] == "q"
    pods = render.worker_pods(JOB, s, plan, facts(), attempt=1)
    assert pods[0]["spec"]["schedulerName"] == "volcano"
    assert pods[0]["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "gpt-a1"
    assert render.pod_group(JOB, spec(), plan, attempt=0) is None
    cos = spec(scheduling={"gang": "coscheduling"})
    assert render.pod_group(JOB, cos, plan, 0)["kind"] == "PodGroup"  # type: ignore[index]


@pytest.mark.parametrize("name", ["a", "x" * api.MAX_JOB_NAME])
def test_pod_names_are_dns_labels(name: str) -> None:
    assert len(render.pod_name(name, 999, 4095)) <= 63


def test_network_policy_admits_the_job_and_the_scrapers_only() -> None:
    spec = api.SpanTrainJobSpec.model_validate({"model": {"preset": "gpt-mini"}})
    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    pol = render.network_policy(JOB, spec, [scraper])
    assert pol["kind"] == "NetworkPolicy" and pol["metadata"]["name"] == JOB.name
    assert pol["metadata"]["ownerReferences"][0]["uid"] == JOB.uid
    selector = {"matchLabels": {render.L_JOB: JOB.name}}
    assert pol["spec"]["podSelector"] == selector
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    own, scrape = pol["spec"]["ingress"]
    # the job's pods reach each other on any port (gloo picks its ports at run time)
    assert own == {"from": [{"podSelector": selector}]}
    assert scrape == {"from": [scraper], "ports": [{"protocol": "TCP", "port": "metrics"}]}
    # no scrapers: only the job's own pods
    assert render.network_policy(JOB, spec, [])["spec"]["ingress"] == [own]
