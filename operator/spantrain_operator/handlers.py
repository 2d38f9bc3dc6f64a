"""kopf handlers of the SpanTrain operator: thin glue over ``reconcile``, ``render``, ``k8s``.

Role: keep two in-memory indexes (the jobs' pods by job, the nodes by name) and run one level-
based reconcile per job — from a timer (every ``Settings.reconcile_interval`` seconds, which
also covers resume after an operator restart) and right away on create, resume and spec update.
Each reconcile reads the job fresh, decides with the pure ``reconcile.decide``, plans when told
to (inventory here, then the planner in one of ``planqueue``'s planner processes: a job whose
plan is not ready yet returns, skips its timer ticks while the plan is computed, and is
reconciled again the moment the plan is done), then applies: plan ConfigMap, status, deletions
(each with the grace period ``reconcile`` chose), creations (deterministic names: no
duplicates; one job's pods at once), events. A child the API server refuses fails the job
(``InvalidSpec``) after a few backed-off tries. A pass that re-plans or restarts goes on to the
next attempt's pods at once rather than a timer tick later. Runs are serialised per job. While
a job is Running, its rank 0's metrics are read (``scrape``, rate-limited and silent when
nothing answers) into ``status.progress``.

kopf stores its own bookkeeping in annotations under ``spantrain.io`` (the status schema is
structural and declares only SpanTrain's fields). Run with ``spantrain operator`` or
``kopf run -m spantrain_operator.handlers``. Must not import torch or spantrain_worker.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from spantrain_planner import api
from spantrain_planner.api import Reason
from spantrain_planner.core.contract import PLAN_FILE
from spantrain_planner.core.errors import InputError, PlanningError, PlanTimeoutError
from spantrain_planner.inputs.cluster import ClusterSpec
from spantrain_planner.inputs.plan import Plan
from spantrain_planner.passes.adapt import with_link_speeds

from . import (
    inventory,
    k8s,
    metrics,
    planning,
    planqueue,
    reconcile,
    render,
    scrape,
    settings,
    status,
)

SETTINGS = settings.current()
INTERVAL = SETTINGS.reconcile_interval
DEFAULT_IMAGE = SETTINGS.worker_image
NETWORK_POLICY_SCRAPERS = SETTINGS.network_policy_scrapers

PodIndex = kopf.Index[tuple[str, str], dict[str, Any]]
NodeIndex = kopf.Index[str, dict[str, Any]]

_kube: k8s.Kube | None = None
_kube_lock = threading.Lock()
_job_locks: dict[str, threading.Lock] = {}
_plans: dict[str, Plan] = {}  # plan hash -> plan (plans are immutable, named by hash)
_scraper = scrape.Scraper(interval=SETTINGS.progress_interval, timeout=SETTINGS.progress_timeout)
_planner: planqueue.PlanQueue[tuple[Plan, float, str]] = planqueue.PlanQueue(
    processes=SETTINGS.planner_processes
)


def kube() -> k8s.Kube:
    global _kube
    with _kube_lock:
        if _kube is None:
            _kube = k8s.Kube()
        return _kube


def _lock(uid: str) -> threading.Lock:
    with _kube_lock:
        return _job_locks.setdefault(uid, threading.Lock())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    prefix = "spantrain.io"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{prefix}/kopf-finalizer"
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = SETTINGS.workers
    settings.watching.server_timeout = 300
    settings.peering.name = SETTINGS.peering
    settings.peering.priority = SETTINGS.peering_priority
    settings.peering.mandatory = SETTINGS.peering_mandatory
    port = SETTINGS.metrics_port
    if port:
        try:
            metrics.serve(port)
        except OSError as err:  # a second in-process run (tests) finds the port taken
            logging.getLogger(__name__).warning("metrics port %s: %s", port, err)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else the kubeconfig KUBECONFIG names (read at call time)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.probe(id="jobs")
def probe_jobs(**_: Any) -> int:
    return len(metrics._phases)


# ---------------------------------------------------------------------------------------------
# indexes


@kopf.index("pods", labels={render.L_JOB: kopf.PRESENT})
def pods_by_job(
    namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace or "", labels[render.L_JOB]): _plain(body)}


@kopf.index("nodes")
def nodes_by_name(name: str | None, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {name or "": _plain(body)}


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {
        "metadata": dict(body.get("metadata") or {}),
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


# ---------------------------------------------------------------------------------------------
# reconcile


# The indexes arrive as keyword arguments named after their handlers; kopf's callback
# protocol cannot name them, so they are taken from ``kwargs``.


@kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=INTERVAL, sharp=False)
def reconcile_timer(
    name: str | None, namespace: str | None, uid: str | None, logger: kopf.Logger, **kwargs: Any
) -> None:
    if uid and _planner.busy(uid):
        return  # its plan is being computed: the plan's completion reconciles it (when_done)
    _dispatch(namespace, name, uid, logger, kwargs)


@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec")
def reconcile_now(
    name: str | None, namespace: str | None, uid: str | None, logger: kopf.Logger, **kwargs: Any
) -> None:
    _dispatch(namespace, name, uid, logger, kwargs)


def _dispatch(
    namespace: str | None, name: str | None, uid: str | None, logger: kopf.Logger,
    kwargs: Mapping[str, Any],
) -> None:
    assert namespace and name and uid, "SpanTrainJob is namespaced and has a name and uid"
    run(namespace, name, uid, kwargs["pods_by_job"], kwargs["nodes_by_name"], logger)


def run(
    namespace: str, name: str, uid: str, pods_index: PodIndex, nodes_index: NodeIndex,
    logger: kopf.Logger,
) -> None:
    if _refusals.get(uid, (0, 0.0))[1] > time.monotonic():
        return  # backing off after the API server refused a child
    lock = _lock(uid)
    if not lock.acquire(blocking=False):
        return  # another handler is reconciling this job right now; the timer comes back
    started = time.monotonic()
    try:
        _run(namespace, name, uid, pods_index, nodes_index, logger)
    except Exception as err:
        metrics.RECONCILE_ERRORS.labels(reason=type(err).__name__).inc()
        raise kopf.TemporaryError(f"reconcile failed: {err}", delay=INTERVAL) from err
    finally:
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        lock.release()


def _load_plan(namespace: str, status: Mapping[str, Any]) -> Plan | None:
    summary = status.get("plan") or {}
    digest, cm = summary.get("hash"), summary.get("configMap")
    if not digest or not cm:
        return None
    if digest in _plans:
        return _plans[digest]
    data = kube().read_config_map_data(namespace, cm)
    if not data or PLAN_FILE not in data:
        return None
    plan = Plan.model_validate_json(data[PLAN_FILE])
    _plans[digest] = plan
    return plan


class NoEligibleNodes(PlanningError):
    """No node the placement selects is Ready and schedulable (the job waits, not fails)."""


def eligible_cluster(
    spec: api.SpanTrainJobSpec, nodes: list[Mapping[str, Any]], *, name: str, exclude: list[str],
    link_speeds: Mapping[tuple[str, str], float] | None = None,
) -> ClusterSpec:
    """The nodes the job's placement selects, as the planner's cluster description; with the
    link speeds the job's workers measured (``status.measuredLinks``) over the labels'."""
    inv = inventory.build_inventory(nodes, spec.placement, name=name, exclude=exclude,
                                    now=datetime.now(UTC))
    for warning in inv.warnings:  # measured facts that were malformed or expired
        logging.getLogger(__name__).warning("%s: %s", name, warning)
    if inv.cluster is None:
        # the nodes the placement selects but cannot use (not Ready, cordoned...) say more
        # than the hundreds it does not select
        skipped = sorted(inv.skipped.items(), key=lambda kv: ("does not match" in kv[1], kv[0]))
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:10])
        raise NoEligibleNodes(
            f"no eligible node among {len(inv.skipped)} (placement matches none that is Ready "
            f"and schedulable){': ' + why if why else ''}; waiting for such a node (or relax "
            "spec.placement)"
        )
    return with_link_speeds(inv.cluster, link_speeds or {})


def _forget(namespace: str, name: str, uid: str) -> None:
    metrics.forget_job(namespace, name, uid)
    _scraper.forget(uid)
    _planner.forget(uid)


def _observe_plan(namespace: str, name: str, plan: Plan) -> None:
    pred = plan.predicted
    metrics.observe_plan(
        namespace, name,
        samples_per_second=pred.samples_per_second if pred is not None else None,
        step_seconds=pred.step_seconds if pred is not None else None,
    )


def _run(
    namespace: str, name: str, uid: str, pods_index: PodIndex, nodes_index: NodeIndex,
    logger: kopf.Logger,
) -> None:
    kc = kube()
    body = kc.get_job(namespace, name)
    if body is None or body["metadata"].get("uid") != uid:
        _forget(namespace, name, uid)
        return
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        _forget(namespace, name, uid)
        return
    now = datetime.now(UTC)
    job = render.JobRef(name=name, namespace=namespace, uid=uid)
    old_status: dict[str, Any] = dict(body.get("status") or {})
    pods = list(pods_index.get((namespace, name), []))
    pods = [p for p in pods if _owned_by(p, uid)]
    nodes = {n: next(iter(b)) for n, b in nodes_index.items()}
    generation = int(meta.get("generation", 1))
    try:
        spec = api.parse_spec(body.get("spec") or {})
    except ValidationError as err:
        state = reconcile.JobState(job, generation, _fallback_spec(), old_status, None, pods,
                                   nodes, now, DEFAULT_IMAGE)
        invalid = reconcile.plan_failed(state, Reason.INVALID_SPEC, str(err))
        _apply(body, old_status, invalid, logger)
        return
    plan = _load_plan(namespace, old_status)
    if plan is not None:
        _observe_plan(namespace, name, plan)
    target = status.metrics_target(pods, old_status)
    report = _scraper.poll(uid, target, render.METRICS_PORT) if target else None
    state = reconcile.JobState(job, generation, spec, old_status, plan, pods, nodes, now,
                               DEFAULT_IMAGE, report, NETWORK_POLICY_SCRAPERS)
    decision = reconcile.decide(state)
    reason = decision.replan
    if reason:
        exclude = decision.exclude_nodes
        links = decision.link_speeds
        request = (status.plan_spec_hash(spec), tuple(exclude), tuple(sorted(links.items())))
        def plan_args() -> tuple[Any, ...]:  # built when the request is submitted
            cluster = eligible_cluster(spec, list(nodes.values()), name=f"{namespace}/{name}",
                                       exclude=exclude, link_speeds=links)
            return spec, cluster, SETTINGS.plan_budget_seconds

        try:
            done = _planner.result(uid, request, planning.plan_job, plan_args,
                                   wait_seconds=INTERVAL)
            if done is not None:
                metrics.PLAN_SECONDS.observe(done[1])
            new_plan = done[0] if done is not None else None
            replan_inputs = done[2] if done is not None else None
        except PlanTimeoutError as err:
            decision = reconcile.plan_failed(state, Reason.PLAN_TIMEOUT, str(err))
        except InputError as err:
            decision = reconcile.plan_failed(state, Reason.INVALID_SPEC, str(err))
        except NoEligibleNodes as err:
            decision = reconcile.waiting_for_nodes(state, str(err))
        except PlanningError as err:
            decision = reconcile.plan_failed(state, Reason.PLAN_INFEASIBLE, str(err))
        else:
            if new_plan is None:
                metrics.PLANS_QUEUED.set(_planner.queued())
                # queued or running: reconcile again as soon as the plan is done (the timer
                # comes back too, in case this process restarts)
                _planner.when_done(uid, functools.partial(
                    _follow_up, run, namespace, name, uid, pods_index, nodes_index, logger))
                return
            metrics.PLANS_QUEUED.set(_planner.queued())
            metrics.planned(namespace, name, reason)
            plan = new_plan
            digest = new_plan.digest()
            _plans[digest] = new_plan
            cm = render.config_map(job, spec, new_plan, replan_inputs=replan_inputs)
            try:
                kc.create_if_absent(cm)
            except k8s.Refused as err:
                _refused(body, reconcile.Decision(status=old_status), err, logger, state)
                return
            # events of decide (NodeLost...) come first
            early = decision.events
            decision = reconcile.after_plan(
                state, new_plan, reason, config_map=cm["metadata"]["name"]
            )
            decision.events = early + decision.events
            _observe_plan(namespace, name, new_plan)
            # write the plan, then go on to pods in the same pass
            _apply(body, old_status, decision, logger, state)
            old_status = decision.status
            pods = _marked_deleting(pods, decision.delete_pods, now)
            state = reconcile.JobState(job, generation, spec, old_status, plan, pods, nodes,
                                       now, DEFAULT_IMAGE)
            decision = reconcile.decide(state)
            # the plan's ConfigMap was created just above: not again (a 409 round trip)
            decision.create = [o for o in decision.create if o["metadata"]["name"] !=
                               cm["metadata"]["name"] or o["kind"] != "ConfigMap"]
    _apply(body, old_status, decision, logger, state)
    if decision.restarted:
        metrics.restarted(namespace, name)
        # the failed attempt's pods are going: create the next attempt's in the same pass
        old_status = decision.status
        pods = _marked_deleting(pods, decision.delete_pods, now)
        state = reconcile.JobState(job, generation, spec, old_status, plan, pods, nodes, now,
                                   DEFAULT_IMAGE)
        decision = reconcile.decide(state)
        _apply(body, old_status, decision, logger, state)
    metrics.set_phase(uid, decision.status.get("phase"))


def _refused(
    body: Mapping[str, Any], d: reconcile.Decision, err: k8s.Refused, logger: kopf.Logger,
    state: reconcile.JobState | None,
) -> None:
    """A child the API server refuses: the job fails (``InvalidSpec``, with the server's
    message) at once for a 422, after ``CHILD_TRIES`` refusals for a 400/403 (a quota or an
    admission webhook may change its mind); retries back off. Never a hot loop."""
    uid = body["metadata"].get("uid", "")
    tries = _refusals.get(uid, (0, 0.0))[0] + 1
    metrics.RECONCILE_ERRORS.labels(reason="Refused").inc()
    if state is None or (err.status != 422 and tries < CHILD_TRIES):
        delay = INTERVAL * 2**tries
        _refusals[uid] = (tries, time.monotonic() + delay)  # the timer waits until then
        raise kopf.TemporaryError(f"{err} (try {tries} of {CHILD_TRIES})", delay=delay)
    _refusals.pop(uid, None)
    message = (f"{err}; the job's spec renders an object the cluster does not accept: fix the "
               "field the message names and apply the job again")
    failed = reconcile.plan_failed(replace(state, status=d.status), Reason.INVALID_SPEC, message)
    _apply(body, d.status, failed, logger)


def _marked_deleting(
    pods: list[dict[str, Any]], deleted: Mapping[str, int | None], now: datetime
) -> list[dict[str, Any]]:
    """``pods`` as they are once ``deleted`` were deleted (the index lags behind)."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("name") in deleted and not meta.get("deletionTimestamp"):
            pod = {**pod, "metadata": {**meta, "deletionTimestamp": status.iso(now)}}
        out.append(pod)
    return out


def _owned_by(pod: Mapping[str, Any], uid: str) -> bool:
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid for r in refs)


def _fallback_spec() -> api.SpanTrainJobSpec:
    return api.SpanTrainJobSpec(model=api.ModelSpec(preset="gpt-tiny"))


#: tries before a child the API server refuses (403, 400) fails the job; a 422 (Invalid) fails
#: it at once: the same spec renders the same object, so retrying cannot help
CHILD_TRIES = 3
#: creates one job's pods concurrently (the API client's pool is ``Settings.workers`` wide)
_creators = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spantrain-create")
#: reconciles a job whose plan just finished (``PlanQueue.when_done``): as wide as kopf's
#: pool, since 50 plans can finish within seconds and each pass waits on a few API round
#: trips (2 threads queued them for seconds, longer than the timer tick that also takes them)
_followups = ThreadPoolExecutor(max_workers=SETTINGS.workers,
                                thread_name_prefix="spantrain-planned")
_refusals: dict[str, tuple[int, float]] = {}  # job uid -> (refusals in a row, retry after)


def _follow_up(fn: Callable[..., Any], namespace: str, name: str, *args: Any) -> None:
    """Run ``fn`` (a reconcile pass) on the follow-up pool; a failure is logged, not lost
    (the timer still comes back to the job)."""
    def done(fut: Future[Any]) -> None:
        err = fut.exception()
        if err is not None:
            logging.getLogger(__name__).error(
                "%s/%s: reconcile after planning failed: %s", namespace, name, err,
                exc_info=err)

    _followups.submit(fn, namespace, name, *args).add_done_callback(done)


def _apply(
    body: Mapping[str, Any], old_status: Mapping[str, Any], d: reconcile.Decision,
    logger: kopf.Logger, state: reconcile.JobState | None = None,
) -> None:
    kc = kube()
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    kc.patch_job_status(ns, name, old_status, status.typed(d.status))
    for pod, grace in sorted(d.delete_pods.items()):
        kc.delete_pod(ns, pod, grace_seconds=grace)
    for cm in d.delete_config_maps:
        kc.delete_config_map(ns, cm)
    # the objects pods refer to first (Service, PodGroup...), in order; then the pods at once
    # (one round trip to the API server instead of one per pod)
    others = [o for o in d.create if o["kind"] != "Pod"]
    pods = [o for o in d.create if o["kind"] == "Pod"]
    try:
        for obj in others:
            kc.create_if_absent(obj)
        done = list(_creators.map(kc.create_if_absent, pods)) if len(pods) > 1 else [
            kc.create_if_absent(p) for p in pods]
    except k8s.Refused as err:
        _refused(body, d, err, logger, state)
        return
    created = [p["metadata"]["name"] for p, new in zip(pods, done, strict=True) if new]
    _refusals.pop(meta.get("uid", ""), None)
    if created:
        d.events.append(("Normal", Reason.STAGE_POD_CREATED,
                         f"created {len(created)} worker pod(s): {', '.join(created[:8])}"
                         + (" ..." if len(created) > 8 else "")))
    for kind, reason, message in d.events:
        logger.info("%s: %s", reason, message)
        kc.event(body, kind, reason, message)
    if d.delete_job:
        kc.delete_job(ns, name)
