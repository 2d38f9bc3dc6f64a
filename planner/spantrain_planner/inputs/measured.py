"""Measured cluster facts (what ``spantrain profile-cluster`` writes) and their merge.

Role: the boundary model of the cluster profiler and the pure functions that turn its
measurements into the planner's facts.

* ``DeviceMeasurement``: one device's compute from a weighted set of layer micro-benchmarks
  (``KernelMeasurement`` per layer kind -- matmul, conv, attention -- and precision: the
  effective FLOP/s *in the planner's FLOP counting* and the fixed cost per layer and pass),
  and its usable memory. ``annotation()`` is the flat JSON the operator's inventory reads from
  a node's ``spantrain.io/profile`` annotation.
* ``LinkMeasurement``: one *directed* node pair (WAN links are often asymmetric): one-way
  latency from a tiny payload's round trips, bandwidth from a large payload; each a ``Stat``
  (median, min, max, count) over repeats.
* ``ClusterMeasurement``: both, plus the probes that failed (``ProbeFailure``: which pair or
  device, and why). ``updated_with`` keeps an old fact wherever the new run failed to measure
  it; ``fresh`` drops facts older than a maximum age.
* ``apply_measurements``: a ``ClusterSpec`` with the fresh measured facts put in (compute,
  per-layer overhead, memory, a matrix entry per measured directed pair), and ``FactSource``
  rows saying where every fact came from: ``measured``, ``label`` (the description or node
  labels said so) or ``default`` (tier or device-kind defaults).

Pure: pydantic, PyYAML and planner modules only; never torch, kopf, a Kubernetes client or
the clock (``now`` is an argument).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from spantrain_planner.core.errors import InputError
from spantrain_planner.inputs.cluster import (
    DEFAULT_LAYER_OVERHEAD_US,
    TIER_DEFAULTS,
    ClusterSpec,
    DeviceGroupSpec,
    LinksSpec,
    MatrixEntry,
    NodeSpec,
    _rule_score,
    load_document,
)

KernelKind = Literal["matmul", "conv", "attention"]
Precision = Literal["fp32", "bf16", "fp16"]
Source = Literal["measured", "label", "default"]

KIND: Literal["ClusterMeasurement"] = "ClusterMeasurement"
#: Measurements older than this are ignored by default (devices and links change).
DEFAULT_MAX_AGE = timedelta(hours=24)
#: pc = sum(w_i * t_i): how much each layer kind weighs in a device's one compute figure when
#: the model's own kind is not known (times weighted, so the figure is a weighted harmonic
#: mean of the kinds' FLOP/s).
DEFAULT_KIND_WEIGHTS: dict[str, float] = {"matmul": 1.0, "conv": 1.0, "attention": 1.0}
#: The layer kind that dominates each built-in model family.
FAMILY_KIND: dict[str, KernelKind] = {"gpt": "attention", "resnet": "conv", "mlp": "matmul"}


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class Stat(_Model):
    """A repeated measurement: median, extremes and how many repeats."""

    median: float = Field(gt=0)
    min: float = Field(gt=0)
    max: float = Field(gt=0)
    count: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Stat:
        if not self.min <= self.median <= self.max:
            raise ValueError(f"need min <= median <= max, got {self.min:g}, {self.median:g}, "
                             f"{self.max:g}")
        return self

    @property
    def spread(self) -> float:
        """(max - min) / median: 0 for perfectly repeatable measurements."""
        return (self.max - self.min) / self.median

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """The statistics of some positive samples."""
        if not values or min(values) <= 0:
            raise ValueError(f"need positive samples, got {list(values)}")
        return cls(median=statistics.median(values), min=min(values), max=max(values),
                   count=len(values))


class KernelMeasurement(_Model):
    """One layer kind at one precision on one device."""

    kind: KernelKind = Field(description="matmul (MLP linear layers), conv (residual conv "
                             "blocks) or attention (transformer decoder blocks).")
    precision: Precision = Field("fp32")
    flops_per_second: Stat = Field(description="Effective FLOP/s, FLOPs counted as the "
                                   "planner's analytic profiles count them (forward + "
                                   "backward), over repeats.")
    overhead_us: float = Field(0.0, ge=0, description="Fixed cost per layer and pass in "
                               "microseconds (the intercept of time against batch size).")


class DeviceMeasurement(_Model):
    """What the profiler measured on one device of a node."""

    node: str = Field(min_length=1)
    device: int = Field(0, ge=0, description="Index of the device on its node (resolve order).")
    accelerator: str = Field("cpu")
    host: str = Field("", description="Machine key (architecture, CPU/GPU model, cores, "
                      "torch version): a different key means a different machine.")
    threads: int = Field(1, ge=1, description="torch threads the benchmarks ran on.")
    kernels: list[KernelMeasurement] = Field(min_length=1)
    memory_bytes: int | None = Field(None, gt=0, description="Usable memory in bytes.")
    measured_at: AwareDatetime

    @model_validator(mode="after")
    def _unique(self) -> DeviceMeasurement:
        seen = [(k.kind, k.precision) for k in self.kernels]
        dupes = sorted({f"{k}/{p}" for k, p in seen if seen.count((k, p)) > 1})
        if dupes:
            raise ValueError(f"kernels: measured twice: {', '.join(dupes)}")
        return self

    def kernel(self, kind: str, precision: str = "fp32") -> KernelMeasurement | None:
        for k in self.kernels:
            if (k.kind, k.precision) == (kind, precision):
                return k
        return None

    def _chosen(self, kind: str | None, precision: str) -> list[tuple[float, KernelMeasurement]]:
        """(weight, kernel) pairs behind the device's figure for a layer kind and precision:
        that kind alone when measured, else the weighted set; at ``precision`` when measured,
        else fp32."""
        for prec in dict.fromkeys((precision, "fp32")):
            if kind is not None and (hit := self.kernel(kind, prec)) is not None:
                return [(1.0, hit)]
            chosen = [(DEFAULT_KIND_WEIGHTS.get(k.kind, 1.0), k) for k in self.kernels
                      if k.precision == prec]
            if chosen:
                return chosen
        return [(1.0, k) for k in self.kernels]

    def effective_flops(self, kind: str | None = None, precision: str = "fp32", *,
                        best: bool = False) -> float:
        """FLOP/s the planner should use (see ``_chosen``); a weighted harmonic mean of the
        medians, or (``best``) of the fastest samples: the least disturbed by other work."""
        chosen = self._chosen(kind, precision)
        total = sum(w for w, _ in chosen)
        return total / sum(
            w / (k.flops_per_second.max if best else k.flops_per_second.median)
            for w, k in chosen)

    def overhead_us(self, kind: str | None = None, precision: str = "fp32") -> float:
        chosen = self._chosen(kind, precision)
        return sum(w * k.overhead_us for w, k in chosen) / sum(w for w, _ in chosen)

    def kind_factors(self, precision: str = "fp32") -> dict[str, float]:
        """Per layer kind: its FLOP/s over the device's weighted figure (1.0: as fast)."""
        base = self.effective_flops(None, precision)
        return {k.kind: k.flops_per_second.median / base for k in self.kernels
                if k.precision == precision}

    def annotation(self, kind: str | None = None, precision: str = "fp32") -> dict[str, Any]:
        """The flat form the operator reads from a node's ``spantrain.io/profile``
        annotation (``computeTflops``, ``layerOverheadUs``, ``memoryBytes``, ``measuredAt``),
        with the per-kind factors and the full measurement beside it."""
        out: dict[str, Any] = {
            "computeTflops": round(self.effective_flops(kind, precision) / 1e12, 9),
            "layerOverheadUs": round(self.overhead_us(kind, precision), 1),
            "kindFactors": {k: round(v, 4) for k, v in self.kind_factors(precision).items()},
            "measuredAt": timestamp(self.measured_at),
            "source": "spantrain profile-cluster",
        }
        if self.memory_bytes is not None:
            out["memoryBytes"] = self.memory_bytes
        return out


class ProfileAnnotation(BaseModel):
    """A node's ``spantrain.io/profile`` annotation as the operator reads it: what
    ``DeviceMeasurement.annotation`` writes (or ``scripts/e2e``'s calibration). Unknown keys are
    ignored (a newer profiler may add some); every figure is checked, and ``measuredAt`` is
    required, because a measurement without a time can never expire."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore",
                              frozen=True)

    compute_tflops: float | None = Field(None, gt=0, le=1e6)
    layer_overhead_us: float | None = Field(None, ge=0, le=1e9)
    memory_bytes: int | None = Field(None, gt=0)
    bandwidth_mbps: float | None = Field(None, gt=0)
    latency_ms: float | None = Field(None, ge=0)
    kind_factors: dict[str, float] = Field(default_factory=dict)
    measured_at: AwareDatetime
    source: str | None = None


def read_profile_annotation(
    raw: str, *, now: datetime | None, max_age: timedelta = DEFAULT_MAX_AGE
) -> tuple[ProfileAnnotation | None, str | None]:
    """(the annotation, None) when it is well-formed and fresh at ``now`` (None: age not
    checked); else (None, why it is ignored, in words a warning can carry)."""
    try:
        prof = ProfileAnnotation.model_validate_json(raw)
    except ValueError as err:
        first = str(err).splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        return None, f"malformed ({detail}); using labels and defaults"
    if now is not None and now - prof.measured_at > max_age:
        return None, (f"measured at {timestamp(prof.measured_at)}, older than "
                      f"{max_age.total_seconds() / 3600:g} h: expired; using labels and defaults")
    return prof, None


class LinkMeasurement(_Model):
    """One directed node pair: ``src`` sends, ``dst`` receives."""

    src: str = Field(min_length=1)
    dst: str = Field(min_length=1)
    latency_ms: Stat = Field(description="One-way latency (half a tiny payload's round trip).")
    bandwidth_mbps: Stat = Field(description="Goodput of a large payload, Mbit/s.")
    payload_bytes: int = Field(0, ge=0, description="Bytes of the large payload.")
    measured_at: AwareDatetime

    @model_validator(mode="after")
    def _distinct(self) -> LinkMeasurement:
        if self.src == self.dst:
            raise ValueError(f"a link from {self.src!r} to itself")
        return self


class ProbeFailure(_Model):
    """A probe that gave no figure: a device (``dst`` None) or a directed pair."""

    src: str
    dst: str | None = None
    error: str
    at: AwareDatetime

    @property
    def what(self) -> str:
        return f"{self.src} -> {self.dst}" if self.dst is not None else self.src


class ClusterMeasurement(_Model):
    """Everything one profiler run (or several, merged) measured."""

    api_version: str = Field("spantrain.io/v1alpha1")
    kind: Literal["ClusterMeasurement"] = KIND
    cluster: str = Field("cluster")
    devices: list[DeviceMeasurement] = Field(default_factory=list)
    links: list[LinkMeasurement] = Field(default_factory=list)
    failures: list[ProbeFailure] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> ClusterMeasurement:
        devs = [(d.node, d.device) for d in self.devices]
        if len(devs) != len(set(devs)):
            raise ValueError("devices: a (node, device) measured twice; merge runs with "
                             "updated_with")
        pairs = [(x.src, x.dst) for x in self.links]
        if len(pairs) != len(set(pairs)):
            raise ValueError("links: a directed pair measured twice; merge runs with "
                             "updated_with")
        return self

    def device(self, node: str, index: int = 0) -> DeviceMeasurement | None:
        return next((d for d in self.devices if (d.node, d.device) == (node, index)), None)

    def link(self, src: str, dst: str) -> LinkMeasurement | None:
        return next((x for x in self.links if (x.src, x.dst) == (src, dst)), None)

    def fresh(self, now: datetime, max_age: timedelta = DEFAULT_MAX_AGE) -> ClusterMeasurement:
        """Only the facts measured within ``max_age`` of ``now`` (failures kept)."""
        def ok(at: datetime) -> bool:
            return now - at <= max_age
        return self.model_copy(update={
            "devices": [d for d in self.devices if ok(d.measured_at)],
            "links": [x for x in self.links if ok(x.measured_at)],
        })

    def expired(self, now: datetime, max_age: timedelta = DEFAULT_MAX_AGE) -> list[str]:
        """Names of the facts older than ``max_age`` (devices ``node/index``, pairs a->b)."""
        return ([f"{d.node}/{d.device}" for d in self.devices if now - d.measured_at > max_age]
                + [f"{x.src}->{x.dst}" for x in self.links if now - x.measured_at > max_age])

    def updated_with(self, new: ClusterMeasurement) -> ClusterMeasurement:
        """This (older) measurement with ``new``'s facts on top: a device or pair ``new``
        measured replaces the old figure; one it failed to measure keeps the old one. The
        failures are ``new``'s (the old run's failures are history)."""
        devices = {(d.node, d.device): d for d in self.devices}
        devices.update({(d.node, d.device): d for d in new.devices})
        links = {(x.src, x.dst): x for x in self.links}
        links.update({(x.src, x.dst): x for x in new.links})
        return ClusterMeasurement(
            cluster=new.cluster, devices=[devices[k] for k in sorted(devices)],
            links=[links[k] for k in sorted(links)], failures=list(new.failures),
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)

    def matrix(self) -> list[MatrixEntry]:
        """The measured pairs as ``links.matrix`` entries (one object for the whole
        matrix, which is how a cluster stores it)."""
        return [MatrixEntry(a=x.src, b=x.dst, bandwidth_mbps=x.bandwidth_mbps.median,
                            latency_ms=x.latency_ms.median) for x in self.links]


def timestamp(at: datetime) -> str:
    """``2026-12-07T17:00:00Z``: how measurements and tables write a time."""
    return at.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def load_measurement(path: str | Path) -> ClusterMeasurement:
    """Read a measurement file, naming the file and the bad field on error."""
    data = load_document(path)
    try:
        return ClusterMeasurement.model_validate(data)
    except ValueError as err:
        raise InputError(f"{path}: invalid cluster measurement:\n{err}") from None


# --------------------------------------------------------------------------------------------
# merge into the planner's facts


class FactSource(_Model):
    """Where one fact the planner uses came from."""

    subject: str = Field(description="A node, node/deviceN, or a directed pair a->b.")
    fact: Literal["compute", "layerOverhead", "memory", "bandwidth", "latency"]
    value: str
    source: Source
    measured_at: datetime | None = None


@dataclass(frozen=True)
class MergedCluster:
    """A cluster with measured facts put in, and where each fact came from."""

    spec: ClusterSpec
    sources: tuple[FactSource, ...]
    ignored: tuple[str, ...] = ()  # measured facts not used, and why

    def count(self, source: Source) -> int:
        return sum(1 for s in self.sources if s.source == source)


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def apply_measurements(
    spec: ClusterSpec,
    measured: ClusterMeasurement | None,
    *,
    now: datetime,
    max_age: timedelta = DEFAULT_MAX_AGE,
    layer_kind: str | None = None,
    precision: str = "fp32",
) -> MergedCluster:
    """``spec`` with the fresh measured facts of ``measured`` preferred to what it says.

    Per device group: compute (the effective FLOP/s of ``layer_kind`` -- a model family's
    dominant kind, see ``FAMILY_KIND`` -- at ``precision``, else the weighted set), the
    per-layer overhead and memory are the medians (memory: the minimum) over the group's
    measured devices. Per directed node pair: a ``links.matrix`` entry from the measured
    median bandwidth and latency, replacing the spec's entry for that direction.
    Measurements of nodes the spec does not have are ignored (and listed).
    """
    fresh = measured.fresh(now, max_age) if measured is not None else ClusterMeasurement()
    ignored: list[str] = []
    if measured is not None:
        ignored += [f"{name}: older than {max_age}" for name in measured.expired(now, max_age)]
    names = {n.name for n in spec.nodes}
    for d in fresh.devices:
        if d.node not in names:
            ignored.append(f"{d.node}/{d.device}: no such node in {spec.name}")
    sources: list[FactSource] = []
    nodes: list[NodeSpec] = []
    for node in spec.nodes:
        groups: list[DeviceGroupSpec] = []
        first = 0
        for group in node.devices:
            kind = "cpu" if group.accelerator.lower() == "cpu" else "gpu"
            subject = (f"{node.name}/{kind}{first}" if group.count == 1
                       else f"{node.name}/{kind}{first}..{first + group.count - 1}")
            hits = [m for i in range(first, first + group.count)
                    if (m := fresh.device(node.name, i)) is not None]
            first += group.count
            update: dict[str, Any] = {}
            at = max((m.measured_at for m in hits), default=None)
            if hits:
                flops = _median(m.effective_flops(layer_kind, precision) for m in hits)
                update["compute_tflops"] = flops / 1e12
                update["layer_overhead_us"] = _median(
                    m.overhead_us(layer_kind, precision) for m in hits)
                mems = [m.memory_bytes for m in hits if m.memory_bytes is not None]
                if mems:
                    update["memory_bytes"] = min(mems)
            new = group.model_copy(update=update)
            sources.append(FactSource(
                subject=subject, fact="compute", value=f"{new.compute_tflops * 1e3:.4g} GFLOP/s",
                source="measured" if "compute_tflops" in update else "label",
                measured_at=at if "compute_tflops" in update else None))
            overhead = new.layer_overhead_us
            shown = overhead if overhead is not None else DEFAULT_LAYER_OVERHEAD_US[
                "cpu" if kind == "cpu" else "accelerator"]
            sources.append(FactSource(
                subject=subject, fact="layerOverhead", value=f"{shown:.0f} us",
                source=("measured" if "layer_overhead_us" in update
                        else "label" if overhead is not None else "default"),
                measured_at=at if "layer_overhead_us" in update else None))
            sources.append(FactSource(
                subject=subject, fact="memory", value=f"{new.memory_bytes / 2**30:.2f} GiB",
                source="measured" if "memory_bytes" in update else "label",
                measured_at=at if "memory_bytes" in update else None))
            groups.append(new)
        nodes.append(node.model_copy(update={"devices": groups}))
    matrix = {(e.a, e.b): e for e in spec.links.matrix}
    measured_pairs: dict[tuple[str, str], LinkMeasurement] = {}
    for link in fresh.links:
        if link.src not in names or link.dst not in names:
            ignored.append(f"{link.src}->{link.dst}: no such node in {spec.name}")
            continue
        measured_pairs[(link.src, link.dst)] = link
        matrix[(link.src, link.dst)] = MatrixEntry(
            a=link.src, b=link.dst, bandwidth_mbps=link.bandwidth_mbps.median,
            latency_ms=link.latency_ms.median)
    merged = spec.model_copy(update={
        "nodes": nodes,
        "links": LinksSpec(rules=list(spec.links.rules),
                           matrix=[matrix[k] for k in sorted(matrix)]),
    })
    ClusterSpec.model_validate(merged.model_dump())  # the merged spec must still be valid
    for a in spec.nodes:
        for b in spec.nodes:
            if a.name != b.name:
                sources.extend(_link_sources(merged, a, b, measured_pairs))
    return MergedCluster(merged, tuple(sources), tuple(ignored))


def _link_sources(
    spec: ClusterSpec, a: NodeSpec, b: NodeSpec,
    measured: dict[tuple[str, str], LinkMeasurement],
) -> list[FactSource]:
    """Bandwidth and latency of a -> b and where they come from, resolved as ``cluster``
    resolves them (matrix entry of that direction, of the reverse one, rule, uplinks)."""
    subject = f"{a.name}->{b.name}"
    for key in ((a.name, b.name), (b.name, a.name)):
        hit = measured.get(key)
        if hit is not None:
            how = "" if key == (a.name, b.name) else f" (as {b.name}->{a.name})"
            return [
                FactSource(subject=subject, fact="bandwidth",
                           value=f"{hit.bandwidth_mbps.median:.4g} Mbit/s{how}",
                           source="measured", measured_at=hit.measured_at),
                FactSource(subject=subject, fact="latency",
                           value=f"{hit.latency_ms.median:.3g} ms{how}",
                           source="measured", measured_at=hit.measured_at),
            ]
        entry = next((e for e in spec.links.matrix if (e.a, e.b) == key), None)
        if entry is not None:
            return [
                FactSource(subject=subject, fact="bandwidth",
                           value=f"{entry.bandwidth_mbps:.4g} Mbit/s", source="label"),
                FactSource(subject=subject, fact="latency", value=f"{entry.latency_ms:.3g} ms",
                           source="label"),
            ]
    if any(_rule_score(rule, a, b) for rule in spec.links.rules):
        # the most specific rule wins in ``cluster``; which one it is does not change the
        # source: the description says so
        return [FactSource(subject=subject, fact="bandwidth", value="by rule", source="label"),
                FactSource(subject=subject, fact="latency", value="by rule", source="label")]
    bw_default = a.bandwidth_mbps is None or b.bandwidth_mbps is None
    lat_default = a.latency_ms is None or b.latency_ms is None
    bw = min(a.bandwidth_mbps or TIER_DEFAULTS[a.tier][0],
             b.bandwidth_mbps or TIER_DEFAULTS[b.tier][0])
    lat = ((a.latency_ms if a.latency_ms is not None else TIER_DEFAULTS[a.tier][1])
           + (b.latency_ms if b.latency_ms is not None else TIER_DEFAULTS[b.tier][1]))
    return [
        FactSource(subject=subject, fact="bandwidth", value=f"{bw:.4g} Mbit/s (uplinks)",
                   source="default" if bw_default else "label"),
        FactSource(subject=subject, fact="latency", value=f"{lat:.3g} ms (uplinks)",
                   source="default" if lat_default else "label"),
    ]


def sources_summary(merged: MergedCluster) -> str:
    """One line: how many facts came from each source."""
    sources: tuple[Source, ...] = ("measured", "label", "default")
    counts = {src: merged.count(src) for src in sources}
    return ("facts: " + ", ".join(f"{n} {src}" for src, n in counts.items())
            + (f" ({len(merged.ignored)} measured fact(s) ignored: "
               f"{'; '.join(merged.ignored[:3])})" if merged.ignored else ""))


# --------------------------------------------------------------------------------------------
# one machine emulating a cluster (``spantrain local``)


def calibrate_emulated(
    spec: ClusterSpec,
    machine: DeviceMeasurement,
    speeds: dict[str, float] | None = None,
    *,
    layer_kind: str | None = None,
    precision: str = "fp32",
) -> ClusterSpec:
    """The emulated cluster in this machine's units, for a prediction of what it measures.

    ``spantrain local`` runs every emulated device on this machine at a *share* of its speed:
    padded by sleeps in proportion to the description's FLOP/s (the fastest device at full
    speed: the default, ``speeds`` None), at full speed (``--no-emulation``: every share 1),
    or under a CPU quota (``--emulate``: the share is the quota's cores). A device at share
    ``s`` computes at ``s`` x the machine's measured FLOP/s and pays the machine's per-layer
    overhead / ``s`` (padding and quotas stretch fixed costs too). ``speeds`` maps node names
    to shares; nodes it leaves out keep their description.
    """
    if speeds is None:
        fastest = max(g.compute_tflops for n in spec.nodes for g in n.devices)
        speeds = {n.name: max(g.compute_tflops for g in n.devices) / fastest
                  for n in spec.nodes}
    flops = machine.effective_flops(layer_kind, precision)
    overhead = machine.overhead_us(layer_kind, precision)
    nodes = []
    for node in spec.nodes:
        share = speeds.get(node.name)
        if share is None:
            nodes.append(node)
            continue
        if not share > 0:
            raise InputError(f"node {node.name}: emulated speed share must be > 0, got {share}")
        top = max(g.compute_tflops for g in node.devices)
        groups = [g.model_copy(update={
            "compute_tflops": flops / 1e12 * share * g.compute_tflops / top,
            "layer_overhead_us": overhead / (share * g.compute_tflops / top),
        }) for g in node.devices]
        nodes.append(node.model_copy(update={"devices": groups}))
    return spec.model_copy(update={"nodes": nodes})
