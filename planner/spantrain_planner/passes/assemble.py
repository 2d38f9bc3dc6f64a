"""Assemble a complete ``Plan`` from a stage layout.

Role: the one place that turns "these layers on these devices with these shares, this
schedule, this many micro-batches" into a ``Plan`` with ranks, action lists and predictions.
The search, the baselines, the worker's tests and users who pin a layout all go through it.

Pure: planner modules only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spantrain_planner.evaluation.simulator import (
    DEFAULT_COST,
    CostModel,
    ProfileSums,
    SimResult,
    action_seconds,
    ring_allreduce_seconds,
    simulate,
    static_memory_bytes,
)
from spantrain_planner.inputs.cluster import Topology
from spantrain_planner.inputs.plan import (
    DeviceAssignment,
    DeviceUtilization,
    ExcludedDevice,
    ModelRef,
    Plan,
    Prediction,
    Schedule,
    StagePlan,
    StagePrediction,
    gradient_buckets,
)
from spantrain_planner.inputs.profiles import ModelProfile
from spantrain_planner.passes.schedules import (
    StageCost,
    fuse_backward,
    static_schedule,
    zero_bubble,
)


@dataclass(frozen=True)
class StageLayout:
    """Layers ``[layer_start, layer_end)`` on ``devices`` (topology indices) with ``shares``."""

    layer_start: int
    layer_end: int
    devices: tuple[int, ...]
    shares: tuple[int, ...]  # samples of each micro-batch, per device
    network_group: int = 0


def model_ref(profile: ModelProfile) -> ModelRef:
    return ModelRef(
        name=profile.name,
        family=profile.family,
        config=dict(profile.config),
        entrypoint=profile.entrypoint,
        num_layers=profile.num_layers,
    )


def stage_costs(
    layouts: Sequence[StageLayout],
    topology: Topology,
    sums: ProfileSums,
    cost: CostModel = DEFAULT_COST,
) -> list[StageCost]:
    """Per-micro-batch durations of each stage on its slowest device, and boundary transfers."""
    result: list[StageCost] = []
    for s, lay in enumerate(layouts):
        rs = sums.range(lay.layer_start, lay.layer_end)
        devices = [topology.devices[d] for d in lay.devices]
        durations = {
            kind: max(
                action_seconds(kind, rs, share, dev, cost)
                for share, dev in zip(lay.shares, devices, strict=True)
            )
            for kind in ("F", "B", "W")
        }
        send_f = 0.0
        if s + 1 < len(layouts):
            send_f = boundary_seconds(lay, layouts[s + 1], topology, rs.output_bytes)
        send_b = 0.0
        if s > 0:
            prev = sums.range(layouts[s - 1].layer_start, layouts[s - 1].layer_end)
            send_b = boundary_seconds(layouts[s - 1], lay, topology, prev.output_bytes)
        result.append(StageCost(durations["F"], durations["B"], durations["W"], send_f, send_b))
    return result


def boundary_seconds(
    src: StageLayout, dst: StageLayout, topology: Topology, bytes_per_row: int
) -> float:
    """Time for one micro-batch to cross a stage boundary: the busiest channel, plus latency.

    Channels are as in the simulator: one per node pair between nodes, one per device pair
    inside a node.
    """
    serial: dict[tuple[str, str], float] = {}
    latency = 0.0
    s_off = 0
    for sd, ss in zip(src.devices, src.shares, strict=True):
        d_off = 0
        for dd, ds in zip(dst.devices, dst.shares, strict=True):
            rows = max(0, min(s_off + ss, d_off + ds) - max(s_off, d_off))
            if rows and sd != dd:
                a, b = topology.devices[sd], topology.devices[dd]
                key = (a.node, b.node) if a.node != b.node else (a.id, b.id)
                serial[key] = (
                    serial.get(key, 0.0) + rows * bytes_per_row / topology.bandwidth[sd][dd]
                )
                latency = max(latency, topology.latency[sd][dd])
            d_off += ds
        s_off += ss
    return max(serial.values(), default=0.0) + latency


def grad_buckets_for(
    topology: Topology, lay: StageLayout, profile: ModelProfile
) -> list[list[int]]:
    """How a stage sums its gradients: ``gradient_buckets`` overlapping its last weight pass
    on accelerators, or (empty) one all-reduce after its actions.

    Only on accelerators: there the collective runs beside the compute (NCCL on its own
    stream). On a CPU device the ring's copies, reductions and socket work take cycles from
    the same cores; measured on the CEE testbed's CPU-quota devices (before pacing), one ring
    per layer overlapped shortened the all-reduce tail after the last pass (about 120 to 75 ms)
    but not the step (0.91-0.92 s after vs 0.93-1.03 s overlapped).
    """
    if len(lay.devices) < 2 or any(
        topology.devices[d].accelerator.lower() == "cpu" for d in lay.devices
    ):
        return []
    return gradient_buckets(
        lay.layer_start,
        [profile.layers[i].param_bytes for i in range(lay.layer_start, lay.layer_end)],
    )


def assemble(
    layouts: Sequence[StageLayout],
    topology: Topology,
    profile: ModelProfile,
    *,
    schedule: Schedule,
    num_microbatches: int,
    strategy: str = "spantrain",
    excluded: Sequence[ExcludedDevice] = (),
    inflight_limits: Sequence[int] | None = None,
    max_pending_w: Sequence[int] | None = None,
    cost: CostModel = DEFAULT_COST,
    sums: ProfileSums | None = None,
    predict: bool = True,
) -> tuple[Plan, SimResult | None]:
    """Build the plan (ranks, actions) and, if ``predict``, simulate it."""
    sums = sums or ProfileSums(profile)
    microbatch_size = sum(layouts[0].shares)
    assert all(sum(lay.shares) == microbatch_size for lay in layouts), "shares differ by stage"
    p = len(layouts)
    if schedule == "zb":
        costs = stage_costs(layouts, topology, sums, cost)
        actions = zero_bubble(costs, num_microbatches, inflight_limits, max_pending_w)
        actions = [fuse_backward(a) for a in actions]
    else:
        actions = static_schedule(schedule, p, num_microbatches)
    costs_for_pred = stage_costs(layouts, topology, sums, cost)
    stages: list[StagePlan] = []
    rank = 0
    for s, lay in enumerate(layouts):
        devices = []
        for d, share in zip(lay.devices, lay.shares, strict=True):
            dev = topology.devices[d]
            devices.append(
                DeviceAssignment(
                    rank=rank,
                    device_id=dev.id,
                    node=dev.node,
                    arch=dev.arch,
                    accelerator=dev.accelerator,
                    microbatch_share=share,
                )
            )
            rank += 1
        rs = sums.range(lay.layer_start, lay.layer_end)
        c = costs_for_pred[s]
        stages.append(
            StagePlan(
                stage_index=s,
                layer_start=lay.layer_start,
                layer_end=lay.layer_end,
                network_group=lay.network_group,
                devices=devices,
                actions=actions[s],
                grad_buckets=grad_buckets_for(topology, lay, profile),
                predicted=StagePrediction(
                    forward_seconds=c.forward,
                    backward_input_seconds=c.backward_input,
                    backward_weight_seconds=c.backward_weight,
                    send_seconds=c.send_forward,
                    allreduce_seconds=ring_allreduce_seconds(
                        topology, list(lay.devices), rs.param_bytes
                    ),
                    memory_bytes=static_memory_bytes(rs, cost),
                ),
            )
        )
    plan = Plan(
        strategy=strategy,
        cluster=topology.name,
        model=model_ref(profile),
        global_batch=num_microbatches * microbatch_size,
        num_microbatches=num_microbatches,
        microbatch_size=microbatch_size,
        schedule=schedule,
        stages=stages,
        excluded=list(excluded),
    )
    if not predict:
        return plan, None
    sim = simulate(plan, topology, profile, cost=cost, sums=sums)
    return with_prediction(plan, sim), sim


def with_prediction(plan: Plan, sim: SimResult) -> Plan:
    """The plan with its ``predicted`` block (and per-stage peak memory) filled in."""
    peak_by_device = dict(zip(sim.device_ids, sim.peak_memory_bytes, strict=True))
    stages = [
        st.model_copy(
            update={
                "predicted": st.predicted.model_copy(
                    update={"memory_bytes": max(peak_by_device[d.device_id] for d in st.devices)}
                )
            }
        )
        for st in plan.stages
    ]
    prediction = Prediction(
        step_seconds=sim.step_seconds,
        samples_per_second=sim.samples_per_second,
        bubble_fraction=sim.bubble_fraction,
        utilization=sim.utilization,
        bottleneck=sim.bottleneck,
        devices=[
            DeviceUtilization(
                device_id=dev,
                busy_fraction=busy / sim.step_seconds if sim.step_seconds else 0.0,
                peak_memory_bytes=peak,
                memory_bytes=cap,
            )
            for dev, busy, peak, cap in zip(
                sim.device_ids,
                sim.busy_seconds,
                sim.peak_memory_bytes,
                sim.memory_capacity,
                strict=True,
            )
        ],
    )
    return plan.model_copy(update={"stages": stages, "predicted": prediction})
