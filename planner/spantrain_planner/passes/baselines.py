"""Baselines: what users run today, expressed as plans and scored by the same simulator.

Role: the yardsticks for every benchmark. Each baseline is as good as its own method allows
(it picks its best micro-batch count, its own memory-feasible layout) but no better:

* ``dp-all``      data parallel (DDP) over every device, equal per-device batch, gradient
                  accumulation only when memory needs it;
* ``gpipe-even``  / ``1f1b-even``: one device per stage in cluster order, equal layer counts
                  (PyTorch pipelining / DeepSpeed-style even split), best micro-batch count;
* ``pipedream``   a homogeneous PipeDream-style planner: it believes every device has the mean
                  speed and every link the median bandwidth, chooses stages x replicas and the
                  layer split by DP under that belief, runs 1F1B with equal shares;
* ``asteroid``    an Asteroid-like heterogeneity-aware hybrid planner: devices fastest first,
                  a joint DP over (device prefix x layer prefix) choosing stage widths and layer
                  ranges with proportional shares, communication in its cost, 1F1B; no
                  network grouping and no zero-bubble schedule;
* ``dp-best-group`` data parallel over the best single network group (the careful user who
                  ignores the edge).

Pure: planner modules only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spantrain_planner.core.options import PlannerOptions
from spantrain_planner.evaluation.simulator import (
    DEFAULT_COST,
    CostModel,
    ProfileSums,
    SimResult,
    ring_allreduce_seconds,
)
from spantrain_planner.inputs.cluster import Device, Topology
from spantrain_planner.inputs.plan import Plan, Schedule
from spantrain_planner.inputs.profiles import ModelProfile
from spantrain_planner.passes.assemble import StageLayout, assemble
from spantrain_planner.passes.grouping import group_devices
from spantrain_planner.passes.partition import (
    StageDevices,
    coarsen,
    divisors,
    even_shares,
    joint_partition,
    microbatch_candidates,
    partition_layers,
)

Scored = tuple[Plan, SimResult]

GENERAL = ("dp-all", "gpipe-even", "1f1b-even", "pipedream")
HYBRID = "asteroid"
BEST_GROUP = "dp-best-group"
ALL = (*GENERAL, HYBRID, BEST_GROUP)


@dataclass(frozen=True)
class _Ctx:
    topology: Topology
    profile: ModelProfile
    global_batch: int
    cost: CostModel
    sums: ProfileSums


def _best(
    candidates: Sequence[tuple[Sequence[StageLayout], int, Schedule]], ctx: _Ctx, strategy: str
) -> Scored | None:
    """Simulate candidates; keep the fastest that fits in memory."""
    best: Scored | None = None
    for layouts, m, schedule in candidates:
        plan, sim = assemble(
            layouts,
            ctx.topology,
            ctx.profile,
            schedule=schedule,
            num_microbatches=m,
            strategy=strategy,
            cost=ctx.cost,
            sums=ctx.sums,
        )
        assert sim is not None
        if sim.memory_violations():
            continue
        if best is None or sim.step_seconds < best[1].step_seconds:
            best = (plan, sim)
    return best


def data_parallel(ctx: _Ctx, devices: Sequence[int], strategy: str = "dp-all") -> Scored | None:
    """DDP: equal shares; the fewest micro-batches (gradient accumulation) that fit memory."""
    devices = list(devices)[: ctx.global_batch]
    valid = [
        m
        for m in range(1, ctx.global_batch + 1)
        if ctx.global_batch % m == 0 and ctx.global_batch // m >= len(devices)
    ]
    for m in valid:  # smallest first: accumulation only when memory forces it
        b = ctx.global_batch // m
        layout = StageLayout(
            0, ctx.profile.num_layers, tuple(devices), tuple(even_shares(len(devices), b))
        )
        found = _best([([layout], m, "1f1b")], ctx, strategy)
        if found is not None:
            return found
    return None


def even_pipeline(ctx: _Ctx, schedule: Schedule) -> Scored | None:
    """One device per stage in cluster order, equal layer counts, best micro-batch count."""
    n = min(ctx.topology.num_devices, ctx.profile.num_layers)
    bounds = [0]
    for count in even_shares(n, ctx.profile.num_layers):
        bounds.append(bounds[-1] + count)
    candidates = []
    for m in microbatch_candidates(ctx.global_batch, n, 1, None):
        b = ctx.global_batch // m
        layouts = [StageLayout(bounds[j], bounds[j + 1], (j,), (b,)) for j in range(n)]
        candidates.append((layouts, m, schedule))
    return _best(candidates, ctx, f"{schedule}-even")


def _homogenized(topology: Topology) -> Topology:
    """What a homogeneous planner believes: mean speed, mean memory, median link."""
    mean_flops = statistics.fmean(d.flops for d in topology.devices)
    mean_mem = int(statistics.fmean(d.memory_bytes for d in topology.devices))
    mean_overhead = statistics.fmean(d.layer_overhead for d in topology.devices)
    links = [
        topology.bandwidth[i][j]
        for i in range(topology.num_devices)
        for j in range(topology.num_devices)
        if i != j
    ]
    lats = [
        topology.latency[i][j]
        for i in range(topology.num_devices)
        for j in range(topology.num_devices)
        if i != j
    ]
    bw = statistics.median(links) if links else math.inf
    lat = statistics.median(lats) if lats else 0.0
    devs = tuple(
        Device(
            d.index,
            d.id,
            f"node-{d.index}",
            d.tier,
            d.zone,
            d.arch,
            d.accelerator,
            mean_flops,
            mean_mem,
            d.platform,
            mean_overhead,
        )
        for d in topology.devices
    )
    n = topology.num_devices
    return Topology(
        topology.name,
        devs,
        tuple(tuple(math.inf if i == j else bw for j in range(n)) for i in range(n)),
        tuple(tuple(0.0 if i == j else lat for j in range(n)) for i in range(n)),
    )


def pipedream(ctx: _Ctx, max_stages: int = 16) -> Scored | None:
    """PipeDream-style: plan on a homogenized view of the cluster, run on the real one."""
    homo = _homogenized(ctx.topology)
    coarse, bounds = coarsen(ctx.profile)
    csums = ProfileSums(coarse)
    n = ctx.topology.num_devices
    believed: list[tuple[float, list[StageLayout], int]] = []
    for p in range(1, min(n, coarse.num_layers, max_stages) + 1):
        widths = even_shares(p, n)
        runs: list[tuple[int, ...]] = []
        start = 0
        for w in widths:
            runs.append(tuple(range(start, start + w)))
            start += w
        for m in microbatch_candidates(ctx.global_batch, p, max(widths), None):
            b = ctx.global_batch // m
            stages = [StageDevices(r, tuple(even_shares(len(r), b)), 0) for r in runs]
            result = partition_layers(stages, homo, csums, m, schedule="1f1b", cost=ctx.cost)
            if result is None:
                continue
            bottleneck, ranges = result
            ar = max(
                ring_allreduce_seconds(homo, list(st.devices), csums.range(a, z).param_bytes)
                for st, (a, z) in zip(stages, ranges, strict=True)
            )
            layouts = [
                StageLayout(bounds[a], bounds[z], st.devices, st.shares)
                for st, (a, z) in zip(stages, ranges, strict=True)
            ]
            believed.append(((m + p - 1) * bottleneck + ar, layouts, m))
    believed.sort(key=lambda t: t[0])
    # it runs what it believes is best; if that overflows real memory, its next choice
    for _, layouts, m in believed[:8]:
        found = _best([(layouts, m, "1f1b")], ctx, "pipedream")
        if found is not None:
            return found
    return None


def asteroid(ctx: _Ctx, max_units: int = 48) -> Scored | None:
    """Asteroid-like joint DP over device prefixes and layer prefixes (fastest devices first).

    The same joint width x layer DP the SpanTrain search uses, but over one flat device order
    (no network groups: a stage may span a slow link) and scored with 1F1B only.
    """
    topo = ctx.topology
    order = sorted(range(topo.num_devices), key=lambda d: (-topo.devices[d].flops, d))
    unit = max(1, math.ceil(len(order) / max_units))
    units = [tuple(order[i : i + unit]) for i in range(0, len(order), unit)]
    coarse, bounds = coarsen(ctx.profile)
    csums = ProfileSums(coarse)
    candidates: list[tuple[float, list[StageLayout], int]] = []
    # every micro-batch count its DP can use (not only those near the stage count SpanTrain
    # tries): the Asteroid-like planner gets the best m its own 1F1B cost model can find
    for m in divisors(ctx.global_batch):
        if ctx.global_batch // m < len(units[0]):
            continue
        for bottleneck, stages, ranges in joint_partition(
            units, topo, csums, m, ctx.global_batch // m, cost=ctx.cost
        ):
            layouts = [
                StageLayout(bounds[a], bounds[z], st.devices, st.shares)
                for st, (a, z) in zip(stages, ranges, strict=True)
            ]
            candidates.append(((m + len(layouts) - 1) * bottleneck, layouts, m))
    candidates.sort(key=lambda t: t[0])
    return _best([(lay, m, "1f1b") for _, lay, m in candidates[:8]], ctx, "asteroid")


def best_group_dp(ctx: _Ctx, options: PlannerOptions) -> Scored | None:
    """Data parallel over the single network group where it runs fastest."""
    best: Scored | None = None
    for group in group_devices(ctx.topology, options.network_cut_ratio, options.compute_tolerance):
        found = data_parallel(ctx, group.devices, BEST_GROUP)
        if found is not None and (best is None or found[1].step_seconds < best[1].step_seconds):
            best = found
    return best


def run_baselines(
    topology: Topology,
    profile: ModelProfile,
    options: PlannerOptions,
    *,
    cost: CostModel = DEFAULT_COST,
    names: Sequence[str] = ALL,
) -> dict[str, Scored | None]:
    """Every requested baseline's best plan (None where nothing fits in memory)."""
    ctx = _Ctx(topology, profile, options.global_batch, cost, ProfileSums(profile))
    makers: dict[str, Callable[[], Scored | None]] = {
        "dp-all": lambda: data_parallel(ctx, range(topology.num_devices)),
        "gpipe-even": lambda: even_pipeline(ctx, "gpipe"),
        "1f1b-even": lambda: even_pipeline(ctx, "1f1b"),
        "pipedream": lambda: pipedream(ctx),
        "asteroid": lambda: asteroid(ctx),
        "dp-best-group": lambda: best_group_dp(ctx, options),
    }
    return {name: makers[name]() for name in names}
