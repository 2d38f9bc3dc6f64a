"""Discrete-event simulator of one training step of a plan.

Role: the planner's cost function and the source of every predicted figure (step time,
samples/s, bubble fraction, per-device utilisation and peak memory, the bottleneck). It times
the very action lists the worker executes: each device runs its stage's actions in order; an
``F<m>`` waits for the rows of micro-batch ``m`` from every upstream device that holds some of
them, a ``B<m>`` for the gradient rows from downstream. Transfers use the alpha-beta model
(latency + bytes / bandwidth) and are serialised per channel: one channel per ordered node
pair for traffic between nodes (devices of a node share its NIC), one per device pair inside a
node. Transfers overlap with compute (the worker sends asynchronously). A stage on several
devices sums its gradients as the worker does (``gradsync``), with ring all-reduces over the
ring's slowest link: after its last action, one ring over all its gradients; or, where the
plan gives ``grad_buckets`` (accelerators), one ring per bucket of layers in that order, each
starting once every device of the stage has finished the bucket's layers' part of its last
weight pass (``W`` or ``BW``) and the previous ring is done, so the rings overlap the rest of
that pass. When a stage's rings and actions are done, each of its devices runs the optimizer.

Pure: planner modules and the standard library only.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field

from spantrain_planner.inputs.cluster import Device, Topology
from spantrain_planner.inputs.plan import Plan, StagePlan, boundary_transfers, parse_action
from spantrain_planner.inputs.profiles import ModelProfile

#: AdamW: FLOP-equivalents per parameter, and how far below peak elementwise work runs.
OPTIMIZER_FLOPS_PER_PARAM = 16.0
OPTIMIZER_EFFICIENCY = 0.05
#: Parameters + gradients + AdamW's two moments, in parameter-sized copies.
STATE_COPIES = 4


@dataclass(frozen=True)
class CostModel:
    """Knobs of the cost model (kept together so tests and calibration can swap them)."""

    overhead_scale: float = 1.0  # multiplies every device's per-layer overhead (0: none)
    optimizer_flops_per_param: float = OPTIMIZER_FLOPS_PER_PARAM
    optimizer_efficiency: float = OPTIMIZER_EFFICIENCY
    state_copies: int = STATE_COPIES


DEFAULT_COST = CostModel()


@dataclass(frozen=True)
class LayerSums:
    """Per-sample sums over a layer range (prefix sums make these O(1))."""

    forward: float
    backward_input: float
    backward_weight: float
    param_bytes: int
    param_count: int
    stash_bytes: int
    output_bytes: int
    num_layers: int


class ProfileSums:
    """Prefix sums over a model profile, for O(1) range costs."""

    def __init__(self, profile: ModelProfile) -> None:
        self.profile = profile
        n = profile.num_layers
        self._f = [0.0] * (n + 1)
        self._b = [0.0] * (n + 1)
        self._w = [0.0] * (n + 1)
        self._p = [0] * (n + 1)
        self._pc = [0] * (n + 1)
        self._s = [0] * (n + 1)
        for i, layer in enumerate(profile.layers):
            self._f[i + 1] = self._f[i] + layer.forward_flops
            self._b[i + 1] = self._b[i] + layer.backward_input_flops
            self._w[i + 1] = self._w[i] + layer.backward_weight_flops
            self._p[i + 1] = self._p[i] + layer.param_bytes
            self._pc[i + 1] = self._pc[i] + layer.param_count
            self._s[i + 1] = self._s[i] + layer.stash_bytes

    def range(self, start: int, end: int) -> LayerSums:
        out = self.profile.layers[end - 1].output_bytes if end < self.profile.num_layers else 0
        return LayerSums(
            forward=self._f[end] - self._f[start],
            backward_input=self._b[end] - self._b[start],
            backward_weight=self._w[end] - self._w[start],
            param_bytes=self._p[end] - self._p[start],
            param_count=self._pc[end] - self._pc[start],
            stash_bytes=self._s[end] - self._s[start],
            output_bytes=out,
            num_layers=end - start,
        )


def action_seconds(
    kind: str,
    sums: LayerSums,
    share: int,
    device: Device,
    cost: CostModel = DEFAULT_COST,
) -> float:
    """Duration of one action for ``share`` samples on ``device``.

    Work over the device's effective FLOP/s, plus its fixed per-layer overhead (once per
    layer and pass: a fused BW pays it once, which is why splitting B and W is not free).
    """
    flops = device.flops
    overhead = cost.overhead_scale * device.layer_overhead * sums.num_layers
    if kind == "F":
        work = sums.forward
    elif kind == "B":
        work = sums.backward_input
    elif kind == "W":
        work = sums.backward_weight
    else:  # BW: one pass does both (and pays the launch overhead once)
        work = sums.backward_input + sums.backward_weight
    return share * work / flops + overhead


def optimizer_seconds(param_count: int, flops: float, cost: CostModel = DEFAULT_COST) -> float:
    if param_count == 0:
        return 0.0
    return param_count * cost.optimizer_flops_per_param / (flops * cost.optimizer_efficiency)


def ring_allreduce_seconds(topology: Topology, devices: list[int], num_bytes: int) -> float:
    """Ring all-reduce time: 2(k-1)/k of the data over the slowest hop, 2(k-1) latencies."""
    k = len(devices)
    if k <= 1 or num_bytes == 0:
        return 0.0
    ring = sorted(devices, key=lambda d: (topology.devices[d].node, d))
    hops = [(ring[i], ring[(i + 1) % k]) for i in range(k)]
    slowest_bw = min(topology.bandwidth[a][b] for a, b in hops)
    worst_lat = max(topology.latency[a][b] for a, b in hops)
    return 2 * (k - 1) / k * num_bytes / slowest_bw + 2 * (k - 1) * worst_lat


def static_memory_bytes(sums: LayerSums, cost: CostModel = DEFAULT_COST) -> int:
    return sums.param_bytes * cost.state_copies


@dataclass(frozen=True)
class Interval:
    """One bar of the timeline chart."""

    device: int  # index into SimResult.device_ids
    start: float
    end: float
    kind: str  # F, B, W, BW, AR (all-reduce), OPT, or SEND
    microbatch: int = -1


@dataclass
class SimResult:
    step_seconds: float
    samples_per_second: float
    bubble_fraction: float
    utilization: float
    bottleneck: str
    device_ids: list[str]
    busy_seconds: list[float]
    peak_memory_bytes: list[int]
    memory_capacity: list[int]
    intervals: list[Interval] = field(default_factory=list)
    stage_compute_seconds: list[float] = field(default_factory=list)

    def memory_violations(self) -> list[tuple[str, int, int]]:
        """(device id, needed bytes, available bytes) for every device over its memory."""
        return [
            (dev, need, cap)
            for dev, need, cap in zip(
                self.device_ids, self.peak_memory_bytes, self.memory_capacity, strict=True
            )
            if need > cap
        ]


def simulate(
    plan: Plan,
    topology: Topology,
    profile: ModelProfile,
    *,
    cost: CostModel = DEFAULT_COST,
    record: bool = False,
    sums: ProfileSums | None = None,
) -> SimResult:
    """Simulate one step of ``plan`` on ``topology``: every rank's actions in order as their
    inputs arrive (``_run_actions``), then each stage's gradient rings and the optimizer
    (``_sync_and_update``)."""
    sums = sums or ProfileSums(profile)
    lay = _layout(plan, topology, sums)
    run = _run_actions(plan, topology, profile, sums, lay, cost, record)
    step_end, stage_compute = _sync_and_update(plan, topology, lay, run, cost, record)
    return _result(plan, topology, lay, run, cost, step_end, stage_compute)


@dataclass
class _Layout:
    """Rank tables of a plan and who sends what to whom at each stage boundary."""

    rank_device: dict[int, int]
    rank_stage: dict[int, int]
    rank_share: dict[int, int]
    ranks: list[int]
    stage_sums: list[LayerSums]
    parsed: list[list[tuple[str, int]]]
    fwd_out: dict[int, list[tuple[int, int]]]  # rank -> [(peer, rows)]
    fwd_in: dict[int, list[int]]
    bwd_out: dict[int, list[tuple[int, int]]]
    bwd_in: dict[int, list[int]]


def _layout(plan: Plan, topology: Topology, sums: ProfileSums) -> _Layout:
    index_of = {d.id: d.index for d in topology.devices}
    stages = plan.stages
    num_stages = len(stages)
    rank_device: dict[int, int] = {}
    rank_stage: dict[int, int] = {}
    rank_share: dict[int, int] = {}
    for stage in stages:
        for a in stage.devices:
            rank_device[a.rank] = index_of[a.device_id]
            rank_stage[a.rank] = stage.stage_index
            rank_share[a.rank] = a.microbatch_share
    ranks = sorted(rank_device)
    stage_sums = [sums.range(st.layer_start, st.layer_end) for st in stages]
    parsed = [[parse_action(a) for a in st.actions] for st in stages]

    # who sends what to whom at each boundary: (rank) -> [(peer, rows)]
    fwd_out: dict[int, list[tuple[int, int]]] = defaultdict(list)
    fwd_in: dict[int, list[int]] = defaultdict(list)
    bwd_out: dict[int, list[tuple[int, int]]] = defaultdict(list)
    bwd_in: dict[int, list[int]] = defaultdict(list)
    for s in range(num_stages - 1):
        for t in boundary_transfers(plan, s):
            fwd_out[t.src].append((t.dst, t.num_rows))
            fwd_in[t.dst].append(t.src)
            bwd_out[t.dst].append((t.src, t.num_rows))
            bwd_in[t.src].append(t.dst)

    return _Layout(rank_device, rank_stage, rank_share, ranks, stage_sums, parsed,
                   fwd_out, fwd_in, bwd_out, bwd_in)


@dataclass
class _Run:
    """What the action phase leaves for the gradient sync and the result."""

    busy: dict[int, float]
    finish_compute: dict[int, float]
    stash_peak: dict[int, int]
    layer_sums: list[LayerSums]
    layer_done: dict[tuple[int, int], float]  # (rank, layer) -> its gradient is final
    link_busy: dict[tuple[str, str], float]
    intervals: list[Interval]
    dev_pos: dict[int, int]


def _run_actions(plan: Plan, topology: Topology, profile: ModelProfile, sums: ProfileSums,
                 lay: _Layout, cost: CostModel, record: bool) -> _Run:
    """The event loop: each rank runs its stage's actions in order, each as soon as its
    device is free and its inputs (activations, gradients) have arrived over the links."""
    stages = plan.stages
    rank_device, rank_stage, rank_share = lay.rank_device, lay.rank_stage, lay.rank_share
    ranks, stage_sums, parsed = lay.ranks, lay.stage_sums, lay.parsed
    fwd_out, fwd_in, bwd_out, bwd_in = lay.fwd_out, lay.fwd_in, lay.bwd_out, lay.bwd_in
    arrivals: dict[tuple[str, int, int, int], float] = {}  # (dir, m, dst, src) -> time
    channel_free: dict[tuple[object, object], float] = defaultdict(float)
    link_busy: dict[tuple[str, str], float] = defaultdict(float)

    def channel(src: int, dst: int) -> tuple[object, object]:
        a, b = topology.devices[src], topology.devices[dst]
        return (a.node, b.node) if a.node != b.node else (src, dst)

    def send(direction: str, m: int, src_rank: int, dst_rank: int, nbytes: float, t: float) -> None:
        src, dst = rank_device[src_rank], rank_device[dst_rank]
        if src == dst:
            arrivals[(direction, m, dst_rank, src_rank)] = t
            return
        key = channel(src, dst)
        start = max(t, channel_free[key])
        serial = nbytes / topology.bandwidth[src][dst]
        channel_free[key] = start + serial
        arrivals[(direction, m, dst_rank, src_rank)] = start + serial + topology.latency[src][dst]
        na, nb = topology.devices[src].node, topology.devices[dst].node
        link_busy[
            (na, nb) if na != nb else (topology.devices[src].id, topology.devices[dst].id)
        ] += serial

    def deps_time(rank: int, kind: str, m: int) -> float | None:
        if kind == "F":
            srcs = fwd_in.get(rank, [])
            key = "fwd"
        elif kind in ("B", "BW"):
            srcs = bwd_in.get(rank, [])
            key = "bwd"
        else:
            return 0.0
        latest = 0.0
        for src in srcs:
            t = arrivals.get((key, m, rank, src))
            if t is None:
                return None
            latest = max(latest, t)
        return latest

    # the last weight pass of each stage: its per-layer progress starts the gradient rings
    final_pass = [
        max((k for k, (kind, _) in enumerate(acts) if kind in ("W", "BW")), default=-1)
        for acts in parsed
    ]
    layer_sums = (  # only plans with overlapped buckets need per-layer costs
        [sums.range(i, i + 1) for i in range(profile.num_layers)]
        if any(st.grad_buckets for st in stages) else []
    )
    layer_done: dict[tuple[int, int], float] = {}  # (rank, layer) -> its gradient is final

    pointer = dict.fromkeys(ranks, 0)
    free = dict.fromkeys(ranks, 0.0)
    busy = dict.fromkeys(ranks, 0.0)
    stash_live = dict.fromkeys(ranks, 0)
    stash_peak = dict.fromkeys(ranks, 0)
    finish_compute = dict.fromkeys(ranks, 0.0)
    intervals: list[Interval] = []
    heap: list[tuple[float, int]] = []

    def try_queue(rank: int) -> None:
        s = rank_stage[rank]
        k = pointer[rank]
        if k >= len(parsed[s]):
            return
        kind, m = parsed[s][k]
        ready = deps_time(rank, kind, m)
        if ready is not None:
            heapq.heappush(heap, (max(ready, free[rank]), rank))

    for r in ranks:
        try_queue(r)
    remaining = sum(len(parsed[rank_stage[r]]) for r in ranks)
    dev_pos = {rank_device[r]: i for i, r in enumerate(ranks)}
    while heap:
        start, rank = heapq.heappop(heap)
        s = rank_stage[rank]
        k = pointer[rank]
        if k >= len(parsed[s]):
            continue
        kind, m = parsed[s][k]
        ready = deps_time(rank, kind, m)
        if ready is None or max(ready, free[rank]) != start:
            continue  # stale entry
        dev = rank_device[rank]
        share = rank_share[rank]
        dur = action_seconds(kind, stage_sums[s], share, topology.devices[dev], cost)
        end = start + dur
        free[rank] = end
        busy[rank] += dur
        pointer[rank] += 1
        remaining -= 1
        if kind == "F":
            stash_live[rank] += 1
            stash_peak[rank] = max(stash_peak[rank], stash_live[rank])
            for dst, rows in fwd_out.get(rank, []):
                send("fwd", m, rank, dst, rows * stage_sums[s].output_bytes, end)
                try_queue(dst)
        if kind in ("B", "BW") and s > 0:
            in_bytes = sums.range(stages[s - 1].layer_start, stages[s - 1].layer_end).output_bytes
            for dst, rows in bwd_out.get(rank, []):
                send("bwd", m, rank, dst, rows * in_bytes, end)
                try_queue(dst)
        if kind in ("W", "BW"):
            stash_live[rank] -= 1
        if k == final_pass[s] and stages[s].grad_buckets:
            done = start
            for i in reversed(range(stages[s].layer_start, stages[s].layer_end)):
                done += action_seconds(kind, layer_sums[i], share, topology.devices[dev], cost)
                layer_done[(rank, i)] = done
        if record:
            intervals.append(Interval(dev_pos[dev], start, end, kind, m))
        finish_compute[rank] = end
        try_queue(rank)
    assert remaining == 0, "simulation deadlocked: action orders are inconsistent"

    return _Run(busy, finish_compute, stash_peak, layer_sums, layer_done, link_busy, intervals,
                dev_pos)


def _sync_and_update(plan: Plan, topology: Topology, lay: _Layout, run: _Run,
                     cost: CostModel, record: bool) -> tuple[float, list[float]]:
    """Gradient rings inside each stage (the plan's buckets, or one ring), then the optimizer;
    returns the step's end and each stage's compute time."""
    stages = plan.stages
    rank_device, stage_sums = lay.rank_device, lay.stage_sums
    busy, finish_compute, layer_sums = run.busy, run.finish_compute, run.layer_sums
    layer_done, intervals, dev_pos = run.layer_done, run.intervals, run.dev_pos
    step_end = 0.0
    stage_compute: list[float] = []
    for s, stage in enumerate(stages):
        stage_ranks = [a.rank for a in stage.devices]
        devs = [rank_device[r] for r in stage_ranks]
        rings: list[tuple[float, float]] = []
        ring_free = max(finish_compute[r] for r in stage_ranks)
        if stage.grad_buckets:
            ring_free = 0.0
            for bucket in stage.grad_buckets:
                nbytes = sum(layer_sums[i].param_bytes for i in bucket)
                ar = ring_allreduce_seconds(topology, devs, nbytes)
                if ar > 0:
                    ready = max(
                        layer_done.get((r, i), finish_compute[r])
                        for r in stage_ranks for i in bucket
                    )
                    begin = max(ready, ring_free)
                    ring_free = begin + ar
                    rings.append((begin, ring_free))
        else:
            ar = ring_allreduce_seconds(topology, devs, stage_sums[s].param_bytes)
            if ar > 0:
                rings.append((ring_free, ring_free + ar))
                ring_free += ar
        synced = max(ring_free, *(finish_compute[r] for r in stage_ranks))
        stage_compute.append(max(busy[r] for r in stage_ranks))
        for r in stage_ranks:
            dev = rank_device[r]
            opt = optimizer_seconds(stage_sums[s].param_count, topology.devices[dev].flops, cost)
            end = synced + opt
            busy[r] += opt
            if record:
                intervals.extend(Interval(dev_pos[dev], a, b, "AR") for a, b in rings)
                intervals.append(Interval(dev_pos[dev], synced, end, "OPT"))
            step_end = max(step_end, end)

    return step_end, stage_compute


def _result(plan: Plan, topology: Topology, lay: _Layout, run: _Run, cost: CostModel,
            step_end: float, stage_compute: list[float]) -> SimResult:
    ranks, rank_device, rank_stage = lay.ranks, lay.rank_device, lay.rank_stage
    rank_share, stage_sums = lay.rank_share, lay.stage_sums
    busy, stash_peak, link_busy, intervals = run.busy, run.stash_peak, run.link_busy, run.intervals
    device_ids = [topology.devices[rank_device[r]].id for r in ranks]
    busy_list = [busy[r] for r in ranks]
    peak = []
    for r in ranks:
        s = rank_stage[r]
        peak.append(
            static_memory_bytes(stage_sums[s], cost)
            + stash_peak[r] * rank_share[r] * stage_sums[s].stash_bytes
        )
    capacity = [topology.devices[rank_device[r]].memory_bytes for r in ranks]
    utilization = sum(busy_list) / (len(ranks) * step_end) if step_end > 0 else 0.0
    bottleneck = _bottleneck(plan, stage_compute, link_busy)
    return SimResult(
        step_seconds=step_end,
        samples_per_second=plan.global_batch / step_end if step_end > 0 else 0.0,
        bubble_fraction=1.0 - utilization,
        utilization=utilization,
        bottleneck=bottleneck,
        device_ids=device_ids,
        busy_seconds=busy_list,
        peak_memory_bytes=peak,
        memory_capacity=capacity,
        intervals=intervals,
        stage_compute_seconds=stage_compute,
    )


def _bottleneck(
    plan: Plan, stage_compute: list[float], link_busy: dict[tuple[str, str], float]
) -> str:
    s = max(range(len(stage_compute)), key=lambda i: stage_compute[i])
    stage: StagePlan = plan.stages[s]
    words = (
        f"stage {s} (layers {stage.layer_start}-{stage.layer_end - 1} on "
        f"{stage.dp_degree} device{'s' if stage.dp_degree > 1 else ''}): "
        f"{stage_compute[s]:.3g} s compute per step"
    )
    if link_busy:
        (a, b), t = max(link_busy.items(), key=lambda kv: kv[1])
        if t > stage_compute[s]:
            return f"link {a} -> {b}: {t:.3g} s of transfers per step"
    return words
