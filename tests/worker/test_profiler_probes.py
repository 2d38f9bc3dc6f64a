"""The cluster profiler's node side in real processes: link probes over TCP on loopback, the
device micro-benchmarks, the machine-profile cache, and an orchestration run where one peer
cannot be reached (its pairs are named, the old figures stay)."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from spantrain_planner.inputs.cluster import ClusterSpec, Topology, resolve
from spantrain_planner.inputs.measured import ClusterMeasurement
from spantrain_worker import calibration, devprofile, linkprobe
from spantrain_worker.profilecluster import link_measurement, profile_testbed

pytestmark = pytest.mark.torch
PY = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_link_probe_on_loopback_gives_latency_and_bandwidth() -> None:
    port = free_port()
    server = subprocess.Popen([PY, "-m", "spantrain_worker.linkprobe", "serve", "127.0.0.1",
                               str(port), "--timeout", "30"], stdout=subprocess.PIPE)
    try:
        got = linkprobe.probe("127.0.0.1", port, count=10, repeats=3, target_seconds=0.05,
                              timeout=30, bye=True)
        assert server.wait(timeout=10) == 0  # BYE stops it
    finally:
        server.kill()
    assert len(got["latencyMs"]) == 10 and len(got["bandwidthMbps"]) == 3
    link = link_measurement("a", "b", got)
    assert 0 < link.latency_ms.median < 50  # loopback: well under a millisecond unloaded
    assert link.bandwidth_mbps.median > 100  # loopback moves gigabits
    assert link.payload_bytes >= linkprobe.MIN_PAYLOAD


def test_link_probe_names_a_peer_it_cannot_reach() -> None:
    port = free_port()  # nobody listens
    with pytest.raises(linkprobe.ProbeError, match=f"cannot reach 127.0.0.1:{port} within 1 s"):
        linkprobe.probe("127.0.0.1", port, timeout=1.0)
    out = subprocess.run([PY, "-m", "spantrain_worker.linkprobe", "probe", "127.0.0.1",
                          str(port), "--timeout", "1"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1 and "cannot reach" in out.stdout


def test_device_benchmark_counts_flops_like_the_planner() -> None:
    bench = devprofile.CPU_BENCHES[2]
    assert bench.kind == "attention"
    s, d = bench.config["seq_len"], bench.config["d_model"]
    # forward 24 S d^2 + 4 S^2 d, backward twice that plus the score's extra input gradient
    assert devprofile.flops_per_sample(bench) == pytest.approx(
        3 * 24 * s * d * d + (4 + 8) * s * s * d)
    measured = devprofile.measure_device(node="me", kinds=["matmul", "attention"],
                                         precisions=["fp32"], samples=3, sample_seconds=0.03)
    assert [k.kind for k in measured.kernels] == ["matmul", "attention"]
    for k in measured.kernels:
        assert 1e8 < k.flops_per_second.median < 1e13
        assert k.flops_per_second.count == 3
    assert measured.memory_bytes and measured.memory_bytes > 2**26
    assert measured.host.startswith(platform.machine())


def test_paced_benchmark_sleeps_its_share_and_times_compute_only() -> None:
    import time

    import torch

    calls = 0

    def step() -> None:
        nonlocal calls
        calls += 1
        end = time.thread_time() + 0.002
        while time.thread_time() < end:  # 2 ms of CPU
            pass

    t0 = time.perf_counter()
    out = devprofile._samples([step, step], torch.device("cpu"), 2, 0.05, "cpu", duty=0.5)
    wall = time.perf_counter() - t0
    assert [len(x) for x in out] == [2, 2]  # each step sampled twice, taking turns
    for per_step in out[0] + out[1]:  # the sleeps are not counted, only the compute
        assert 0.0018 < per_step < 0.004
    # ... but they happen: after every burst of BURST_SECONDS, as long as the burst (duty
    # 0.5); each 50 ms sample holds one full burst (its last, partial one ends the sample)
    assert wall > 4 * (0.05 + devprofile.BURST_SECONDS) * 0.95
    with pytest.raises(ValueError, match="duty"):
        devprofile._samples([step], torch.device("cpu"), 1, 0.01, "cpu", duty=0.0)


def test_machine_profile_cache_is_keyed_and_expires(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibration.cached_profile() is None
    measured = devprofile.measure_device(node="localhost", kinds=["matmul"],
                                         precisions=["fp32"], samples=2, sample_seconds=0.02,
                                         clock="cpu")
    path = calibration.store(measured)
    assert path.parent == tmp_path / "spantrain" / "device-profiles"
    assert path.name == f"{calibration.cache_key(1)}.json"
    assert calibration.cached_profile() == measured
    later = measured.measured_at + timedelta(days=2)
    assert calibration.cached_profile(now=later) is None  # too old: measured again
    assert calibration.cache_key(1) != calibration.cache_key(2)  # other threads, other key
    with pytest.raises(ValueError, match="one CPU thread"):
        devprofile.measure_device(threads=2, clock="cpu", kinds=["matmul"])


@dataclass
class LoopbackBed:
    """Stands in for a testbed: every node a loopback address, processes run here; the
    server of ``dead`` is never started (its address answers nothing)."""

    topology: Topology
    dead: str

    def address(self, index: int) -> str:
        return f"127.0.0.{index + 1}"

    def enforce_compute(self, enforced: bool = True, devices: Sequence[int] | None = None) -> None:
        pass

    def run(self, index: int, argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        if self.topology.devices[index].node == self.dead and "serve" in argv:
            argv = [PY, "-c", "pass"]
        return subprocess.Popen(argv, **popen)


def test_an_unreachable_peer_is_named_and_the_old_figures_stay() -> None:
    spec = ClusterSpec.model_validate({"nodes": [
        {"name": n, "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]}
        for n in ("a", "b", "c")]})
    bed = LoopbackBed(resolve(spec), dead="c")
    new = profile_testbed(bed, devices=False, probe_args=["--count", "3", "--repeats", "1",
                                                          "--target-seconds", "0.02"],
                          probe_timeout=2.0, port=free_port())
    assert sorted((x.src, x.dst) for x in new.links) == [
        ("a", "b"), ("b", "a"), ("c", "a"), ("c", "b")]
    assert sorted(f.what for f in new.failures) == ["a -> c", "b -> c"]
    assert all("cannot reach" in f.error for f in new.failures)
    old_figure = {"latencyMs": [1.0], "bandwidthMbps": [42.0], "payloadBytes": 1}
    old = ClusterMeasurement(links=[link_measurement("a", "c", old_figure)])
    merged = old.updated_with(new)
    kept = merged.link("a", "c")
    assert kept is not None and kept.bandwidth_mbps.median == 42.0
    assert merged.link("b", "c") is None  # never measured: no figure, the label stays
    assert datetime.now(UTC) - kept.measured_at < timedelta(minutes=5)
