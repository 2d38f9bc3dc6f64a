"""The chart's Grafana dashboard queries only series that the worker or the operator export,
with label names those series carry (the ``spantrain_job`` contract, never ``job``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "helm" / "spantrain" / "dashboards" / "spantrain.json"

_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
}
#: Labels Prometheus itself adds: histogram buckets, and what a scrape config attaches.
_ADDED = {"le", "job", "instance", "namespace", "pod", "node", "spantrain_attempt", "replica"}


def _series(families: Iterable[Any], prefix: str) -> dict[str, set[str]]:
    """Series name -> label names, from metric families (collected registries)."""
    out: dict[str, set[str]] = {}
    for fam in families:
        if not fam.name.startswith(prefix):
            continue
        labels: set[str] = set()
        for sample in fam.samples:
            labels |= set(sample.labels)
        for suffix in _SUFFIXES.get(fam.type, ("",)):
            out[fam.name + suffix] = labels
    return out


def defined_series() -> dict[str, set[str]]:
    from spantrain_operator import metrics as operator_metrics
    from spantrain_worker.metrics import StepStats, WorkerMetrics

    worker = WorkerMetrics("gpt", 0, 0, namespace="ml", device="d0")
    worker.observe(StepStats(step=0, loss=1.0, step_seconds=0.1, compute_seconds=0.05,
                             communication_seconds=0.01, idle_seconds=0.04,
                             samples_per_second=10.0, grad_norm=1.0, learning_rate=1e-3), 4)
    worker.add_bytes({1: 10}, {1: 10})
    # one job's operator series, so that every labelled family has a sample to read labels from
    operator_metrics.observe_plan("ml", "gpt", samples_per_second=10.0, step_seconds=0.1)
    operator_metrics.planned("ml", "gpt", "NodeLost")
    operator_metrics.restarted("ml", "gpt")
    operator_metrics.set_phase("uid-gpt", "Running")
    operator_metrics.RECONCILE_SECONDS.observe(0.01)
    operator_metrics.PLAN_SECONDS.observe(0.01)
    try:
        return {
            **_series(worker.registry.collect(), "spantrain_worker_"),
            **_series(prometheus_client.REGISTRY.collect(), "spantrain_operator_"),
        }
    finally:
        operator_metrics.forget_job("ml", "gpt", "uid-gpt")


def panel_exprs() -> Iterator[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    yield panel.get("title", "?"), target["expr"]
            yield from walk(panel.get("panels") or [])

    yield from walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            yield f"variable {var['name']}", var["query"]


_NAME = re.compile(r"\b(spantrain_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(spantrain_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def test_every_queried_metric_is_exported() -> None:
    defined = defined_series()
    assert "spantrain_worker_samples_total" in defined
    assert "spantrain_operator_replans_total" in defined
    assert "spantrain_operator_predicted_samples_per_second" in defined
    used: set[str] = set()
    for title, expr in panel_exprs():
        # label names inside selectors (spantrain_namespace, spantrain_job) are not metrics
        names = {n for n in _NAME.findall(expr)
                 if not re.search(rf"\b{n}\s*(=~|!~|!=|=)", expr)
                 and not re.search(rf"(by|without)\s*\([^)]*\b{n}\b", expr)
                 and not re.search(rf"label_values\([^)]*,\s*{n}\s*\)", expr)}
        unknown = names - set(defined)
        assert not unknown, f"{title}: {sorted(unknown)}: exported by neither worker nor operator"
        used |= names
    # the dashboard shows what the issue asks for
    for name in ("spantrain_worker_samples_total",
                 "spantrain_operator_predicted_samples_per_second",
                 "spantrain_worker_step_seconds_sum", "spantrain_worker_idle_seconds_total",
                 "spantrain_worker_sent_bytes_total", "spantrain_worker_loss",
                 "spantrain_operator_restarts_total", "spantrain_operator_replans_total"):
        assert name in used, name


def test_selectors_use_labels_the_series_carry() -> None:
    defined = defined_series()
    for title, expr in panel_exprs():
        for name, body in _SELECTOR.findall(expr):
            for label, op, value in _MATCHER.findall(body):
                known = defined.get(name, set()) | _ADDED
                assert label in known, f"{title}: {name} has no label {label}"
                assert label not in ("job", "namespace"), (
                    f"{title}: select SpanTrainJobs by spantrain_job/spantrain_namespace "
                    "(job and namespace are the scrape's target labels)")
                if "$" in value:
                    assert op == "=~", f"{title}: template variable {value} needs =~"
        for group in _GROUPING.findall(expr):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                assert label != "job", f"{title}: group by spantrain_job, not job"
