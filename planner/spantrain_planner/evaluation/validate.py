"""Plan validation: the invariants every plan must satisfy before anyone runs it.

Role: ``validate_plan`` checks a plan against its topology and model profile — every layer
exactly once in contiguous ranges, ranks 0..n-1 each once, devices exist and appear once,
shares positive and summing to the micro-batch size in every stage, every micro-batch's
F, B and W (or BW) present exactly once per stage in a legal order, and (given a simulation)
memory within every device. Violations of user-controllable limits raise ``InfeasibleError``;
structural violations raise ``PlanValidationError`` (a planner bug or a hand-edited plan).

Pure: planner modules only.
"""

from __future__ import annotations

from spantrain_planner.core.errors import InfeasibleError, PlanningError, gib
from spantrain_planner.evaluation.simulator import SimResult
from spantrain_planner.inputs.cluster import Topology
from spantrain_planner.inputs.plan import Plan, grad_bucket_problem, parse_action
from spantrain_planner.inputs.profiles import ModelProfile


class PlanValidationError(PlanningError):
    """A plan breaks a structural invariant."""


def _check_actions(stage_index: int, actions: list[str], num_microbatches: int) -> None:
    seen: dict[str, set[int]] = {"F": set(), "B": set(), "W": set()}
    for action in actions:
        kind, m = parse_action(action)
        if not 0 <= m < num_microbatches:
            raise PlanValidationError(
                f"stage {stage_index}: {action} names a micro-batch >= {num_microbatches}"
            )
        parts = ["B", "W"] if kind == "BW" else [kind]
        for part in parts:
            if m in seen[part]:
                raise PlanValidationError(f"stage {stage_index}: {part}{m} appears twice")
            if part == "B" and m not in seen["F"]:
                raise PlanValidationError(f"stage {stage_index}: B{m} before F{m}")
            if part == "W" and m not in seen["B"]:
                raise PlanValidationError(f"stage {stage_index}: W{m} before B{m}")
            seen[part].add(m)
    for part, ms in seen.items():
        if len(ms) != num_microbatches:
            missing = sorted(set(range(num_microbatches)) - ms)
            raise PlanValidationError(
                f"stage {stage_index}: {part} missing for micro-batches {missing[:5]}"
            )


def validate_plan(
    plan: Plan, topology: Topology, profile: ModelProfile, sim: SimResult | None = None
) -> None:
    """Raise if ``plan`` breaks an invariant; return None when it is sound."""
    if plan.model.num_layers != profile.num_layers:
        raise PlanValidationError(
            f"plan covers {plan.model.num_layers} layers, the model has {profile.num_layers}"
        )
    expected_start = 0
    for s, stage in enumerate(plan.stages):
        if stage.stage_index != s:
            raise PlanValidationError(f"stage {s} carries stageIndex {stage.stage_index}")
        if stage.layer_start != expected_start or stage.layer_end <= stage.layer_start:
            raise PlanValidationError(
                f"stage {s}: layers [{stage.layer_start}, {stage.layer_end}) do not continue "
                f"from layer {expected_start}"
            )
        expected_start = stage.layer_end
        total = sum(d.microbatch_share for d in stage.devices)
        if total != plan.microbatch_size:
            raise PlanValidationError(
                f"stage {s}: shares sum to {total}, the micro-batch has {plan.microbatch_size}"
            )
        _check_actions(s, stage.actions, plan.num_microbatches)
        problem = grad_bucket_problem(stage)
        if problem:
            raise PlanValidationError(problem)
    if expected_start != profile.num_layers:
        raise PlanValidationError(
            f"layers {expected_start}..{profile.num_layers - 1} are not assigned to any stage"
        )
    ranks = sorted(d.rank for st in plan.stages for d in st.devices)
    if ranks != list(range(len(ranks))):
        raise PlanValidationError(f"ranks must be 0..{len(ranks) - 1} once each, got {ranks}")
    ids = [d.device_id for st in plan.stages for d in st.devices]
    known = {d.id for d in topology.devices}
    for dev in ids:
        if dev not in known:
            raise PlanValidationError(f"device {dev} is not in cluster {topology.name}")
        if ids.count(dev) > 1:
            raise PlanValidationError(f"device {dev} is used twice")
    excluded = {e.device_id for e in plan.excluded}
    missing = known - set(ids) - excluded
    if plan.excluded and missing:
        raise PlanValidationError(f"devices neither used nor excluded: {sorted(missing)[:5]}")
    if sim is not None:
        for dev, need, cap in sim.memory_violations():
            raise InfeasibleError(
                f"device {dev} needs {gib(need)} but has {gib(cap)} (short by "
                f"{gib(need - cap)}); lower the batch or raise the micro-batch count",
                device_id=dev,
                needed_bytes=need,
                available_bytes=cap,
            )
