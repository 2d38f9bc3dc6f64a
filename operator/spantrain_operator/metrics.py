"""Prometheus metrics of the operator (``spantrain_operator_*``, base units, ``_total``
counters, low-cardinality labels).

Role: declare the metrics once and offer small recording helpers; ``handlers`` starts the HTTP
endpoint at start-up. Must not import torch, spantrain_worker or kopf.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from spantrain_planner.api import PHASES

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
RESTARTS = Counter(
    "spantrain_operator_restarts_total", "Job restarts after worker failures.", ["namespace"]
)
REPLANS = Counter(
    "spantrain_operator_replans_total", "Re-plans (lost nodes, spec changes).", ["reason"]
)
PREDICTED_SAMPLES = Gauge(
    "spantrain_operator_predicted_samples_per_second",
    "Throughput the current plan predicts, per job.",
    ["namespace", "job"],
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


def forget_job(namespace: str, name: str, uid: str) -> None:
    set_phase(uid, None)
    with contextlib.suppress(KeyError):
        PREDICTED_SAMPLES.remove(namespace, name)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr)
