"""Pure decisions of the runtime: rank roles, action checks, schedules of the LR and clip."""

from __future__ import annotations

import itertools
import math
import time

import pytest

torch = pytest.importorskip("torch")

from spantrain_worker.comm import plan_channels  # noqa: E402
from spantrain_worker.config import TrainingConfig, WorkerEnv  # noqa: E402
from spantrain_worker.emulation import Emulation, Emulator, Link  # noqa: E402
from spantrain_worker.runtime import (  # noqa: E402
    PlanError,
    check_actions,
    clip_coefficient,
    learning_rate,
    stage_role,
)

from .conftest import make_plan  # noqa: E402

pytestmark = pytest.mark.torch


def test_roles_reshard_rows_between_widths() -> None:
    plan = make_plan("gpt-tiny", [(0, 2, [3, 2]), (2, 3, [5]), (3, 4, [1, 2, 2])],
                     schedule="1f1b", num_microbatches=2)
    mid = stage_role(plan, 2)
    assert [(p.rank, p.row_start, p.row_end) for p in mid.upstream] == [(0, 0, 3), (1, 3, 5)]
    assert [(p.rank, p.row_start, p.row_end) for p in mid.downstream] == [
        (3, 0, 1), (4, 1, 3), (5, 3, 5)]
    last = stage_role(plan, 5)
    assert last.is_last and last.sample_indices(1) == range(8, 10)
    assert [(p.rank, p.row_start, p.row_end) for p in last.upstream] == [(2, 3, 5)]
    # one activation and one gradient channel per communicating pair
    assert len(plan_channels(plan)) == 2 * (2 + 3)


def test_check_actions_rejects_out_of_order_or_missing() -> None:
    check_actions(("F0", "F1", "B0", "W0", "BW1"), 2, 0)
    with pytest.raises(PlanError, match="before F1"):
        check_actions(("F0", "BW1", "F1", "BW0"), 2, 0)
    with pytest.raises(PlanError, match="before B0"):
        check_actions(("F0", "W0", "B0"), 1, 0)
    with pytest.raises(PlanError, match="in order"):
        check_actions(("F1", "F0", "BW0", "BW1"), 2, 0)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainingConfig(steps=100, learning_rate=1.0, warmup_steps=10,
                         min_learning_rate_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(100, cfg) == pytest.approx(0.1)
    lrs = [learning_rate(t, cfg) for t in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_clip_coefficient_matches_torch() -> None:
    params = [torch.nn.Parameter(torch.ones(3) * 2.0)]
    params[0].grad = torch.ones(3) * 4.0
    norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    assert clip_coefficient(norm, 1.0) * 4.0 == pytest.approx(float(params[0].grad[0]))
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(math.inf, 0.0) == 1.0


def test_emulated_link_serialises_messages_per_channel() -> None:
    emu = Emulation(slowdown={1: 2.0}, links=[Link(src=0, dst=1, bandwidth_bytes_per_second=100,
                                                   latency_seconds=0.5)])
    em = Emulator(emu, rank=1)
    assert em.slowdown == 2.0
    assert em.arrival(0, 10.0, 100) == pytest.approx(11.5)
    assert em.arrival(0, 10.0, 100) == pytest.approx(12.5)  # queued behind the first
    assert Emulator(emu, rank=0).arrival(1, 3.0, 100) == 3.0  # no link 1 -> 0 given


def test_paced_device_actions_last_their_cpu_time_over_the_share() -> None:
    em = Emulator(Emulation(pace_cores=0.5), rank=0)
    t0 = time.perf_counter()
    em.pad_compute(0.01, cpu=0.02)  # ran at full speed: must last 0.02 / 0.5 = 0.04 s
    assert 0.028 <= time.perf_counter() - t0 < 0.2
    t0 = time.perf_counter()
    em.pad_compute(0.05, cpu=0.02)  # already slower than its share: no wait
    assert time.perf_counter() - t0 < 0.01


def test_slowed_device_actions_last_their_cpu_time_times_the_slowdown() -> None:
    em = Emulator(Emulation(slowdown={0: 3.0}), rank=0)
    t0 = time.perf_counter()
    em.pad_compute(0.01, cpu=0.01)  # alone on its core: lasts 3 x 0.01 s
    assert 0.018 <= time.perf_counter() - t0 < 0.2
    t0 = time.perf_counter()
    em.pad_compute(0.03, cpu=0.01)  # waited for a core 20 ms: already lasted 3 x its CPU
    assert time.perf_counter() - t0 < 0.01


def test_pace_cores_comes_from_the_environment() -> None:
    base = {"SPANTRAIN_PLAN": "plan.json"}
    assert WorkerEnv.from_env(base).pace_cores is None
    assert WorkerEnv.from_env({**base, "SPANTRAIN_PACE_CORES": "0.12"}).pace_cores == 0.12
    with pytest.raises(ValueError, match="SPANTRAIN_PACE_CORES"):
        WorkerEnv.from_env({**base, "SPANTRAIN_PACE_CORES": "-1"})
