"""Two-level device grouping: network groups, then compute groups inside each.

Role: the paper's hierarchical clustering. Level 1 clusters *nodes* by link speed
(agglomerative, single linkage over node pairs in decreasing bandwidth): two groups merge
when the link joining them is within ``cut_ratio`` of the faster group's own speed (its
slowest internal link; a lone node's best link), so a link several times slower than what
either side has inside stays a cut. Devices on one
node are never split (intra-node links are the fastest). Level 2 splits each network group by
device speed: sorted fastest first, a new compute group starts when a device is more than
``tolerance`` slower than the group's fastest.

The search builds pipeline stages from these groups, so all-reduce traffic stays inside a
network group and only stage-boundary activations cross the slow links.

Pure: planner modules and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

from spantrain_planner.inputs.cluster import Topology


@dataclass(frozen=True)
class NetworkGroup:
    index: int
    devices: tuple[int, ...]  # topology indices, sorted by (node, index)
    compute_groups: tuple[tuple[int, ...], ...]  # fastest group first
    nodes: tuple[str, ...]
    internal_bandwidth: float  # slowest inter-node link inside (bytes/s); inf if one node


def _node_pairs(
    topology: Topology,
) -> tuple[list[str], dict[str, int], list[tuple[float, int, int]]]:
    nodes: list[str] = []
    first_device: dict[str, int] = {}
    for dev in topology.devices:
        if dev.node not in first_device:
            first_device[dev.node] = dev.index
            nodes.append(dev.node)
    pairs: list[tuple[float, int, int]] = []
    for a in range(len(nodes)):
        da = first_device[nodes[a]]
        for b in range(a + 1, len(nodes)):
            db = first_device[nodes[b]]
            pairs.append((topology.bandwidth[da][db], a, b))
    # fastest first; ties broken by node order so the result is deterministic
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return nodes, first_device, pairs


def network_groups_of_nodes(topology: Topology, cut_ratio: float) -> list[list[str]]:
    """Level 1 on nodes: lists of node names, one list per network group."""
    nodes, _, pairs = _node_pairs(topology)
    parent = list(range(len(nodes)))
    # a group's "own speed": slowest link used to build it; a lone node's is its best link
    best_link = [0.0] * len(nodes)
    for bw, a, b in pairs:
        best_link[a] = max(best_link[a], bw)
        best_link[b] = max(best_link[b], bw)
    speed = list(best_link)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for bw, a, b in pairs:
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        if bw * cut_ratio >= max(speed[ra], speed[rb]):
            parent[rb] = ra
            speed[ra] = min(speed[ra], speed[rb], bw)
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(nodes):
        groups.setdefault(find(i), []).append(name)
    return sorted(groups.values(), key=lambda g: nodes.index(g[0]))


def compute_groups(
    topology: Topology, devices: list[int], tolerance: float
) -> list[tuple[int, ...]]:
    """Level 2: devices of one network group split by speed (fastest group first)."""
    ordered = sorted(devices, key=lambda d: (-topology.devices[d].flops, d))
    result: list[list[int]] = []
    for d in ordered:
        if result and topology.devices[d].flops >= topology.devices[result[-1][0]].flops * (
            1.0 - tolerance
        ):
            result[-1].append(d)
        else:
            result.append([d])
    return [tuple(sorted(g)) for g in result]


def group_devices(topology: Topology, cut_ratio: float, tolerance: float) -> list[NetworkGroup]:
    """Both levels; groups ordered by their first node's position in the cluster."""
    by_node: dict[str, list[int]] = {}
    for dev in topology.devices:
        by_node.setdefault(dev.node, []).append(dev.index)
    groups: list[NetworkGroup] = []
    for k, node_names in enumerate(network_groups_of_nodes(topology, cut_ratio)):
        devices = [d for n in node_names for d in by_node[n]]
        internal = float("inf")
        for i in range(len(node_names)):
            for j in range(i + 1, len(node_names)):
                a, b = by_node[node_names[i]][0], by_node[node_names[j]][0]
                internal = min(internal, topology.bandwidth[a][b])
        groups.append(
            NetworkGroup(
                index=k,
                devices=tuple(devices),
                compute_groups=tuple(compute_groups(topology, devices, tolerance)),
                nodes=tuple(node_names),
                internal_bandwidth=internal,
            )
        )
    return groups
