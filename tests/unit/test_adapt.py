"""The adapter's decisions (``spantrain_planner.passes.adapt``): optimal shares, memory caps,
the predicted gain, and a detector that acts on sustained departures and never on noise."""

from __future__ import annotations

import itertools
import random

import pytest

from spantrain_planner.inputs.cluster import ClusterSpec, resolve
from spantrain_planner.inputs.plan import Plan
from spantrain_planner.inputs.profiles import preset
from spantrain_planner.passes.adapt import (
    AdaptPolicy,
    Detector,
    balanced_shares,
    rebalance,
    replan_pays,
)
from spantrain_planner.passes.assemble import StageLayout, assemble


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
