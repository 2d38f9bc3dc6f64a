"""Root test of the cluster profiler against the limits the kernel testbed imposes.

Two devices on two nodes: ``slow`` gets a quarter core, ``fast`` half a core (cgroup CFS
quotas), and the link between them is asymmetric (token buckets: 40 Mbit/s slow -> fast,
100 Mbit/s fast -> slow); ``bench.adapt.profiler_check`` builds it and runs the profiler
(``spantrain_worker.profilecluster.profile_testbed``, the same code ``spantrain
profile-cluster --emulate`` runs). Each direction's bandwidth must be within 15 % of its
bucket; the devices' compute ratio is asserted only roughly here (see the test) and its error
against the 15 % target is reported by ``bench/adapt.py``. Needs root, iproute2 and cgroup
v1 cpu/cpuacct.
"""

from __future__ import annotations

import pytest

from tests.testbed import requirements

pytestmark = [pytest.mark.root, pytest.mark.torch, pytest.mark.slow]

if (missing := requirements.testbed_missing()) is not None:
    pytest.skip(missing, allow_module_level=True)

from bench.adapt import PROFILER_LIMITS_MBPS, profiler_check  # noqa: E402

from spantrain_worker.profilecluster import devices_table, links_table  # noqa: E402


def test_profiler_measures_the_testbed_limits() -> None:
    result = profiler_check(instance=211, port=29711)
    measured, cores = result["measurement"], result["cores"]
    print(devices_table(measured))
    print(links_table(measured))
    assert measured.failures == []
    assert cores == pytest.approx([0.25, 0.5])
    for (a, b), mbps in PROFILER_LIMITS_MBPS.items():
        link = measured.link(a, b)
        assert link is not None
        got = link.bandwidth_mbps.median
        print(f"{a} -> {b}: bucket {mbps:g} Mbit/s, measured {got:.1f} "
              f"({(got / mbps - 1) * 100:+.1f} %), spread {link.bandwidth_mbps.spread:.1%}")
        assert got == pytest.approx(mbps, rel=0.15)
        assert link.latency_ms.count == 20 and link.bandwidth_mbps.count == 5
    ratio = result["compute_ratio"]
    print(f"compute ratio {ratio:.3f} against the quotas' {cores[1] / cores[0]:g} "
          f"(error {result['compute_error']:.1%}; issue 14's target, 15 %, is reported by "
          "bench/adapt.py)")
    # what holds in every run here: the half-core device measures faster than the quarter-core
    # one. The 15 % target on their ratio does not: over 8 runs on this machine the ratio was
    # 1.64-3.0 against the quotas' 2 (the quarter-core device computes up to ~25 % below its
    # quota in some runs, above it in others); bench/adapt.py reports it as
    # profiler_compute_error, and the closing note of issue 14 says it is not met
    assert ratio > 1.2
