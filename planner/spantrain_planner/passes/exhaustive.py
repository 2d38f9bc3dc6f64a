"""Exhaustive reference planner for tiny instances (the yardstick of the search's quality).

Role: enumerate *every* plan in SpanTrain's plan space for a few devices and layers — every
ordered sequence of disjoint device sets as stages, every contiguous layer split, every
micro-batch count, every schedule variant the search uses — simulate each, and return the
fastest that fits in memory. Exponential: only for tests and benchmarks (≤ 5 devices,
≤ 12 layers).

Pure: planner modules and the standard library only.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

from spantrain_planner.core.errors import InfeasibleError
from spantrain_planner.core.options import PlannerOptions
from spantrain_planner.evaluation.simulator import DEFAULT_COST, CostModel, ProfileSums, SimResult
from spantrain_planner.inputs.cluster import Topology
from spantrain_planner.inputs.plan import Plan, Schedule
from spantrain_planner.inputs.profiles import ModelProfile
from spantrain_planner.passes.assemble import StageLayout, assemble
from spantrain_planner.passes.partition import microbatch_candidates, proportional_shares
from spantrain_planner.passes.randomcase import random_cluster, random_profile
from spantrain_planner.passes.search import search


def ordered_set_partitions(items: tuple[int, ...]) -> Iterator[list[tuple[int, ...]]]:
    """Every sequence of disjoint non-empty blocks covering ``items`` (order of blocks matters)."""
    if not items:
        yield []
        return
    n = len(items)
    # choose the first block as any non-empty subset, recurse on the rest
    for size in range(1, n + 1):
        for first in itertools.combinations(items, size):
            rest = tuple(x for x in items if x not in first)
            for tail in ordered_set_partitions(rest):
                yield [first, *tail]


def exhaustive_plan(
    topology: Topology,
    profile: ModelProfile,
    options: PlannerOptions,
    *,
    cost: CostModel = DEFAULT_COST,
) -> tuple[Plan, SimResult] | None:
    """The fastest memory-feasible plan of the whole plan space (None if nothing fits)."""
    assert topology.num_devices <= 5 and profile.num_layers <= 12, "exhaustive is exponential"
    sums = ProfileSums(profile)
    num_layers = profile.num_layers
    schedules: list[Schedule] = options.schedules()
    best: tuple[float, Plan, SimResult] | None = None
    all_devices = tuple(range(topology.num_devices))
    for used in range(1, topology.num_devices + 1):
        for subset in itertools.combinations(all_devices, used):
            for blocks in ordered_set_partitions(subset):
                p = len(blocks)
                if p > num_layers:
                    continue
                widest = max(len(b) for b in blocks)
                for m in microbatch_candidates_all(options, widest):
                    b = options.global_batch // m
                    stages = []
                    for block in blocks:
                        shares = proportional_shares([topology.devices[d].flops for d in block], b)
                        kept = [(d, s) for d, s in zip(block, shares, strict=True) if s > 0]
                        stages.append(kept)
                    for cuts in itertools.combinations(range(1, num_layers), p - 1):
                        bounds = [0, *cuts, num_layers]
                        layouts = [
                            StageLayout(
                                bounds[j],
                                bounds[j + 1],
                                tuple(d for d, _ in stages[j]),
                                tuple(s for _, s in stages[j]),
                            )
                            for j in range(p)
                        ]
                        for schedule in schedules:
                            variants: list[list[int] | None] = [None]
                            if schedule == "zb" and p > 1:
                                variants.append([min(m, 2 * (p - s)) for s in range(p)])
                            for limits in variants:
                                plan, sim = assemble(
                                    layouts,
                                    topology,
                                    profile,
                                    schedule=schedule,
                                    num_microbatches=m,
                                    inflight_limits=limits,
                                    max_pending_w=limits,
                                    cost=cost,
                                    sums=sums,
                                )
                                assert sim is not None
                                if sim.memory_violations():
                                    continue
                                if best is None or sim.step_seconds < best[0]:
                                    best = (sim.step_seconds, plan, sim)
    return (best[1], best[2]) if best else None


def microbatch_candidates_all(options: PlannerOptions, widest: int) -> list[int]:
    """Every micro-batch count the plan space allows (the search samples a few of them)."""
    if options.num_microbatches is not None:
        return microbatch_candidates(options.global_batch, 1, widest, options.num_microbatches)
    return [
        m
        for m in range(1, options.global_batch + 1)
        if options.global_batch % m == 0 and options.global_batch // m >= widest
    ]


def optimality_gaps(num_cases: int) -> list[float]:
    """Relative excess step time of the search over the exhaustive optimum on random instances.

    Instances have 3-4 devices, 4-6 layers and a batch of 4 or 8, from seeds 0, 1, 2, ...;
    an instance where nothing fits must be infeasible for the search too (else this raises).
    """
    gaps: list[float] = []
    seed = 0
    while len(gaps) < num_cases:
        rng = random.Random(seed)
        seed += 1
        topology = random_cluster(rng, rng.randint(3, 4))
        profile = random_profile(rng, rng.randint(4, 6))
        options = PlannerOptions(global_batch=rng.choice([4, 8]))
        reference = exhaustive_plan(topology, profile, options)
        if reference is None:
            try:
                search(topology, profile, options)
            except InfeasibleError:
                continue
            raise AssertionError(f"seed {seed - 1}: exhaustive found nothing, the search did")
        _, sim = search(topology, profile, options)
        gaps.append(sim.step_seconds / reference[1].step_seconds - 1.0)
    return gaps
