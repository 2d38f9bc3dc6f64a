"""Level-based reconciliation of one SpanTrainJob: observed state in, actions out.

Role: the operator's decisions as one pure function. ``decide`` looks at the job (spec,
status, generation), the plan it points at, its pods (any attempt) and the nodes, and returns
what to do: re-plan (and why), objects to create (create-if-absent, deterministic names),
pods to delete, the new status and the events. It never remembers anything between calls, so
a restarted operator, a missed watch event or a repeated call converges to the same place.
``after_plan`` / ``plan_failed`` fold a planning outcome into the status.

State machine (status.phase is for display; conditions are authoritative):
  Pending -> (plan) Planned -> (all workers Running and Ready) Running -> Succeeded
  a current-attempt worker Failed -> attempt+1, restarts+1, Restarting (or Failed past
      maxRestarts); a planned node lost -> re-plan without it, attempt+1, replans+1
  spec.suspend -> pods deleted, plan kept, Suspended; unsuspend -> pods recreated
  activeDeadlineSeconds past startTime -> Failed/DeadlineExceeded
  a plan-relevant spec change -> re-plan, attempt+1

Deleting pods: every deletion carries its grace period (``Deletions``: pod name -> seconds,
``GRACEFUL`` for the operator's configured period). Pods whose attempt is over -- a peer
failed, a planned node was lost, the job failed -- are blocked in a collective that will never
complete, and a terminated pod has nothing left to stop, so they go at once (grace 0): their
devices are free for the next attempt right away instead of after a grace period spent
waiting for a process that will not exit on its own. Healthy workers (suspend, a spec change,
an expired deadline) get the graceful period. A dead attempt's pod on the host network keeps
the graceful period too: its process still holds the rendezvous port that the next attempt's
pod on the same node binds. A pod on a lost node goes at once whatever the reason: no kubelet
is left to confirm a graceful stop.

Progress: when the handler read rank 0's metrics this pass (``JobState.report``) and every
worker is ready, ``status.progress`` is rewritten from it; otherwise the last one stays.

Called by ``handlers``; pure. Must not import torch, spantrain_worker, kopf or the Kubernetes
client.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias

from spantrain_planner import api
from spantrain_planner.api import JobCondition as Cond
from spantrain_planner.api import JobPhase as Phase
from spantrain_planner.api import Reason
from spantrain_planner.inputs.plan import Plan

from . import inventory, render, status
from .status import WorkerReport

TERMINAL = api.TERMINAL_PHASES

#: Grace period of a deletion: ``GRACEFUL`` (None) is the operator's configured period,
#: ``AT_ONCE`` (0) removes the pod without waiting for its processes.
GRACEFUL: int | None = None
AT_ONCE = 0
Deletions: TypeAlias = dict[str, int | None]


@dataclass(frozen=True)
class JobState:
    """Everything ``decide`` looks at."""

    job: render.JobRef
    generation: int
    spec: api.SpanTrainJobSpec
    status: Mapping[str, Any]
    plan: Plan | None  # the plan status.plan names (None: none, or its ConfigMap is gone)
    pods: Sequence[Mapping[str, Any]]
    nodes: Mapping[str, Mapping[str, Any]]  # every node, by name
    now: datetime
    default_image: str = render.DEFAULT_IMAGE
    report: WorkerReport | None = None  # rank 0's metrics, when read this pass
    #: NetworkPolicy peers allowed to scrape workers; None: no NetworkPolicy per job
    network_policy_scrapers: list[dict[str, Any]] | None = None


@dataclass
class Decision:
    """What to do now. Apply in order: create config, patch status, delete, create pods."""

    status: dict[str, Any]
    replan: str | None = None  # Initial, SpecChanged, NodeLost or Replanned
    exclude_nodes: list[str] = field(default_factory=list)
    #: link speeds the job's workers measured ((a, b) -> Mbit/s): any plan uses them
    link_speeds: dict[tuple[str, str], float] = field(default_factory=dict)
    create: list[dict[str, Any]] = field(default_factory=list)
    delete_pods: Deletions = field(default_factory=dict)  # pod name -> grace seconds
    delete_config_maps: list[str] = field(default_factory=list)
    delete_job: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    finished: str | None = None  # "Succeeded"/"Failed" when this call ended the job
    restarted: bool = False


_parse = inventory.parse_time


def _cond(st: dict[str, Any], s: JobState, kind: str, value: bool, reason: str, msg: str) -> None:
    st["conditions"] = status.set_condition(
        st.get("conditions") or [], kind, value, reason, msg, generation=s.generation, now=s.now
    )


def _set_phase(st: dict[str, Any], phase: str, reason: str, message: str) -> None:
    st["phase"], st["reason"], st["message"] = phase, reason, message


def deletions(
    views: Iterable[status.PodView], *, dead: bool, lost_nodes: Collection[str] = ()
) -> Deletions:
    """The pods of ``views`` not already being deleted, each with its grace period.

    ``dead``: their attempt is over (see the module docstring). A pod on a lost node goes at
    once whatever the reason: no kubelet is left to confirm a graceful stop.
    """
    out: Deletions = {}
    for v in views:
        if v.deleting:
            continue
        on_lost_node = v.node is not None and v.node in lost_nodes
        at_once = v.terminated or (dead and not v.host_network) or on_lost_node
        out[v.name] = AT_ONCE if at_once else GRACEFUL
    return out


def _cleanup(s: JobState, *, dead: bool) -> Deletions:
    """Pods to delete once the job is finished, by cleanPodPolicy."""
    policy = s.spec.run_policy.clean_pod_policy
    views = [status.pod_view(p) for p in s.pods]
    if policy == "All":
        return deletions(views, dead=dead)
    if policy == "Running":
        return deletions([v for v in views if v.phase in ("Pending", "Running")], dead=dead)
    return {}


def _finish(s: JobState, st: dict[str, Any], d: Decision, ok: bool, reason: str, msg: str) -> None:
    phase = Phase.SUCCEEDED if ok else Phase.FAILED
    _set_phase(st, phase, reason, msg)
    _cond(st, s, Cond(phase), True, reason, msg)
    _cond(st, s, Cond.RUNNING, False, reason, msg)
    st["completionTime"] = status.iso(s.now)
    d.events.append(("Normal" if ok else "Warning", reason, msg))
    d.finished = phase


@dataclass
class _Pass:
    """One ``decide`` call's working state, handed from step to step."""

    s: JobState
    st: dict[str, Any]
    d: Decision
    phase: str
    plan: Plan
    attempt: int
    obs: status.Observation
    planned_nodes: list[str]
    lost: dict[str, str] = field(default_factory=dict)


def decide(s: JobState) -> Decision:
    """The next step for a job (see the module docstring): each step below either ends the
    pass with its decision or hands over to the next."""
    st: dict[str, Any] = copy.deepcopy(dict(s.status))
    st.setdefault("attempt", 0)
    st.setdefault("restarts", 0)
    st.setdefault("replans", 0)
    st.setdefault("conditions", [])
    st["observedGeneration"] = s.generation
    d = Decision(status=st, link_speeds=status.link_speeds(st.get("measuredLinks") or []))
    phase = st.get("phase") or Phase.PENDING
    st["phase"] = phase

    if phase in TERMINAL:
        _terminal(s, st, d, phase)
        return d
    plan_status = st.get("plan")
    if plan_status is None or s.plan is None:
        d.replan = Reason.INITIAL if plan_status is None else Reason.PLAN_LOST
        return d
    if plan_status.get("specHash") != status.plan_spec_hash(s.spec):
        d.replan = Reason.SPEC_CHANGED
        return d
    plan, attempt = s.plan, int(st["attempt"])
    obs = status.observe(s.pods, attempt=attempt, plan_hash=plan.digest())
    d.delete_pods = deletions(obs.stale, dead=True)  # earlier attempts and plans
    planned_nodes = sorted({dv.node for stg in plan.stages for dv in stg.devices})
    p = _Pass(s, st, d, phase, plan, attempt, obs, planned_nodes)
    for step in (_deadline, _suspend, _lost_nodes, _replan_requested, _failures, _succeeded):
        if step(p):
            return d
    _create_missing(p)
    _observe(p)
    return d


def _terminal(s: JobState, st: dict[str, Any], d: Decision, phase: str) -> None:
    """A finished job: its pods go, and the job itself after ``ttlSecondsAfterFinished``."""
    dead = phase == Phase.FAILED and st.get("reason") != Reason.DEADLINE_EXCEEDED
    d.delete_pods = _cleanup(s, dead=dead)
    ttl = s.spec.run_policy.ttl_seconds_after_finished
    done = _parse(st.get("completionTime"))
    if ttl is not None and done is not None and (s.now - done).total_seconds() >= ttl:
        d.delete_job = True


def _deadline(p: _Pass) -> bool:
    """The deadline, counted from startTime (which suspension resets)."""
    s, st, d = p.s, p.st, p.d
    deadline = s.spec.run_policy.active_deadline_seconds
    started = _parse(st.get("startTime"))
    if deadline is None or started is None or (s.now - started).total_seconds() < deadline:
        return False
    _finish(s, st, d, False, Reason.DEADLINE_EXCEEDED,
            f"the job ran longer than runPolicy.activeDeadlineSeconds ({deadline} s)")
    d.delete_pods = {**_cleanup(s, dead=False), **d.delete_pods}
    return True


def _suspend(p: _Pass) -> bool:
    """Suspended: every pod goes, the plan is kept. Resumed: the workers come back."""
    s, st, d, plan = p.s, p.st, p.d, p.plan
    if s.spec.suspend:
        d.delete_pods = {**deletions(p.obs.current.values(), dead=False), **d.delete_pods}
        if p.phase != Phase.SUSPENDED:
            d.events.append(("Normal", Reason.SUSPENDED, "spec.suspend is true: workers deleted"))
        _set_phase(st, Phase.SUSPENDED, Reason.SUSPENDED, "spec.suspend is true; the plan is kept")
        _cond(st, s, Cond.SUSPENDED, True, Reason.SUSPENDED, "spec.suspend is true")
        _cond(st, s, Cond.RUNNING, False, Reason.SUSPENDED, "spec.suspend is true")
        st.pop("startTime", None)
        st["ready"] = f"0/{plan.world_size}"
        st["stages"] = status.stage_statuses(plan, status.observe([], attempt=0, plan_hash=None))
        return True
    if status.is_true(st["conditions"], Cond.SUSPENDED):
        _cond(st, s, Cond.SUSPENDED, False, Reason.RESUMED, "spec.suspend is false")
        d.events.append(("Normal", Reason.RESUMED, "spec.suspend is false: recreating workers"))
        p.phase = Phase.PLANNED
        _set_phase(st, p.phase, Reason.RESUMED, "recreating workers")
    return False


def _lost_nodes(p: _Pass) -> bool:
    """Planned nodes gone for longer than the grace period: re-plan without them (or let the
    failure path restart the job when re-planning is off)."""
    s, st, d = p.s, p.st, p.d
    grace = s.spec.failure_policy.node_lost_grace_period_seconds
    p.lost = inventory.lost_nodes(p.planned_nodes, s.nodes, grace_seconds=grace, now=s.now)
    if not p.lost:
        return False
    detail = ", ".join(f"{n} ({why})" for n, why in sorted(p.lost.items()))
    d.events.append(("Warning", Reason.NODE_LOST, f"planned node(s) lost: {detail}"))
    _cond(st, s, Cond.DEGRADED, True, Reason.NODE_LOST, f"lost: {detail}")
    if s.spec.failure_policy.replan_on_node_loss:
        d.replan = Reason.NODE_LOST
        d.exclude_nodes = sorted(p.lost)
        return True
    return False


def _replan_requested(p: _Pass) -> bool:
    """Workers that stopped for a re-plan (exit ``REPLAN_EXIT_CODE``, after a checkpoint of
    every rank): re-plan with the links they measured and restart from that checkpoint. Not
    a failure (``restarts`` stays); a worker that failed otherwise takes the failure path."""
    current = list(p.obs.current.values())
    if any(v.phase == "Failed" and not v.asks_replan for v in current):
        return False
    request = status.replan_request(current)
    if request is None:
        return False
    p.d.replan = Reason.REPLANNED
    p.d.link_speeds = {**p.d.link_speeds, **request.link_speeds()}
    return True


def _failures(p: _Pass) -> bool:
    """A failed worker of the current attempt restarts the whole pipeline from its
    checkpoint, up to ``maxRestarts``."""
    s, st, d, obs, lost = p.s, p.st, p.d, p.obs, p.lost
    failed = obs.failed
    if not (failed or (lost and not s.spec.failure_policy.replan_on_node_loss)):
        return False
    what = (
        "; ".join(f"{f.name} (rank {f.rank}): {f.message or 'Failed'}" for f in failed)
        or f"lost node(s) {', '.join(sorted(lost))}"
    )
    for f in failed:
        d.events.append(
            ("Warning", Reason.STAGE_POD_FAILED, f"{f.name} (rank {f.rank}): {f.message}")
        )
    limit = s.spec.failure_policy.max_restarts
    if int(st["restarts"]) >= limit:
        _finish(s, st, d, False, Reason.MAX_RESTARTS_EXCEEDED,
                f"{what}; failurePolicy.maxRestarts ({limit}) reached")
        d.delete_pods = {**d.delete_pods, **_cleanup(s, dead=True)}
        return True
    st["restarts"] = int(st["restarts"]) + 1
    st["attempt"] = p.attempt + 1
    msg = f"restart {st['restarts']}/{limit} from the last checkpoint after: {what}"
    _set_phase(st, Phase.RESTARTING, Reason.RESTARTING, msg)
    _cond(st, s, Cond.RUNNING, False, Reason.RESTARTING, msg)
    d.events.append(("Warning", Reason.RESTARTING, msg))
    d.delete_pods = deletions(obs.all, dead=True, lost_nodes=lost)
    d.restarted = True
    return True


def _succeeded(p: _Pass) -> bool:
    """Every worker finished."""
    if not (p.obs.current and p.obs.num_succeeded() == p.plan.world_size):
        return False
    _finish(p.s, p.st, p.d, True, Reason.SUCCEEDED,
            f"all {p.plan.world_size} workers succeeded")
    p.d.delete_pods = {**p.d.delete_pods, **_cleanup(p.s, dead=True)}
    return True


def _create_missing(p: _Pass) -> None:
    """The pods (and their ConfigMap, Service, NetworkPolicy, PodGroup) that do not exist."""
    s, st, d, plan, obs = p.s, p.st, p.d, p.plan, p.obs
    facts = {n: inventory.read_node(s.nodes[n]) for n in p.planned_nodes if n in s.nodes}
    rank0 = obs.current.get(0)
    desired = render.worker_pods(
        s.job, s.spec, plan, facts, attempt=p.attempt,
        rank0_pod_ip=rank0.pod_ip if rank0 else None, default_image=s.default_image,
    )
    missing = [q for q in desired if int(q["metadata"]["labels"][render.L_RANK]) not in obs.current]
    if not missing:
        return
    d.create.append(render.config_map(s.job, s.spec, plan))
    d.create.append(render.service(s.job, s.spec))
    if s.network_policy_scrapers is not None:
        d.create.append(render.network_policy(s.job, s.spec, s.network_policy_scrapers))
    group = render.pod_group(s.job, s.spec, plan, p.attempt)
    if group is not None:
        d.create.append(group)
    d.create.extend(missing)
    if "startTime" not in st:
        st["startTime"] = status.iso(s.now)


def _observe(p: _Pass) -> None:
    """Status from what runs: readiness, stages, node health, progress, phase."""
    s, st, d, plan, obs = p.s, p.st, p.d, p.plan, p.obs
    not_ready = inventory.not_ready_nodes(p.planned_nodes, s.nodes)
    grace = s.spec.failure_policy.node_lost_grace_period_seconds
    ready = obs.num_ready()
    st["ready"] = f"{ready}/{plan.world_size}"
    st["stages"] = status.stage_statuses(plan, obs)
    if not_ready:
        _cond(st, s, Cond.DEGRADED, True, Reason.NODE_NOT_READY,
              f"node(s) not Ready (lost after {grace} s): {', '.join(not_ready)}")
    elif status.get_condition(st["conditions"], Cond.DEGRADED) is not None:
        _cond(st, s, Cond.DEGRADED, False, Reason.NODES_READY, "every planned node is Ready")
    if s.report is not None and ready == plan.world_size:
        before = (st.get("progress") or {}).get("samplesPerSecond")
        st["progress"] = status.progress_from_report(s.report, s.spec, now=s.now, plan=plan)
        entries, adapted = status.adaptation_entries(
            st.get("adaptations") or [], s.report, attempt=p.attempt, now=s.now,
            measured_samples_per_second=before)
        if adapted:
            st["adaptations"] = entries
            d.events.append(("Normal", Reason.REBALANCED, adapted))
    ratio = f"{ready}/{plan.world_size} workers ready"
    if ready == plan.world_size:
        running = f"all {ready} workers are running"
        if p.phase != Phase.RUNNING:
            d.events.append(("Normal", Reason.RUNNING, running))
        _set_phase(st, Phase.RUNNING, Reason.ALL_WORKERS_RUNNING, running)
        _cond(st, s, Cond.RUNNING, True, Reason.ALL_WORKERS_RUNNING, running)
    elif p.phase == Phase.RUNNING:
        _set_phase(st, Phase.PLANNED, Reason.WORKERS_NOT_READY, ratio)
        _cond(st, s, Cond.RUNNING, False, Reason.WORKERS_NOT_READY, ratio)
    elif p.phase == Phase.PENDING:
        _set_phase(st, Phase.PLANNED, Reason.CREATING_WORKERS, ratio)


def after_plan(s: JobState, plan: Plan, reason: str, *, config_map: str) -> Decision:
    """Status (and events) once a plan was computed for ``reason``; pods come next call."""
    st: dict[str, Any] = copy.deepcopy(dict(s.status))
    st.setdefault("restarts", 0)
    st.setdefault("replans", 0)
    st.setdefault("conditions", [])
    st["observedGeneration"] = s.generation
    d = Decision(status=st)
    old = st.get("plan") or {}
    had_pods = bool(s.pods)
    if old or had_pods:
        st["attempt"] = int(st.get("attempt", 0)) + 1
    else:
        st.setdefault("attempt", 0)
    if reason in (Reason.NODE_LOST, Reason.REPLANNED):
        st["replans"] = int(st["replans"]) + 1
    events: list[tuple[str, str, str]] = []
    if reason == Reason.REPLANNED:
        attempt = int((s.status or {}).get("attempt", 0))
        request = status.replan_request(
            v for v in map(status.pod_view, s.pods) if v.attempt == attempt)
        if request is not None:
            st["measuredLinks"] = status.measured_links(st.get("measuredLinks") or [], request,
                                                        now=s.now)
            st["adaptations"], message = status.replan_entry(
                st.get("adaptations") or [], request, attempt=attempt, now=s.now)
            events.append(("Normal", Reason.REPLANNED, message))
    summary = status.plan_summary(
        plan, config_map=config_map, generation=s.generation,
        spec_hash=status.plan_spec_hash(s.spec), reason=reason, now=s.now,
    )
    st["plan"] = summary
    pred = plan.predicted
    detail = (
        f"{plan.pp_degree} stage(s) on {plan.world_size} device(s), schedule {plan.schedule}, "
        f"{plan.num_microbatches} micro-batch(es) of {plan.microbatch_size}"
    )
    if pred is not None:
        detail += (
            f"; predicted {pred.samples_per_second:.1f} samples/s "
            f"({pred.step_seconds:.3f} s/step), bottleneck {pred.bottleneck}"
        )
    _cond(st, s, Cond.PLANNED, True, Reason.PLAN_COMPUTED, f"{reason}: {detail}")
    computed = f"{reason}: {detail} (plan {summary['hash']})"
    d.events.extend(events)
    d.events.append(("Normal", Reason.PLAN_COMPUTED, computed))
    if reason == Reason.NODE_LOST:
        replanned = f"re-planned on the remaining nodes: {detail}"
        d.events.append(("Warning", Reason.REPLANNING, replanned))
    if old.get("configMap") and old.get("configMap") != config_map:
        d.delete_config_maps.append(str(old["configMap"]))
    views = [status.pod_view(p) for p in s.pods]
    gone = inventory.lost_nodes(
        sorted({v.node for v in views if v.node}), s.nodes,
        grace_seconds=s.spec.failure_policy.node_lost_grace_period_seconds, now=s.now,
    )
    # a lost node ends the attempt; a spec change (or a lost plan) stops healthy workers
    d.delete_pods = deletions(views, dead=reason == Reason.NODE_LOST, lost_nodes=gone)
    if st.get("phase") in (None, Phase.PENDING, Phase.RUNNING, Phase.PLANNED, Phase.RESTARTING):
        next_phase = Phase.PLANNED if not (old or had_pods) else Phase.RESTARTING
        _set_phase(st, next_phase, Reason.PLAN_COMPUTED, detail)
    st["ready"] = f"0/{plan.world_size}"
    st["stages"] = status.stage_statuses(plan, status.observe([], attempt=0, plan_hash=None))
    return d


NO_ELIGIBLE_NODES = Reason.NO_ELIGIBLE_NODES


def waiting_for_nodes(s: JobState, message: str) -> Decision:
    """No node the placement selects is Ready and schedulable right now: the job waits.

    As a pod waits for a node rather than failing, the job stays ``Pending`` (reason
    ``NoEligibleNodes``, condition ``Planned`` False) and is planned again on every pass, so it
    starts once nodes join or come back (fake or real nodes miss heartbeats under load; edge
    nodes come and go). The Warning event is emitted when the job starts waiting, not on every
    retry. Pods of an earlier plan go: they cannot run without their nodes.
    """
    st: dict[str, Any] = copy.deepcopy(dict(s.status))
    st.setdefault("conditions", [])
    st["observedGeneration"] = s.generation
    d = Decision(status=st)
    if st.get("reason") != NO_ELIGIBLE_NODES:
        d.events.append(("Warning", NO_ELIGIBLE_NODES, message))
    _set_phase(st, Phase.PENDING, NO_ELIGIBLE_NODES, message)
    _cond(st, s, Cond.PLANNED, False, NO_ELIGIBLE_NODES, message)
    if status.get_condition(st["conditions"], Cond.RUNNING) is not None:
        _cond(st, s, Cond.RUNNING, False, NO_ELIGIBLE_NODES, message)
    d.delete_pods = deletions((status.pod_view(p) for p in s.pods), dead=True)
    return d


def plan_failed(s: JobState, reason: str, message: str) -> Decision:
    """The job fails because no plan exists (PlanInfeasible, InvalidSpec)."""
    st: dict[str, Any] = copy.deepcopy(dict(s.status))
    st.setdefault("conditions", [])
    st["observedGeneration"] = s.generation
    d = Decision(status=st)
    _cond(st, s, Cond.PLANNED, False, reason, message)
    _finish(s, st, d, False, reason, message)
    d.delete_pods = deletions((status.pod_view(p) for p in s.pods), dead=True)
    return d
