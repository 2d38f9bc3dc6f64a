"""Root tests of ``spantrain_testbed``: real namespaces, real token buckets, real CPU quotas.

Every figure here is measured on the kernel objects the testbed creates: TCP throughput between
two namespaces against the configured link rate, a busy loop's CPU share against its cgroup
quota, a gloo all-reduce across namespaces, and that ``down`` (also after a crash) leaves
nothing behind. Instances 201–205 are used so a testbed someone brought up by hand (instance 0)
is never touched. Needs root, iproute2 (``ip``, ``tc``) and cgroup v1 cpu/cpuacct.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spantrain_planner.inputs.cluster import ClusterSpec, Topology, resolve
from tests.testbed.requirements import testbed_missing

pytestmark = [pytest.mark.root]

if (missing := testbed_missing()) is not None:
    pytest.skip(missing, allow_module_level=True)

from spantrain_testbed import (  # noqa: E402
    Testbed,
    cgroups,
    netns,
    plan_network,
    plan_quotas,
    sweep,
)
from spantrain_testbed.netns import (  # noqa: E402
    JUMBO_MIN_BITS_PER_SECOND,
    JUMBO_MTU,
    STANDARD_MTU,
    leftovers,
    pair_mtu,
    setup_commands,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PY = sys.executable
MBIT = 1e6 / 8  # bytes/s per Mbit/s


def three_devices() -> Topology:
    """a -50- b, a -400- c, b -50- c (Mbit/s); c is twice as fast as a and b. a-c is fast
    enough for jumbo packets, the others carry standard ones."""
    spec = ClusterSpec.model_validate({
        "name": "tb3",
        "nodes": [
            {"name": "a", "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]},
            {"name": "b", "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]},
            {"name": "c", "devices": [{"computeTflops": 2, "memoryBytes": "1Gi"}]},
        ],
        "links": {"matrix": [
            {"a": "a", "b": "b", "bandwidthMbps": 50},
            {"a": "a", "b": "c", "bandwidthMbps": 400},
            {"a": "b", "b": "c", "bandwidthMbps": 50},
        ]},
    })
    return resolve(spec)


def two_nodes_three_devices() -> Topology:
    """Node x holds two devices (120 Mbit/s between them), node y one; x–y at 80 Mbit/s."""
    spec = ClusterSpec.model_validate({
        "name": "shared",
        "nodes": [
            {"name": "x", "intraNodeBandwidthMbps": 120,
             "devices": [{"count": 2, "computeTflops": 1, "memoryBytes": "1Gi"}]},
            {"name": "y", "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]},
        ],
        "links": {"matrix": [{"a": "x", "b": "y", "bandwidthMbps": 80}]},
    })
    return resolve(spec)


def _nothing_left(instance: int) -> None:
    namespaces, links = leftovers(instance)
    assert namespaces == [] and links == [], (namespaces, links)
    ns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"stb{instance}-" not in ns_list
    link_list = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"stb{instance}-" not in link_list
    for root in (cgroups.CPU_ROOT, cgroups.CPUACCT_ROOT):
        assert not (root / f"stb{instance}").exists()
    assert not Path(f"/run/spantrain-testbed/stb{instance}.json").exists()


@pytest.fixture(scope="module")
def tb3() -> Iterator[Testbed]:
    # 0.25 cores per TFLOP/s: a and b get 0.25 of a core each, c 0.5
    with Testbed(three_devices(), instance=201, cores_per_tflops=0.25) as tb:
        yield tb
    _nothing_left(201)


def measure(tb: Testbed, src: int, dst: int, port: int, seconds: float = 3.0) -> float:
    """Steady-state TCP goodput src -> dst in bytes/s, measured by a receiver in dst's ns."""
    probe = str(HERE / "tcp_probe.py")
    addr = tb.address(dst)
    recv = tb.run(dst, [PY, probe, "recv", addr, str(port), str(seconds + 3)],
                  stdout=subprocess.PIPE)
    send = tb.run(src, [PY, probe, "send", addr, str(port), str(seconds), str(2 * 10**9)],
                  stdout=subprocess.PIPE)
    send_out, _ = send.communicate(timeout=seconds + 30)
    recv_out, _ = recv.communicate(timeout=seconds + 30)
    assert send.returncode == 0 and recv.returncode == 0, (send_out, recv_out)
    rate = json.loads(recv_out)["rate"]
    assert rate is not None, recv_out
    return float(rate)


# -- pure planning -------------------------------------------------------------------------


def test_plan_names_addresses_and_buckets() -> None:
    plan = plan_network(three_devices(), 201)
    assert [d.address for d in plan.devices] == ["10.210.201.1", "10.210.201.2", "10.210.201.3"]
    assert all(len(d.ns_if) <= 15 and len(d.host_if) <= 15 for d in plan.devices)
    by_if = {s.interface: s for s in plan.shaping}
    a_out = by_if["stb201-u0"]
    assert a_out.kind == "htb"
    assert {(c.bits_per_second, c.destinations) for c in a_out.classes} == {
        (50_000_000, ("10.210.201.2",)), (400_000_000, ("10.210.201.3",))}
    shared = plan_network(two_nodes_three_devices(), 202)
    kinds = {s.interface: s.kind for s in shared.shaping}
    # x's uplink carries both x devices' traffic to y: one bucket, shared; the x devices'
    # own interfaces shape only same-node traffic (htb: their traffic to y is not theirs to cap)
    assert kinds == {"stb202-u0": "tbf", "stb202-u1": "tbf", "stb202-n0": "htb",
                     "stb202-n1": "htb"}
    # scaled x100: a-c (40 Gbit/s) is faster than any veth here and left unshaped
    fast = {s.interface: s for s in plan_network(three_devices(), 201, 100.0).shaping}
    assert [c.destinations for c in fast["stb201-u0"].classes] == [("10.210.201.2",)]
    assert plan.latency_ignored_seconds > 0 and "netem" in plan.notes[0]


def test_packets_are_as_large_as_the_link_carries_in_half_a_bucket() -> None:
    # half of 2 ms at the slower direction's rate, 1500 bytes at least, JUMBO_MTU at most
    assert pair_mtu(50_000_000, 50_000_000) == 6_250
    assert pair_mtu(400_000_000, 50_000_000) == 6_250
    assert pair_mtu(1_000_000, 1_000_000) == STANDARD_MTU
    assert pair_mtu(400_000_000, 400_000_000) == 50_000
    assert pair_mtu(10**9, 10**9) == JUMBO_MTU
    assert pair_mtu(None, None) == JUMBO_MTU  # unshaped
    plan = plan_network(three_devices(), 201)
    a, b, c = plan.devices
    # a: b at 50 Mbit/s, c at 400; ties go to the smaller packet on the subnet route
    assert (a.subnet_mtu, a.route_mtus) == (6_250, (("10.210.201.3", 50_000),))
    assert (b.subnet_mtu, b.route_mtus) == (6_250, ())
    assert (c.subnet_mtu, c.route_mtus) == (6_250, (("10.210.201.1", 50_000),))
    cmds = [" ".join(cmd) for cmd in setup_commands(plan)]
    assert "ip -n stb201-d0 route add 10.210.201.3/32 dev stb201-n0 src 10.210.201.1 mtu lock " \
        "50000" in cmds
    assert all(f"mtu {JUMBO_MTU}" in cmd for cmd in cmds if " type veth " in cmd)
    # every packet fits its bucket twice, headers included
    for shaping in plan.shaping:
        for cls in shaping.classes:
            assert cls.burst_bytes >= 2 * pair_mtu(cls.bits_per_second, cls.bits_per_second)
    # every pair fast (x20: 1 Gbit/s and more): jumbo on the subnet route, no exceptions
    fast = plan_network(three_devices(), 201, 20.0)
    assert {(d.subnet_mtu, d.route_mtus) for d in fast.devices} == {(JUMBO_MTU, ())}
    assert JUMBO_MIN_BITS_PER_SECOND <= 1e9


def test_quotas_scale_with_flops_and_fit_the_machine() -> None:
    quotas = plan_quotas(["a", "b", "c"], [1e12, 1e12, 2e12])
    assert sum(q.cores for q in quotas) == pytest.approx(1.8)
    assert quotas[2].cores == pytest.approx(2 * quotas[0].cores)
    with pytest.raises(ValueError, match="cores_per_tflops"):
        plan_quotas(["a", "b"], [4e12, 4e12], cores_per_tflops=0.5)


# -- real kernel objects -------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst", "mbps"), [(0, 1, 50), (0, 2, 400), (2, 1, 50)])
def test_tcp_throughput_matches_link_rate(tb3: Testbed, src: int, dst: int, mbps: int) -> None:
    rate = measure(tb3, src, dst, 5201 + src * 10 + dst)
    print(f"{src}->{dst}: configured {mbps} Mbit/s, measured {rate / MBIT:.1f} Mbit/s goodput")
    # goodput: the bucket counts Ethernet/IP/TCP headers, ~4.5 % of a 1514-byte frame
    assert rate == pytest.approx(mbps * MBIT, rel=0.15), f"{rate / MBIT:.1f} Mbit/s vs {mbps}"


def test_links_and_quotas_change_under_load(tb3: Testbed) -> None:
    """What the adapter benchmark does mid-run: a link's token bucket lowered, then restored,
    and a device's quota halved, each taking hold on the running kernel objects."""
    try:
        tb3.scale_links(0.5)
        slowed = measure(tb3, 0, 1, 5301)
        tb3.scale_links(1.0)
        restored = measure(tb3, 0, 1, 5302)
    finally:
        tb3.scale_links(1.0)
    print(f"0->1 at half rate {slowed / MBIT:.1f} Mbit/s, restored {restored / MBIT:.1f}")
    assert slowed == pytest.approx(25 * MBIT, rel=0.15)
    assert restored == pytest.approx(50 * MBIT, rel=0.15)
    loop = ("import time\nt0 = time.monotonic(); c0 = time.process_time()\n"
            "while time.monotonic() - t0 < 3.0: pass\n"
            "print((time.process_time() - c0) / (time.monotonic() - t0))")
    try:
        tb3.set_cores(0, 0.125)
        proc = tb3.run(0, [PY, "-c", loop], stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=60)
    finally:
        tb3.set_cores(0, 0.25)
    assert float(out) == pytest.approx(0.125, rel=0.2)


def test_cpu_quota_caps_a_busy_loop(tb3: Testbed) -> None:
    assert tb3.quotas[0].cores == pytest.approx(0.25)
    loop = ("import time\nt0 = time.monotonic(); c0 = time.process_time()\n"
            "while time.monotonic() - t0 < 4.0: pass\n"
            "print((time.process_time() - c0) / (time.monotonic() - t0))")
    before = tb3.cpu_seconds(0)
    proc = tb3.run(0, [PY, "-c", loop], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    share = float(out)
    print(f"quota 0.25 core: busy loop got {share:.3f}")
    assert share == pytest.approx(0.25, abs=0.07)
    assert tb3.cpu_seconds(0) - before >= 0.8  # cpuacct saw the loop (4 s at a quarter core)
    stats = cgroups.throttle_stats(201, 0)
    assert stats["nr_throttled"] > 0
    tb3.enforce_compute(False)
    try:
        proc = tb3.run(0, [PY, "-c", loop.replace("4.0", "1.5")], stdout=subprocess.PIPE)
        assert float(proc.communicate(timeout=60)[0]) > 0.4  # lifted: beyond the quarter core
    finally:
        tb3.enforce_compute(True)
    assert (cgroups.device_group(201, 0) / "cpu.cfs_quota_us").read_text().strip() == str(
        tb3.quotas[0].quota_us)
    assert tb3.quotas[0].quota_us == round(0.25 * tb3.quotas[0].period_us)


def test_pacing_removes_the_quota_burst_after_idle(tb3: Testbed) -> None:
    # a CFS quota lets a process that was idle run its first quota's worth of CPU at full
    # speed; a slow GPU does not, so the worker pads each action to CPU time / share
    assert tb3.device_env(0)["SPANTRAIN_PACE_CORES"] == "0.25"
    proc = tb3.run(0, [PY, str(HERE / "pace_probe.py")], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    got = json.loads(out.decode().strip().splitlines()[-1])
    smooth = got["cpu"] / got["share"]  # 8 ms for 2 ms of CPU at a quarter core
    print(f"2 ms of CPU after idle: {got['unpaced'] * 1e3:.1f} ms unpaced, "
          f"{got['paced'] * 1e3:.1f} ms paced, {smooth * 1e3:.1f} ms at a constant speed")
    assert got["paced"] >= 0.95 * smooth
    assert got["paced"] < 2.5 * smooth


def test_gloo_allreduce_across_namespaces(tb3: Testbed) -> None:
    script = str(HERE / "gloo_allreduce.py")
    procs = [tb3.run(r, [PY, script, str(r), "2", "29511"], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]
    assert [r["small"] for r in results] == [[3.0] * 4, [3.0] * 4]
    assert all(r["big_sum"] == 2_000_000.0 for r in results)
    assert [r["ifname"] for r in results] == ["stb201-n0", "stb201-n1"]
    # 4 MB each way over the 50 Mbit/s a-b link takes >= 0.6 s: gloo went through the bucket
    assert min(r["big_seconds"] for r in results) > 0.5


def test_devices_of_a_node_share_its_uplink() -> None:
    with Testbed(two_nodes_three_devices(), instance=202, cores_per_tflops=0.25) as tb:
        alone = measure(tb, 0, 2, 5301)
        assert alone == pytest.approx(80 * MBIT, rel=0.15)
        intra = measure(tb, 1, 0, 5304)
        assert intra == pytest.approx(120 * MBIT, rel=0.15)
        # both x devices send to y at once: together they still get one 80 Mbit/s link
        probe = str(HERE / "tcp_probe.py")
        addr = tb.address(2)
        recvs = [tb.run(2, [PY, probe, "recv", addr, str(port), "6"], stdout=subprocess.PIPE)
                 for port in (5302, 5303)]
        sends = [tb.run(src, [PY, probe, "send", addr, str(port), "3", str(10**9)],
                        stdout=subprocess.PIPE) for src, port in ((0, 5302), (1, 5303))]
        for s in sends:
            s.communicate(timeout=40)
        rates = [json.loads(r.communicate(timeout=40)[0])["rate"] for r in recvs]
        assert sum(rates) == pytest.approx(80 * MBIT, rel=0.15), [r / MBIT for r in rates]
        print(f"120 Mbit/s intra-node: {intra / MBIT:.1f}; "
              f"80 Mbit/s node link: alone {alone / MBIT:.1f}, two senders "
              f"{' + '.join(f'{r / MBIT:.1f}' for r in rates)} Mbit/s")
    _nothing_left(202)


def test_teardown_is_complete_and_idempotent() -> None:
    tb = Testbed(three_devices(), instance=203)
    tb.down()  # before up: nothing to do, no error
    tb.up()
    namespaces, links = leftovers(203)
    assert len(namespaces) == 3 and len(links) >= 3 + 3 * 2 + 1
    sleeper = tb.run(1, ["sleep", "300"])
    assert sleeper.pid in cgroups.pids(203)
    tb.down()
    assert sleeper.wait(timeout=10) is not None
    _nothing_left(203)
    tb.down()
    _nothing_left(203)


CRASHER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from tests.testbed.test_testbed import three_devices
from spantrain_testbed import Testbed
tb = Testbed(three_devices(), instance={instance}).up()
tb.run(0, ["sleep", "300"])
print("up", flush=True)
time.sleep(300)
"""


def _crash(instance: int) -> None:
    """A process brings an instance up, starts a sleeper in it and is SIGKILLed."""
    proc = subprocess.Popen([PY, "-c", CRASHER.format(repo=str(REPO), instance=instance)],
                            stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"up"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    namespaces, _ = leftovers(instance)
    assert len(namespaces) == 3  # the crash left everything behind
    assert len(cgroups.pids(instance)) == 1


def test_crash_then_down_sweeps_everything() -> None:
    _crash(204)
    sleeper = cgroups.pids(204)[0]
    down = subprocess.run([PY, "-m", "spantrain_testbed", "down", "--instance", "204"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    _nothing_left(204)
    assert not Path(f"/proc/{sleeper}").exists() or "Z" in Path(
        f"/proc/{sleeper}/stat").read_text().split(")")[1][:3]


def test_crash_then_startup_sweep() -> None:
    _crash(205)
    # any later testbed's up() removes instances whose owner died
    with Testbed(three_devices(), instance=206):
        _nothing_left(205)
    _nothing_left(206)


def test_cli_up_status_run_down() -> None:
    cluster = HERE / "tb3.yaml"
    # `spantrain testbed`; run outside the checkout so that a stale spantrain.egg-info there
    # cannot hide the installed entry points
    cli = [PY, "-m", "spantrain_planner.cli", "testbed"]
    try:
        up = subprocess.run([*cli, "up", str(cluster), "--instance", "207"], cwd=HERE,
                            capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        status = subprocess.run([*cli, "status", "--instance", "207", "--json"], cwd=HERE,
                                capture_output=True, text=True, timeout=60)
        (entry,) = json.loads(status.stdout)
        assert entry["namespaces"] == 3 and entry["owner_pid"] is None
        run = subprocess.run([*cli, "run", "--instance", "207", "b/cpu0", "--", "sh", "-c",
                              "echo $GLOO_SOCKET_IFNAME $SPANTRAIN_DEVICE_ADDR"],
                             cwd=HERE, capture_output=True, text=True, timeout=60)
        assert run.stdout.split() == ["stb207-n1", "10.210.207.2"], run.stderr
    finally:
        down = subprocess.run([*cli, "down", "--instance", "207"], cwd=HERE,
                              capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    _nothing_left(207)


def test_sweep_of_absent_instance_is_a_no_op() -> None:
    sweep(209)
    _nothing_left(209)
    assert netns.subnet(209) == "10.210.209.0/24"
