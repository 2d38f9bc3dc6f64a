"""The dynamic adapter's decisions: when a running plan no longer matches its devices, and the
cheapest change that fixes it.

Role: pure functions and one small state machine over what the workers measure. The worker
(``spantrain_worker.adapter``) feeds it each rank's measured compute seconds per sample row,
gathered the same way on every rank, so every rank takes the same decision at the same step
and no rank has to tell the others what to do.

What it decides (in order of cost, as in the paper's adapter):

1. **Re-balance** the sample shares inside each stage so that the stage's devices finish their
   micro-batch together again: shares in proportion to each device's measured speed
   (``1 / seconds per row``), capped by its memory (a share's activations grow with it), and at
   least one row each. No weights move and no process restarts; gradients stay exact (a stage
   still sums its devices' gradients over the same samples).
2. **Re-plan** when the step time grows more than the measured compute explains (``StepWatch``:
   the links slowed, which no share inside a stage can fix): the workers time one large
   payload per node pair the plan uses (``LinkProbe``), the cluster is re-described with those
   speeds (``with_probed_links``) and planned afresh, and ``decide_replan`` keeps the new plan
   only when its predicted gain over the remaining steps exceeds the measured cost of the
   checkpoint and restart (``replan_pays``). Layers then move through the plan-independent
   checkpoint, carried out by whoever started the workers (``spantrain local``, the benchmark
   or the operator) from the ``ReplanRecord`` the workers leave.

Noise never triggers it: a proposal must promise a gain of at least ``threshold`` in the
predicted step time (the slowest stage's compute) for ``sustain`` consecutive measurement
windows, each the median over ``window`` steps; after an adaptation the next ``warmup`` steps
are not measured (the cost of the change itself is not a departure). Once re-balanced, the
devices of a stage finish together, so the same departure proposes nothing: no oscillation.

Must not import torch, the worker, the operator or anything that does I/O.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from spantrain_planner.core.options import PlannerOptions
from spantrain_planner.evaluation.simulator import (
    ProfileSums,
    action_seconds,
    optimizer_seconds,
    simulate,
)
from spantrain_planner.inputs.cluster import ClusterSpec, MatrixEntry, Topology, resolve
from spantrain_planner.inputs.plan import Plan, row_ranges
from spantrain_planner.inputs.profiles import ModelProfile
from spantrain_planner.passes.search import search


@dataclass(frozen=True)
class AdaptPolicy:
    """Window, threshold and hysteresis of the adapter."""

    window: int = 4  #: steps per measurement window (each rank's median over them)
    threshold: float = 0.15  #: least predicted step-time gain worth a change (0.15 = 15 %)
    sustain: int = 2  #: consecutive windows that must all propose a change
    warmup: int = 2  #: steps not measured at the start and after an adaptation
    max_growth: float = 2.0  #: share growth allowed where the plan does not give memory

    def __post_init__(self) -> None:
        if self.window < 1 or self.sustain < 1 or self.warmup < 0:
            raise ValueError("window and sustain must be >= 1 and warmup >= 0")
        if not 0 < self.threshold < 10 or self.max_growth < 1:
            raise ValueError("threshold must be in (0, 10) and max_growth >= 1")


@dataclass(frozen=True)
class Rebalance:
    """A proposed re-balance and what it is predicted to bring."""

    plan: Plan
    gain: float  #: predicted step-time ratio old/new - 1 (the slowest stage's compute)
    seconds_per_row: dict[int, float]  #: what was measured, per rank
    old_shares: dict[int, int]  #: rank -> rows per micro-batch before
    new_shares: dict[int, int]  #: and after
    stage_seconds_before: list[float]  #: predicted compute seconds per micro-batch, per stage
    stage_seconds_after: list[float]

    def changed_ranks(self) -> list[int]:
        return sorted(r for r, n in self.new_shares.items() if self.old_shares[r] != n)


def balanced_shares(seconds_per_row: Sequence[float], total: int,
                    caps: Sequence[int]) -> list[int] | None:
    """Rows per device, at least one each and at most its cap, summing to ``total``, that
    minimise the slowest device's time (rows x seconds per row); None when the caps cannot
    hold ``total``.

    One row at a time to the device that would finish it first: for identical rows on
    devices of different speeds this greedy is optimal for the makespan. Ties go to the
    earlier device, so every rank computes the same shares.
    """
    n = len(seconds_per_row)
    if n == 0 or total < n or min(caps) < 1 or sum(min(c, total) for c in caps) < total:
        return None
    shares = [1] * n
    heap = [((1 + 1) * t, i) for i, t in enumerate(seconds_per_row) if caps[i] > 1]
    heapq.heapify(heap)
    for _ in range(total - n):
        _, i = heapq.heappop(heap)
        shares[i] += 1
        if shares[i] < caps[i]:
            heapq.heappush(heap, ((shares[i] + 1) * seconds_per_row[i], i))
    return shares


def _memory_caps(plan: Plan) -> dict[str, float]:
    """Device id -> the largest share growth its memory allows (peak scales with the share at
    most: parameters and optimizer state do not grow, so this is conservative)."""
    caps: dict[str, float] = {}
    if plan.predicted is not None:
        for d in plan.predicted.devices:
            if d.peak_memory_bytes > 0 and d.memory_bytes > 0:
                caps[d.device_id] = d.memory_bytes / d.peak_memory_bytes
    return caps


def rebalance(plan: Plan, seconds_per_row: Mapping[int, float],
              policy: AdaptPolicy | None = None) -> Rebalance | None:
    """Shares inside every stage in proportion to the measured speeds; None if nothing moves
    (one-device stages, speeds already matched, or a rank not measured)."""
    if any(not (seconds_per_row.get(d.rank, 0.0) > 0.0) for s in plan.stages for d in s.devices):
        return None
    policy = policy or AdaptPolicy()
    caps = _memory_caps(plan)
    stages = []
    before: list[float] = []
    after: list[float] = []
    old: dict[int, int] = {}
    new: dict[int, int] = {}
    for stage in plan.stages:
        shares = [d.microbatch_share for d in stage.devices]
        t = [seconds_per_row[d.rank] for d in stage.devices]
        proposed = shares
        if len(shares) > 1:
            limit = [max(s, math.floor(s * caps.get(d.device_id, policy.max_growth)))
                     for s, d in zip(shares, stage.devices, strict=True)]
            proposed = balanced_shares(t, sum(shares), limit) or shares
        before.append(max(s * x for s, x in zip(shares, t, strict=True)))
        after.append(max(s * x for s, x in zip(proposed, t, strict=True)))
        for d, s0, s1 in zip(stage.devices, shares, proposed, strict=True):
            old[d.rank], new[d.rank] = s0, s1
        stages.append(stage.model_copy(update={"devices": [
            d.model_copy(update={"microbatch_share": s})
            for d, s in zip(stage.devices, proposed, strict=True)]}))
    if new == old or max(after) <= 0:
        return None
    gain = max(before) / max(after) - 1.0
    moved = plan.model_copy(update={"stages": stages, "predicted": plan.predicted})
    return Rebalance(moved, gain, dict(seconds_per_row), old, new, before, after)


@dataclass
class Detector:
    """Sustained departure, with hysteresis: ``observe`` every step, act on what it returns.

    The caller gathers each rank's window median (the same numbers on every rank) when
    ``due(step)`` says so and hands them to ``propose``; ``adopted(step)`` restarts the
    measurement after a change.
    """

    policy: AdaptPolicy = field(default_factory=AdaptPolicy)
    start: int = 0
    streak: int = 0
    last_gain: float = 0.0  #: the gain the last window's re-balance would have promised
    _since: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._since = self.start + self.policy.warmup

    def measuring(self, step: int) -> bool:
        """Whether ``step``'s timing belongs to the current window."""
        return step >= self._since

    def due(self, step: int) -> bool:
        """Whether a window ends with ``step`` (every rank gathers after this step)."""
        done = step + 1 - self._since
        return done > 0 and done % self.policy.window == 0

    def propose(self, plan: Plan, seconds_per_row: Mapping[int, float]) -> Rebalance | None:
        """The change to make now, if this window and the ones before it agree."""
        proposal = rebalance(plan, seconds_per_row, self.policy)
        self.last_gain = proposal.gain if proposal is not None else 0.0
        if proposal is None or proposal.gain < self.policy.threshold:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < self.policy.sustain:
            return None
        self.streak = 0
        return proposal

    def adopted(self, step: int) -> None:
        """A change took effect after ``step``: skip the warm-up, then measure afresh."""
        self.streak = 0
        self._since = step + 1 + self.policy.warmup


def window_median(per_step: Sequence[float]) -> float:
    """A window's figure: the median, which one disturbed step cannot move."""
    return statistics.median(per_step) if per_step else 0.0


def replan_pays(gain_seconds_per_step: float, remaining_steps: int,
                restart_seconds: float) -> bool:
    """Re-plan (move layers through a checkpoint and restart) only when the time it saves over
    the remaining steps exceeds what the restart costs."""
    return gain_seconds_per_step * remaining_steps > restart_seconds


def row_share_table(plan: Plan) -> dict[int, tuple[int, int]]:
    """rank -> its row range in every micro-batch (for logs and records)."""
    return {d.rank: r for s in plan.stages for d, r in zip(s.devices, row_ranges(s), strict=True)}


# --------------------------------------------------------------------------------------------
# re-plan: the links slowed


@dataclass
class StepWatch:
    """A sustained slowdown the compute does not explain: the links (or anything between the
    stages) slowed, which a re-balance cannot fix.

    Each window gives the median step seconds and the slowest rank's compute seconds per step.
    The first window after a start or a change is the baseline; a later window whose step
    time grew ``threshold`` more than its compute did, ``sustain`` windows in a row, fires.
    A slower device slows step and compute alike (the re-balance's case), so it never fires
    here; jitter within the threshold never does either.
    """

    policy: AdaptPolicy = field(default_factory=AdaptPolicy)
    baseline: tuple[float, float] | None = None
    streak: int = 0
    last_excess: float = 0.0

    def observe(self, step_seconds: float, compute_seconds: float) -> bool:
        """Whether this window completes a sustained unexplained slowdown."""
        if step_seconds <= 0 or compute_seconds <= 0:
            return False
        if self.baseline is None:
            self.baseline = (step_seconds, compute_seconds)
            return False
        base_step, base_compute = self.baseline
        self.last_excess = (step_seconds / base_step) / (compute_seconds / base_compute) - 1
        if self.last_excess < self.policy.threshold:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < self.policy.sustain:
            return False
        self.streak = 0
        return True

    def reset(self) -> None:
        """The plan changed: the next window is the new baseline."""
        self.baseline = None
        self.streak = 0


@dataclass(frozen=True)
class LinkProbe:
    """One timed transfer: ``num_bytes`` from a rank on node ``src`` to one on node ``dst``."""

    src: str
    dst: str
    src_rank: int
    dst_rank: int
    num_bytes: int
    seconds: float = 0.0

    @property
    def mbps(self) -> float:
        return self.num_bytes * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0


#: a probe lasts about this long at the plan's assumed speed (and 10x as long on a link 10x
#: slower); never less than ``PROBE_MIN_BYTES``, which is several token buckets' bursts
PROBE_SECONDS = 0.1
PROBE_MIN_BYTES = 1 << 20
PROBE_MAX_BYTES = 16 << 20


def link_probes(plan: Plan, topology: Topology) -> list[LinkProbe]:
    """The probes a re-plan needs: one per ordered pair of the plan's nodes, between their
    lowest ranks, sized by the link's assumed bandwidth (pure)."""
    first: dict[str, tuple[int, str]] = {}
    for stage in plan.stages:
        for d in stage.devices:
            if d.node not in first or d.rank < first[d.node][0]:
                first[d.node] = (d.rank, d.device_id)
    index = {dev.id: i for i, dev in enumerate(topology.devices)}
    probes = []
    for a, (ra, da) in sorted(first.items()):
        for b, (rb, db) in sorted(first.items()):
            if a == b:
                continue
            bps = topology.bandwidth[index[da]][index[db]]
            size = int(min(PROBE_MAX_BYTES, max(PROBE_MIN_BYTES, bps * PROBE_SECONDS)))
            probes.append(LinkProbe(a, b, ra, rb, size))
    return probes


def with_link_speeds(spec: ClusterSpec, speeds: Mapping[tuple[str, str], float]) -> ClusterSpec:
    """``spec`` with the given directed node pairs' bandwidth (Mbit/s) as ``links.matrix``
    entries; each keeps the latency the spec gave the pair, and pairs of nodes the spec does
    not have are left out (pure)."""
    names = {n.name for n in spec.nodes}
    wanted = {k: v for k, v in speeds.items() if k[0] in names and k[1] in names and v > 0}
    if not wanted:
        return spec
    topology = resolve(spec)
    kept = [e for e in spec.links.matrix if (e.a, e.b) not in wanted]
    added = [MatrixEntry(a=a, b=b, bandwidth_mbps=mbps,
                         latency_ms=node_link(topology, a, b)[1] * 1e3)
             for (a, b), mbps in sorted(wanted.items())]
    links = spec.links.model_copy(update={"matrix": kept + added})
    return spec.model_copy(update={"links": links})


def node_link(topology: Topology, a: str, b: str) -> tuple[float, float]:
    """(Mbit/s, seconds) the topology assumes from node ``a`` to node ``b`` (between their
    first devices: a node's devices share its links)."""
    first = {dev.node: i for i, dev in reversed(list(enumerate(topology.devices)))}
    i, j = first[a], first[b]
    return topology.bandwidth[i][j] * 8 / 1e6, topology.latency[i][j]


def with_probed_links(spec: ClusterSpec, probes: Sequence[LinkProbe]) -> ClusterSpec:
    """``spec`` with every probed node pair's bandwidth as measured (``with_link_speeds``)."""
    return with_link_speeds(spec, {(p.src, p.dst): p.mbps for p in probes if p.seconds > 0})


def planned_seconds_per_row(plan: Plan, topology: Topology,
                            profile: ModelProfile) -> dict[int, float]:
    """rank -> the compute seconds per sample row its plan assumes (its forward and backward
    over all micro-batches and its optimizer step, divided by its rows): what the workers'
    measured seconds per row are compared with (pure)."""
    sums = ProfileSums(profile)
    out = {}
    for stage in plan.stages:
        layers = sums.range(stage.layer_start, stage.layer_end)
        for d in stage.devices:
            device = topology.device(d.device_id)
            share = d.microbatch_share
            if share < 1:
                continue
            per_mb = sum(action_seconds(kind, layers, share, device) for kind in ("F", "B", "W"))
            total = plan.num_microbatches * per_mb + optimizer_seconds(layers.param_count,
                                                                       device.flops)
            out[d.rank] = total / (share * plan.num_microbatches)
    return out


def with_measured_speeds(spec: ClusterSpec, plan: Plan, profile: ModelProfile,
                         seconds_per_row: Mapping[int, float]) -> ClusterSpec:
    """``spec`` with each planned device group's speed as its workers measured it: FLOP/s
    times (assumed / measured seconds per row), per-layer overhead divided by the same (the
    median over a group's devices; groups the plan does not use keep the spec's). A re-plan
    weighs compute against the measured links in the same, measured, units (pure)."""
    topology = resolve(spec)
    assumed = planned_seconds_per_row(plan, topology, profile)
    ratios: dict[tuple[str, int], list[float]] = {}
    group_of = _device_groups(spec)
    for stage in plan.stages:
        for d in stage.devices:
            measured = seconds_per_row.get(d.rank, 0.0)
            if measured > 0 and d.rank in assumed and d.device_id in group_of:
                ratios.setdefault(group_of[d.device_id], []).append(assumed[d.rank] / measured)
    if not ratios:
        return spec
    nodes = []
    for node in spec.nodes:
        groups = []
        for g, group in enumerate(node.devices):
            found = ratios.get((node.name, g))
            if not found:
                groups.append(group)
                continue
            r = statistics.median(found)
            first = next(dev for dev, key in group_of.items() if key == (node.name, g))
            overhead = topology.device(first).layer_overhead
            groups.append(group.model_copy(update={
                "compute_tflops": group.compute_tflops * r,
                "layer_overhead_us": overhead * 1e6 / r}))
        nodes.append(node.model_copy(update={"devices": groups}))
    return spec.model_copy(update={"nodes": nodes})


def _device_groups(spec: ClusterSpec) -> dict[str, tuple[str, int]]:
    """device id -> (node, index of its device group), in ``resolve``'s order."""
    devices = iter(resolve(spec).devices)
    out = {}
    for node in spec.nodes:
        for g, group in enumerate(node.devices):
            for _ in range(group.count):
                out[next(devices).id] = (node.name, g)
    return out


def link_key(a: str, b: str) -> str:
    """How records name a directed node pair: ``a->b``."""
    return f"{a}->{b}"


def parse_link_key(key: str) -> tuple[str, str] | None:
    a, sep, b = key.partition("->")
    return (a, b) if sep and a and b else None


class ReplanInputs(BaseModel):
    """What the workers need to plan afresh: the cluster the plan was made for (as the planner
    saw it, calibrated or measured), the model profile and the planner options. Written beside
    the plan by whoever starts the workers (``WorkerEnv.planner_inputs_path``)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    cluster: ClusterSpec
    profile: ModelProfile
    options: PlannerOptions


class ReplanRequest(BaseModel):
    """What a worker that stopped for a re-plan tells its starter (its termination message on
    Kubernetes): the step its checkpoint holds, the links it measured, the predicted gain."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    step: int = Field(ge=0, description="The checkpoint's step: the new plan resumes here.")
    gain: float = Field(description="Predicted step-time gain of the new plan, 1 - new/old.")
    measured_links: dict[str, float] = Field(description="'a->b': measured Mbit/s.")
    restart_seconds: float = Field(0.0, description="Measured cost of a checkpoint+restart.")
    reason: str = Field("", description="Why, in words.")

    def link_speeds(self) -> dict[tuple[str, str], float]:
        """The measured links by (sending node, receiving node)."""
        out = {}
        for key, mbps in self.measured_links.items():
            pair = parse_link_key(key)
            if pair is not None and mbps > 0:
                out[pair] = mbps
        return out


class ReplanRecord(ReplanRequest):
    """What the workers leave in their output directory when they stop for a re-plan
    (``replan.json``): the request, why, and the new plan itself."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    assumed_links: dict[str, float] = Field(description="'a->b': the plan's Mbit/s.")
    step_seconds_before: float = Field(description="Predicted step of the running plan "
                                       "under the measured links.")
    step_seconds_after: float = Field(description="Predicted step of the new plan.")
    remaining_steps: int
    cluster: ClusterSpec = Field(description="The cluster with the measured links.")
    plan: dict[str, object] = Field(description="The new plan (plan.json).")

    def new_plan(self) -> Plan:
        """The plan to restart on."""
        return Plan.model_validate(self.plan)


@dataclass(frozen=True)
class ReplanDecision:
    """A fresh plan for the measured links and what it is predicted to bring."""

    plan: Plan
    cluster: ClusterSpec
    before_seconds: float  #: the running plan's step under the measured links
    after_seconds: float  #: the new plan's step
    pays: bool

    @property
    def gain(self) -> float:
        return 1 - self.after_seconds / self.before_seconds if self.before_seconds > 0 else 0.0


def decide_replan(plan: Plan, inputs: ReplanInputs, probes: Sequence[LinkProbe], *,
                  remaining_steps: int, restart_seconds: float,
                  seconds_per_row: Mapping[int, float] | None = None) -> ReplanDecision:
    """Plan afresh with the probed links (and the devices' measured speeds) and weigh it
    against the running plan, both predicted on the measured cluster (pure)."""
    cluster = inputs.cluster
    if seconds_per_row:
        cluster = with_measured_speeds(cluster, plan, inputs.profile, seconds_per_row)
    cluster = with_probed_links(cluster, probes)
    measured = resolve(cluster)
    before = simulate(plan, measured, inputs.profile).step_seconds
    fresh, result = search(measured, inputs.profile, inputs.options)
    after = result.step_seconds
    pays = after < before and replan_pays(before - after, remaining_steps, restart_seconds)
    return ReplanDecision(fresh, cluster, before, after, pays)
