"""Node inventory: labels/annotations/allocatable -> devices, eligibility, lost nodes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from spantrain_operator import inventory
from spantrain_planner.api import PlacementSpec
from spantrain_planner.inputs.cluster import resolve

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def node(name: str, labels: dict[str, str] | None = None, *, alloc: dict[str, str] | None = None,
         annotations: dict[str, str] | None = None, ready: bool = True,
         taints: list[dict[str, str]] | None = None, unschedulable: bool = False,
         since: datetime = NOW - timedelta(hours=1)) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/arch": "amd64", **(labels or {})},
                     "annotations": annotations or {}},
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {
            "allocatable": {"cpu": "8", "memory": "32Gi", **(alloc or {})},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                            "lastTransitionTime": since.strftime("%Y-%m-%dT%H:%M:%SZ")}],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
        },
    }


GPU = {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-3090", "nvidia.com/gpu.memory": "24576",
       "nvidia.com/gpu.count": "4"}


def test_gpu_node_one_device_per_gpu_with_table_compute() -> None:
    facts = inventory.read_node(node("g", GPU, alloc={"nvidia.com/gpu": "4"}))
    assert facts.num_devices == 4 and facts.accelerator == "NVIDIA-GeForce-RTX-3090"
    assert facts.compute_tflops == inventory.GPU_TFLOPS["RTX-3090"]
    assert facts.memory_bytes == 24576 * 2**20 and facts.compute_source == "table"
    assert facts.tier == "cloud" and facts.internal_ip == "10.0.0.1"


def test_allocatable_gpu_wins_over_count_label() -> None:
    facts = inventory.read_node(node("g", GPU, alloc={"nvidia.com/gpu": "2"}))
    assert facts.num_devices == 2


def test_cpu_node_is_one_device_sized_by_cores() -> None:
    facts = inventory.read_node(node("c", {"kubernetes.io/arch": "arm64"}, alloc={"cpu": "4000m"}))
    assert facts.num_devices == 1 and facts.accelerator == "cpu"
    assert facts.compute_tflops == pytest.approx(4 * 20 / 1000)
    assert facts.memory_bytes == int(32 * 2**30 * inventory.CPU_MEMORY_FRACTION)


def test_precedence_profile_then_annotation_then_label() -> None:
    labels = {"spantrain.io/compute-tflops": "3", "spantrain.io/memory-bytes": "4Gi",
              "spantrain.io/bandwidth-mbps": "100", "spantrain.io/latency-ms": "7",
              "spantrain.io/tier": "end"}
    facts = inventory.read_node(node("n", labels))
    assert (facts.compute_tflops, facts.memory_bytes) == (3.0, 4 * 2**30)
    assert (facts.bandwidth_mbps, facts.latency_ms, facts.tier) == (100.0, 7.0, "end")
    facts = inventory.read_node(node("n", labels, annotations={"spantrain.io/compute-tflops": "5"}))
    assert facts.compute_tflops == 5.0 and facts.compute_source == "label"
    prof = json.dumps({"computeTflops": 9.5, "memoryBytes": 123, "bandwidthMbps": 42,
                       "measuredAt": "2026-12-07T10:00:00Z"})
    facts = inventory.read_node(node("n", labels, annotations={"spantrain.io/profile": prof}))
    assert (facts.compute_tflops, facts.memory_bytes, facts.bandwidth_mbps) == (9.5, 123, 42.0)
    assert facts.compute_source == "measured" and facts.warning is None
    assert facts.layer_overhead_us is None
    prof = json.dumps({"computeTflops": 0.02, "layerOverheadUs": 850,
                       "measuredAt": "2026-12-07T10:00:00Z"})
    facts = inventory.read_node(node("n", labels, annotations={"spantrain.io/profile": prof}))
    assert facts.layer_overhead_us == 850.0
    inv = inventory.build_inventory([node("n", labels, annotations={
        "spantrain.io/profile": prof})], PlacementSpec())
    assert inv.cluster is not None
    assert inv.cluster.nodes[0].devices[0].layer_overhead_us == 850.0


def test_edge_platforms_and_tiers() -> None:
    ke = inventory.read_node(node("e", {"node-role.kubernetes.io/edge": ""}))
    assert ke.platform == "kubeedge" and ke.tier == "edge"
    k3s = inventory.read_node(node("k", {"node.kubernetes.io/instance-type": "k3s"}))
    assert k3s.platform == "k3s" and k3s.tier == "end"
    k3s2 = inventory.read_node(node("k", annotations={"k3s.io/hostname": "k"}))
    assert k3s2.platform == "k3s"
    zone = inventory.read_node(node("z", {"topology.kubernetes.io/zone": "eu-1"}))
    assert zone.zone == "eu-1"


def test_jetson_unified_memory_from_allocatable() -> None:
    labels = {"nvidia.com/gpu.product": "NVIDIA-Jetson-AGX-Orin", "kubernetes.io/arch": "arm64"}
    facts = inventory.read_node(node("j", labels, alloc={"nvidia.com/gpu": "1", "memory": "32Gi"}))
    assert facts.num_devices == 1 and facts.compute_tflops == inventory.GPU_TFLOPS["Orin"]
    assert facts.memory_bytes == int(32 * 2**30 * inventory.CPU_MEMORY_FRACTION)


def test_eligibility_filters() -> None:
    nodes = [
        node("a", {"tier": "x"}), node("b", ready=False), node("c", unschedulable=True),
        node("d", {"tier": "y"}),
        node("e", {"tier": "x"}, taints=[{"key": "node-role.kubernetes.io/edge", "value": "",
                                          "effect": "NoSchedule"}]),
        node("f", {"tier": "x"}, taints=[{"key": "node.kubernetes.io/unreachable",
                                          "effect": "NoExecute"}]),
    ]
    inv = inventory.build_inventory(nodes, PlacementSpec(node_selector={"tier": "x"}))
    assert sorted(inv.nodes) == ["a", "e"]
    assert inv.skipped["b"] == "not Ready" and "cordoned" in inv.skipped["c"]
    assert "nodeSelector" in inv.skipped["d"] and "unreachable" in inv.skipped["f"]
    strict = PlacementSpec(node_selector={"tier": "x"}, tolerate_node_taints=False)
    assert sorted(inventory.build_inventory(nodes, strict).nodes) == ["a"]
    tol = PlacementSpec.model_validate({"nodeSelector": {"tier": "x"}, "tolerateNodeTaints": False,
                                       "tolerations": [{"key": "node-role.kubernetes.io/edge",
                                                        "operator": "Exists"}]})
    assert sorted(inventory.build_inventory(nodes, tol).nodes) == ["a", "e"]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ({"key": "tier", "operator": "In", "values": ["x", "z"]}, ["a"]),
        ({"key": "tier", "operator": "NotIn", "values": ["x"]}, ["b", "c"]),
        ({"key": "tier", "operator": "Exists"}, ["a", "b"]),
        ({"key": "tier", "operator": "DoesNotExist"}, ["c"]),
        ({"key": "cores", "operator": "Gt", "values": ["4"]}, ["b"]),
        ({"key": "cores", "operator": "Lt", "values": ["4"]}, ["a"]),
    ],
)
def test_match_expressions(expr: dict[str, Any], expected: list[str]) -> None:
    nodes = [node("a", {"tier": "x", "cores": "2"}), node("b", {"tier": "y", "cores": "8"}),
             node("c")]
    placement = PlacementSpec.model_validate({"matchExpressions": [expr]})
    assert sorted(inventory.build_inventory(nodes, placement).nodes) == expected


def test_cluster_spec_resolves_and_is_deterministic() -> None:
    nodes = [node("z-cpu"), node("a-gpu", GPU, alloc={"nvidia.com/gpu": "4"}),
             node("m-edge", {"node-role.kubernetes.io/edge": "",
                             "spantrain.io/bandwidth-mbps": "50"})]
    inv = inventory.build_inventory(nodes, PlacementSpec(), name="ns/job")
    again = inventory.build_inventory(list(reversed(nodes)), PlacementSpec(), name="ns/job")
    assert inv.cluster == again.cluster
    topo = resolve(inv.cluster)  # type: ignore[arg-type]
    assert topo.num_devices == 6 and inv.num_devices == 6
    assert [d.id for d in topo.devices][:2] == ["a-gpu/gpu0", "a-gpu/gpu1"]
    assert topo.devices[4].tier == "edge"


def test_max_devices_keeps_the_fastest() -> None:
    nodes = [node("slow"), node("fast", GPU, alloc={"nvidia.com/gpu": "4"})]
    inv = inventory.build_inventory(nodes, PlacementSpec(max_devices=3))
    assert list(inv.nodes) == ["fast"] and inv.nodes["fast"].num_devices == 3


def test_no_eligible_node_gives_no_cluster() -> None:
    inv = inventory.build_inventory([node("a", ready=False)], PlacementSpec())
    assert inv.cluster is None and inv.skipped == {"a": "not Ready"}


def test_lost_nodes_deleted_or_not_ready_past_grace() -> None:
    nodes = {
        "ok": node("ok"),
        "flaky": node("flaky", ready=False, since=NOW - timedelta(seconds=30)),
        "down": node("down", ready=False, since=NOW - timedelta(seconds=600)),
    }
    lost = inventory.lost_nodes(["ok", "flaky", "down", "gone"], nodes, grace_seconds=300,
                                now=NOW)
    assert sorted(lost) == ["down", "gone"] and lost["gone"] == "deleted"
    assert inventory.not_ready_nodes(["ok", "flaky", "down"], nodes) == ["down", "flaky"]


NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("annotation", "warned"), [
    ({"computeTflops": 9.5, "measuredAt": "2026-12-07T11:00:00Z"}, None),  # fresh: used
    ({"computeTflops": 9.5, "measuredAt": "2026-12-05T11:00:00Z"}, "expired"),
    ({"computeTflops": 9.5}, "measuredAt"),  # no time: can never expire, so not used
    ({"computeTflops": -1, "measuredAt": "2026-12-07T11:00:00Z"}, "computeTflops"),
    ({"computeTflops": "fast", "measuredAt": "2026-12-07T11:00:00Z"}, "computeTflops"),
    ({"computeTflops": 9.5, "measuredAt": "yesterday"}, "measuredAt"),
    ({"computeTflops": 9.5, "measuredAt": "2026-12-07T11:00:00"}, "measuredAt"),  # no zone
    ("{not json", "malformed"),
    ([1, 2], "malformed"),
])
def test_a_measurement_is_used_while_fresh_and_well_formed(annotation: object,
                                                           warned: str | None) -> None:
    labels = {"spantrain.io/compute-tflops": "3"}
    raw = annotation if isinstance(annotation, str) else json.dumps(annotation)
    facts = inventory.read_node(node("edge-7", labels, annotations={"spantrain.io/profile": raw}),
                                now=NOW)
    if warned is None:
        assert (facts.compute_tflops, facts.compute_source, facts.warning) == (9.5, "measured",
                                                                               None)
        return
    # ignored: the label holds, and the warning names the node and what was wrong
    assert (facts.compute_tflops, facts.compute_source) == (3.0, "label")
    assert facts.warning is not None and "edge-7" in facts.warning and warned in facts.warning
    inv = inventory.build_inventory(
        [node("edge-7", labels, annotations={"spantrain.io/profile": raw})], PlacementSpec(),
        now=NOW)
    assert inv.warnings == (facts.warning,)
    assert inv.cluster is not None and inv.cluster.nodes[0].devices[0].compute_tflops == 3.0


def test_max_age_is_the_callers() -> None:
    raw = json.dumps({"computeTflops": 9.5, "measuredAt": "2026-12-07T06:00:00Z"})
    n = node("n", {}, annotations={"spantrain.io/profile": raw})
    assert inventory.read_node(n, NOW).compute_tflops == 9.5  # 6 h < the default 24 h
    assert inventory.read_node(n, NOW, timedelta(hours=1)).compute_source != "measured"
