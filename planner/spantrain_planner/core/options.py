"""Planner knobs (the ``spec.planner`` block of a SpanTrainJob and the CLI flags).

Role: one typed place for every choice a user can make about planning. Pure pydantic.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

#: The pipeline schedules (``schedules``), and what a user may ask for: one of them or auto.
Schedule = Literal["gpipe", "1f1b", "zb"]
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)
ScheduleChoice = Literal["auto", Schedule]
SCHEDULE_CHOICES: tuple[str, ...] = ("auto", *SCHEDULES)

#: What the dynamic adapter may do while a job runs (``spec.planner.adapt``): nothing;
#: re-balance shares inside stages in place; or that and re-plan through a restart.
AdaptMode = Literal["off", "rebalance", "replan"]
ADAPT_MODES: tuple[AdaptMode, ...] = get_args(AdaptMode)
DEFAULT_ADAPT: AdaptMode = "replan"


class PlannerOptions(BaseModel):
    """How to plan: batch, schedule, micro-batches and grouping thresholds."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    global_batch: int = Field(32, ge=1, description="Samples per optimizer step.")
    schedule: ScheduleChoice = Field(
        "auto", description="Pipeline schedule: auto picks the fastest of gpipe, 1f1b and zb."
    )
    num_microbatches: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        description="Micro-batches per step; unset means chosen by the planner.",
    )
    network_cut_ratio: float = Field(
        4.0,
        gt=1.0,
        le=1000.0,
        description="Level-1 grouping: devices stay in one network group while their link is "
        "within this factor of the group's fastest link.",
    )
    compute_tolerance: float = Field(
        0.3,
        ge=0.0,
        le=100.0,
        description="Level-2 grouping: devices whose speeds differ by less than this fraction "
        "share a compute group.",
    )
    allow_exclusion: bool = Field(
        True, description="Let the planner leave out devices that would slow the job down."
    )
    max_stages: int | None = Field(
        None, ge=1, le=4096, description="Upper bound on pipeline stages."
    )

    def schedules(self) -> list[Schedule]:
        """The schedules to try: the one asked for, or every one for auto."""
        return list(SCHEDULES) if self.schedule == "auto" else [self.schedule]
