"""The adapter's decisions (``spantrain_planner.passes.adapt``): optimal shares, memory caps,
the predicted gain, and a detector that acts on sustained departures and never on noise."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from spantrain_planner.core.options import PlannerOptions
from spantrain_planner.inputs.cluster import ClusterSpec, resolve
from spantrain_planner.inputs.plan import Plan
from spantrain_planner.inputs.profiles import preset
from spantrain_planner.passes.adapt import (
    PROBE_MAX_BYTES,
    PROBE_MIN_BYTES,
    AdaptPolicy,
    Detector,
    LinkProbe,
    ReplanInputs,
    ReplanRecord,
    ReplanRequest,
    StepWatch,
    balanced_shares,
    decide_replan,
    link_probes,
    planned_seconds_per_row,
    rebalance,
    replan_pays,
    with_measured_speeds,
    with_probed_links,
)
from spantrain_planner.passes.assemble import StageLayout, assemble
from spantrain_planner.passes.search import search


def _plan(shares: list[list[int]], model: str = "gpt-tiny", m: int = 2) -> Plan:
    spec = ClusterSpec.model_validate({"name": "t", "nodes": [
        {"name": f"n{i}", "devices": [{"computeTflops": 1.0, "memoryBytes": "8Gi"}]}
        for i in range(sum(len(s) for s in shares))]})
    layers = preset(model).num_layers
    cuts = [round(k * layers / len(shares)) for k in range(len(shares) + 1)]
    layouts, nxt = [], 0
    for k, s in enumerate(shares):
        layouts.append(StageLayout(cuts[k], cuts[k + 1], tuple(range(nxt, nxt + len(s))),
                                   tuple(s)))
        nxt += len(s)
    plan, _ = assemble(layouts, resolve(spec), preset(model), schedule="1f1b",
                       num_microbatches=m)
    return plan


def _makespan(shares: list[int], t: list[float]) -> float:
    return max(s * x for s, x in zip(shares, t, strict=True))


@pytest.mark.parametrize("seed", range(40))
def test_balanced_shares_are_optimal_and_deterministic(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    t = [rng.choice([0.5, 1.0, 1.3, 2.0, 4.0, 7.5]) for _ in range(n)]
    total = rng.randint(n, 12)
    caps = [rng.randint(1, total) for _ in range(n)]
    got = balanced_shares(t, total, caps)
    feasible = [c for c in itertools.product(*(range(1, cap + 1) for cap in caps))
                if sum(c) == total]
    if not feasible:
        assert got is None
        return
    assert got is not None and sum(got) == total
    assert all(1 <= g <= c for g, c in zip(got, caps, strict=True))
    assert _makespan(got, t) == pytest.approx(min(_makespan(list(c), t) for c in feasible))
    assert balanced_shares(t, total, caps) == got


def test_a_slow_device_gets_fewer_rows_and_the_gain_is_predicted() -> None:
    plan = _plan([[4, 4], [8]])
    # rank 1 four times slower per row than rank 0; stage 1 as fast as rank 0
    proposal = rebalance(plan, {0: 1.0, 1: 4.0, 2: 1.0})
    assert proposal is not None
    assert proposal.new_shares == {0: 7, 1: 1, 2: 8}
    assert proposal.old_shares == {0: 4, 1: 4, 2: 8}
    # before: stage 0 takes 4 x 4 = 16, after max(7, 4) = 7; stage 1 takes 8 -> 16/8 - 1
    assert proposal.gain == pytest.approx(1.0)
    assert [d.microbatch_share for d in proposal.plan.stages[0].devices] == [7, 1]
    assert proposal.plan.stages[1] == plan.stages[1]
    assert proposal.changed_ranks() == [0, 1]


def test_matched_speeds_propose_nothing() -> None:
    plan = _plan([[4, 4], [8]])
    assert rebalance(plan, {0: 1.0, 1: 1.0, 2: 2.0}) is None
    assert rebalance(_plan([[8], [8]]), {0: 1.0, 1: 3.0}) is None  # width-1 stages
    assert rebalance(plan, {0: 1.0, 1: 1.0}) is None  # a rank not measured


def test_memory_caps_how_far_a_share_may_grow() -> None:
    plan = _plan([[4, 4], [8]])
    assert plan.predicted is not None
    devices = [d.model_copy(update={"memory_bytes": d.peak_memory_bytes * 5 // 4})
               if d.device_id == plan.stages[0].devices[0].device_id else d
               for d in plan.predicted.devices]
    tight = plan.model_copy(update={"predicted": plan.predicted.model_copy(
        update={"devices": devices})})
    proposal = rebalance(tight, {0: 1.0, 1: 4.0, 2: 1.0})
    assert proposal is not None
    assert proposal.new_shares[0] == 5  # 4 x 1.25: its memory holds no more


def test_noise_never_triggers() -> None:
    plan = _plan([[4, 4], [8]])
    rng = random.Random(1)
    detector = Detector(AdaptPolicy(), start=0)
    acted = []
    for step in range(400):
        if detector.due(step):
            speeds = {r: 1.0 * (1 + rng.uniform(-0.1, 0.1)) for r in range(3)}
            if detector.propose(plan, speeds) is not None:
                acted.append(step)
    assert acted == []


def test_a_sustained_departure_triggers_once_after_the_sustain_windows() -> None:
    policy = AdaptPolicy(window=4, sustain=2, warmup=2, threshold=0.15)
    plan = _plan([[4, 4], [8]])
    detector = Detector(policy, start=0)
    acted: list[int] = []
    for step in range(60):
        if detector.due(step):
            proposal = detector.propose(plan, {0: 1.0, 1: 4.0, 2: 1.0})
            if proposal is not None:
                acted.append(step)
                plan = proposal.plan
                detector.adopted(step)
    # windows end at steps 5 and 9 (warm-up 2, window 4): the second agreeing window acts;
    # after that the shares match the speeds and nothing more is proposed
    assert acted == [9]
    # a single departing window (a blip) is not enough
    detector = Detector(policy, start=0)
    plan = _plan([[4, 4], [8]])
    figures = iter([{0: 1.0, 1: 4.0, 2: 1.0}, {0: 1.0, 1: 1.0, 2: 1.0}] * 10)
    assert all(detector.propose(plan, next(figures)) is None
               for step in range(80) if detector.due(step))


def test_policy_rejects_nonsense_and_replan_pays_only_when_it_saves_time() -> None:
    with pytest.raises(ValueError):
        AdaptPolicy(window=0)
    with pytest.raises(ValueError):
        AdaptPolicy(threshold=0)
    assert replan_pays(0.5, 1000, 60.0)
    assert not replan_pays(0.5, 100, 60.0)


# --------------------------------------------------------------------------------------------
# re-plan: the links slowed


def test_step_watch_fires_on_unexplained_slowdown_only() -> None:
    policy = AdaptPolicy(threshold=0.15, sustain=2)
    # a slower device: step and compute grow together -> never
    watch = StepWatch(policy)
    assert not watch.observe(0.20, 0.10)
    assert not any(watch.observe(0.20 * f, 0.10 * f) for f in (2.0, 2.0, 2.0, 2.0))
    # +-10 % jitter on the step alone -> never
    watch = StepWatch(policy)
    watch.observe(0.20, 0.10)
    rng = random.Random(3)
    assert not any(watch.observe(0.20 * rng.uniform(0.9, 1.1), 0.10) for _ in range(200))
    # links 10x slower: the step grows, the compute does not -> after `sustain` windows, once
    watch = StepWatch(policy)
    watch.observe(0.20, 0.10)
    fired = [watch.observe(0.35, 0.10) for _ in range(4)]
    assert fired == [False, True, False, True]
    watch.reset()
    assert not watch.observe(0.35, 0.10)  # a new baseline
    assert watch.baseline == (0.35, 0.10)
    assert not watch.observe(0.0, 0.10)  # nothing measured: nothing concluded


def _two_node_spec(inter_mbps: float = 200.0) -> ClusterSpec:
    return ClusterSpec.model_validate({"name": "two", "nodes": [
        {"name": name, "bandwidthMbps": inter_mbps, "intraNodeBandwidthMbps": 10_000,
         "latencyMs": 1.0,
         "devices": [{"count": 2, "computeTflops": 0.02, "memoryBytes": "1Gi"}]}
        for name in ("a", "b")]})


def test_link_probes_cover_every_ordered_node_pair_sized_by_the_assumed_link() -> None:
    spec = _two_node_spec()
    topo = resolve(spec)
    plan, _ = search(topo, preset("gpt-mini"), PlannerOptions(global_batch=16))
    nodes = {d.node for s in plan.stages for d in s.devices}
    assert nodes == {"a", "b"}
    probes = link_probes(plan, topo)
    assert {(p.src, p.dst) for p in probes} == {(a, b) for a in nodes for b in nodes if a != b}
    for p in probes:
        assert PROBE_MIN_BYTES <= p.num_bytes <= PROBE_MAX_BYTES
        node_of = {d.rank: d.node for s in plan.stages for d in s.devices}
        assert (node_of[p.src_rank], node_of[p.dst_rank]) == (p.src, p.dst)
        ranks = [d.rank for s in plan.stages for d in s.devices if d.node == p.src]
        assert p.src_rank == min(ranks)
    assert LinkProbe("a", "b", 0, 2, 1_000_000, 0.4).mbps == pytest.approx(20.0)
    assert LinkProbe("a", "b", 0, 2, 1_000_000, 0.0).mbps == 0.0


def test_probed_links_replace_the_assumed_ones_per_direction() -> None:
    spec = _two_node_spec()
    topo = resolve(spec)
    probes = [LinkProbe("a", "b", 0, 2, 2_500_000, 1.0), LinkProbe("b", "a", 2, 0, 2_500_000, 0)]
    measured = resolve(with_probed_links(spec, probes))
    ia = next(i for i, d in enumerate(measured.devices) if d.node == "a")
    ib = next(i for i, d in enumerate(measured.devices) if d.node == "b")
    assert measured.bandwidth[ia][ib] * 8 / 1e6 == pytest.approx(20.0)
    # b -> a was not measured (0 s): a matrix entry of a -> b alone also covers b -> a
    assert measured.bandwidth[ib][ia] * 8 / 1e6 == pytest.approx(20.0)
    assert measured.latency[ia][ib] == pytest.approx(topo.latency[ia][ib])


def test_a_replan_is_kept_only_when_it_pays_for_the_restart() -> None:
    spec = _two_node_spec()
    profile = preset("gpt-mini")
    options = PlannerOptions(global_batch=16)
    plan, before = search(resolve(spec), profile, options)
    assert {d.node for s in plan.stages for d in s.devices} == {"a", "b"}
    inputs = ReplanInputs(cluster=spec, profile=profile, options=options)
    slow = [LinkProbe(p.src, p.dst, p.src_rank, p.dst_rank, p.num_bytes,
                      p.num_bytes * 8 / 0.5e6)  # 0.5 Mbit/s: far below the plan's 200
            for p in link_probes(plan, resolve(spec))]
    many = decide_replan(plan, inputs, slow, remaining_steps=10_000, restart_seconds=5.0)
    assert many.after_seconds < many.before_seconds
    assert many.before_seconds > before.step_seconds  # the running plan suffers
    assert many.pays and many.gain > 0
    few = decide_replan(plan, inputs, slow, remaining_steps=1, restart_seconds=1e6)
    assert not few.pays and few.plan.to_json() == many.plan.to_json()
    same = [LinkProbe(p.src, p.dst, p.src_rank, p.dst_rank, p.num_bytes,
                      p.num_bytes * 8 / 200e6) for p in slow]
    assert not decide_replan(plan, inputs, same, remaining_steps=10_000,
                             restart_seconds=5.0).pays  # nothing changed: nothing to gain
    record = ReplanRecord(step=7, gain=0.5, reason="r", measured_links={"a->b": 0.5},
                          assumed_links={"a->b": 200.0}, step_seconds_before=1.0,
                          step_seconds_after=0.5, restart_seconds=5.0, remaining_steps=9,
                          cluster=many.cluster, plan=json.loads(many.plan.to_json()))
    back = ReplanRecord.model_validate_json(record.model_dump_json(by_alias=True))
    assert Plan.model_validate(back.plan).to_json() == many.plan.to_json()
    assert json.loads(record.model_dump_json(by_alias=True))["stepSecondsBefore"] == 1.0
    # what a pod's termination message carries is the request part, read leniently
    request = ReplanRequest.model_validate_json(record.model_dump_json(by_alias=True))
    assert request.link_speeds() == {("a", "b"): 0.5} and request.step == 7
    odd = ReplanRequest(step=1, gain=0.1, measured_links={"a->b": 3.0, "nonsense": 1.0,
                                                          "a->": 2.0, "b->a": 0.0})
    assert odd.link_speeds() == {("a", "b"): 3.0}


def test_measured_speeds_rescale_the_planned_groups_only() -> None:
    spec = _two_node_spec()
    profile = preset("gpt-mini")
    plan, _ = search(resolve(spec), profile, PlannerOptions(global_batch=16))
    assumed = planned_seconds_per_row(plan, resolve(spec), profile)
    assert set(assumed) == {d.rank for s in plan.stages for d in s.devices}
    # every device measured 4x slower than assumed
    slower = with_measured_speeds(spec, plan, profile, {r: 4 * t for r, t in assumed.items()})
    for before, after in zip(resolve(spec).devices, resolve(slower).devices, strict=True):
        assert after.flops == pytest.approx(before.flops / 4)
        assert after.layer_overhead == pytest.approx(before.layer_overhead * 4)
    again = planned_seconds_per_row(plan, resolve(slower), profile)
    for r, t in assumed.items():
        assert again[r] == pytest.approx(4 * t)  # the plan now assumes what was measured
    assert with_measured_speeds(spec, plan, profile, {}) == spec
