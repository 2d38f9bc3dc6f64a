"""The cluster profiler's pure half: measurement documents, expiry, merge precedence, sources,
keeping old facts where a run failed, bad input named, and the local calibration."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spantrain_planner.cli.report import sources_table
from spantrain_planner.core.errors import InputError
from spantrain_planner.inputs.cluster import ClusterSpec, resolve
from spantrain_planner.inputs.measured import (
    ClusterMeasurement,
    DeviceMeasurement,
    KernelMeasurement,
    LinkMeasurement,
    ProbeFailure,
    Stat,
    apply_measurements,
    calibrate_emulated,
    load_measurement,
    sources_summary,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def stat(value: float, count: int = 5) -> Stat:
    return Stat(median=value, min=value * 0.9, max=value * 1.1, count=count)


def device(node: str, gflops: dict[str, float], *, index: int = 0, overhead: float = 100.0,
           memory: int | None = 3 * 2**30, age: timedelta = timedelta(0),
           precision: str = "fp32") -> DeviceMeasurement:
    return DeviceMeasurement(
        node=node, device=index,
        kernels=[KernelMeasurement(kind=k, precision=precision, flops_per_second=stat(v * 1e9),
                                   overhead_us=overhead) for k, v in gflops.items()],
        memory_bytes=memory, measured_at=NOW - age)


def link(a: str, b: str, mbps: float, ms: float = 0.2,
         age: timedelta = timedelta(0)) -> LinkMeasurement:
    return LinkMeasurement(src=a, dst=b, latency_ms=stat(ms, 20), bandwidth_mbps=stat(mbps),
                           measured_at=NOW - age)


def spec() -> ClusterSpec:
    return ClusterSpec.model_validate({
        "name": "three",
        "nodes": [
            {"name": "a", "tier": "cloud", "bandwidthMbps": 1000,
             "devices": [{"count": 2, "computeTflops": 0.05, "memoryBytes": "2Gi"}]},
            {"name": "b", "tier": "edge",
             "devices": [{"computeTflops": 0.02, "memoryBytes": "1Gi",
                          "layerOverheadUs": 500}]},
            {"name": "c", "tier": "end", "devices": [{"computeTflops": 0.01,
                                                      "memoryBytes": "1Gi"}]},
        ],
        "links": {"rules": [{"between": ["b", "c"], "bandwidthMbps": 50}],
                  "matrix": [{"a": "a", "b": "c", "bandwidthMbps": 30}]},
    })


def test_stat_and_weighted_figures() -> None:
    s = Stat.of([1.0, 3.0, 2.0])
    assert (s.median, s.min, s.max, s.count) == (2.0, 1.0, 3.0, 3)
    assert s.spread == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min <= median <= max"):
        Stat(median=5, min=1, max=2, count=2)
    d = device("a", {"matmul": 100, "conv": 25, "attention": 50})
    # time-weighted: 3 / (1/100 + 1/25 + 1/50)
    assert d.effective_flops() == pytest.approx(3 / (1 / 100 + 1 / 25 + 1 / 50) * 1e9)
    assert d.effective_flops("conv") == pytest.approx(25e9)
    assert d.effective_flops("attention", "bf16") == pytest.approx(50e9)  # falls back to fp32
    factors = d.kind_factors()
    assert factors["matmul"] > 1 > factors["conv"]
    flat = d.annotation("attention")
    assert flat["computeTflops"] == pytest.approx(0.05)
    assert flat["layerOverheadUs"] == 100.0 and flat["memoryBytes"] == 3 * 2**30
    assert flat["measuredAt"] == "2025-06-01T12:00:00Z"


def test_merge_prefers_fresh_measurements_and_names_every_source() -> None:
    measured = ClusterMeasurement(
        devices=[device("a", {"attention": 80}, index=0, overhead=200),
                 device("a", {"attention": 60}, index=1, overhead=400, memory=2**30),
                 device("c", {"attention": 5}, age=timedelta(days=3)),  # too old
                 device("ghost", {"attention": 5})],
        links=[link("a", "b", 400, 0.5), link("b", "a", 900, 0.5)],
    )
    merged = apply_measurements(spec(), measured, now=NOW, layer_kind="attention")
    nodes = {n.name: n for n in merged.spec.nodes}
    (ga,) = nodes["a"].devices
    assert ga.compute_tflops == pytest.approx(0.07)  # median of the two devices
    assert ga.layer_overhead_us == pytest.approx(300)
    assert ga.memory_bytes == 2**30  # the smaller
    assert nodes["c"].devices[0].compute_tflops == 0.01  # expired: the label stays
    src = {(s.subject, s.fact): s.source for s in merged.sources}
    assert src[("a/cpu0..1", "compute")] == "measured"
    assert src[("b/cpu0", "compute")] == "label"
    assert src[("b/cpu0", "layerOverhead")] == "label"
    assert src[("c/cpu0", "layerOverhead")] == "default"
    assert src[("a->b", "bandwidth")] == "measured"
    assert src[("a->c", "bandwidth")] == "label"  # the description's matrix
    assert src[("c->a", "bandwidth")] == "label"  # its reverse entry
    assert src[("b->c", "bandwidth")] == "label"  # a rule
    assert src[("c->b", "latency")] == "label"
    assert any("c/0: older than" in x for x in merged.ignored)
    assert any("ghost/0: no such node" in x for x in merged.ignored)
    topo = resolve(merged.spec)
    a0, b0 = topo.device("a/cpu0").index, topo.device("b/cpu0").index
    assert topo.bandwidth[a0][b0] == pytest.approx(400e6 / 8)  # directed, both kept
    assert topo.bandwidth[b0][a0] == pytest.approx(900e6 / 8)
    assert topo.latency[a0][b0] == pytest.approx(0.5e-3)
    text = sources_table(merged)
    assert "a->b" in text and "measured" in text
    assert sources_summary(merged).startswith("facts: ")


def test_uplink_defaults_are_named_default() -> None:
    bare = ClusterSpec.model_validate({"nodes": [
        {"name": "x", "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]},
        {"name": "y", "bandwidthMbps": 100, "latencyMs": 1,
         "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]}]})
    merged = apply_measurements(bare, None, now=NOW)
    src = {(s.subject, s.fact): s.source for s in merged.sources}
    assert src[("x->y", "bandwidth")] == "default"  # x says nothing: its tier's default
    assert merged.count("measured") == 0


def test_a_failed_probe_keeps_the_old_facts_and_names_the_pair() -> None:
    old = ClusterMeasurement(
        devices=[device("a", {"matmul": 50}), device("b", {"matmul": 20})],
        links=[link("a", "b", 100), link("b", "a", 80)])
    failure = ProbeFailure(src="b", dst="a", error="cannot reach 10.0.0.1:29610", at=NOW)
    new = ClusterMeasurement(devices=[device("a", {"matmul": 60})],
                             links=[link("a", "b", 120)], failures=[failure])
    merged = old.updated_with(new)
    assert merged.link("a", "b").bandwidth_mbps.median == 120  # type: ignore[union-attr]
    assert merged.link("b", "a").bandwidth_mbps.median == 80  # type: ignore[union-attr]
    assert merged.device("b") is not None  # not measured this time: kept
    assert merged.device("a").kernels[0].flops_per_second.median == 60e9  # type: ignore[union-attr]
    assert [f.what for f in merged.failures] == ["b -> a"]


def test_expiry_and_round_trip(tmp_path: Path) -> None:
    m = ClusterMeasurement(devices=[device("a", {"conv": 10}, age=timedelta(hours=30))],
                           links=[link("a", "b", 10, age=timedelta(hours=1))])
    assert m.expired(NOW) == ["a/0"]
    fresh = m.fresh(NOW)
    assert fresh.devices == [] and len(fresh.links) == 1
    assert m.fresh(NOW, timedelta(days=2)).devices != []
    path = tmp_path / "m.yaml"
    path.write_text(m.to_yaml())
    assert load_measurement(path) == m
    assert [e.b for e in m.matrix()] == ["b"]


@pytest.mark.parametrize(("patch", "named"), [
    ({"links": [{"src": "a", "dst": "a", "latencyMs": {"median": 1, "min": 1, "max": 1,
                                                      "count": 1},
                 "bandwidthMbps": {"median": 1, "min": 1, "max": 1, "count": 1},
                 "measuredAt": "2025-01-01T00:00:00Z"}]}, "to itself"),
    ({"devices": [{"node": "a", "kernels": [], "measuredAt": "2025-01-01T00:00:00Z"}]},
     "kernels"),
    ({"devices": [{"node": "a", "measuredAt": "2025-01-01T00:00:00",
                   "kernels": [{"kind": "matmul", "flopsPerSecond": {
                       "median": 1, "min": 1, "max": 1, "count": 1}}]}]}, "timezone"),
    ({"devices": [{"node": "a", "measuredAt": "2025-01-01T00:00:00Z",
                   "kernels": [{"kind": "fft", "flopsPerSecond": {
                       "median": 1, "min": 1, "max": 1, "count": 1}}]}]}, "kind"),
])
def test_bad_measurement_files_are_named(tmp_path: Path, patch: dict[str, object],
                                         named: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(patch))
    with pytest.raises(InputError, match=f"(?s)bad.yaml: invalid cluster measurement.*{named}"):
        load_measurement(path)


def test_calibration_keeps_relative_speeds_in_this_machines_units() -> None:
    local = ClusterSpec.model_validate({"nodes": [
        {"name": "fast", "devices": [{"computeTflops": 0.02, "memoryBytes": "1Gi"}]},
        {"name": "slow", "devices": [{"computeTflops": 0.005, "memoryBytes": "1Gi"}]}]})
    machine = device("localhost", {"attention": 80, "matmul": 160}, overhead=250)
    padded = {n.name: n.devices[0] for n in calibrate_emulated(
        local, machine, layer_kind="attention").nodes}
    assert padded["fast"].compute_tflops == pytest.approx(0.08)
    assert padded["slow"].compute_tflops == pytest.approx(0.02)
    assert padded["slow"].layer_overhead_us == pytest.approx(1000)  # 4x padded
    full = {n.name: n.devices[0] for n in calibrate_emulated(
        local, machine, {"fast": 1.0, "slow": 1.0}, layer_kind="attention").nodes}
    assert full["slow"].compute_tflops == pytest.approx(0.08)
    with pytest.raises(InputError, match="share must be > 0"):
        calibrate_emulated(local, machine, {"fast": 0.0})
