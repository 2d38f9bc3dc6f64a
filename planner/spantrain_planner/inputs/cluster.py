"""Device inventory: the cluster description the planner reads, and its resolved topology.

Role: the boundary model for "what devices exist and how they are connected". Users write it
as YAML/JSON (``examples/clusters/``), the operator builds it from Kubernetes nodes, the
testbed builds network namespaces from it. ``resolve()`` turns it into a frozen ``Topology``
with one entry per device and dense bandwidth/latency matrices, which every later pass uses.

Link resolution for a device pair, first match wins:
  1. same node: the node's intra-node bandwidth/latency (PCIe/NVLink, or shared memory);
  2. ``links.matrix`` entry for the node pair;
  3. the most specific ``links.rules`` entry (node-node > node-tier > tier-tier);
  4. the slower of the two nodes' uplinks (node values, else tier defaults); latencies add.

Pure: imports pydantic, PyYAML and planner modules only; never torch, kopf or a Kubernetes
client.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from spantrain_planner.core.errors import InputError
from spantrain_planner.core.units import mbps_to_bytes_per_second, parse_bytes

Tier = Literal["cloud", "edge", "end"]

#: Defaults when a node says nothing about its uplink: what the tiers typically get.
TIER_DEFAULTS: dict[str, tuple[float, float]] = {
    # tier: (uplink Mbit/s, one-way latency ms)
    "cloud": (10_000.0, 0.1),
    "edge": (1_000.0, 1.0),
    "end": (300.0, 2.0),
}
DEFAULT_INTRA_NODE_MBPS = 100_000.0  # PCIe 4 x16 order of magnitude, or shared memory
DEFAULT_INTRA_NODE_LATENCY_MS = 0.01
#: Fixed cost per layer per pass when a device does not say: kernel launches on accelerators,
#: Python/ATen dispatch and cache effects on CPUs (measured on a 2-core x86 with torch 2.9).
DEFAULT_LAYER_OVERHEAD_US = {"accelerator": 20.0, "cpu": 300.0}


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class DeviceGroupSpec(_Model):
    """One kind of device on a node, ``count`` times (for example 4 identical GPUs)."""

    count: int = Field(1, ge=1, description="How many identical devices of this kind.")
    accelerator: str = Field(
        "cpu", description="Accelerator product (e.g. NVIDIA-GeForce-RTX-3090) or 'cpu'."
    )
    compute_tflops: float = Field(
        gt=0, description="Effective (measured or sustained) compute per device in TFLOP/s."
    )
    memory_bytes: int = Field(
        description="Usable memory per device in bytes; Kubernetes quantities like 24Gi allowed."
    )
    layer_overhead_us: float | None = Field(
        None,
        ge=0,
        description="Fixed cost per layer per pass in microseconds (kernel launches, framework "
        "dispatch); default 20 for accelerators, 300 for CPUs.",
    )

    @field_validator("memory_bytes", mode="before")
    @classmethod
    def _parse_memory(cls, value: Any) -> int:
        try:
            return parse_bytes(value)
        except ValueError as err:
            raise ValueError(f"memoryBytes: {err}") from None


class NodeSpec(_Model):
    """A machine (Kubernetes node) holding one or more devices."""

    name: str = Field(min_length=1, description="Node name (unique).")
    tier: Tier = Field("cloud", description="Network tier hint: cloud, edge or end.")
    zone: str | None = Field(None, description="Topology zone (topology.kubernetes.io/zone).")
    arch: str = Field("amd64", description="CPU architecture (kubernetes.io/arch).")
    platform: str | None = Field(None, description="Edge platform: kubeedge, k3s or None.")
    bandwidth_mbps: float | None = Field(
        None, gt=0, description="Uplink bandwidth in Mbit/s (default: the tier's)."
    )
    latency_ms: float | None = Field(
        None, ge=0, description="Uplink one-way latency in ms (default: the tier's)."
    )
    intra_node_bandwidth_mbps: float = Field(
        DEFAULT_INTRA_NODE_MBPS, gt=0, description="Bandwidth between devices of this node."
    )
    devices: list[DeviceGroupSpec] = Field(min_length=1, description="Devices on this node.")


class LinkRule(_Model):
    """Bandwidth/latency between two endpoints; each endpoint a tier or a node name."""

    between: tuple[str, str] = Field(description="Two tiers or node names, order irrelevant.")
    bandwidth_mbps: float = Field(gt=0, description="Link bandwidth in Mbit/s.")
    latency_ms: float = Field(0.5, ge=0, description="One-way latency in ms.")


class MatrixEntry(_Model):
    """A measured link from node ``a`` to node ``b`` (from the profiler).

    Links are directed (WAN uplinks are often slower than downlinks): the entry is the a -> b
    direction, and also b -> a unless the matrix has an entry of its own for b -> a.
    """

    a: str
    b: str
    bandwidth_mbps: float = Field(gt=0)
    latency_ms: float = Field(0.5, ge=0)


class LinksSpec(_Model):
    rules: list[LinkRule] = Field(default_factory=list, description="Overrides by tier/node.")
    matrix: list[MatrixEntry] = Field(default_factory=list, description="Measured node pairs.")


class ClusterSpec(_Model):
    """A heterogeneous cluster: nodes with devices, and how the nodes are connected."""

    name: str = Field("cluster", description="A name for reports.")
    nodes: list[NodeSpec] = Field(min_length=1)
    links: LinksSpec = Field(default_factory=LinksSpec)

    @model_validator(mode="after")
    def _check_names(self) -> ClusterSpec:
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"node names must be unique; repeated: {', '.join(dupes)}")
        known = set(names) | set(TIER_DEFAULTS)
        for rule in self.links.rules:
            for end in rule.between:
                if end not in known:
                    raise ValueError(
                        f"links.rules: {end!r} is neither a tier (cloud, edge, end) nor a node"
                    )
        seen: set[tuple[str, str]] = set()
        for k, entry in enumerate(self.links.matrix):
            for end in (entry.a, entry.b):
                if end not in names:
                    raise ValueError(f"links.matrix[{k}]: unknown node {end!r}")
            if entry.a == entry.b:
                raise ValueError(f"links.matrix[{k}]: a link from {entry.a!r} to itself; a "
                                 "node's own devices use intraNodeBandwidthMbps")
            if (entry.a, entry.b) in seen:
                raise ValueError(f"links.matrix[{k}]: a second entry from {entry.a!r} to "
                                 f"{entry.b!r}; give each direction once")
            seen.add((entry.a, entry.b))
        return self


@dataclass(frozen=True)
class Device:
    """One device (one worker process, one pod) after resolution."""

    index: int
    id: str
    node: str
    tier: str
    zone: str | None
    arch: str
    accelerator: str
    flops: float  # effective FLOP/s
    memory_bytes: int
    platform: str | None = None
    layer_overhead: float = DEFAULT_LAYER_OVERHEAD_US["accelerator"] * 1e-6  # seconds


@dataclass(frozen=True)
class Topology:
    """Resolved cluster: devices plus dense pairwise link matrices (bytes/s and seconds)."""

    name: str
    devices: tuple[Device, ...]
    bandwidth: tuple[tuple[float, ...], ...]  # bytes per second, [i][j]
    latency: tuple[tuple[float, ...], ...]  # seconds, [i][j]

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def transfer_seconds(self, src: int, dst: int, num_bytes: float) -> float:
        """Time to move ``num_bytes`` from device ``src`` to ``dst`` (alpha-beta model)."""
        if src == dst or num_bytes <= 0:
            return 0.0
        return self.latency[src][dst] + num_bytes / self.bandwidth[src][dst]

    def device(self, device_id: str) -> Device:
        for dev in self.devices:
            if dev.id == device_id:
                return dev
        raise KeyError(device_id)

    def subset(self, indices: list[int]) -> Topology:
        """The topology restricted to some devices, re-indexed from 0 (order kept)."""
        devs = tuple(
            Device(
                index=k,
                id=self.devices[i].id,
                node=self.devices[i].node,
                tier=self.devices[i].tier,
                zone=self.devices[i].zone,
                arch=self.devices[i].arch,
                accelerator=self.devices[i].accelerator,
                flops=self.devices[i].flops,
                memory_bytes=self.devices[i].memory_bytes,
                platform=self.devices[i].platform,
                layer_overhead=self.devices[i].layer_overhead,
            )
            for k, i in enumerate(indices)
        )
        bw = tuple(tuple(self.bandwidth[i][j] for j in indices) for i in indices)
        lat = tuple(tuple(self.latency[i][j] for j in indices) for i in indices)
        return Topology(self.name, devs, bw, lat)


def _endpoint_matches(end: str, node: NodeSpec) -> int:
    """0 = no match, 1 = tier match, 2 = node-name match."""
    if end == node.name:
        return 2
    if end == node.tier:
        return 1
    return 0


def _rule_score(rule: LinkRule, a: NodeSpec, b: NodeSpec) -> int:
    """How specifically a rule names the pair (0: not at all; 4: both node names)."""
    x, y = rule.between
    forward = _endpoint_matches(x, a), _endpoint_matches(y, b)
    backward = _endpoint_matches(x, b), _endpoint_matches(y, a)
    return max(sum(forward) if all(forward) else 0, sum(backward) if all(backward) else 0)


def _node_link(spec: ClusterSpec, a: NodeSpec, b: NodeSpec) -> tuple[float, float]:
    """(Mbit/s, one-way ms) from node ``a`` to node ``b`` (distinct): the matrix entry of that
    direction, else of the reverse one, else the most specific rule, else tier defaults."""
    forward = [e for e in spec.links.matrix if (e.a, e.b) == (a.name, b.name)]
    backward = [e for e in spec.links.matrix if (e.a, e.b) == (b.name, a.name)]
    for entry in (*forward, *backward):
        return entry.bandwidth_mbps, entry.latency_ms
    best: tuple[int, LinkRule] | None = None
    for rule in spec.links.rules:
        score = _rule_score(rule, a, b)
        if score and (best is None or score > best[0]):
            best = (score, rule)
    if best is not None:
        return best[1].bandwidth_mbps, best[1].latency_ms
    bw_a, lat_a = TIER_DEFAULTS[a.tier]
    bw_b, lat_b = TIER_DEFAULTS[b.tier]
    bw = min(a.bandwidth_mbps or bw_a, b.bandwidth_mbps or bw_b)
    lat = (a.latency_ms if a.latency_ms is not None else lat_a) + (
        b.latency_ms if b.latency_ms is not None else lat_b
    )
    return bw, lat


def resolve(spec: ClusterSpec) -> Topology:
    """Expand nodes into devices and compute the pairwise link matrices."""
    devices: list[Device] = []
    node_of: list[NodeSpec] = []
    for node in spec.nodes:
        k = 0
        for group in node.devices:
            kind = "gpu" if group.accelerator.lower() != "cpu" else "cpu"
            overhead_us = group.layer_overhead_us
            if overhead_us is None:
                overhead_us = DEFAULT_LAYER_OVERHEAD_US["cpu" if kind == "cpu" else "accelerator"]
            for _ in range(group.count):
                devices.append(
                    Device(
                        index=len(devices),
                        id=f"{node.name}/{kind}{k}",
                        node=node.name,
                        tier=node.tier,
                        zone=node.zone,
                        arch=node.arch,
                        accelerator=group.accelerator,
                        flops=group.compute_tflops * 1e12,
                        memory_bytes=group.memory_bytes,
                        platform=node.platform,
                        layer_overhead=overhead_us * 1e-6,
                    )
                )
                node_of.append(node)
                k += 1
    n = len(devices)
    pair_cache: dict[tuple[str, str], tuple[float, float]] = {}
    bw_rows: list[tuple[float, ...]] = []
    lat_rows: list[tuple[float, ...]] = []
    for i in range(n):
        bw_row: list[float] = []
        lat_row: list[float] = []
        for j in range(n):
            a, b = node_of[i], node_of[j]
            if i == j:
                mbps, ms = float("inf"), 0.0
            elif a.name == b.name:
                mbps, ms = a.intra_node_bandwidth_mbps, DEFAULT_INTRA_NODE_LATENCY_MS
            else:
                key = (a.name, b.name)  # directed: a measured matrix may be asymmetric
                if key not in pair_cache:
                    pair_cache[key] = _node_link(spec, a, b)
                mbps, ms = pair_cache[key]
            bw_row.append(mbps_to_bytes_per_second(mbps))
            lat_row.append(ms / 1000.0)
        bw_rows.append(tuple(bw_row))
        lat_rows.append(tuple(lat_row))
    return Topology(spec.name, tuple(devices), tuple(bw_rows), tuple(lat_rows))


class _YamlLoader(yaml.SafeLoader):
    """YAML as kubectl reads it (go-yaml): ``1e-3`` and ``1.0e3`` are numbers, where PyYAML's
    YAML 1.1 resolver would keep them strings (and a strict model would refuse them)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_document(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict, with a clear error naming the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise InputError(f"cannot read {p}: {err.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.load(text, Loader=_YamlLoader)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise InputError(f"{p} is not valid YAML/JSON: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"{p} must hold a mapping at the top level")
    return data


def load_cluster(path: str | Path) -> ClusterSpec:
    """Load and validate a cluster description file."""
    data = load_document(path)
    data.pop("apiVersion", None)
    data.pop("kind", None)
    try:
        return ClusterSpec.model_validate(data)
    except ValueError as err:
        raise InputError(f"{path}: invalid cluster description:\n{err}") from None
