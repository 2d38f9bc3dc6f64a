"""The plan: which layers run where, on how many devices, with which shares and schedule.

Role: the boundary model every side shares — the planner writes it, the operator stores it in
a ConfigMap and summarises it in the job status, every worker reads it to know its stage,
its rows of each micro-batch, its peers and its action order. Also the pure rank arithmetic
(rank -> stage, replica, rows; which rows move between which ranks at a stage boundary), so
the simulator and the worker agree by construction.

Conventions:
  * ranks are numbered stage by stage, devices in plan order inside a stage;
  * every micro-batch has ``microbatch_size`` samples; inside stage s, device k holds the rows
    ``[offset_k, offset_k + share_k)`` where offsets are the running sum of shares in plan
    order; the global batch is ``num_microbatches * microbatch_size``;
  * actions are strings ``F<m>`` (forward), ``B<m>`` (input gradient), ``W<m>`` (weight
    gradient) and ``BW<m>`` (full backward), executed in order by every device of a stage.

Pure: pydantic and the standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from spantrain_planner.core.options import SCHEDULES, Schedule

__all__ = ["SCHEDULES", "Schedule"]  # re-exported: plans name their schedule

API_VERSION = "spantrain.io/v1alpha1"
_ACTION = re.compile(r"^(F|B|W|BW)(\d+)$")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class DeviceAssignment(_Model):
    """One device of a stage: its rank and its share of every micro-batch."""

    rank: int = Field(ge=0, description="Global rank of the worker on this device.")
    device_id: str = Field(description="Device id (node/kindN).")
    node: str = Field(description="Node that hosts the device.")
    arch: str = Field("amd64", description="CPU architecture of the node.")
    accelerator: str = Field("cpu", description="Accelerator product or 'cpu'.")
    microbatch_share: int = Field(ge=1, description="Samples of each micro-batch on this device.")


class StagePrediction(_Model):
    """Predicted per-micro-batch times on the stage's slowest device (seconds)."""

    forward_seconds: float = 0.0
    backward_input_seconds: float = 0.0
    backward_weight_seconds: float = 0.0
    send_seconds: float = Field(0.0, description="Boundary transfer to the next stage.")
    allreduce_seconds: float = 0.0
    memory_bytes: int = Field(0, description="Peak memory on the stage's fullest device.")


class StagePlan(_Model):
    """A pipeline stage: consecutive layers, data-parallel over one or more devices."""

    stage_index: int = Field(ge=0)
    layer_start: int = Field(ge=0, description="First layer (inclusive).")
    layer_end: int = Field(ge=1, description="Last layer (exclusive).")
    network_group: int = Field(0, ge=0, description="Level-1 group the devices belong to.")
    devices: list[DeviceAssignment] = Field(min_length=1)
    actions: list[str] = Field(description="Ordered actions every device of the stage runs.")
    grad_buckets: list[list[int]] = Field(
        default_factory=list,
        description="Gradient all-reduces that overlap the stage's last weight pass: the "
        "layers of each, in launch order (last layers first; together every layer of the "
        "stage once). Empty: one all-reduce of every gradient after the stage's actions "
        "(CPU devices, where the ring's work would come out of the compute's cores).",
    )
    predicted: StagePrediction = Field(default_factory=StagePrediction)

    @property
    def dp_degree(self) -> int:
        return len(self.devices)

    @property
    def layers(self) -> range:
        return range(self.layer_start, self.layer_end)


#: Like DDP's ``bucket_cap_mb``: consecutive layers share one gradient all-reduce until it
#: holds this many bytes, so small layers do not each pay the ring's latencies.
GRAD_BUCKET_BYTES = 25 * 2**20


def gradient_buckets(
    layer_start: int, layer_bytes: Sequence[int], cap: int = GRAD_BUCKET_BYTES
) -> list[list[int]]:
    """Split layers ``layer_start, layer_start + 1, ...`` (parameter bytes ``layer_bytes``)
    into buckets in backward order: last layer first, a bucket closed once it holds ``cap``
    bytes; a tail without parameters joins the previous bucket."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in reversed(range(len(layer_bytes))):
        current.append(layer_start + i)
        size += layer_bytes[i]
        if size >= cap:
            buckets.append(current)
            current, size = [], 0
    if current:
        if size == 0 and buckets:
            buckets[-1].extend(current)
        else:
            buckets.append(current)
    return buckets


def grad_bucket_problem(stage: StagePlan) -> str | None:
    """What is wrong with a stage's ``grad_buckets`` (None: empty, or every layer of the
    stage once, last layer first)."""
    if not stage.grad_buckets:
        return None
    order = [i for bucket in stage.grad_buckets for i in bucket]
    want = list(reversed(stage.layers))
    if order != want or not all(stage.grad_buckets):
        return (f"stage {stage.stage_index}: gradient buckets {stage.grad_buckets} must hold "
                f"layers {want[0]}..{want[-1]} once each, last layer first, none empty")
    return None


class ExcludedDevice(_Model):
    device_id: str
    node: str
    reason: str


class DeviceUtilization(_Model):
    device_id: str
    busy_fraction: float = Field(description="Compute time / step time.")
    peak_memory_bytes: int
    memory_bytes: int = Field(description="Usable memory of the device.")


class Prediction(_Model):
    """What the simulator predicts for one training step of this plan."""

    step_seconds: float
    samples_per_second: float
    bubble_fraction: float = Field(description="Idle share of stage-busy time, averaged.")
    utilization: float = Field(description="Mean busy fraction over used devices.")
    bottleneck: str = Field(description="Slowest stage or link, in words.")
    devices: list[DeviceUtilization] = Field(default_factory=list)


class ModelRef(_Model):
    """How a worker builds the model: a built-in family with its config, or an entry point."""

    name: str
    family: Literal["gpt", "resnet", "mlp", "custom"]
    config: dict[str, Any] = Field(default_factory=dict)
    entrypoint: str | None = None
    num_layers: int = Field(ge=1)


class Plan(_Model):
    """A complete hybrid pipeline-parallel plan (the ``plan.json`` workers read)."""

    api_version: str = API_VERSION
    kind: Literal["Plan"] = "Plan"
    strategy: str = Field("spantrain", description="Which planner or baseline produced it.")
    cluster: str
    model: ModelRef
    global_batch: int = Field(ge=1)
    num_microbatches: int = Field(ge=1)
    microbatch_size: int = Field(ge=1)
    schedule: Schedule
    stages: list[StagePlan] = Field(min_length=1)
    excluded: list[ExcludedDevice] = Field(default_factory=list)
    predicted: Prediction | None = None

    @model_validator(mode="after")
    def _batch_adds_up(self) -> Plan:
        if self.num_microbatches * self.microbatch_size != self.global_batch:
            raise ValueError(
                f"numMicrobatches ({self.num_microbatches}) x microbatchSize "
                f"({self.microbatch_size}) must equal globalBatch ({self.global_batch})"
            )
        return self

    @property
    def pp_degree(self) -> int:
        return len(self.stages)

    @property
    def world_size(self) -> int:
        return sum(stage.dp_degree for stage in self.stages)

    def digest(self) -> str:
        """A short content hash (sha256 of canonical JSON), stable across processes."""
        payload = self.model_dump(mode="json", by_alias=True, exclude={"predicted"})
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


def parse_action(action: str) -> tuple[str, int]:
    """``"BW12"`` -> ``("BW", 12)``."""
    match = _ACTION.match(action)
    if not match:
        raise ValueError(f"malformed action {action!r}; expected F<m>, B<m>, W<m> or BW<m>")
    return match.group(1), int(match.group(2))


# --------------------------------------------------------------------------------------------
# Rank arithmetic (pure; the worker and the simulator both use it)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    stage_index: int
    replica: int  # position inside the stage
    row_start: int  # first row of each micro-batch this rank holds
    row_end: int  # exclusive
    stage_ranks: tuple[int, ...]


@dataclass(frozen=True)
class Transfer:
    """Rows ``[row_start, row_end)`` of a micro-batch go from ``src`` to ``dst``."""

    src: int
    dst: int
    row_start: int
    row_end: int

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start


def row_ranges(stage: StagePlan) -> list[tuple[int, int]]:
    """Row range of every device of a stage, in plan order."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    for device in stage.devices:
        ranges.append((offset, offset + device.microbatch_share))
        offset += device.microbatch_share
    return ranges


def rank_info(plan: Plan, rank: int) -> RankInfo:
    """Where a rank sits in the plan."""
    for stage in plan.stages:
        ranks = tuple(d.rank for d in stage.devices)
        if rank in ranks:
            k = ranks.index(rank)
            start, end = row_ranges(stage)[k]
            return RankInfo(rank, stage.stage_index, k, start, end, ranks)
    raise ValueError(f"rank {rank} is not in the plan (world size {plan.world_size})")


def boundary_transfers(plan: Plan, stage_index: int) -> list[Transfer]:
    """Row transfers from stage ``stage_index`` to ``stage_index + 1`` (activations).

    Gradients flow the same pairs in reverse. Stages of different widths re-shard by sample:
    each source sends exactly the rows of each destination that it holds.
    """
    src_stage = plan.stages[stage_index]
    dst_stage = plan.stages[stage_index + 1]
    transfers: list[Transfer] = []
    for src, (s0, s1) in zip(src_stage.devices, row_ranges(src_stage), strict=True):
        for dst, (d0, d1) in zip(dst_stage.devices, row_ranges(dst_stage), strict=True):
            lo, hi = max(s0, d0), min(s1, d1)
            if lo < hi:
                transfers.append(Transfer(src.rank, dst.rank, lo, hi))
    return transfers
