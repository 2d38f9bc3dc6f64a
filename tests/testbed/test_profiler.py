"""Root test of the cluster profiler against the limits the kernel testbed imposes.

Two devices on two nodes: ``slow`` gets a quarter core, ``fast`` half a core (cgroup CFS
quotas), and the link between them is asymmetric (token buckets: 40 Mbit/s slow -> fast,
100 Mbit/s fast -> slow). The profiler (``spantrain_worker.profilecluster.profile_testbed``,
the same code ``spantrain profile-cluster --emulate`` runs) must see each direction's
bandwidth within 15 % of its bucket and the devices' compute ratio within 15 % of their quota
ratio. Instance 211. Needs root, iproute2 and cgroup v1 cpu/cpuacct.
"""

from __future__ import annotations

import pytest

from spantrain_planner.inputs.cluster import ClusterSpec, resolve
from tests.testbed import requirements

pytestmark = [pytest.mark.root, pytest.mark.torch, pytest.mark.slow]

if (missing := requirements.testbed_missing()) is not None:
    pytest.skip(missing, allow_module_level=True)

from spantrain_testbed import Testbed  # noqa: E402
from spantrain_worker.profilecluster import (  # noqa: E402
    devices_table,
    links_table,
    profile_testbed,
)

INSTANCE = 211
LIMITS_MBPS = {("slow", "fast"): 40.0, ("fast", "slow"): 100.0}


def test_profiler_measures_the_testbed_limits() -> None:
    spec = ClusterSpec.model_validate({
        "name": "profiled",
        "nodes": [
            {"name": "slow", "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]},
            {"name": "fast", "devices": [{"computeTflops": 2, "memoryBytes": "1Gi"}]},
        ],
        "links": {"matrix": [{"a": a, "b": b, "bandwidthMbps": mbps}
                             for (a, b), mbps in LIMITS_MBPS.items()]},
    })
    with Testbed(resolve(spec), instance=INSTANCE, cores_per_tflops=0.25) as tb:
        cores = [q.cores for q in tb.quotas]
        measured = profile_testbed(
            tb, bench_args=["--kinds", "matmul,attention", "--precisions", "fp32",
                            "--samples", "5", "--sample-seconds", "0.2"],
            probe_args=["--repeats", "5", "--target-seconds", "0.5"], port=29711)
    print(devices_table(measured))
    print(links_table(measured))
    assert measured.failures == []
    assert cores == pytest.approx([0.25, 0.5])
    for (a, b), mbps in LIMITS_MBPS.items():
        link = measured.link(a, b)
        assert link is not None
        got = link.bandwidth_mbps.median
        print(f"{a} -> {b}: bucket {mbps:g} Mbit/s, measured {got:.1f} "
              f"({(got / mbps - 1) * 100:+.1f} %), spread {link.bandwidth_mbps.spread:.1%}")
        assert got == pytest.approx(mbps, rel=0.15)
        assert link.latency_ms.count == 20 and link.bandwidth_mbps.count == 5
    slow, fast = measured.device("slow"), measured.device("fast")
    assert slow is not None and fast is not None
    for best in (False, True):
        ratio = fast.effective_flops(best=best) / slow.effective_flops(best=best)
        print(f"compute ({'best samples' if best else 'medians'}): slow "
              f"{slow.effective_flops(best=best) / 1e9:.1f} GFLOP/s at {cores[0]:g} core, fast "
              f"{fast.effective_flops(best=best) / 1e9:.1f} at {cores[1]:g}: ratio {ratio:.3f} "
              f"against the quotas' {cores[1] / cores[0]:g} ({(ratio / 2 - 1) * 100:+.1f} %)")
    # a quota caps a device's speed; other work on the machine only slows it further (more
    # so the smaller the quota: each CFS period starts with cold caches), so the fastest
    # samples are the ones the quota alone limited
    assert ratio == pytest.approx(cores[1] / cores[0], rel=0.15)
