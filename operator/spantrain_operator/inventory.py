"""Node inventory: Kubernetes nodes (as plain dicts) -> the planner's ``ClusterSpec``.

Role: read what every node is — architecture, accelerators, compute, memory, network tier,
bandwidth, latency, edge platform — from the labels, annotations and allocatable resources
real cloud-edge-end clusters carry (DESIGN.md, "What the operator reads from a node"), decide
which nodes a job may use (Ready, schedulable, matching its placement, taints tolerated) and
describe them to the planner: one device per GPU, one device per CPU-only node. Also decides
which planned nodes are lost (deleted, or NotReady past a grace period).

Called by ``handlers`` with node bodies from the kopf index; pure (no I/O, no clock: ``now`` is
an argument). Must not import torch, spantrain_worker, kopf or the Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from spantrain_planner.api import NodeSelectorRequirement, PlacementSpec, Toleration
from spantrain_planner.core.units import parse_bytes
from spantrain_planner.inputs.cluster import ClusterSpec, DeviceGroupSpec, LinksSpec, NodeSpec, Tier
from spantrain_planner.inputs.measured import DEFAULT_MAX_AGE, read_profile_annotation

L_ARCH = "kubernetes.io/arch"
L_HOSTNAME = "kubernetes.io/hostname"
L_ZONE = "topology.kubernetes.io/zone"
L_GPU_PRODUCT = "nvidia.com/gpu.product"
L_GPU_MEMORY = "nvidia.com/gpu.memory"  # MiB (GPU feature discovery)
L_GPU_COUNT = "nvidia.com/gpu.count"
R_GPU = "nvidia.com/gpu"
K_PROFILE = "spantrain.io/profile"  # measured profile (JSON), written by the profiler
K_TFLOPS = "spantrain.io/compute-tflops"
K_MEMORY = "spantrain.io/memory-bytes"
K_TIER = "spantrain.io/tier"
_TIERS: dict[str, Tier] = {"cloud": "cloud", "edge": "edge", "end": "end"}
K_BANDWIDTH = "spantrain.io/bandwidth-mbps"
K_LATENCY = "spantrain.io/latency-ms"
L_KUBEEDGE = "node-role.kubernetes.io/edge"
L_INSTANCE_TYPE = "node.kubernetes.io/instance-type"

#: Sustained fp32 TFLOP/s per GPU when nothing better is known (about half the datasheet peak,
#: what dense training kernels reach). Matched as a case-insensitive substring of the GPU
#: product label; longer keys first so "RTX-3090-Ti" does not read as "RTX-3090".
GPU_TFLOPS: dict[str, float] = {
    "H200": 30.0, "H100": 30.0, "A100": 12.0, "A10G": 15.0, "A10": 15.0, "A30": 5.0,
    "L40S": 40.0, "L40": 40.0, "L4": 15.0, "V100": 8.0, "T4": 4.0, "P100": 5.0,
    "RTX-4090": 40.0, "RTX-3090-Ti": 20.0, "RTX-3090": 18.0, "RTX-3080": 15.0,
    "RTX-3070": 10.0, "RTX-3060": 6.0, "RTX-2080": 5.0, "TITAN": 6.0,
    "Orin": 2.5, "Xavier": 0.7, "TX2": 0.3, "Nano": 0.2,
}
GPU_DEFAULT_TFLOPS = 5.0
#: Sustained fp32 GFLOP/s per CPU core by architecture (AVX2/NEON matmul, all cores busy).
CPU_GFLOPS_PER_CORE: dict[str, float] = {"amd64": 50.0, "arm64": 20.0, "arm": 5.0}
CPU_DEFAULT_GFLOPS_PER_CORE = 20.0
#: Share of a CPU-only node's allocatable memory a worker may plan for (the rest is the OS,
#: the runtime and the data pipeline).
CPU_MEMORY_FRACTION = 0.8
#: Taints that mean "not usable now" whatever the job tolerates.
UNUSABLE_TAINTS = frozenset(
    {
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/unschedulable",
        "node.kubernetes.io/network-unavailable",
        "node.kubernetes.io/out-of-disk",
    }
)


@dataclass(frozen=True)
class NodeFacts:
    """What the operator knows about one node (per-device values)."""

    name: str
    arch: str
    tier: Tier
    zone: str | None
    platform: str | None  # "kubeedge", "k3s" or None
    accelerator: str  # GPU product or "cpu"
    num_devices: int
    compute_tflops: float  # per device
    memory_bytes: int  # per device
    bandwidth_mbps: float | None
    latency_ms: float | None
    internal_ip: str | None
    taints: tuple[Mapping[str, Any], ...] = ()
    ready: bool = True
    schedulable: bool = True
    compute_source: str = "table"  # measured (profiler), label, or table (defaults)
    warning: str | None = None  # a profile annotation ignored, and why
    #: measured fixed cost per layer and pass (profile ``layerOverheadUs``); None: the
    #: planner's default for the kind of device
    layer_overhead_us: float | None = None

    @property
    def is_gpu(self) -> bool:
        return self.accelerator != "cpu"


@dataclass(frozen=True)
class Inventory:
    """The eligible nodes of a job, as the planner's cluster and as per-node facts."""

    cluster: ClusterSpec | None  # None when no node is eligible
    nodes: Mapping[str, NodeFacts]
    skipped: Mapping[str, str] = field(default_factory=dict)  # node -> why not eligible
    warnings: tuple[str, ...] = ()  # measured facts ignored (malformed, expired), per node

    @property
    def num_devices(self) -> int:
        return sum(n.num_devices for n in self.nodes.values())


def _meta(node: Mapping[str, Any], key: str) -> dict[str, str]:
    return dict((node.get("metadata") or {}).get(key) or {})


def _lookup(node: Mapping[str, Any], key: str) -> str | None:
    """A spantrain.io value: annotation first (numbers belong there), then label."""
    value = _meta(node, "annotations").get(key)
    if value is None:
        value = _meta(node, "labels").get(key)
    return None if value in (None, "") else str(value)


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number > 0 else None


def _int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value))
    except ValueError:
        return None


def cpu_cores(quantity: Any) -> float:
    """Kubernetes CPU quantity ("8", "7500m") to cores."""
    text = str(quantity or "0").strip()
    if text.endswith("m"):
        return float(text[:-1]) / 1000.0
    try:
        return float(text)
    except ValueError:
        return 0.0


def gpu_tflops(product: str) -> float:
    """Sustained fp32 TFLOP/s of a GPU product from the fallback table."""
    lowered = product.lower().replace(" ", "-")
    for key in sorted(GPU_TFLOPS, key=len, reverse=True):
        if key.lower() in lowered:
            return GPU_TFLOPS[key]
    return GPU_DEFAULT_TFLOPS


def _profile(node: Mapping[str, Any], now: datetime | None,
             max_age: timedelta) -> tuple[dict[str, Any], str | None]:
    """The measured facts of a node's profile annotation (camelCase keys, only those it has),
    and why it was ignored (malformed, expired) if it was."""
    raw = _meta(node, "annotations").get(K_PROFILE)
    if not raw:
        return {}, None
    prof, why = read_profile_annotation(raw, now=now, max_age=max_age)
    if prof is None:
        return {}, why
    return prof.model_dump(by_alias=True, exclude_none=True, mode="json"), None


def _condition(node: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def is_ready(node: Mapping[str, Any]) -> bool:
    cond = _condition(node, "Ready")
    return bool(cond and cond.get("status") == "True")


def platform_of(labels: Mapping[str, str], annotations: Mapping[str, str]) -> str | None:
    """kubeedge (node-role.kubernetes.io/edge), k3s (instance type or k3s.io/*), or None."""
    if L_KUBEEDGE in labels:
        return "kubeedge"
    if labels.get(L_INSTANCE_TYPE) == "k3s" or any(
        k.startswith("k3s.io/") for k in (*labels, *annotations)
    ):
        return "k3s"
    return None


def read_node(node: Mapping[str, Any], now: datetime | None = None,
              max_age: timedelta = DEFAULT_MAX_AGE) -> NodeFacts:
    """Read one node object (a dict with camelCase keys, as the API returns it).

    A profiler measurement (the ``spantrain.io/profile`` annotation) wins over labels while it
    is younger than ``max_age`` at ``now``; an expired or malformed one is ignored and said
    why in ``NodeFacts.warning``. Without ``now`` its age is not checked (callers that read a
    node only for its address and platform)."""
    meta = node.get("metadata") or {}
    name = str(meta.get("name"))
    labels = _meta(node, "labels")
    annotations = _meta(node, "annotations")
    status = node.get("status") or {}
    allocatable = dict(status.get("allocatable") or {})
    measured, warning = _profile(node, now, max_age)

    arch = labels.get(L_ARCH) or (status.get("nodeInfo") or {}).get("architecture") or "amd64"
    platform = platform_of(labels, annotations)
    num_gpus = _int(allocatable.get(R_GPU))
    if num_gpus is None:
        num_gpus = _int(labels.get(L_GPU_COUNT)) or 0
    product = labels.get(L_GPU_PRODUCT) or ("nvidia-gpu" if num_gpus else "")
    is_gpu = num_gpus > 0

    tier = _TIERS.get(_lookup(node, K_TIER) or "")
    if tier is None:
        tier = "edge" if platform == "kubeedge" else "end" if platform == "k3s" else "cloud"

    compute_source = "measured"
    tflops = _float(str(measured.get("computeTflops"))) if "computeTflops" in measured else None
    if tflops is None:
        compute_source = "label"
        tflops = _float(_lookup(node, K_TFLOPS))
    if tflops is None:
        compute_source = "table"
        if is_gpu:
            tflops = gpu_tflops(product)
        else:
            cores = max(cpu_cores(allocatable.get("cpu")), 1.0)
            per_core = CPU_GFLOPS_PER_CORE.get(arch, CPU_DEFAULT_GFLOPS_PER_CORE)
            tflops = cores * per_core / 1000.0

    memory = _int(measured.get("memoryBytes"))
    if memory is None:
        text = _lookup(node, K_MEMORY)
        try:
            memory = parse_bytes(text) if text is not None else None
        except ValueError:
            memory = None
    if memory is None and is_gpu and _int(labels.get(L_GPU_MEMORY)):
        memory = int(labels[L_GPU_MEMORY]) * 2**20
    if memory is None:
        try:
            total = parse_bytes(str(allocatable.get("memory", "0")))
        except ValueError:
            total = 0
        share = total // max(num_gpus, 1) if is_gpu else total  # Jetson: unified memory
        memory = int(share * CPU_MEMORY_FRACTION)

    internal_ip = None
    for addr in status.get("addresses") or []:
        if addr.get("type") == "InternalIP":
            internal_ip = str(addr.get("address"))
            break
    if internal_ip is None:
        internal_ip = annotations.get("k3s.io/internal-ip")

    return NodeFacts(
        name=name,
        arch=str(arch),
        tier=tier,
        zone=labels.get(L_ZONE),
        platform=platform,
        accelerator=product if is_gpu else "cpu",
        num_devices=num_gpus if is_gpu else 1,
        compute_tflops=float(tflops),
        memory_bytes=int(memory),
        bandwidth_mbps=_float(str(measured.get("bandwidthMbps")))
        if "bandwidthMbps" in measured
        else _float(_lookup(node, K_BANDWIDTH)),
        latency_ms=_float(str(measured.get("latencyMs")))
        if "latencyMs" in measured
        else _float(_lookup(node, K_LATENCY)),
        internal_ip=internal_ip,
        taints=tuple(dict(t) for t in (node.get("spec") or {}).get("taints") or []),
        ready=is_ready(node),
        schedulable=not (node.get("spec") or {}).get("unschedulable", False),
        compute_source=compute_source,
        warning=f"node {name}: {K_PROFILE} annotation {warning}" if warning else None,
        layer_overhead_us=_float(str(measured.get("layerOverheadUs")))
        if "layerOverheadUs" in measured
        else None,
    )


# ---------------------------------------------------------------------------------------------
# eligibility


def _requirement_holds(req: NodeSelectorRequirement, labels: Mapping[str, str]) -> bool:
    value = labels.get(req.key)
    if req.operator == "Exists":
        return req.key in labels
    if req.operator == "DoesNotExist":
        return req.key not in labels
    if req.operator == "In":
        return value is not None and value in req.values
    if req.operator == "NotIn":
        return value is None or value not in req.values
    number, bound = _int(value), _int(req.values[0] if req.values else None)
    if number is None or bound is None:
        return False
    return number > bound if req.operator == "Gt" else number < bound


def _tolerated(taint: Mapping[str, Any], tolerations: Sequence[Toleration]) -> bool:
    for tol in tolerations:
        if tol.effect is not None and tol.effect != taint.get("effect"):
            continue
        if tol.key is None and tol.operator == "Exists":
            return True
        if tol.key != taint.get("key"):
            continue
        if tol.operator == "Exists" or (tol.value or "") == (taint.get("value") or ""):
            return True
    return False


def ineligible_reason(
    node: Mapping[str, Any], facts: NodeFacts, placement: PlacementSpec
) -> str | None:
    """Why a node may not host this job's workers (None: it may)."""
    if not facts.ready:
        return "not Ready"
    if not facts.schedulable:
        return "cordoned (unschedulable)"
    labels = _meta(node, "labels")
    for key, value in placement.node_selector.items():
        if labels.get(key) != value:
            return f"nodeSelector {key}={value} does not match"
    for req in placement.match_expressions:
        if not _requirement_holds(req, labels):
            return f"matchExpressions {req.key} {req.operator} {req.values} does not hold"
    for taint in facts.taints:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if taint.get("key") in UNUSABLE_TAINTS:
            return f"taint {taint.get('key')}"
        if not placement.tolerate_node_taints and not _tolerated(taint, placement.tolerations):
            return f"taint {taint.get('key')}={taint.get('value', '')}:{taint.get('effect')}"
    return None


def _limit_devices(facts: list[NodeFacts], max_devices: int) -> list[NodeFacts]:
    """Keep the fastest ``max_devices`` devices (ties by node name): whole nodes first."""
    ranked = sorted(facts, key=lambda f: (-f.compute_tflops, f.name))
    kept: list[NodeFacts] = []
    left = max_devices
    for f in ranked:
        if left <= 0:
            break
        take = min(f.num_devices, left)
        kept.append(f if take == f.num_devices else _with_devices(f, take))
        left -= take
    return sorted(kept, key=lambda f: f.name)


def _with_devices(f: NodeFacts, count: int) -> NodeFacts:
    from dataclasses import replace

    return replace(f, num_devices=count)


def build_inventory(
    nodes: Iterable[Mapping[str, Any]],
    placement: PlacementSpec,
    *,
    name: str = "cluster",
    exclude: Iterable[str] = (),
    links: LinksSpec | None = None,
    now: datetime | None = None,
    max_age: timedelta = DEFAULT_MAX_AGE,
) -> Inventory:
    """The eligible nodes of a job and the planner's ``ClusterSpec`` for them.

    ``exclude`` names nodes never to use (for example nodes just lost). Nodes are sorted by
    name, so the same cluster always gives the same ``ClusterSpec`` (and the same plan).
    Measured facts older than ``max_age`` at ``now`` are not used (``read_node``).
    """
    excluded = set(exclude)
    warnings: list[str] = []
    eligible: list[NodeFacts] = []
    skipped: dict[str, str] = {}
    for node in sorted(nodes, key=lambda n: str((n.get("metadata") or {}).get("name"))):
        facts = read_node(node, now, max_age)
        if facts.warning:
            warnings.append(facts.warning)
        if facts.name in excluded:
            skipped[facts.name] = "lost"
            continue
        reason = ineligible_reason(node, facts, placement)
        if reason is not None:
            skipped[facts.name] = reason
            continue
        eligible.append(facts)
    if placement.max_devices is not None:
        eligible = _limit_devices(eligible, placement.max_devices)
    if not eligible:
        return Inventory(None, {}, skipped, tuple(warnings))
    spec = ClusterSpec(
        name=name,
        nodes=[
            NodeSpec(
                name=f.name,
                tier=f.tier,
                zone=f.zone,
                arch=f.arch,
                platform=f.platform,
                bandwidth_mbps=f.bandwidth_mbps,
                latency_ms=f.latency_ms,
                devices=[
                    DeviceGroupSpec(
                        count=f.num_devices,
                        accelerator=f.accelerator,
                        compute_tflops=f.compute_tflops,
                        memory_bytes=f.memory_bytes,
                        layer_overhead_us=f.layer_overhead_us,
                    )
                ],
            )
            for f in eligible
        ],
        links=links or LinksSpec(),
    )
    return Inventory(spec, {f.name: f for f in eligible}, skipped, tuple(warnings))


# ---------------------------------------------------------------------------------------------
# lost nodes


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 timestamp from the API (``...Z``), or None when absent or malformed."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def lost_nodes(
    planned: Iterable[str],
    nodes: Mapping[str, Mapping[str, Any]],
    *,
    grace_seconds: float,
    now: datetime,
) -> dict[str, str]:
    """Planned nodes that are gone: deleted, or not Ready for longer than the grace period.

    Returns node -> reason. A node not Ready for less than the grace period is not lost yet
    (see ``not_ready_nodes``).
    """
    lost: dict[str, str] = {}
    for name in planned:
        node = nodes.get(name)
        if node is None:
            lost[name] = "deleted"
            continue
        if is_ready(node):
            continue
        cond = _condition(node, "Ready") or {}
        since = parse_time(cond.get("lastTransitionTime"))
        if since is None or (now - since).total_seconds() >= grace_seconds:
            lost[name] = f"not Ready since {cond.get('lastTransitionTime', 'unknown')}"
    return lost


def not_ready_nodes(planned: Iterable[str], nodes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Planned nodes that exist but are not Ready (lost or within the grace period)."""
    return sorted(n for n in planned if n in nodes and not is_ready(nodes[n]))
