"""Network side of the testbed: namespaces, bridges, veths and token-bucket shaping.

Role: ``plan_network`` (pure) maps a resolved ``Topology`` to names, addresses and shaping
rules; ``setup_commands`` (pure) turns that into ``ip``/``tc`` command lines; ``apply`` runs
them; ``leftovers``/``remove`` find and delete every object of an instance by its name prefix,
so a crashed run is cleaned up by the next ``down`` or start-up sweep. Called by
``testbed.Testbed`` only.

Layout of instance ``N`` (every name starts with ``stbN-``; addresses are 10.210.N.0/24 and
only ever assigned inside the instance's own namespaces — the root namespace gets none, so no
traffic can leave the testbed)::

    ns stbN-d<i>: stbN-n<i> (10.210.N.<i+1>) ──veth── stbN-h<i> ─┐
                                                                  ├ bridge stbN-b<k> (node k)
    ns stbN-d<j>: ...                                            ─┘          │
                                              stbN-u<k> ──veth── stbN-w<k> ──┴ bridge stbN-br

Bandwidth, as the planner models it (each ordered pair of nodes is its own link):

* node → other nodes: egress of the node's uplink ``stbN-u<k>`` carries everything the node's
  devices send off-node, so devices of one node *share* the node's link. It gets an ``htb``
  qdisc with one class per destination node (rate = ceil = ``bandwidth[i][j]``) and ``u32``
  filters on the destination addresses of that node's devices; unmatched traffic (ARP) goes
  to an unshaped default class. Where a node talks to exactly one other node, a single
  ``tbf`` does the same job.
* device → device on the same node: egress of the device's own ``stbN-n<i>`` inside its
  namespace, ``htb`` classes per same-node destination, only where the intra-node rate is
  below ``UNSHAPED_BITS_PER_SECOND`` (faster links are left alone: a veth on this machine is
  slower than that anyway).

Packet size: every interface sends one TCP segment per packet; packets to a peer are half as
large as the slower direction of its link carries in ``BURST_SECONDS`` (the token bucket's
depth), between 1500 bytes and ``JUMBO_MTU`` (per-destination route MTUs), so slow links stay exact
and faster ones do not burn the devices' CPU quotas on per-packet kernel work.

Latency is NOT emulated: adding delay needs the ``netem`` qdisc, which this kernel lacks;
``tbf``/``htb`` only pace. The topology's latencies are recorded in the plan and reported.

Must not import torch, ``spantrain_worker`` or ``spantrain_operator``; uses only the standard
library and ``spantrain_planner.inputs.cluster``.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from spantrain_planner.inputs.cluster import Topology

PREFIX = "stb"
NAME_RE = re.compile(r"^stb(\d{1,3})-")
MAX_INSTANCE = 255
MAX_DEVICES = 250
#: Rates at or above this are not shaped (a veth on a small VM carries a few Gbit/s at most).
UNSHAPED_BITS_PER_SECOND = 10e9
#: Minimum token-bucket depth: a few MTU-sized packets. The bucket's depth is what a link
#: delivers at once after an idle spell: with 128 KiB (two 64 KiB GSO super-packets) a scaled
#: 20 Mbit/s link passed a 64 KB activation message in no time instead of 26 ms, so 1F1B's
#: round trips came out free. Every device's interface therefore sends one segment per packet
#: (``gso_max_segs 1``, no GSO super-packets), and packets to a peer are as large as two fit
#: in its bucket (``pair_mtu``).
MIN_BURST_BYTES = 8 * 1024
#: Token-bucket depth as time at the link's rate (above the minimum).
BURST_SECONDS = 0.002
#: Smallest packet: on slow links small packets keep a shallow token bucket exact.
STANDARD_MTU = 1500
#: Largest packet (unshaped links, and links where it takes at most ``BURST_SECONDS``). Every
#: packet costs the sending and the receiving device kernel CPU inside their CPU quota; at
#: 1500 bytes a 4-device all-reduce of 3.3 MB at a scaled in-node rate took 2.5x longer under
#: 0.12-core quotas than without them (measured: 500 vs 195 ms, the wire alone 102 ms), and a
#: 0.25-core stage of a pipeline on 85 Mbit/s links computed 40 % slower than alone — an
#: artefact of emulating GPU servers' DMA links and offloading NICs with a software network,
#: which large packets remove (measured after: 101 ms, the wire's time).
JUMBO_MTU = 65000
#: Packets per token bucket at least: a packet (with its Ethernet header) must fit the bucket
#: or ``tbf`` drops it, and two per bucket keep the flow smooth.
PACKETS_PER_BUCKET = 2
#: Rates at or above this use ``JUMBO_MTU``.
JUMBO_MIN_BITS_PER_SECOND = JUMBO_MTU * 8 * PACKETS_PER_BUCKET / BURST_SECONDS
#: Queue in front of a shaped class: this much time at the class's rate (min 256 KiB).
QUEUE_SECONDS = 0.05
MIN_QUEUE_BYTES = 256 * 1024
HTB_QUANTUM = 100_000  # bytes; explicit so htb does not warn "quantum is big"
DEFAULT_MINOR = 0xFFFF


class NetError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message has the command and its stderr."""


def subnet(instance: int) -> str:
    return f"10.210.{instance}.0/24"


def address(instance: int, device_index: int) -> str:
    return f"10.210.{instance}.{device_index + 1}"


def prefix(instance: int) -> str:
    return f"{PREFIX}{instance}-"


@dataclass(frozen=True)
class DeviceNet:
    """One device: its namespace, veth ends and address."""

    index: int
    device_id: str
    node_index: int
    netns: str
    host_if: str  # in the root namespace, on the node bridge
    ns_if: str  # inside the namespace; GLOO_SOCKET_IFNAME
    address: str
    #: MTU of the route to the rest of the instance's subnet (the most common of its peers'),
    #: and per-peer exceptions (address, MTU); see ``pair_mtu``
    subnet_mtu: int = STANDARD_MTU
    route_mtus: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class RateClass:
    """One token bucket: traffic to ``destinations`` (addresses) at ``bits_per_second``."""

    minor: int
    bits_per_second: int
    destinations: tuple[str, ...]
    label: str

    @property
    def burst_bytes(self) -> int:
        return max(MIN_BURST_BYTES, int(self.bits_per_second / 8 * BURST_SECONDS))

    @property
    def queue_bytes(self) -> int:
        return max(MIN_QUEUE_BYTES, int(self.bits_per_second / 8 * QUEUE_SECONDS))


@dataclass(frozen=True)
class Shaping:
    """Egress shaping of one interface: nothing, one ``tbf``, or ``htb`` classes."""

    interface: str
    netns: str | None  # None: the root namespace
    kind: str  # "none" | "tbf" | "htb"
    classes: tuple[RateClass, ...] = ()


@dataclass(frozen=True)
class NodeNet:
    """One node: its bridge and its uplink veth to the main bridge."""

    index: int
    name: str
    bridge: str
    uplink_if: str  # on the node bridge; egress = everything the node sends off-node
    trunk_if: str  # on the main bridge


@dataclass(frozen=True)
class NetPlan:
    """Every name, address and token bucket of one testbed instance."""

    instance: int
    bridge: str
    devices: tuple[DeviceNet, ...]
    nodes: tuple[NodeNet, ...]
    shaping: tuple[Shaping, ...]
    latency_ignored_seconds: float = 0.0  # the largest latency the topology asked for
    notes: tuple[str, ...] = field(default_factory=tuple)


def _rate_bits(bytes_per_second: float, scale: float) -> int | None:
    """Rate in bit/s for tc, or None where the link is left unshaped."""
    bits = bytes_per_second * 8.0 * scale
    if bits != bits or bits >= UNSHAPED_BITS_PER_SECOND:  # NaN or inf or fast
        return None
    return max(8_000, round(bits))


def _shaping(
    interface: str,
    netns: str | None,
    groups: Sequence[tuple[str, int | None, tuple[str, ...]]],
    other_traffic: bool,
) -> Shaping:
    """``groups``: (label, rate or None, destination addresses). tbf iff one shaped group
    covers every destination the interface can reach."""
    shaped = [(label, rate, dests) for label, rate, dests in groups if rate is not None]
    if not shaped:
        return Shaping(interface, netns, "none")
    if len(groups) == 1 and not other_traffic:
        label, rate, dests = shaped[0]
        assert rate is not None
        return Shaping(interface, netns, "tbf", (RateClass(1, rate, dests, label),))
    classes = tuple(
        RateClass(0x10 + k, rate, dests, label)
        for k, (label, rate, dests) in enumerate(shaped)
        if rate is not None
    )
    return Shaping(interface, netns, "htb", classes)


def plan_network(
    topology: Topology,
    instance: int,
    bandwidth_scale: float = 1.0,
    routed: Mapping[int, Sequence[str]] | None = None,
) -> NetPlan:
    """Names, addresses and token buckets for ``topology`` (pure).

    ``bandwidth_scale`` multiplies every link rate (the benchmark scales a 100 Mbit/s WAN
    down together with compute so that transfer/compute proportions are kept). ``routed``
    maps a device index to networks (CIDRs) reached through that device, such as the pod
    network of a Kubernetes node running in it: traffic to them is shaped like traffic to the
    device itself (the caller adds the routes).
    """
    extra = {i: tuple(cidrs) for i, cidrs in (routed or {}).items()}
    if not 0 <= instance <= MAX_INSTANCE:
        raise ValueError(f"testbed instance must be 0..{MAX_INSTANCE}, got {instance}")
    if not 0 < topology.num_devices <= MAX_DEVICES:
        raise ValueError(
            f"the testbed holds 1..{MAX_DEVICES} devices (one /24), the cluster has "
            f"{topology.num_devices}; use a smaller cluster description"
        )
    if bandwidth_scale <= 0:
        raise ValueError(f"bandwidth_scale must be > 0, got {bandwidth_scale}")
    pre = prefix(instance)
    node_names: list[str] = []
    for device in topology.devices:
        if device.node not in node_names:
            node_names.append(device.node)
    nodes = tuple(
        NodeNet(k, name, f"{pre}b{k}", f"{pre}u{k}", f"{pre}w{k}")
        for k, name in enumerate(node_names)
    )
    devices = tuple(
        DeviceNet(
            index=device.index,
            device_id=device.id,
            node_index=node_names.index(device.node),
            netns=f"{pre}d{device.index}",
            host_if=f"{pre}h{device.index}",
            ns_if=f"{pre}n{device.index}",
            address=address(instance, device.index),
        )
        for device in topology.devices
    )
    devices = tuple(_with_mtus(d, devices, topology, bandwidth_scale) for d in devices)
    members = [[d for d in devices if d.node_index == k] for k in range(len(nodes))]
    shaping: list[Shaping] = []
    for node in nodes:
        src = members[node.index][0].index
        groups: list[tuple[str, int | None, tuple[str, ...]]] = []
        for other in nodes:
            if other.index == node.index:
                continue
            dst = members[other.index][0].index
            rate = _rate_bits(topology.bandwidth[src][dst], bandwidth_scale)
            dests = tuple(
                a for d in members[other.index] for a in (d.address, *extra.get(d.index, ()))
            )
            groups.append((f"{node.name}->{other.name}", rate, dests))
        shaping.append(_shaping(node.uplink_if, None, groups, other_traffic=False))
    for dev in devices:
        peers = [p for p in members[dev.node_index] if p.index != dev.index]
        groups = [
            (
                f"{dev.device_id}->{p.device_id}",
                _rate_bits(topology.bandwidth[dev.index][p.index], bandwidth_scale),
                (p.address, *extra.get(p.index, ())),
            )
            for p in peers
        ]
        shaping.append(_shaping(dev.ns_if, dev.netns, groups, other_traffic=len(nodes) > 1))
    worst_latency = max((max(row) for row in topology.latency), default=0.0)
    return NetPlan(
        instance=instance,
        bridge=f"{pre}br",
        devices=devices,
        nodes=nodes,
        shaping=tuple(s for s in shaping if s.kind != "none"),
        latency_ignored_seconds=worst_latency,
        notes=("latency not emulated: the kernel has no netem; only bandwidth is enforced",),
    )


def pair_mtu(rate_bits: int | None, back_bits: int | None) -> int:
    """Packet size between two devices: a ``PACKETS_PER_BUCKET``-th of what the slower
    direction carries in ``BURST_SECONDS`` (the token bucket's depth), within
    ``STANDARD_MTU``..``JUMBO_MTU``; both ends use the same, so they agree on the MSS."""
    rates = [r for r in (rate_bits, back_bits) if r is not None]
    if not rates:
        return JUMBO_MTU
    fits = int(min(rates) * BURST_SECONDS / 8 / PACKETS_PER_BUCKET)
    return max(STANDARD_MTU, min(JUMBO_MTU, fits))


def _with_mtus(
    dev: DeviceNet, devices: Sequence[DeviceNet], topology: Topology, scale: float
) -> DeviceNet:
    """``dev`` with its packet sizes: the most common one on the subnet route, exceptions per
    peer (few routes where most links are alike)."""
    i = dev.index
    mtus = {
        p.address: pair_mtu(_rate_bits(topology.bandwidth[i][p.index], scale),
                            _rate_bits(topology.bandwidth[p.index][i], scale))
        for p in devices
        if p.index != i
    }
    counts = Counter(mtus.values())
    subnet_mtu = max(counts, key=lambda m: (counts[m], -m)) if counts else STANDARD_MTU
    exceptions = tuple((a, m) for a, m in mtus.items() if m != subnet_mtu)
    return replace(dev, subnet_mtu=subnet_mtu, route_mtus=exceptions)


def _tc(shaping: Shaping) -> list[str]:
    return ["tc"] if shaping.netns is None else ["tc", "-n", shaping.netns]


def shaping_commands(shaping: Shaping) -> list[list[str]]:
    """``tc`` command lines for one interface's egress (pure)."""
    tc, dev = _tc(shaping), shaping.interface
    if shaping.kind == "none":
        return []
    if shaping.kind == "tbf":
        (cls,) = shaping.classes
        return [[*tc, "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", f"{cls.bits_per_second}bit", "burst", str(cls.burst_bytes),
                 "limit", str(cls.queue_bytes)]]
    cmds = [[*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb",
             "default", f"{DEFAULT_MINOR:x}"],
            [*tc, "class", "add", "dev", dev, "parent", "1:", "classid", f"1:{DEFAULT_MINOR:x}",
             "htb", "rate", f"{int(UNSHAPED_BITS_PER_SECOND)}bit", "quantum", str(HTB_QUANTUM)]]
    for cls in shaping.classes:
        classid = f"1:{cls.minor:x}"
        cmds.append([*tc, "class", "add", "dev", dev, "parent", "1:", "classid", classid, "htb",
                     "rate", f"{cls.bits_per_second}bit", "ceil", f"{cls.bits_per_second}bit",
                     "burst", str(cls.burst_bytes), "cburst", str(cls.burst_bytes),
                     "quantum", str(HTB_QUANTUM)])
        cmds.append([*tc, "qdisc", "add", "dev", dev, "parent", classid, "handle",
                     f"{cls.minor:x}:", "bfifo", "limit", str(cls.queue_bytes)])
        for dest in cls.destinations:
            cmds.append([*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip",
                         "prio", "1", "u32", "match", "ip", "dst",
                         dest if "/" in dest else f"{dest}/32",
                         "flowid", classid])
    return cmds


def rate_commands(shaping: Shaping, factor: float) -> list[list[str]]:
    """``tc`` command lines that set every token bucket of an interface to ``factor`` times its
    planned rate while traffic flows (pure): the adapter benchmark throttles and jitters
    links of a running job with them."""
    tc, dev = _tc(shaping), shaping.interface
    cmds: list[list[str]] = []
    for cls in shaping.classes:
        bits = max(8_000, round(cls.bits_per_second * factor))
        scaled = replace(cls, bits_per_second=bits)
        # never a smaller bucket or queue than set up: the routes' MTUs were chosen for the
        # planned rate, and a packet larger than the bucket would never leave
        burst = max(scaled.burst_bytes, cls.burst_bytes)
        if shaping.kind == "tbf":
            cmds.append([*tc, "qdisc", "change", "dev", dev, "root", "tbf", "rate", f"{bits}bit",
                         "burst", str(burst),
                         "limit", str(max(scaled.queue_bytes, cls.queue_bytes))])
        else:
            cmds.append([*tc, "class", "change", "dev", dev, "parent", "1:", "classid",
                         f"1:{cls.minor:x}", "htb", "rate", f"{bits}bit", "ceil", f"{bits}bit",
                         "burst", str(burst), "cburst", str(burst), "quantum", str(HTB_QUANTUM)])
    return cmds


def setup_commands(plan: NetPlan) -> list[list[str]]:
    """Every command that builds the instance, in order (pure)."""
    # every interface carries jumbo packets; the routes decide which peers get them
    mtu = ["mtu", str(JUMBO_MTU)]
    cmds: list[list[str]] = [
        ["ip", "link", "add", plan.bridge, *mtu, "type", "bridge"],
        ["ip", "link", "set", plan.bridge, "up"],
    ]
    for node in plan.nodes:
        cmds += [
            ["ip", "link", "add", node.bridge, *mtu, "type", "bridge"],
            ["ip", "link", "set", node.bridge, "up"],
            ["ip", "link", "add", node.uplink_if, *mtu, "type", "veth", "peer", "name",
             node.trunk_if, *mtu],
            ["ip", "link", "set", node.uplink_if, "master", node.bridge, "up"],
            ["ip", "link", "set", node.trunk_if, "master", plan.bridge, "up"],
        ]
    for dev in plan.devices:
        node = plan.nodes[dev.node_index]
        ns = ["ip", "-n", dev.netns]
        cmds += [
            ["ip", "netns", "add", dev.netns],
            ["ip", "link", "add", dev.host_if, *mtu, "type", "veth", "peer", "name", dev.ns_if,
             "netns", dev.netns, *mtu],
            ["ip", "link", "set", dev.host_if, "master", node.bridge, "up"],
            # gloo takes the interface's first address: make sure it is the IPv4 one
            ["ip", "netns", "exec", dev.netns, "sh", "-c",
             "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"],
            [*ns, "addr", "add", f"{dev.address}/24", "dev", dev.ns_if],
            [*ns, "link", "set", "lo", "up"],
            [*ns, "link", "set", dev.ns_if, "gso_max_segs", "1"],
            [*ns, "link", "set", dev.ns_if, "up"],
            [*ns, "route", "replace", subnet(plan.instance), "dev", dev.ns_if, "proto", "kernel",
             "scope", "link", "src", dev.address, "mtu", "lock", str(dev.subnet_mtu)],
        ]
        cmds += [
            [*ns, "route", "add", f"{peer}/32", "dev", dev.ns_if, "src", dev.address,
             "mtu", "lock", str(peer_mtu)]
            for peer, peer_mtu in dev.route_mtus
        ]
    for shaping in plan.shaping:
        cmds += shaping_commands(shaping)
    return cmds


def run_cmd(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=60)
    if check and proc.returncode != 0:
        raise NetError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def apply(plan: NetPlan) -> None:
    """Create the instance's kernel objects (the caller removes them on failure)."""
    for cmd in setup_commands(plan):
        run_cmd(cmd)


def _instance_of(name: str) -> int | None:
    match = NAME_RE.match(name)
    return int(match.group(1)) if match else None


def list_netns() -> list[str]:
    out = run_cmd(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_links() -> list[str]:
    out = run_cmd(["ip", "-o", "link", "show"]).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def leftovers(instance: int | None = None) -> tuple[list[str], list[str]]:
    """(namespaces, links) named like a testbed instance (``None``: any instance)."""

    def ours(name: str) -> bool:
        found = _instance_of(name)
        return found is not None and (instance is None or found == instance)

    return [n for n in list_netns() if ours(n)], [n for n in list_links() if ours(n)]


def instances_present() -> set[int]:
    namespaces, links = leftovers(None)
    found = {_instance_of(n) for n in namespaces + links}
    return {i for i in found if i is not None}


def netns_pids(netns: str) -> list[int]:
    proc = run_cmd(["ip", "netns", "pids", netns], check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


def remove(instance: int, timeout: float = 10.0) -> None:
    """Delete the instance's namespaces and links (processes must be gone already).

    Deleting one end of a veth deletes both; a namespace's veth disappears with it, which the
    kernel does asynchronously, so this polls until nothing named ``stbN-`` is left.
    """
    namespaces, links = leftovers(instance)
    for ns in namespaces:
        run_cmd(["ip", "netns", "del", ns], check=False)
    deadline = time.monotonic() + timeout
    while True:
        namespaces, links = leftovers(instance)
        for link in links:
            run_cmd(["ip", "link", "del", link], check=False)
        namespaces, links = leftovers(instance)
        if not namespaces and not links:
            return
        if time.monotonic() > deadline:
            raise NetError(
                f"testbed instance {instance}: still present after {timeout}s: "
                f"namespaces {namespaces}, links {links}"
            )
        time.sleep(0.05)


def class_stats(shaping: Shaping) -> str:
    """``tc -s class show`` for a shaped interface (for ``status``)."""
    return run_cmd([*_tc(shaping), "-s", "class", "show", "dev", shaping.interface],
                   check=False).stdout
