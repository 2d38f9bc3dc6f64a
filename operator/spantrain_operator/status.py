"""Status of a SpanTrainJob: conditions, phase, plan summary and readiness from observed pods.

Role: pure helpers that build the ``status`` block (camelCase dicts, as the API stores it):
KEP-1623 conditions keyed by type with ``observedGeneration`` (``lastTransitionTime`` kept
unless the status flips), the plan summary shown by ``kubectl get stj``, per-stage readiness
counted from the job's pods, the hash of the spec fields a plan depends on, and training
progress parsed from a worker's Prometheus exposition text (the HTTP request is ``scrape``'s).

Called by ``reconcile``; pure (``now`` is an argument). Must not import torch,
spantrain_worker, kopf or the Kubernetes client.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from spantrain_planner import api
from spantrain_planner.core.contract import REPLAN_EXIT_CODE
from spantrain_planner.inputs.plan import Plan
from spantrain_planner.passes.adapt import ReplanRequest

from .render import L_ATTEMPT, L_PLAN, L_RANK


def iso(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def typed(st: Mapping[str, Any]) -> dict[str, Any]:
    """A status as the API's ``SpanTrainJobStatus`` model has it: validated (a field the model
    lacks, or a value of the wrong type, raises here instead of reaching the API server) and
    dumped back with exactly the fields that were set. Every status the operator writes goes
    through it (``handlers._apply``)."""
    model = api.SpanTrainJobStatus.model_validate(dict(st))
    out: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if out != dict(st):  # the model reads statuses leniently (extra="ignore"); writing is not
        lost = sorted(_paths(st) - _paths(out))
        raise ValueError(f"status fields the SpanTrainJob API does not have: {lost}")
    return out


def _paths(value: Any, prefix: str = "") -> set[str]:
    """Every key path of nested dicts and lists (``progress.step``, ``stages[0].index``)."""
    if isinstance(value, Mapping):
        return {q for k, v in value.items() for q in _paths(v, f"{prefix}.{k}" if prefix else k)}
    if isinstance(value, list):
        return {q for i, v in enumerate(value) for q in _paths(v, f"{prefix}[{i}]")}
    return {f"{prefix}={value!r}"}


def get_condition(conditions: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    for cond in conditions:
        if cond.get("type") == kind:
            return cond
    return None


def is_true(conditions: Sequence[Mapping[str, Any]], kind: str) -> bool:
    cond = get_condition(conditions, kind)
    return bool(cond and cond.get("status") == "True")


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    kind: str,
    status: bool | str,
    reason: str,
    message: str,
    *,
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """Conditions with ``kind`` set; the transition time moves only when the status flips."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != kind:
            out.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != value
        out.append(
            {
                "type": kind,
                "status": value,
                "observedGeneration": generation,
                "lastTransitionTime": iso(now) if changed else cond.get("lastTransitionTime"),
                "reason": reason,
                "message": message,
            }
        )
    if not found:
        out.append(
            {
                "type": kind,
                "status": value,
                "observedGeneration": generation,
                "lastTransitionTime": iso(now),
                "reason": reason,
                "message": message,
            }
        )
    order = {t: i for i, t in enumerate(api.CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(str(c.get("type")), 99))


def plan_spec_hash(spec: api.SpanTrainJobSpec) -> str:
    """Hash of what a plan depends on: model, batch, precision, planner knobs, placement.

    Anything else (suspend, images, policies, env) changes pods, not the plan.
    """
    payload = {
        "model": spec.model.model_dump(mode="json", by_alias=True, exclude_none=True),
        "globalBatch": spec.training.global_batch,
        "precision": spec.training.precision,
        "planner": spec.planner.model_dump(mode="json", by_alias=True, exclude_none=True),
        "placement": spec.placement.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_summary(
    plan: Plan,
    *,
    config_map: str,
    generation: int,
    spec_hash: str,
    reason: str,
    now: datetime,
) -> dict[str, Any]:
    """The ``status.plan`` block for a plan."""
    pred = plan.predicted
    stages = [
        api.StageSummary(
            index=s.stage_index,
            layer_start=s.layer_start,
            layer_end=s.layer_end,
            replicas=s.dp_degree,
            nodes=sorted({d.node for d in s.devices}),
            devices=[d.device_id for d in s.devices],
            ranks=[d.rank for d in s.devices],
            shares=[d.microbatch_share for d in s.devices],
        )
        for s in plan.stages
    ]
    summary = api.PlanSummary(
        hash=plan.digest(),
        config_map=config_map,
        generation=generation,
        spec_hash=spec_hash,
        reason=reason,
        computed_at=iso(now),
        strategy=plan.strategy,
        schedule=plan.schedule,
        num_stages=plan.pp_degree,
        num_devices=plan.world_size,
        num_microbatches=plan.num_microbatches,
        microbatch_size=plan.microbatch_size,
        num_excluded=len(plan.excluded),
        predicted_step_seconds=round(pred.step_seconds, 6) if pred else None,
        predicted_samples_per_second=round(pred.samples_per_second, 3) if pred else None,
        bottleneck=pred.bottleneck if pred else None,
        nodes=sorted({d.node for s in plan.stages for d in s.devices}),
        stages=stages,
    )
    return summary.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------------
# pods


@dataclass(frozen=True)
class PodView:
    """What matters about one worker pod."""

    name: str
    rank: int
    attempt: int
    plan_hash: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    ready: bool
    node: str | None
    pod_ip: str | None
    deleting: bool
    message: str = ""
    host_network: bool = False
    exit_code: int | None = None  #: the worker container's, once it terminated
    termination_message: str = ""  #: what it wrote to its termination log

    @property
    def asks_replan(self) -> bool:
        """The worker stopped after a checkpoint so that the job is re-planned."""
        return self.exit_code == REPLAN_EXIT_CODE

    @property
    def terminated(self) -> bool:
        """The containers have exited: nothing is left to stop."""
        return self.phase in ("Succeeded", "Failed")


def pod_view(pod: Mapping[str, Any]) -> PodView:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    message = str(status.get("message") or status.get("reason") or "")
    exit_code, last_words = None, ""
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and term.get("exitCode"):
            exit_code = _int_or_none(term.get("exitCode"))
            last_words = str(term.get("message") or "")
            message = (
                f"container {cs.get('name')} exited with code {term.get('exitCode')} "
                f"({term.get('reason', '')})"
            )
    try:
        rank = int(labels.get(L_RANK, -1))
        attempt = int(labels.get(L_ATTEMPT, -1))
    except ValueError:
        rank, attempt = -1, -1
    return PodView(
        name=str(meta.get("name")),
        rank=rank,
        attempt=attempt,
        plan_hash=str(labels.get(L_PLAN, "")),
        phase=str(status.get("phase") or "Pending"),
        ready=ready,
        node=(pod.get("spec") or {}).get("nodeName"),
        pod_ip=status.get("podIP"),
        deleting=bool(meta.get("deletionTimestamp")),
        message=message,
        host_network=bool((pod.get("spec") or {}).get("hostNetwork")),
        exit_code=exit_code,
        termination_message=last_words,
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def replan_request(views: Iterable[PodView]) -> ReplanRequest | None:
    """The re-plan the current attempt's workers asked for: the first readable request among
    the pods that exited with ``REPLAN_EXIT_CODE`` (every rank writes the same one), or an
    empty one (no measured links) when none could be read; None when no worker asked."""
    asked = sorted((v for v in views if v.asks_replan), key=lambda v: v.rank)
    if not asked:
        return None
    for view in asked:
        try:
            return ReplanRequest.model_validate_json(view.termination_message)
        except ValueError:
            continue
    return ReplanRequest(step=0, gain=0.0, measured_links={})


def measured_links(old: Sequence[Mapping[str, Any]], request: ReplanRequest, *,
                   now: datetime) -> list[dict[str, Any]]:
    """``status.measuredLinks`` with the request's links (newest per pair, the last
    ``MAX_MEASURED_LINKS``)."""
    fresh = request.link_speeds()
    kept = [dict(x) for x in old if (x.get("a"), x.get("b")) not in fresh]
    added = [{"a": a, "b": b, "bandwidthMbps": round(mbps, 3), "measuredAt": iso(now)}
             for (a, b), mbps in sorted(fresh.items())]
    return [*kept, *added][-api.MAX_MEASURED_LINKS:]


def link_speeds(entries: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """``status.measuredLinks`` as the planner takes them ((a, b) -> Mbit/s)."""
    out = {}
    for x in entries:
        try:
            out[(str(x["a"]), str(x["b"]))] = float(x["bandwidthMbps"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def replan_entry(old: Sequence[Mapping[str, Any]], request: ReplanRequest, *, attempt: int,
                 now: datetime) -> tuple[list[dict[str, Any]], str]:
    """``status.adaptations`` with the re-plan, and its event message."""
    links = ", ".join(f"{k} {v:.1f} Mbit/s" for k, v in sorted(request.measured_links.items()))
    entry: dict[str, Any] = {
        "time": iso(now), "kind": "replan", "attempt": attempt, "step": request.step,
        "reason": ((request.reason or "the workers asked for a re-plan") + "; links measured: "
                   + (links or "none") + "; layers re-planned, restarted from the "
                   "checkpoint"),
        "predictedGain": round(request.gain, 4),
    }
    message = (f"workers stopped at step {request.step} for a re-plan (measured "
               f"{links or 'no links'}; predicted {100 * request.gain:.0f} % faster steps); "
               "restarting from the checkpoint on the new plan")
    return [*(dict(a) for a in old), entry][-api.MAX_ADAPTATIONS:], message


@dataclass(frozen=True)
class Observation:
    """The job's pods split into the current attempt (by rank) and everything else."""

    current: Mapping[int, PodView]
    stale: Sequence[PodView]
    all: Sequence[PodView] = field(default_factory=tuple)

    @property
    def failed(self) -> list[PodView]:
        return [p for p in self.current.values() if p.phase == "Failed"]

    def num_ready(self) -> int:
        return sum(
            1 for p in self.current.values() if p.phase == "Running" and p.ready and not p.deleting
        )

    def num_succeeded(self) -> int:
        return sum(1 for p in self.current.values() if p.phase == "Succeeded")


def observe(
    pods: Iterable[Mapping[str, Any]], *, attempt: int, plan_hash: str | None
) -> Observation:
    views = sorted((pod_view(p) for p in pods), key=lambda v: v.name)
    current: dict[int, PodView] = {}
    stale: list[PodView] = []
    for v in views:
        if v.attempt == attempt and v.plan_hash == plan_hash and v.rank >= 0:
            current[v.rank] = v
        else:
            stale.append(v)
    return Observation(current=current, stale=stale, all=views)


def stage_statuses(plan: Plan, obs: Observation) -> list[dict[str, Any]]:
    out = []
    for stage in plan.stages:
        ranks = [d.rank for d in stage.devices]
        pods = [obs.current[r] for r in ranks if r in obs.current]
        out.append(
            {
                "index": stage.stage_index,
                "total": len(ranks),
                "ready": sum(1 for p in pods if p.phase == "Running" and p.ready),
                "failed": sum(1 for p in pods if p.phase == "Failed"),
            }
        )
    return out


def progress_block(
    step: int, steps: int, *, loss: float | None, samples_per_second: float | None,
    step_seconds: float | None, now: datetime,
    predicted_samples_per_second: float | None = None,
) -> dict[str, Any]:
    """``status.progress`` from what the workers report (ETA from the step time), the plan's
    predicted throughput beside the measured one."""
    left = max(steps - step, 0)
    block: dict[str, Any] = {
        "step": step,
        "steps": steps,
        "progressPercentage": min(100, int(100 * step / steps)) if steps else 0,
        "lastUpdatedTime": iso(now),
    }
    if loss is not None:
        block["loss"] = loss
    if samples_per_second is not None:
        block["samplesPerSecond"] = samples_per_second
    if predicted_samples_per_second is not None:
        block["predictedSamplesPerSecond"] = round(predicted_samples_per_second, 3)
    if step_seconds is not None:
        block["estimatedRemainingSeconds"] = int(left * step_seconds)
    return block


# ---------------------------------------------------------------------------------------------
# progress from a worker's Prometheus metrics (the text ``spantrain_worker.metrics`` serves)

Sample = tuple[dict[str, str], float]


def parse_exposition(text: str) -> dict[str, list[Sample]]:
    """Samples of a Prometheus text exposition, by sample name (``prometheus_client``'s
    parser). A page that stops being well-formed yields the samples before that point, never
    an exception: a half-written or foreign page is not an error of the job."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[Sample]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    except (ValueError, TypeError, IndexError):
        pass
    return out


@dataclass(frozen=True)
class WorkerReport:
    """Training progress as one worker's metrics endpoint tells it."""

    steps_done: int  # optimizer steps completed
    loss: float | None
    samples_per_second: float | None
    step_seconds: float | None  # mean wall time of a step in the worker process
    adaptations: int = 0  # in-place adaptations of this attempt (the adapter's counter)
    adaptation_gain: float | None = None  # predicted gain of the last one
    adaptation_step: int | None = None  # first step trained under the last one


def _first(samples: Mapping[str, list[Sample]], name: str) -> float | None:
    for _, value in samples.get(name, []):
        if math.isfinite(value):
            return value
    return None


def worker_report(text: str) -> WorkerReport | None:
    """The progress in a worker's exposition; None before its first step (or on a foreign
    page). ``spantrain_worker_step`` holds the index of the last completed step, so the
    steps done are one more; the step histogram's count tells whether any step ran at all."""
    samples = parse_exposition(text)
    count = _first(samples, "spantrain_worker_step_seconds_count")
    last = _first(samples, "spantrain_worker_step")
    if not count or last is None or last < 0:
        return None
    total = _first(samples, "spantrain_worker_step_seconds_sum")
    sps = _first(samples, "spantrain_worker_samples_per_second")
    adapted = sum(v for _, v in samples.get("spantrain_worker_adaptations_total", [])
                  if math.isfinite(v))
    astep = _first(samples, "spantrain_worker_adaptation_step")
    return WorkerReport(
        steps_done=int(last) + 1,
        loss=_first(samples, "spantrain_worker_loss"),
        samples_per_second=sps if sps is not None and sps > 0 else None,
        step_seconds=total / count if total is not None and total > 0 else None,
        adaptations=int(adapted),
        adaptation_gain=_first(samples, "spantrain_worker_adaptation_gain") if adapted else None,
        adaptation_step=int(astep) if adapted and astep is not None else None,
    )


def adaptation_entries(
    old: Sequence[Mapping[str, Any]], report: WorkerReport, *, attempt: int, now: datetime,
    measured_samples_per_second: float | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """``status.adaptations`` with what the report adds, and the event message for it (None
    when nothing new): the workers' counter of this attempt against the entries recorded for
    it; several seen at once become one entry with their count."""
    seen = sum(int(a.get("count", 1)) for a in old if a.get("attempt") == attempt)
    new = report.adaptations - seen
    if new <= 0:
        return [dict(a) for a in old], None
    gain = report.adaptation_gain
    entry: dict[str, Any] = {
        "time": iso(now), "kind": "rebalance", "attempt": attempt,
        "step": report.adaptation_step or 0, "count": new,
        "reason": "measured device speeds departed from the plan's shares; shares inside "
                  "stages re-balanced in place",
    }
    if gain is not None:
        entry["predictedGain"] = round(gain, 4)
    if measured_samples_per_second:
        entry["measuredSamplesPerSecond"] = round(measured_samples_per_second, 3)
        if gain is not None:
            entry["predictedSamplesPerSecond"] = round(
                measured_samples_per_second * (1 + gain), 3)
    message = (f"re-balanced sample shares inside stages at step {entry['step']}"
               + (f": predicted {100 * gain:.0f} % faster steps" if gain is not None else "")
               + (f" ({new} adaptations)" if new > 1 else ""))
    return [*(dict(a) for a in old), entry][-api.MAX_ADAPTATIONS:], message


def metrics_target(
    pods: Iterable[Mapping[str, Any]], st: Mapping[str, Any]
) -> str | None:
    """The pod IP to read progress from: rank 0 of the current attempt, once the job is
    Running (rank 0 holds the globally reduced loss and the global throughput)."""
    plan = st.get("plan") or {}
    if st.get("phase") != "Running" or not plan.get("hash"):
        return None
    obs = observe(pods, attempt=int(st.get("attempt") or 0), plan_hash=plan.get("hash"))
    rank0 = obs.current.get(0)
    if rank0 is None or rank0.phase != "Running" or rank0.deleting or not rank0.pod_ip:
        return None
    return rank0.pod_ip


def progress_from_report(
    report: WorkerReport, spec: api.SpanTrainJobSpec, *, now: datetime,
    plan: Plan | None = None,
) -> dict[str, Any]:
    """``status.progress`` from a worker's report; the ETA uses the current throughput
    (global batch / samples per second) and falls back on the mean step time. With ``plan``,
    its predicted throughput goes beside the measured one."""
    steps = spec.training.steps
    step_seconds = report.step_seconds
    if report.samples_per_second:
        step_seconds = spec.training.global_batch / report.samples_per_second
    return progress_block(
        min(report.steps_done, steps), steps,
        loss=round(report.loss, 6) if report.loss is not None else None,
        samples_per_second=(
            round(report.samples_per_second, 3) if report.samples_per_second else None
        ),
        step_seconds=step_seconds, now=now,
        predicted_samples_per_second=(
            plan.predicted.samples_per_second
            if plan is not None and plan.predicted is not None else None
        ),
    )
