"""The SpanTrain planner: search for the fastest memory-feasible hybrid pipeline plan.

Role: ``make_plan(topology, profile, options)``, the entry point the CLI, the operator and
the worker's local launcher call. It composes the passes:

  1. group devices (``grouping``): network groups, compute groups inside them;
  2. enumerate pipeline *structures*: which network groups take part and in which order along
     the pipeline (every ordered subset for up to ``EXHAUSTIVE_GROUPS`` groups, a speed-ordered
     chain and its prefixes beyond), plus "all devices as one group"; for each, how many
     stages each group is split into (hill-climbing 1 -> 2 -> 4 ... per group);
  3. for each structure and micro-batch count: integer per-device shares in proportion to
     speed, then a layer partition by dynamic programming that minimises the bottleneck stage
     time (compute, boundary transfer, amortised all-reduce) under every device's memory;
  4. simulate the best few candidates under each schedule (``gpipe``, ``1f1b``, ``zb`` with
     1F1B-like and relaxed memory limits), drop any that overflow memory, keep the fastest.

Devices left out (a whole group that only slows the pipeline, or a device whose share rounds
to zero) are listed in ``plan.excluded`` with the reason. Deterministic: same inputs, same
plan, byte for byte.

Pure: planner modules and the standard library only.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from spantrain_planner.core.errors import InfeasibleError, PlanTimeoutError, gib
from spantrain_planner.core.options import PlannerOptions
from spantrain_planner.evaluation.simulator import (
    DEFAULT_COST,
    CostModel,
    ProfileSums,
    SimResult,
    ring_allreduce_seconds,
)
from spantrain_planner.evaluation.validate import validate_plan
from spantrain_planner.inputs.cluster import Topology
from spantrain_planner.inputs.plan import ExcludedDevice, Plan, Schedule
from spantrain_planner.inputs.profiles import ModelProfile
from spantrain_planner.passes.assemble import StageLayout, assemble
from spantrain_planner.passes.grouping import NetworkGroup, group_devices
from spantrain_planner.passes.partition import (
    WINDOWED_DP_LAYERS,
    StageDevices,
    coarsen,
    joint_partition,
    microbatch_candidates,
    microbatch_fallbacks,
    partition_layers,
    proportional_shares,
)

StageSets = tuple[tuple[tuple[int, ...], int], ...]  # (devices, network group) per stage
#: Schedules from the most activation memory to the least, tried in this order as a probe.
SCHEDULES_BY_MEMORY: tuple[Schedule, ...] = ("zb", "1f1b", "gpipe")
EXHAUSTIVE_GROUPS = 4  # every ordered subset of up to this many network groups
TOP_CANDIDATES = 6  # structures simulated
FINALISTS = 3  # structures simulated under every schedule
POLISH_ROUNDS = 4  # greedy boundary moves checked by simulation
SMALL_CLUSTER = 8  # at most this many devices: simulate several times more candidates
TINY_CLUSTER = 6  # at most this many devices: every pipeline order is tried and simulated
MAX_SPLIT = 8  # most stages one network group is split into
JOINT_UNITS = 24  # the joint width x layer DP runs when the pipeline has at most this many units


# --------------------------------------------------------------------------------------------
# structures


@dataclass(frozen=True)
class Candidate:
    estimate: float
    key: tuple[object, ...]  # deterministic tie-break
    stages: tuple[StageDevices, ...]
    ranges: tuple[tuple[int, int], ...]
    num_microbatches: int
    groups_used: tuple[int, ...]


@dataclass
class SearchStats:
    structures: int = 0
    partitions: int = 0
    simulations: int = 0
    best_by_groups: dict[tuple[int, ...], float] = field(default_factory=dict)
    #: the time budget ran out: structures not yet generated or scored were skipped
    truncated: bool = False


class _OutOfTime(Exception):
    """The search's time budget is spent (caught inside ``search``)."""


def split_group(topology: Topology, group: NetworkGroup, num_stages: int) -> list[tuple[int, ...]]:
    """Split a network group's devices into ``num_stages`` chunks of roughly equal speed.

    With no more stages than nodes, chunks are runs of whole nodes, so each stage's
    all-reduce stays on intra-node links; otherwise devices are ordered fastest compute group
    first, node by node, and cut into runs.
    """
    if num_stages <= len(group.nodes):
        units = [
            tuple(d for d in group.devices if topology.devices[d].node == n) for n in group.nodes
        ]
    else:
        units = [(d,) for cg in group.compute_groups for d in cg]
    flops = [sum(topology.devices[d].flops for d in unit) for unit in units]
    total = sum(flops)
    chunks: list[list[int]] = [[]]
    acc = 0.0
    for pos, unit in enumerate(units):
        remaining_units = len(units) - pos
        remaining_chunks = num_stages - len(chunks)
        if (
            chunks[-1]
            and len(chunks) < num_stages
            and (acc >= total * len(chunks) / num_stages or remaining_units <= remaining_chunks)
        ):
            chunks.append([])
        chunks[-1].extend(unit)
        acc += flops[pos]
    assert len(chunks) == num_stages and all(chunks)
    return [tuple(c) for c in chunks]


class _Searcher:
    def __init__(
        self,
        topology: Topology,
        profile: ModelProfile,
        options: PlannerOptions,
        cost: CostModel,
        deadline: float = math.inf,
    ) -> None:
        self.topology = topology
        self.deadline = deadline  # time.monotonic() after which the search stops generating
        self.profile = profile
        self.options = options
        self.cost = cost
        self.sums = ProfileSums(profile)
        coarse, _ = coarsen(profile)
        mid, self.mid_bounds = coarsen(profile, WINDOWED_DP_LAYERS // 2)
        self.mid_sums = ProfileSums(mid)
        self.coarse = coarse.num_layers < profile.num_layers
        self.search_sums = ProfileSums(coarse) if self.coarse else self.sums
        self.stats = SearchStats()
        self.candidates: list[Candidate] = []
        self.max_stages = min(profile.num_layers, options.max_stages or profile.num_layers)
        self.schedule_for_dp = "gpipe" if options.schedule == "gpipe" else "1f1b"
        self.structures: dict[StageSets, float] = {}
        self.seen: set[tuple[StageSets, int]] = set()

    def evaluate(self, stage_sets: StageSets, every_m: bool = False) -> float:
        """Best estimated step time of a structure (and record its candidates).

        While searching, one micro-batch count is tried (the feasible one nearest 4 x stages)
        on the merged-layer profile; the best structures are re-evaluated over every
        candidate count on the full profile afterwards (``refine``).
        """
        self.stats.structures += 1
        if time.monotonic() > self.deadline:
            raise _OutOfTime
        sums = self.sums if every_m else self.search_sums
        p = len(stage_sets)
        if p > self.max_stages:
            return math.inf
        widest = max(len(devs) for devs, _ in stage_sets)
        ms = microbatch_candidates(
            self.options.global_batch, p, widest, self.options.num_microbatches
        )
        if not every_m:
            ms.sort(key=lambda m: (abs(math.log(m / (4 * p))), m))
        fallbacks = ([] if self.options.num_microbatches is not None
                     else microbatch_fallbacks(self.options.global_batch, widest, ms))
        best = math.inf
        for k, m in enumerate([*ms, *fallbacks]):
            if k >= len(ms) and best < math.inf:
                break  # the fallbacks are for memory only: tried while nothing fits
            b = self.options.global_batch // m
            stages = []
            for devs, gi in stage_sets:
                shares = proportional_shares([self.topology.devices[d].flops for d in devs], b)
                kept = tuple((d, s) for d, s in zip(devs, shares, strict=True) if s > 0)
                stages.append(
                    StageDevices(tuple(d for d, _ in kept), tuple(s for _, s in kept), gi)
                )
            self.stats.partitions += 1
            result = self._partition(stages, sums, m)
            if result is None:
                continue
            bottleneck, ranges = result
            ar = max(
                ring_allreduce_seconds(
                    self.topology, list(st.devices), sums.range(r[0], r[1]).param_bytes
                )
                for st, r in zip(stages, ranges, strict=True)
            )
            estimate = (m + p - 1) * bottleneck + ar
            best = min(best, estimate)
            if sums is not self.sums:
                break  # a merged-layer estimate only ranks structures
            used = tuple(sorted({gi for _, gi in stage_sets}))
            if (stage_sets, m) not in self.seen:
                self.seen.add((stage_sets, m))
                self.candidates.append(
                    Candidate(estimate, (stage_sets, m), tuple(stages), tuple(ranges), m, used)
                )
            if not every_m:
                break
        if best < self.structures.get(stage_sets, math.inf):
            self.structures[stage_sets] = best
        return best

    def _partition(
        self, stages: Sequence[StageDevices], sums: ProfileSums, m: int
    ) -> tuple[float, list[tuple[int, int]]] | None:
        """``partition_layers``; on a deep model's full profile, two-level: the cuts of the
        optimum on 64 merged layers, then the full profile's optimum within two merged layers
        of each
        (the full DP is quadratic in the layers: ~50 s for 1,000 layers on eight stages)."""
        dp = functools.partial(
            partition_layers, stages, self.topology, schedule=self.schedule_for_dp, cost=self.cost
        )
        if sums is self.search_sums or self.profile.num_layers <= WINDOWED_DP_LAYERS:
            return dp(sums, m)
        rough = dp(self.mid_sums, m)
        if rough is None:
            return dp(sums, m)  # merged layers can be too coarse to fit: the exact DP decides
        bounds, last = self.mid_bounds, len(self.mid_bounds) - 1
        windows = [  # rough ranges are in merged-layer indices
            (bounds[max(k - 2, 0)], bounds[min(k + 2, last)]) for _, k in rough[1][:-1]
        ]
        return dp(sums, m, windows=windows) or dp(sums, m)

    def climb(self, groups: Sequence[NetworkGroup]) -> None:
        """Hill-climb the number of stages per group, starting from one stage per group."""

        def sets(splits: Sequence[int]) -> StageSets:
            return tuple(
                (chunk, g.index)
                for g, c in zip(groups, splits, strict=True)
                for chunk in split_group(self.topology, g, c)
            )

        splits = [1] * len(groups)
        if sum(splits) > self.max_stages:
            return
        current = self.evaluate(sets(splits))
        while current == math.inf:
            # nothing fits yet: split every group further until something does
            grown = [_next_split(c, g) for c, g in zip(splits, groups, strict=True)]
            if grown == splits or sum(grown) > self.max_stages:
                return
            splits = grown
            current = self.evaluate(sets(splits))
        while True:
            best_move: tuple[float, int] | None = None
            for k, g in enumerate(groups):
                nxt = _next_split(splits[k], g)
                if nxt == splits[k] or sum(splits) - splits[k] + nxt > self.max_stages:
                    continue
                trial = list(splits)
                trial[k] = nxt
                value = self.evaluate(sets(trial))
                if value < current and (best_move is None or value < best_move[0]):
                    best_move = (value, k)
            if best_move is None:
                return
            current, k = best_move
            splits[k] = _next_split(splits[k], groups[k])

    def joint(self, groups: Sequence[NetworkGroup], cross_groups: bool = False) -> None:
        """Stage widths and layers by the joint DP, stages kept inside network groups."""
        units: list[tuple[int, ...]] = []
        unit_group: list[int] = []
        per_device = sum(len(g.devices) for g in groups) <= JOINT_UNITS
        for g in groups:
            blocks: list[tuple[int, ...]]
            if per_device:
                blocks = [(d,) for cg in g.compute_groups for d in cg]
            else:
                blocks = [
                    tuple(d for d in g.devices if self.topology.devices[d].node == n)
                    for n in g.nodes
                ]
            units.extend(blocks)
            unit_group.extend([g.index] * len(blocks))
        self.joint_units(units, unit_group, cross_groups)

    def joint_units(
        self, units: Sequence[tuple[int, ...]], unit_group: Sequence[int], cross_groups: bool
    ) -> None:
        """Run the joint DP on explicit units (in pipeline order) and record its structures."""
        if len(units) > JOINT_UNITS:
            return
        group_of = {d: gi for u, gi in zip(units, unit_group, strict=True) for d in u}
        allowed = None if cross_groups else (lambda k0, k: unit_group[k0] == unit_group[k - 1])
        widest_unit = max(len(u) for u in units)
        for m in microbatch_candidates(self.options.global_batch, 1, widest_unit, None):
            if self.options.num_microbatches not in (None, m):
                continue
            for _, stages, _ in joint_partition(
                units,
                self.topology,
                self.search_sums,
                m,
                self.options.global_batch // m,
                same_stage_allowed=allowed,
                skip_units=self.options.allow_exclusion,
                cost=self.cost,
            ):
                stage_sets = tuple((st.devices, group_of[st.devices[0]]) for st in stages)
                if stage_sets not in self.structures:
                    self.evaluate(stage_sets)

    def refine(self, count: int) -> None:
        """Re-evaluate the best ``count`` structures over every micro-batch count."""
        ranked = sorted(self.structures.items(), key=lambda kv: (kv[1], kv[0]))
        for stage_sets, _ in ranked[:count]:
            self.evaluate(stage_sets, every_m=True)


def _next_split(current: int, group: NetworkGroup) -> int:
    """1 -> 2 -> 4 -> 8 stages, capped by the group's devices."""
    return min(current * 2, len(group.devices), MAX_SPLIT)


def group_variants(topology: Topology, group: NetworkGroup) -> list[NetworkGroup]:
    """The group, and the group cut down to its fastest node(s) (a careful user's choice).

    Leaving weak nodes of a group out can beat using them when every extra stage costs a
    link hop; these variants let the search find that.
    """
    if len(group.nodes) < 2:
        return [group]
    node_flops = {
        n: sum(topology.devices[d].flops for d in group.devices if topology.devices[d].node == n)
        for n in group.nodes
    }
    ranked = sorted(group.nodes, key=lambda n: (-node_flops[n], group.nodes.index(n)))
    out = [group]
    for k in sorted({1, (len(ranked) + 1) // 2}):
        if k >= len(ranked):
            continue
        keep = set(ranked[:k])
        devices = tuple(d for d in group.devices if topology.devices[d].node in keep)
        out.append(
            NetworkGroup(
                index=group.index,
                devices=devices,
                compute_groups=tuple(
                    cg2
                    for cg in group.compute_groups
                    if (cg2 := tuple(d for d in cg if d in devices))
                ),
                nodes=tuple(n for n in group.nodes if n in keep),
                internal_bandwidth=group.internal_bandwidth,
            )
        )
    return out


def _orders(groups: list[NetworkGroup], topology: Topology) -> list[list[NetworkGroup]]:
    """Ordered subsets of network groups to try as pipelines."""
    if len(groups) <= EXHAUSTIVE_GROUPS:
        out: list[list[NetworkGroup]] = []
        for r in range(1, len(groups) + 1):
            for perm in itertools.permutations(groups, r):
                out.append(list(perm))
        return out
    # many groups: fastest group first, then greedily the group best connected to the last
    speed = {g.index: sum(topology.devices[d].flops for d in g.devices) for g in groups}
    chain = [max(groups, key=lambda g: (speed[g.index], -g.index))]
    rest = [g for g in groups if g is not chain[0]]
    while rest:
        tail = chain[-1].devices[0]
        nxt = max(rest, key=lambda g: (topology.bandwidth[tail][g.devices[0]], speed[g.index]))
        chain.append(nxt)
        rest.remove(nxt)
    return [chain[:k] for k in range(1, len(chain) + 1)]


def make_plan(
    topology: Topology,
    profile: ModelProfile,
    options: PlannerOptions,
    *,
    cost: CostModel = DEFAULT_COST,
    exhaustive_groups: int | None = None,
    time_budget: float | None = None,
) -> Plan:
    """Plan ``profile`` on ``topology``; raises ``InfeasibleError`` when nothing fits."""
    plan, _ = search(
        topology, profile, options, cost=cost, exhaustive_groups=exhaustive_groups,
        time_budget=time_budget,
    )
    return plan


def search(
    topology: Topology,
    profile: ModelProfile,
    options: PlannerOptions,
    *,
    cost: CostModel = DEFAULT_COST,
    exhaustive_groups: int | None = None,
    time_budget: float | None = None,
) -> tuple[Plan, SimResult]:
    """``make_plan`` that also returns the winning simulation (for charts and reports).

    With ``time_budget`` (seconds) the search is anytime: it stops generating structures at
    half the budget and scoring them at the whole, and returns the best plan found by then;
    when none fits by then it raises a ``PlanningError`` that says so.
    """
    if topology.num_devices == 0:
        raise InfeasibleError("the cluster has no devices; check the placement's node selector")
    started = time.monotonic()
    budget = math.inf if time_budget is None else time_budget
    searcher = _Searcher(topology, profile, options, cost, deadline=started + budget / 2)
    groups = group_devices(topology, options.network_cut_ratio, options.compute_tolerance)
    try:
        _generate(searcher, groups, exhaustive_groups)
    except _OutOfTime:
        searcher.stats.truncated = True
    if not searcher.candidates:
        if searcher.stats.truncated:
            raise _out_of_time(profile, budget, searcher.stats)
        raise _infeasible(topology, profile, options, cost)
    searcher.deadline = started + budget
    try:
        return _score(searcher, groups)
    except _OutOfTime:
        raise _out_of_time(profile, budget, searcher.stats) from None


def _out_of_time(profile: ModelProfile, budget: float, stats: SearchStats) -> PlanTimeoutError:
    return PlanTimeoutError(
        f"planning {profile.num_layers} layers found no plan that fits within its time budget "
        f"of {budget:g} s ({stats.structures} structures and {stats.simulations} simulations "
        "tried); give the planner more time (the operator's planBudgetSeconds), fix "
        "planner.numMicrobatches or planner.maxStages, or use a shallower model"
    )


def _generate(
    searcher: _Searcher, groups: list[NetworkGroup], exhaustive_groups: int | None
) -> None:
    """Candidate structures: hill-climbs per group order, joint DPs, then the best refined."""
    topology, options = searcher.topology, searcher.options
    orders = _orders(groups, topology)
    if exhaustive_groups is not None and len(groups) > exhaustive_groups:
        orders = orders[: len(groups)]
    if not options.allow_exclusion:
        orders = [o for o in orders if len(o) == len(groups)]
    elif len(groups) <= 3:
        orders = [
            list(combo)
            for order in orders
            for combo in itertools.product(*(group_variants(topology, g) for g in order))
        ]
    for order in orders:
        searcher.climb(order)
    joint_orders = (
        itertools.permutations(groups, len(groups))
        if len(groups) <= EXHAUSTIVE_GROUPS
        else [groups]
    )
    small_cluster = topology.num_devices <= SMALL_CLUSTER
    for joint_order in joint_orders:
        if small_cluster:
            # the pipeline order inside a group matters too: try its compute groups in turn
            for combo in itertools.islice(
                itertools.product(*(_compute_group_orders(g) for g in joint_order)), 24
            ):
                searcher.joint(list(combo))
        else:
            searcher.joint(joint_order)
    node_names = list(dict.fromkeys(d.node for d in topology.devices))
    if topology.num_devices <= TINY_CLUSTER:
        # tiny clusters: every pipeline order of the devices (of the nodes beyond five
        # devices), stages free to span groups
        group_index = {d: g.index for g in groups for d in g.devices}
        if topology.num_devices <= 5:
            unit_orders = [
                [(d,) for d in perm] for perm in itertools.permutations(range(topology.num_devices))
            ]
        else:
            unit_orders = [
                [(d.index,) for n in perm for d in topology.devices if d.node == n]
                for perm in itertools.permutations(node_names)
            ]
        for units in unit_orders:
            searcher.joint_units(units, [group_index[u[0]] for u in units], cross_groups=True)
    fastest_first = sorted(topology.devices, key=lambda d: (-d.flops, d.index))
    searcher.joint(
        [
            NetworkGroup(
                0,
                tuple(d.index for d in fastest_first),
                tuple((d.index,) for d in fastest_first),
                tuple(dict.fromkeys(d.node for d in fastest_first)),
                0.0,
            )
        ],
        cross_groups=True,
    )
    if len(groups) > 1:
        merged = NetworkGroup(
            index=len(groups),
            devices=tuple(d.index for d in topology.devices),
            compute_groups=tuple(
                tuple(sorted(cg)) for cg in _merge_compute_groups(groups, topology)
            ),
            nodes=tuple(n for g in groups for n in g.nodes),
            internal_bandwidth=min(g.internal_bandwidth for g in groups),
        )
        searcher.climb([merged])
    searcher.refine(TOP_CANDIDATES * (8 if topology.num_devices <= SMALL_CLUSTER else 1))


def _score(searcher: _Searcher, groups: Sequence[NetworkGroup]) -> tuple[Plan, SimResult]:
    """Simulate the best candidates under each schedule, polish the winner's cuts, validate."""
    topology, profile, options, cost = (
        searcher.topology, searcher.profile, searcher.options, searcher.cost
    )
    schedules: list[Schedule] = options.schedules()
    best: tuple[tuple[object, ...], Plan, SimResult, Candidate] | None = None
    worst_violation: tuple[str, int, int] | None = None
    # a candidate scored again (a finalist's probe schedule, a polish move back) changes
    # nothing: the same simulation offers the same key to ``best`` and ``worst_violation``
    scored_before: dict[tuple[object, ...], float] = {}

    def score(cand: Candidate, schedule: Schedule, relaxed: bool) -> float:
        nonlocal best, worst_violation
        if time.monotonic() > searcher.deadline:
            searcher.stats.truncated = True
            raise _OutOfTime
        memo = (cand.key, cand.stages, cand.ranges, cand.num_microbatches, schedule, relaxed)
        if memo in scored_before:
            return scored_before[memo]
        scored_before[memo] = value = _simulate_candidate(cand, schedule, relaxed)
        return value

    def _simulate_candidate(cand: Candidate, schedule: Schedule, relaxed: bool) -> float:
        nonlocal best, worst_violation
        layouts = [
            StageLayout(r[0], r[1], st.devices, st.shares, st.network_group)
            for st, r in zip(cand.stages, cand.ranges, strict=True)
        ]
        p = len(layouts)
        limits = [min(cand.num_microbatches, 2 * (p - s)) for s in range(p)] if relaxed else None
        plan, sim = assemble(
            layouts,
            topology,
            profile,
            schedule=schedule,
            num_microbatches=cand.num_microbatches,
            inflight_limits=limits,
            max_pending_w=limits,
            cost=cost,
            sums=searcher.sums,
        )
        assert sim is not None
        searcher.stats.simulations += 1
        violations = sim.memory_violations()
        if violations:
            v = max(violations, key=lambda t: t[1] - t[2])
            if worst_violation is None or v[1] - v[2] < worst_violation[1] - worst_violation[2]:
                worst_violation = v
            return math.inf
        prev = searcher.stats.best_by_groups.get(cand.groups_used, 0.0)
        searcher.stats.best_by_groups[cand.groups_used] = max(prev, sim.samples_per_second)
        key = (sim.step_seconds, cand.key, schedule, relaxed)
        if best is None or key < best[0]:
            best = (key, plan, sim, cand)
        return sim.step_seconds

    try:
        # phase 1: the best-estimated structures (two micro-batch counts each), one schedule
        small = topology.num_devices <= SMALL_CLUSTER
        tiny = topology.num_devices <= TINY_CLUSTER
        by_structure: dict[object, list[Candidate]] = {}
        for cand in sorted(searcher.candidates, key=lambda c: (c.estimate, c.key)):
            group = by_structure.setdefault(tuple(st.devices for st in cand.stages), [])
            if len(group) < (3 if tiny else 2) and all(
                c.num_microbatches != cand.num_microbatches for c in group
            ):
                group.append(cand)
        top = len(by_structure) if tiny else TOP_CANDIDATES * (8 if small else 1)
        first = [c for cands in list(by_structure.values())[:top] for c in cands]
        probes: list[Schedule] = [x for x in SCHEDULES_BY_MEMORY if x in schedules]

        def probe(cand: Candidate) -> float:
            """The first schedule that fits in memory (zb keeps the most activations)."""
            for schedule in probes:
                value = score(cand, schedule, False)
                if value < math.inf:
                    return value
            return math.inf

        scored = sorted(((probe(c), c.key, c) for c in first), key=lambda t: t[:2])
        # phase 2: the front runners under every schedule (and zb with relaxed memory limits)
        for _, _, cand in scored[: FINALISTS * (6 if tiny else 4 if small else 1)]:
            for schedule in schedules:
                score(cand, schedule, False)
            if "zb" in schedules and len(cand.stages) > 1:
                score(cand, "zb", True)
        # phase 3: polish the winner's layer cuts with the simulator in the loop
        if best is not None:
            variants: list[tuple[Schedule, bool]] = (
                [(sch, False) for sch in schedules] + ([("zb", True)] if "zb" in schedules else [])
                if small
                else []
            )
            starts = [best]
            if tiny:  # polish the other front runners too: cuts and structure interact
                starts += [
                    (best[0], best[1], best[2], cand) for _, _, cand in scored[1 : FINALISTS * 6]
                ]
            for start in starts:
                _polish(start, score, rounds=POLISH_ROUNDS if small else 1, variants=variants)
    except _OutOfTime:
        if best is None:
            raise  # nothing fits yet: say the budget ran out
    if best is None:
        if worst_violation is not None:
            dev, need, cap = worst_violation
            raise InfeasibleError(
                f"no plan fits in memory: device {dev} needs {gib(need)} but has {gib(cap)} "
                f"(short by {gib(need - cap)}) in the most frugal plan found; lower "
                f"training.globalBatch, raise planner.numMicrobatches, or add devices",
                device_id=dev,
                needed_bytes=need,
                available_bytes=cap,
            )
        raise _infeasible(topology, profile, options, cost)
    _, plan, sim, _ = best
    plan = plan.model_copy(update={"excluded": _excluded(plan, topology, groups, searcher)})
    validate_plan(plan, topology, profile, sim)
    return plan, sim


def _polish(
    best: tuple[tuple[object, ...], Plan, SimResult, Candidate],
    score: Callable[[Candidate, Schedule, bool], float],
    rounds: int,
    variants: Sequence[tuple[Schedule, bool]] = (),
) -> None:
    """Move each stage boundary by one layer while the simulated step time improves.

    The DP optimises a proxy (the bottleneck stage time); the simulator sees fill, drain and
    schedule effects the proxy cannot, so a few greedy moves usually shave the last percent.
    ``score`` records any improvement as the new best; with ``variants`` each move is scored
    under every (schedule, relaxed memory limit) pair, else under the best plan's.
    """
    key, plan, sim, cand = best
    schedule: Schedule = plan.schedule
    relaxed = bool(key[3])
    ranges = list(cand.ranges)
    current = min(score(cand, sch, rel) for sch, rel in variants) if variants else sim.step_seconds
    cuts = range(len(ranges) - 1)
    if not variants and sim.stage_compute_seconds:
        # large plans: only the cuts beside the slowest stage (each move costs a simulation)
        slowest = max(range(len(ranges)), key=lambda i: sim.stage_compute_seconds[i])
        cuts = range(max(0, slowest - 1), min(len(ranges) - 1, slowest + 1))
    for _ in range(rounds):
        improved = False
        for j in cuts:
            for delta in (-1, 1):
                cut = ranges[j][1] + delta
                if not ranges[j][0] < cut < ranges[j + 1][1]:
                    continue
                trial = list(ranges)
                trial[j] = (ranges[j][0], cut)
                trial[j + 1] = (cut, ranges[j + 1][1])
                moved = Candidate(
                    cand.estimate,
                    (*cand.key, tuple(trial)),
                    cand.stages,
                    tuple(trial),
                    cand.num_microbatches,
                    cand.groups_used,
                )
                value = min(
                    score(moved, sch, rel) for sch, rel in (variants or [(schedule, relaxed)])
                )
                if value < current - 1e-12:
                    current, ranges, improved = value, trial, True
        if not improved:
            return


def _compute_group_orders(group: NetworkGroup) -> list[NetworkGroup]:
    """The group with its compute groups in every order (fastest-first/last beyond three)."""
    cgs = list(group.compute_groups)
    perms = [list(p) for p in itertools.permutations(cgs)] if len(cgs) <= 3 else [cgs, cgs[::-1]]
    return [
        NetworkGroup(group.index, group.devices, tuple(p), group.nodes, group.internal_bandwidth)
        for p in perms
    ]


def _merge_compute_groups(
    groups: Sequence[NetworkGroup], topology: Topology
) -> list[tuple[int, ...]]:
    all_cgs = [cg for g in groups for cg in g.compute_groups]
    return sorted(all_cgs, key=lambda cg: (-topology.devices[cg[0]].flops, cg))


def _excluded(
    plan: Plan, topology: Topology, groups: Sequence[NetworkGroup], searcher: _Searcher
) -> list[ExcludedDevice]:
    used = {d.device_id for st in plan.stages for d in st.devices}
    used_groups = {st.network_group for st in plan.stages}
    out: list[ExcludedDevice] = []
    best_all = searcher.stats.best_by_groups
    for g in groups:
        for d in g.devices:
            dev = topology.devices[d]
            if dev.id in used:
                continue
            if g.index not in used_groups and len(groups) > 1 and max(used_groups) < len(groups):
                with_it = max((v for k, v in best_all.items() if g.index in k), default=0.0)
                estimated = min(
                    (c.estimate for c in searcher.candidates if g.index in c.groups_used),
                    default=math.inf,
                )
                with_it = max(with_it, plan.global_batch / estimated)
                reason = (
                    f"network group {g.index} ({', '.join(g.nodes[:3])}"
                    f"{', ...' if len(g.nodes) > 3 else ''}) left out: the best plan using it "
                    f"would reach about {with_it:.3g} samples/s, this one "
                    f"{plan.global_batch / max(1e-12, _step(plan)):.3g}"
                )
            else:
                reason = (
                    "its share of a "
                    f"{plan.microbatch_size}-sample micro-batch rounds to zero, or the stage "
                    "is faster without it"
                )
            out.append(ExcludedDevice(device_id=dev.id, node=dev.node, reason=reason))
    return out


def _step(plan: Plan) -> float:
    return plan.predicted.step_seconds if plan.predicted else 0.0


def _infeasible(
    topology: Topology, profile: ModelProfile, options: PlannerOptions, cost: CostModel
) -> InfeasibleError:
    """Explain why nothing fits: the most frugal layout's worst device."""
    sums = ProfileSums(profile)
    n = min(topology.num_devices, profile.num_layers)
    order = sorted(range(topology.num_devices), key=lambda d: -topology.devices[d].memory_bytes)[:n]
    # one device per stage, layers split to balance parameter bytes, one sample per micro-batch
    total = sums.range(0, profile.num_layers).param_bytes
    ranges: list[tuple[int, int]] = []
    start = 0
    for j in range(n):
        end = start + 1
        target = total * (j + 1) / n
        while (
            end < profile.num_layers - (n - 1 - j) and sums.range(0, end + 1).param_bytes <= target
        ):
            end += 1
        if j == n - 1:
            end = profile.num_layers
        ranges.append((start, end))
        start = end
    worst: tuple[int, int, int] | None = None
    for j, (a, b) in enumerate(ranges):
        rs = sums.range(a, b)
        d = order[j]
        need = rs.param_bytes * cost.state_copies + (n - j) * rs.stash_bytes
        cap = topology.devices[d].memory_bytes
        if worst is None or need - cap > worst[1] - worst[2]:
            worst = (d, need, cap)
    assert worst is not None
    d, need, cap = worst
    dev = topology.devices[d]
    if need <= cap:
        return InfeasibleError(
            f"no plan found for global batch {options.global_batch} on {topology.num_devices} "
            "devices; check planner.numMicrobatches and planner.maxStages",
        )
    return InfeasibleError(
        f"model {profile.name} does not fit: even split over {n} devices with one sample per "
        f"micro-batch, device {dev.id} needs {gib(need)} but has {gib(cap)} "
        f"(short by {gib(need - cap)}); add devices with more memory, use a smaller model, "
        "or lower the precision",
        device_id=dev.id,
        needed_bytes=need,
        available_bytes=cap,
    )
