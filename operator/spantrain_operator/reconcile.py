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
from spantrain_planner.plan import Plan

from . import inventory, render, status
from .status import WorkerReport

TERMINAL = ("Succeeded", "Failed")

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
    replan: str | None = None  # Initial, SpecChanged or NodeLost
    exclude_nodes: list[str] = field(default_factory=list)
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
    phase = "Succeeded" if ok else "Failed"
    _set_phase(st, phase, reason, msg)
    _cond(st, s, phase, True, reason, msg)
    _cond(st, s, "Running", False, reason, msg)
    st["completionTime"] = status.iso(s.now)
    d.events.append(("Normal" if ok else "Warning", reason, msg))
    d.finished = phase


def decide(s: JobState) -> Decision:
    """The next step for a job (see the module docstring)."""
    st: dict[str, Any] = copy.deepcopy(dict(s.status))
    st.setdefault("attempt", 0)
    st.setdefault("restarts", 0)
    st.setdefault("replans", 0)
    st.setdefault("conditions", [])
    st["observedGeneration"] = s.generation
    d = Decision(status=st)
    phase = st.get("phase") or "Pending"
    st["phase"] = phase

    if phase in TERMINAL:
        dead = phase == "Failed" and st.get("reason") != "DeadlineExceeded"
        d.delete_pods = _cleanup(s, dead=dead)
        ttl = s.spec.run_policy.ttl_seconds_after_finished
        done = _parse(st.get("completionTime"))
        if ttl is not None and done is not None and (s.now - done).total_seconds() >= ttl:
            d.delete_job = True
        return d

    plan_status = st.get("plan")
    spec_hash = status.plan_spec_hash(s.spec)
    if plan_status is None or s.plan is None:
        d.replan = "Initial" if plan_status is None else "PlanLost"
        return d
    if plan_status.get("specHash") != spec_hash:
        d.replan = "SpecChanged"
        return d
    plan = s.plan
    attempt = int(st["attempt"])
    digest = plan.digest()
    obs = status.observe(s.pods, attempt=attempt, plan_hash=digest)
    d.delete_pods = deletions(obs.stale, dead=True)  # earlier attempts and plans

    # deadline (counted from startTime, which suspension resets)
    deadline = s.spec.run_policy.active_deadline_seconds
    started = _parse(st.get("startTime"))
    if (
        deadline is not None
        and started is not None
        and (s.now - started).total_seconds() >= deadline
    ):
        _finish(s, st, d, False, "DeadlineExceeded",
                f"the job ran longer than runPolicy.activeDeadlineSeconds ({deadline} s)")
        d.delete_pods = {**_cleanup(s, dead=False), **d.delete_pods}
        return d

    # suspend: delete every pod, keep the plan
    if s.spec.suspend:
        d.delete_pods = {
            **deletions(obs.current.values(), dead=False), **d.delete_pods
        }
        if phase != "Suspended":
            d.events.append(("Normal", "Suspended", "spec.suspend is true: workers deleted"))
        _set_phase(st, "Suspended", "Suspended", "spec.suspend is true; the plan is kept")
        _cond(st, s, "Suspended", True, "Suspended", "spec.suspend is true")
        _cond(st, s, "Running", False, "Suspended", "spec.suspend is true")
        st.pop("startTime", None)
        st["ready"] = f"0/{plan.world_size}"
        st["stages"] = status.stage_statuses(plan, status.observe([], attempt=0, plan_hash=None))
        return d
    if status.is_true(st["conditions"], "Suspended"):
        _cond(st, s, "Suspended", False, "Resumed", "spec.suspend is false")
        d.events.append(("Normal", "Resumed", "spec.suspend is false: recreating workers"))
        phase = "Planned"
        _set_phase(st, phase, "Resumed", "recreating workers")

    # lost nodes
    planned_nodes = sorted({dv.node for stg in plan.stages for dv in stg.devices})
    grace = s.spec.failure_policy.node_lost_grace_period_seconds
    lost = inventory.lost_nodes(planned_nodes, s.nodes, grace_seconds=grace, now=s.now)
    if lost:
        detail = ", ".join(f"{n} ({why})" for n, why in sorted(lost.items()))
        d.events.append(("Warning", "NodeLost", f"planned node(s) lost: {detail}"))
        _cond(st, s, "Degraded", True, "NodeLost", f"lost: {detail}")
        if s.spec.failure_policy.replan_on_node_loss:
            d.replan = "NodeLost"
            d.exclude_nodes = sorted(lost)
            return d
    not_ready = inventory.not_ready_nodes(planned_nodes, s.nodes)

    # failures of the current attempt restart the whole pipeline
    failed = obs.failed
    if failed or (lost and not s.spec.failure_policy.replan_on_node_loss):
        what = (
            "; ".join(f"{p.name} (rank {p.rank}): {p.message or 'Failed'}" for p in failed)
            or f"lost node(s) {', '.join(sorted(lost))}"
        )
        for p in failed:
            d.events.append(("Warning", "StagePodFailed", f"{p.name} (rank {p.rank}): {p.message}"))
        limit = s.spec.failure_policy.max_restarts
        if int(st["restarts"]) >= limit:
            _finish(s, st, d, False, "MaxRestartsExceeded",
                    f"{what}; failurePolicy.maxRestarts ({limit}) reached")
            d.delete_pods = {**d.delete_pods, **_cleanup(s, dead=True)}
            return d
        st["restarts"] = int(st["restarts"]) + 1
        st["attempt"] = attempt + 1
        msg = (f"restart {st['restarts']}/{limit} from the last checkpoint after: {what}")
        _set_phase(st, "Restarting", "Restarting", msg)
        _cond(st, s, "Running", False, "Restarting", msg)
        d.events.append(("Warning", "Restarting", msg))
        d.delete_pods = deletions(obs.all, dead=True, lost_nodes=lost)
        d.restarted = True
        return d

    # all workers finished
    if obs.current and obs.num_succeeded() == plan.world_size:
        _finish(s, st, d, True, "Succeeded", f"all {plan.world_size} workers succeeded")
        d.delete_pods = {**d.delete_pods, **_cleanup(s, dead=True)}
        return d

    # create what is missing
    facts = {n: inventory.read_node(s.nodes[n]) for n in planned_nodes if n in s.nodes}
    rank0 = obs.current.get(0)
    desired = render.worker_pods(
        s.job, s.spec, plan, facts, attempt=attempt,
        rank0_pod_ip=rank0.pod_ip if rank0 else None, default_image=s.default_image,
    )
    missing = [p for p in desired if int(p["metadata"]["labels"][render.L_RANK]) not in obs.current]
    if missing:
        cm = render.config_map(s.job, s.spec, plan)
        d.create.append(cm)
        d.create.append(render.service(s.job, s.spec))
        if s.network_policy_scrapers is not None:
            d.create.append(render.network_policy(s.job, s.spec, s.network_policy_scrapers))
        group = render.pod_group(s.job, s.spec, plan, attempt)
        if group is not None:
            d.create.append(group)
        d.create.extend(missing)
        if "startTime" not in st:
            st["startTime"] = status.iso(s.now)

    # status from what runs
    ready = obs.num_ready()
    st["ready"] = f"{ready}/{plan.world_size}"
    st["stages"] = status.stage_statuses(plan, obs)
    if not_ready:
        _cond(st, s, "Degraded", True, "NodeNotReady",
              f"node(s) not Ready (lost after {grace} s): {', '.join(not_ready)}")
    elif status.get_condition(st["conditions"], "Degraded") is not None:
        _cond(st, s, "Degraded", False, "NodesReady", "every planned node is Ready")
    if s.report is not None and ready == plan.world_size:
        st["progress"] = status.progress_from_report(s.report, s.spec, now=s.now, plan=plan)
    if ready == plan.world_size:
        if phase != "Running":
            d.events.append(("Normal", "Running", f"all {ready} workers are running"))
        _set_phase(st, "Running", "AllWorkersRunning", f"all {ready} workers are running")
        _cond(st, s, "Running", True, "AllWorkersRunning", f"all {ready} workers are running")
    elif phase == "Running":
        _set_phase(st, "Planned", "WorkersNotReady", f"{ready}/{plan.world_size} workers ready")
        _cond(st, s, "Running", False, "WorkersNotReady",
              f"{ready}/{plan.world_size} workers ready")
    elif phase == "Pending":
        _set_phase(st, "Planned", "CreatingWorkers", f"{ready}/{plan.world_size} workers ready")
    return d


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
    if reason == "NodeLost":
        st["replans"] = int(st["replans"]) + 1
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
    _cond(st, s, "Planned", True, "PlanComputed", f"{reason}: {detail}")
    d.events.append(("Normal", "PlanComputed", f"{reason}: {detail} (plan {summary['hash']})"))
    if reason == "NodeLost":
        d.events.append(("Warning", "Replanning", f"re-planned on the remaining nodes: {detail}"))
    if old.get("configMap") and old.get("configMap") != config_map:
        d.delete_config_maps.append(str(old["configMap"]))
    views = [status.pod_view(p) for p in s.pods]
    gone = inventory.lost_nodes(
        sorted({v.node for v in views if v.node}), s.nodes,
        grace_seconds=s.spec.failure_policy.node_lost_grace_period_seconds, now=s.now,
    )
    # a lost node ends the attempt; a spec change (or a lost plan) stops healthy workers
    d.delete_pods = deletions(views, dead=reason == "NodeLost", lost_nodes=gone)
    if st.get("phase") in (None, "Pending", "Running", "Planned", "Restarting"):
        _set_phase(st, "Planned" if not (old or had_pods) else "Restarting", "PlanComputed", detail)
    st["ready"] = f"0/{plan.world_size}"
    st["stages"] = status.stage_statuses(plan, status.observe([], attempt=0, plan_hash=None))
    return d


NO_ELIGIBLE_NODES = "NoEligibleNodes"


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
    _set_phase(st, "Pending", NO_ELIGIBLE_NODES, message)
    _cond(st, s, "Planned", False, NO_ELIGIBLE_NODES, message)
    if status.get_condition(st["conditions"], "Running") is not None:
        _cond(st, s, "Running", False, NO_ELIGIBLE_NODES, message)
    d.delete_pods = deletions((status.pod_view(p) for p in s.pods), dead=True)
    return d


def plan_failed(s: JobState, reason: str, message: str) -> Decision:
    """The job fails because no plan exists (PlanInfeasible, InvalidSpec)."""
    st: dict[str, Any] = copy.deepcopy(dict(s.status))
    st.setdefault("conditions", [])
    st["observedGeneration"] = s.generation
    d = Decision(status=st)
    _cond(st, s, "Planned", False, reason, message)
    _finish(s, st, d, False, reason, message)
    d.delete_pods = deletions((status.pod_view(p) for p in s.pods), dead=True)
    return d
