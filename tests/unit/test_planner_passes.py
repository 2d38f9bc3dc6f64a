"""Grouping, shares, schedules, simulator (hand-computed cases) and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from spantrain_planner.evaluation.simulator import CostModel
from spantrain_planner.evaluation.validate import PlanValidationError, validate_plan
from spantrain_planner.inputs.cluster import ClusterSpec, load_cluster, resolve
from spantrain_planner.inputs.plan import boundary_transfers, gradient_buckets, rank_info
from spantrain_planner.inputs.profiles import LayerProfile, ModelProfile
from spantrain_planner.passes.assemble import StageLayout, assemble
from spantrain_planner.passes.grouping import compute_groups, group_devices
from spantrain_planner.passes.partition import even_shares, proportional_shares
from spantrain_planner.passes.schedules import (
    StageCost,
    fuse_backward,
    one_f_one_b,
    static_schedule,
    zero_bubble,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "clusters"
NO_OVERHEAD = CostModel(overhead_scale=0.0)


def uniform_cluster(num_devices: int, mbps: float = 1e9, latency_ms: float = 0.0) -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "name": "u",
            "nodes": [
                {
                    "name": f"n{i}",
                    "bandwidthMbps": mbps,
                    "latencyMs": latency_ms / 2,
                    "devices": [{"computeTflops": 1, "memoryBytes": "64Gi"}],
                }
                for i in range(num_devices)
            ],
        }
    )


def unit_profile(num_layers: int, output_bytes: int = 0) -> ModelProfile:
    """Every layer: 1 TFLOP forward, B and W per sample; no parameters."""
    return ModelProfile(
        name="unit",
        layers=[
            LayerProfile(
                name=f"l{i}",
                forward_flops=1e12,
                backward_input_flops=1e12,
                backward_weight_flops=1e12,
                param_count=0,
                param_bytes=0,
                output_bytes=output_bytes,
                stash_bytes=0,
            )
            for i in range(num_layers)
        ],
    )


@pytest.mark.parametrize(
    ("weights", "total", "expected"),
    [
        ([1, 1, 1], 7, [3, 2, 2]),
        ([2, 1, 1], 8, [4, 2, 2]),
        ([3, 1], 3, [2, 1]),
        ([1, 1000], 4, [0, 4]),
        ([1.5, 1.5, 1.0], 10, [4, 4, 2]),
    ],
)
def test_proportional_shares(weights: list[float], total: int, expected: list[int]) -> None:
    shares = proportional_shares(weights, total)
    assert shares == expected and sum(shares) == total


def test_even_shares() -> None:
    assert even_shares(3, 8) == [3, 3, 2]


def test_grouping_paper_env1() -> None:
    topo = resolve(load_cluster(EXAMPLES / "paper-env1.yaml"))
    groups = group_devices(topo, cut_ratio=4.0, tolerance=0.3)
    assert [g.nodes for g in groups] == [
        ("cloud-0", "cloud-1"),
        ("edge-0", "edge-1", "end-0", "end-1", "end-2"),
    ]
    # a looser cut ratio (100 Mbit/s within 100x of 10 Gbit/s) merges everything
    assert len(group_devices(topo, cut_ratio=200.0, tolerance=0.3)) == 1


def test_compute_groups_by_speed() -> None:
    topo = resolve(load_cluster(EXAMPLES / "mixed-edge.yaml"))
    ids = {d.id: d.index for d in topo.devices}
    groups = compute_groups(topo, list(range(topo.num_devices)), tolerance=0.3)
    named = [[topo.devices[i].id for i in g] for g in groups]
    assert named[0] == ["edge-gpu/gpu0"]
    assert sorted(named[-1]) == ["rpi-0/cpu0", "rpi-1/cpu0"]
    assert [ids["jetson-0/gpu0"], ids["jetson-1/gpu0"]] in [list(g) for g in groups]


def test_one_f_one_b_lists() -> None:
    assert one_f_one_b(3, 0, 4) == ["F0", "F1", "F2", "BW0", "F3", "BW1", "BW2", "BW3"]
    assert one_f_one_b(3, 2, 4) == ["F0", "BW0", "F1", "BW1", "F2", "BW2", "F3", "BW3"]
    assert static_schedule("gpipe", 2, 2) == [["F0", "F1", "BW0", "BW1"]] * 2


def test_fuse_backward() -> None:
    assert fuse_backward(["F0", "B0", "W0", "F1", "B1", "F2", "W1"]) == [
        "F0",
        "BW0",
        "F1",
        "B1",
        "F2",
        "W1",
    ]


def test_zero_bubble_orders_are_complete() -> None:
    costs = [StageCost(1.0, 1.0, 1.0, 0.1, 0.1)] * 4
    for actions in zero_bubble(costs, 8):
        assert sorted(actions) == sorted([f"{k}{i}" for k in "FBW" for i in range(8)])


def _equal_stage_plan(p: int, m: int, schedule: str, mbps: float = 1e9, out: int = 0):  # type: ignore[no-untyped-def]
    topo = resolve(uniform_cluster(p, mbps=mbps))
    prof = unit_profile(p, output_bytes=out)
    layouts = [StageLayout(j, j + 1, (j,), (1,)) for j in range(p)]
    plan, sim = assemble(
        layouts, topo, prof, schedule=schedule, num_microbatches=m, cost=NO_OVERHEAD
    )
    assert sim is not None
    return plan, sim, topo, prof


@pytest.mark.parametrize(("p", "m"), [(2, 1), (2, 4), (4, 4), (4, 8), (3, 12)])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_simulator_matches_bubble_formula(p: int, m: int, schedule: str) -> None:
    # equal stages, F = 1 s, B + W = 2 s per micro-batch, free links:
    # step = (m + p - 1) * (F + B + W), bubble fraction = (p - 1) / (m + p - 1)
    _, sim, _, _ = _equal_stage_plan(p, m, schedule)
    assert sim.step_seconds == pytest.approx((m + p - 1) * 3.0)
    assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize(("p", "m"), [(4, 8), (4, 16), (3, 6)])
def test_zero_bubble_beats_1f1b_on_equal_stages(p: int, m: int) -> None:
    _, one, _, _ = _equal_stage_plan(p, m, "1f1b")
    _, zb, _, _ = _equal_stage_plan(p, m, "zb")
    # ZB-H1 on equal stages: bubble (p - 1)(F + B - W) instead of (p - 1)(F + B + W);
    # the greedy schedule must reach it.
    assert zb.step_seconds == pytest.approx(m * 3.0 + (p - 1) * (1.0 + 1.0 - 1.0))
    assert zb.step_seconds < one.step_seconds


def test_simulator_link_time_by_hand() -> None:
    # 2 stages, 1 micro-batch, 10 MB per sample over 100 Mbit/s (0.8 s), 1 ms latency each way
    spec = ClusterSpec.model_validate(
        {
            "name": "h",
            "nodes": [
                {
                    "name": "a",
                    "bandwidthMbps": 100,
                    "latencyMs": 0.5,
                    "devices": [{"computeTflops": 1, "memoryBytes": "8Gi"}],
                },
                {
                    "name": "b",
                    "bandwidthMbps": 100,
                    "latencyMs": 0.5,
                    "devices": [{"computeTflops": 1, "memoryBytes": "8Gi"}],
                },
            ],
        }
    )
    topo = resolve(spec)
    prof = unit_profile(2, output_bytes=10_000_000)
    layouts = [StageLayout(0, 1, (0,), (1,)), StageLayout(1, 2, (1,), (1,))]
    _, sim = assemble(layouts, topo, prof, schedule="1f1b", num_microbatches=1, cost=NO_OVERHEAD)
    assert sim is not None
    # F0 (1) + send (0.8 + 0.001) + F1 (1) + BW1 (2) + send back (0.801) + BW0 (2)
    assert sim.step_seconds == pytest.approx(1 + 0.801 + 1 + 2 + 0.801 + 2)
    assert "link" in sim.bottleneck or "stage" in sim.bottleneck


def test_resharding_transfers() -> None:
    topo = resolve(uniform_cluster(5))
    prof = unit_profile(2)
    layouts = [StageLayout(0, 1, (0, 1), (3, 2)), StageLayout(1, 2, (2, 3, 4), (1, 2, 2))]
    plan, _ = assemble(layouts, topo, prof, schedule="1f1b", num_microbatches=2, predict=False)
    got = [(t.src, t.dst, t.row_start, t.row_end) for t in boundary_transfers(plan, 0)]
    # stage 0 rows: rank0 [0,3) rank1 [3,5); stage 1 rows: rank2 [0,1) rank3 [1,3) rank4 [3,5)
    assert got == [(0, 2, 0, 1), (0, 3, 1, 3), (1, 4, 3, 5)]
    info = rank_info(plan, 3)
    assert (info.stage_index, info.replica, info.row_start, info.row_end) == (1, 1, 1, 3)
    assert plan.world_size == 5 and plan.global_batch == 10


def test_memory_peak_counts_stash_until_w() -> None:
    topo = resolve(uniform_cluster(2))
    prof = ModelProfile(
        name="m",
        layers=[
            LayerProfile(
                name="a",
                forward_flops=1e12,
                backward_input_flops=1e12,
                backward_weight_flops=1e12,
                param_count=10,
                param_bytes=40,
                output_bytes=0,
                stash_bytes=1000,
            )
        ]
        * 2,
    )
    layouts = [StageLayout(0, 1, (0,), (1,)), StageLayout(1, 2, (1,), (1,))]
    _, gp = assemble(layouts, topo, prof, schedule="gpipe", num_microbatches=4)
    _, ob = assemble(layouts, topo, prof, schedule="1f1b", num_microbatches=4)
    assert gp is not None and ob is not None
    assert gp.peak_memory_bytes[0] == 4 * 40 + 4 * 1000  # GPipe keeps every micro-batch
    assert ob.peak_memory_bytes[0] == 4 * 40 + 2 * 1000  # 1F1B keeps p - s = 2


def test_validation_catches_broken_plans() -> None:
    plan, sim, topo, prof = _equal_stage_plan(2, 2, "1f1b")
    validate_plan(plan, topo, prof, sim)
    broken = plan.model_copy(
        update={
            "stages": [
                plan.stages[0].model_copy(update={"actions": ["F0", "BW0", "F1"]}),
                plan.stages[1],
            ]
        }
    )
    with pytest.raises(PlanValidationError, match="missing"):
        validate_plan(broken, topo, prof)
    gap = plan.model_copy(
        update={
            "stages": [
                plan.stages[0].model_copy(update={"layer_end": 0 + 1}),
                plan.stages[1].model_copy(update={"layer_start": 1, "layer_end": 1 + 0 + 1}),
            ]
        }
    )
    validate_plan(gap, topo, prof)
    out_of_order = plan.model_copy(
        update={
            "stages": [
                plan.stages[0].model_copy(update={"actions": ["BW0", "F0", "F1", "BW1"]}),
                plan.stages[1],
            ]
        }
    )
    with pytest.raises(PlanValidationError, match="before"):
        validate_plan(out_of_order, topo, prof)


@pytest.mark.parametrize(("accelerator", "overlap", "step"), [
    # accelerators: the last layer's ring (1 s) runs during layer 0's part of BW0; layer 0's
    # ring starts when BW0 ends: F0 (2) + BW0 (4) + one ring (1)
    ("NVIDIA-GeForce-RTX-3090", True, 7.0),
    # CPU devices: one ring over both layers (2 s) after BW0
    ("cpu", False, 8.0),
])
def test_gradient_rings_overlap_the_last_pass_on_accelerators(
    accelerator: str, overlap: bool, step: float
) -> None:
    spec = uniform_cluster(2, mbps=1000).model_dump(by_alias=True)
    for node in spec["nodes"]:
        node["devices"][0]["accelerator"] = accelerator
    topo = resolve(ClusterSpec.model_validate(spec))
    prof = unit_profile(2)
    # 125 MB of parameters per layer: a 2-device ring moves them once, 1 s at 1 Gbit/s
    # (parameter count 0: no optimizer time)
    prof = prof.model_copy(update={"layers": [
        layer.model_copy(update={"param_bytes": 125_000_000}) for layer in prof.layers]})
    layouts = [StageLayout(0, 2, (0, 1), (1, 1))]
    plan, sim = assemble(layouts, topo, prof, schedule="1f1b", num_microbatches=1,
                         cost=NO_OVERHEAD)
    assert sim is not None
    # 125 MB per layer: each layer is a bucket of its own (>= 25 MiB), last layer first
    assert plan.stages[0].grad_buckets == ([[1], [0]] if overlap else [])
    assert sim.step_seconds == pytest.approx(step)


def test_gradient_buckets_merge_small_layers_up_to_the_cap() -> None:
    mib = 2**20
    # layers 3..7 of a stage; layer 7 is big, 4-6 small, 3 has no parameters
    assert gradient_buckets(3, [0, 10 * mib, 10 * mib, 10 * mib, 30 * mib]) == [[7], [6, 5, 4, 3]]
    assert gradient_buckets(0, [mib, mib]) == [[1, 0]]
    # a tail without parameters joins the bucket before it
    assert gradient_buckets(0, [0, 0, 30 * mib]) == [[2, 1, 0]]
    assert gradient_buckets(0, [0, 30 * mib, 30 * mib]) == [[2], [1, 0]]


def test_validation_rejects_gradient_buckets_that_miss_or_repeat_a_layer() -> None:
    topo = resolve(uniform_cluster(2))
    prof = unit_profile(3)
    plan, _ = assemble([StageLayout(0, 3, (0, 1), (1, 1))], topo, prof, schedule="1f1b",
                       num_microbatches=1, predict=False)
    ok = plan.model_copy(update={"stages": [
        plan.stages[0].model_copy(update={"grad_buckets": [[2], [1, 0]]})]})
    validate_plan(ok, topo, prof)
    for bad in ([[2], [0]], [[0, 1, 2]], [[2, 1], [1, 0]], [[2, 1, 0], []]):
        broken = plan.model_copy(update={"stages": [
            plan.stages[0].model_copy(update={"grad_buckets": bad})]})
        with pytest.raises(PlanValidationError, match="gradient buckets"):
            validate_plan(broken, topo, prof)
