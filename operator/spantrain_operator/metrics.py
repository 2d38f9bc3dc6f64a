"""Prometheus metrics of the operator (``spantrain_operator_*``, base units, ``_total``
counters, low-cardinality labels).

Per-job series carry ``spantrain_namespace`` and ``spantrain_job`` (the SpanTrainJob), the
label names the workers' series use too; never ``job``/``namespace``, which a Prometheus
scrape sets as target labels (the operator's own job and namespace) and would rename the
operator's to ``exported_*``. A job's counters start at 0 when it is first planned, so the
first restart or re-plan shows in ``increase()``.

Role: declare the metrics once and offer small recording helpers; ``handlers`` starts the HTTP
endpoint at start-up. Must not import torch, spantrain_worker or kopf.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from spantrain_planner.api import PHASES, Reason

RECONCILE_SECONDS = Histogram(
    "spantrain_operator_reconcile_duration_seconds",
    "Time to reconcile one SpanTrainJob once.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PLAN_SECONDS = Histogram(
    "spantrain_operator_plan_seconds",
    "Time to compute one plan (inventory, planner search, simulation).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
JOBS = Gauge("spantrain_operator_jobs", "SpanTrainJobs by phase.", ["phase"])
JOB_LABELS = ("spantrain_namespace", "spantrain_job")
RESTARTS = Counter(
    "spantrain_operator_restarts_total", "Job restarts after worker failures.", JOB_LABELS
)
#: Why a job is planned again (reconcile's ``Decision.replan``; ``Initial`` is not a re-plan).
REPLAN_REASONS = (Reason.NODE_LOST, Reason.SPEC_CHANGED, Reason.PLAN_LOST)
REPLANS = Counter(
    "spantrain_operator_replans_total",
    "Re-plans of a job (lost nodes, spec changes, a lost plan ConfigMap); not the first plan.",
    [*JOB_LABELS, "reason"],
)
PREDICTED_SAMPLES = Gauge(
    "spantrain_operator_predicted_samples_per_second",
    "Throughput the job's current plan predicts (samples/s).",
    JOB_LABELS,
)
PREDICTED_STEP_SECONDS = Gauge(
    "spantrain_operator_predicted_step_seconds",
    "Step time the job's current plan predicts.",
    JOB_LABELS,
)
PLANS_QUEUED = Gauge(
    "spantrain_operator_plans_queued", "Plan computations queued or running."
)
RECONCILE_ERRORS = Counter(
    "spantrain_operator_reconcile_errors_total", "Reconciles that raised.", ["reason"]
)

_phases: dict[str, str] = {}


def set_phase(uid: str, phase: str | None) -> None:
    """Record a job's phase (None: the job is gone) and refresh the per-phase gauge."""
    if phase is None:
        _phases.pop(uid, None)
    else:
        _phases[uid] = phase
    counts: Mapping[str, int] = {p: 0 for p in PHASES}
    counts = dict(counts)
    for value in _phases.values():
        counts[value] = counts.get(value, 0) + 1
    for p, n in counts.items():
        JOBS.labels(phase=p).set(n)


def observe_plan(
    namespace: str, name: str, *, samples_per_second: float | None, step_seconds: float | None
) -> None:
    """The current plan's predictions for a job (every reconcile: an operator that restarted
    reads the plan back, not computes it), and its counters at 0 if they are new."""
    RESTARTS.labels(namespace, name).inc(0)
    for reason in REPLAN_REASONS:
        REPLANS.labels(namespace, name, reason).inc(0)
    if samples_per_second is not None:
        PREDICTED_SAMPLES.labels(namespace, name).set(samples_per_second)
    if step_seconds is not None:
        PREDICTED_STEP_SECONDS.labels(namespace, name).set(step_seconds)


def planned(namespace: str, name: str, reason: str) -> None:
    """Count a plan computed for ``reason`` (the first plan, ``Initial``, is no re-plan)."""
    if reason != Reason.INITIAL:
        REPLANS.labels(namespace, name, reason).inc()


def restarted(namespace: str, name: str) -> None:
    RESTARTS.labels(namespace, name).inc()


def forget_job(namespace: str, name: str, uid: str) -> None:
    """Drop a deleted job's series."""
    set_phase(uid, None)
    for metric in (PREDICTED_SAMPLES, PREDICTED_STEP_SECONDS, RESTARTS):
        with contextlib.suppress(KeyError):
            metric.remove(namespace, name)
    for reason in {*REPLAN_REASONS, Reason.INITIAL}:
        with contextlib.suppress(KeyError):
            REPLANS.remove(namespace, name, reason)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr)
