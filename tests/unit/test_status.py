"""Status helpers and the pure reconcile state machine (no cluster: pods and nodes as dicts)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spantrain_operator import reconcile, render, status
from spantrain_planner import api
from spantrain_planner.inputs.plan import Plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_render import JOB, make_plan

REPO = Path(__file__).resolve().parents[2]

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def test_set_condition_keeps_transition_time_unless_status_flips() -> None:
    conds = status.set_condition([], "Running", True, "A", "m", generation=1, now=NOW)
    later = NOW + timedelta(minutes=5)
    same = status.set_condition(conds, "Running", True, "B", "m2", generation=2, now=later)
    assert same[0]["lastTransitionTime"] == conds[0]["lastTransitionTime"]
    assert same[0]["reason"] == "B" and same[0]["observedGeneration"] == 2
    flipped = status.set_condition(same, "Running", False, "C", "", generation=2, now=later)
    assert flipped[0]["lastTransitionTime"] == status.iso(later)
    both = status.set_condition(flipped, "Planned", True, "P", "", generation=2, now=later)
    assert [c["type"] for c in both] == ["Planned", "Running"]  # canonical order
    api.SpanTrainJobStatus.model_validate({"conditions": both})  # schema-valid


def test_plan_summary_matches_the_plan() -> None:
    plan = make_plan()
    summary = status.plan_summary(plan, config_map="cm", generation=3, spec_hash="h",
                                  reason="Initial", now=NOW)
    parsed = api.PlanSummary.model_validate(summary)
    assert parsed.hash == plan.digest() and parsed.num_stages == 2 and parsed.num_devices == 3
    assert parsed.stages[0].shares == [3, 1] and parsed.stages[1].nodes == ["edge-0"]
    assert parsed.nodes == ["cloud-0", "edge-0"] and parsed.generation == 3


def test_plan_spec_hash_ignores_pod_level_fields() -> None:
    base = api.parse_spec({"model": {"preset": "gpt-mini"}})
    same = api.parse_spec({"model": {"preset": "gpt-mini"}, "suspend": True, "image": "x",
                           "failurePolicy": {"maxRestarts": 9}})
    other = api.parse_spec({"model": {"preset": "gpt-mini"}, "training": {"globalBatch": 64}})
    assert status.plan_spec_hash(base) == status.plan_spec_hash(same)
    assert status.plan_spec_hash(base) != status.plan_spec_hash(other)


# --------------------------------------------------------------------------------------------
# every status the reconcile functions write is the API's status model, key for key


def _unknown_keys(model: type[Any], data: Any, path: str = "status") -> list[str]:
    """Keys of ``data`` that ``model`` (a pydantic model) does not declare, recursively."""
    import typing

    from pydantic import BaseModel

    if not isinstance(data, dict):
        return []
    fields = {(f.alias or n): f for n, f in model.model_fields.items()}
    out = [f"{path}.{k}" for k in data if k not in fields]
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            continue
        kinds = [field.annotation, *typing.get_args(field.annotation)]
        for kind in kinds:
            inner = [kind, *typing.get_args(kind)]
            sub = next((k for k in inner if isinstance(k, type) and issubclass(k, BaseModel)),
                       None)
            if sub is None:
                continue
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                out += _unknown_keys(sub, item, f"{path}.{key}[{i}]")
            break
    return out


@pytest.fixture(autouse=True)
def _statuses_are_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("decide", "after_plan", "plan_failed", "waiting_for_nodes"):
        real = getattr(reconcile, name)

        def checked(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            d = _real(*args, **kwargs)
            api.SpanTrainJobStatus.model_validate(d.status)
            assert not _unknown_keys(api.SpanTrainJobStatus, d.status), d.status
            # what the operator writes (status.typed) is what it decided, field for field
            assert status.typed(d.status) == d.status
            return d

        monkeypatch.setattr(reconcile, name, checked)


# --------------------------------------------------------------------------------------------
# reconcile


def spec(**kw: Any) -> api.SpanTrainJobSpec:
    data: dict[str, Any] = {"model": {"preset": "gpt-mini"}, "training": {"globalBatch": 16},
                            "rendezvous": {"addressMode": "dns"}}
    data.update(kw)
    return api.parse_spec(data)


def nodes(*, ready: bool = True, drop: str | None = None) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ("cloud-0", "edge-0"):
        if name == drop:
            continue
        out[name] = {"metadata": {"name": name, "labels": {}},
                     "status": {"conditions": [{"type": "Ready",
                                                "status": "True" if ready else "False",
                                                "lastTransitionTime": "2025-06-01T11:00:00Z"}]}}
    return out


def pod(manifest: dict[str, Any], phase: str = "Running", ready: bool = True) -> dict[str, Any]:
    p = dict(manifest)
    p["status"] = {"phase": phase, "podIP": "10.244.0.9",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return p


def state(
    st: dict[str, Any], pods: Sequence[dict[str, Any]] = (),
    s: api.SpanTrainJobSpec | None = None, ns: dict[str, Any] | None = None,
    now: datetime = NOW, plan: bool = True,
) -> reconcile.JobState:
    return reconcile.JobState(JOB, 1, s or spec(), st, make_plan() if plan else None, list(pods),
                              nodes() if ns is None else ns, now)


def planned(s: api.SpanTrainJobSpec | None = None) -> dict[str, Any]:
    plan = make_plan()
    d = reconcile.after_plan(state({}, s=s, plan=False), plan, "Initial", config_map="cm")
    return d.status


def test_new_job_needs_a_plan_then_creates_everything() -> None:
    d = reconcile.decide(state({}, plan=False))
    assert d.replan == "Initial" and not d.create
    st = planned()
    assert st["phase"] == "Planned" and st["attempt"] == 0 and st["plan"]["hash"]
    assert status.is_true(st["conditions"], "Planned")
    d = reconcile.decide(state(st))
    kinds = [o["kind"] for o in d.create]
    assert kinds == ["ConfigMap", "Service", "Pod", "Pod", "Pod"] and "startTime" in d.status
    # repeated with the same observation: the same (idempotent) creations, nothing else
    assert reconcile.decide(state(st)).create == d.create


def test_all_running_is_running_and_stays_quiet() -> None:
    st = planned()
    d0 = reconcile.decide(state(st))
    pods = [pod(p) for p in d0.create if p["kind"] == "Pod"]
    d = reconcile.decide(state(d0.status, pods))
    assert d.status["phase"] == "Running" and d.status["ready"] == "3/3" and not d.create
    assert [s["ready"] for s in d.status["stages"]] == [2, 1]
    assert ("Normal", "Running", "all 3 workers are running") in d.events
    again = reconcile.decide(state(d.status, pods))
    assert again.status == d.status and not again.events and not again.delete_pods


def test_failed_worker_restarts_then_fails_past_max_restarts() -> None:
    s = spec(failurePolicy={"maxRestarts": 1})
    st = planned(s)
    d0 = reconcile.decide(state(st, s=s))
    pods = [pod(p) for p in d0.create if p["kind"] == "Pod"]
    pods[1] = pod(pods[1], phase="Failed", ready=False)
    d = reconcile.decide(state(d0.status, pods, s=s))
    assert d.restarted and d.status["attempt"] == 1 and d.status["restarts"] == 1
    assert d.status["phase"] == "Restarting" and len(d.delete_pods) == 3
    # the failed attempt is dead: its pods go at once, freeing their devices for the next
    assert set(d.delete_pods.values()) == {reconcile.AT_ONCE}
    # next pass: the old pods are stale, new attempt-1 pods are created
    d2 = reconcile.decide(state(d.status, pods, s=s))
    assert sorted(d2.delete_pods) == sorted(p["metadata"]["name"] for p in pods)
    assert set(d2.delete_pods.values()) == {reconcile.AT_ONCE}
    assert all("-a1-" in o["metadata"]["name"] for o in d2.create if o["kind"] == "Pod")
    new = [pod(p) for p in d2.create if p["kind"] == "Pod"]
    new[0] = pod(new[0], phase="Failed", ready=False)
    d3 = reconcile.decide(state(d2.status, new, s=s))
    assert d3.status["phase"] == "Failed" and d3.status["reason"] == "MaxRestartsExceeded"
    assert d3.finished == "Failed" and "completionTime" in d3.status
    # cleanPodPolicy Running: the running ones go, the failed one stays
    assert sorted(d3.delete_pods) == sorted(p["metadata"]["name"] for p in new[1:])


def test_all_succeeded_is_succeeded_and_ttl_deletes_the_job() -> None:
    s = spec(runPolicy={"ttlSecondsAfterFinished": 60})
    st = planned(s)
    d0 = reconcile.decide(state(st, s=s))
    pods = [pod(p, phase="Succeeded", ready=False) for p in d0.create if p["kind"] == "Pod"]
    d = reconcile.decide(state(d0.status, pods, s=s))
    assert d.status["phase"] == "Succeeded" and d.finished == "Succeeded"
    assert not reconcile.decide(state(d.status, pods, s=s)).delete_job
    late = reconcile.decide(state(d.status, pods, s=s, now=NOW + timedelta(seconds=61)))
    assert late.delete_job


def test_lost_node_replans_without_it() -> None:
    st = planned()
    d0 = reconcile.decide(state(st))
    pods = [pod(p) for p in d0.create if p["kind"] == "Pod"]
    d = reconcile.decide(state(d0.status, pods, ns=nodes(drop="edge-0")))
    assert d.replan == "NodeLost" and d.exclude_nodes == ["edge-0"]
    assert any(e[1] == "NodeLost" for e in d.events)
    after = reconcile.after_plan(state(d.status, pods, plan=False), make_plan(), "NodeLost",
                                 config_map="cm2")
    assert after.status["replans"] == 1 and after.status["attempt"] == 1
    assert after.status["restarts"] == 0 and len(after.delete_pods) == 3
    assert set(after.delete_pods.values()) == {reconcile.AT_ONCE}


def test_not_ready_within_grace_is_degraded_not_lost() -> None:
    st = planned()
    d0 = reconcile.decide(state(st))
    pods = [pod(p) for p in d0.create if p["kind"] == "Pod"]
    soon = datetime(2025, 6, 1, 11, 1, tzinfo=UTC)  # 60 s after NotReady
    d = reconcile.decide(state(d0.status, pods, ns=nodes(ready=False), now=soon))
    assert d.replan is None and status.is_true(d.status["conditions"], "Degraded")


def test_suspend_deletes_pods_and_keeps_the_plan_resume_recreates() -> None:
    st = planned()
    d0 = reconcile.decide(state(st))
    pods = [pod(p) for p in d0.create if p["kind"] == "Pod"]
    sus = spec(suspend=True)
    d = reconcile.decide(state(d0.status, pods, s=sus))
    assert d.status["phase"] == "Suspended" and len(d.delete_pods) == 3
    assert set(d.delete_pods.values()) == {reconcile.GRACEFUL}  # healthy workers stop cleanly
    assert d.status["plan"] == d0.status["plan"] and "startTime" not in d.status
    d2 = reconcile.decide(state(d.status, [], s=spec()))
    assert d2.status["phase"] == "Planned" and len([o for o in d2.create if o["kind"] == "Pod"])
    assert status.get_condition(d2.status["conditions"], "Suspended")["reason"] == "Resumed"


def test_deadline_fails_the_job() -> None:
    s = spec(runPolicy={"activeDeadlineSeconds": 10})
    st = planned(s)
    d0 = reconcile.decide(state(st, s=s))
    d = reconcile.decide(state(d0.status, s=s, now=NOW + timedelta(seconds=11)))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "DeadlineExceeded"


def test_spec_change_replans_and_infeasible_fails() -> None:
    st = planned()
    d = reconcile.decide(state(st, s=spec(training={"globalBatch": 32})))
    assert d.replan == "SpecChanged"
    d0 = reconcile.decide(state(st))
    pods = [pod(p) for p in d0.create if p["kind"] == "Pod"]
    changed = reconcile.after_plan(state(d0.status, pods, s=spec(training={"globalBatch": 32})),
                                   make_plan(), "SpecChanged", config_map="cm2")
    assert set(changed.delete_pods.values()) == {reconcile.GRACEFUL}
    failed = reconcile.plan_failed(state({}), "PlanInfeasible", "needs 9 GiB, has 8 GiB")
    assert failed.status["phase"] == "Failed" and failed.status["reason"] == "PlanInfeasible"
    assert not status.is_true(failed.status["conditions"], "Planned")
    assert ("Warning", "PlanInfeasible", "needs 9 GiB, has 8 GiB") in failed.events
    api.SpanTrainJobStatus.model_validate(failed.status)


def test_pods_of_other_jobs_attempts_are_stale() -> None:
    st = planned()
    d0 = reconcile.decide(state(st))
    old = dict(d0.create[2])
    old["metadata"] = {**old["metadata"], "name": "gpt-a9-r0",
                       "labels": {**old["metadata"]["labels"], render.L_ATTEMPT: "9"}}
    d = reconcile.decide(state(d0.status, [pod(old)]))
    assert d.delete_pods == {"gpt-a9-r0": reconcile.AT_ONCE}


def _view(name: str, phase: str = "Running", *, node: str = "n", host: bool = False,
          deleting: bool = False) -> status.PodView:
    return status.PodView(name=name, rank=0, attempt=0, plan_hash="h", phase=phase, ready=True,
                          node=node, pod_ip=None, deleting=deleting, host_network=host)


def test_deletion_grace_periods() -> None:
    views = [_view("run"), _view("done", "Succeeded"), _view("failed", "Failed"),
             _view("host", host=True), _view("host-lost", node="gone", host=True),
             _view("going", deleting=True)]
    assert reconcile.deletions(views, dead=True, lost_nodes={"gone"}) == {
        "run": 0, "done": 0, "failed": 0, "host": None, "host-lost": 0}
    assert reconcile.deletions(views, dead=False) == {
        "run": None, "done": 0, "failed": 0, "host": None, "host-lost": None}


# --------------------------------------------------------------------------------------------
# progress


def test_progress_lands_in_status_once_running() -> None:
    st = planned()
    d0 = reconcile.decide(state(st))
    pods = [pod(p) for p in d0.create if p["kind"] == "Pod"]
    running = reconcile.decide(state(d0.status, pods)).status
    assert status.metrics_target(pods, running) == "10.244.0.9"
    assert status.metrics_target(pods, d0.status) is None  # not Running yet
    report = status.WorkerReport(steps_done=250, loss=2.5, samples_per_second=32.0,
                                 step_seconds=0.6)
    s = state(running, pods)
    d = reconcile.decide(reconcile.JobState(**{**s.__dict__, "report": report}))
    prog = d.status["progress"]
    # 1000 steps of 16 samples at 32 samples/s: 0.5 s a step, 750 left; the plan's
    # prediction beside the measured throughput
    predicted = s.plan.predicted.samples_per_second  # type: ignore[union-attr]
    assert prog == {"step": 250, "steps": 1000, "progressPercentage": 25, "loss": 2.5,
                    "samplesPerSecond": 32.0, "predictedSamplesPerSecond": round(predicted, 3),
                    "estimatedRemainingSeconds": 375, "lastUpdatedTime": status.iso(NOW)}
    api.SpanTrainJobStatus.model_validate(d.status)
    # no report this pass: the last progress stays
    assert reconcile.decide(state(d.status, pods)).status["progress"] == prog


def test_an_adaptation_lands_in_status_and_events_once() -> None:
    pytest.importorskip("prometheus_client")  # the worker's extra writes the page
    from prometheus_client import generate_latest

    from spantrain_worker.metrics import StepStats, WorkerMetrics

    st = planned()
    d0 = reconcile.decide(state(st))
    pods = [pod(p) for p in d0.create if p["kind"] == "Pod"]
    running = reconcile.decide(state(d0.status, pods)).status
    wm = WorkerMetrics("gpt", 0, 0, namespace="ml", device="cloud-0/gpu0")

    def page_report(step: int) -> status.WorkerReport:
        wm.observe(StepStats(step=step, loss=3.0, step_seconds=0.5, compute_seconds=0.3,
                             communication_seconds=0.1, idle_seconds=0.1,
                             samples_per_second=32.0, grad_norm=1.0, learning_rate=1e-3))
        report = status.worker_report(generate_latest(wm.registry).decode())
        assert report is not None
        return report

    def decide(st: dict, report: status.WorkerReport) -> reconcile.Decision:
        s = state(st, pods)
        return reconcile.decide(reconcile.JobState(**{**s.__dict__, "report": report}))

    quiet = decide(running, page_report(10))
    assert "adaptations" not in quiet.status
    assert not [e for e in quiet.events if e[1] == api.Reason.REBALANCED]
    wm.adapted("rebalance", 0.5, 12)
    adapted = decide(quiet.status, page_report(12))
    entry, = adapted.status["adaptations"]
    assert entry == {"time": status.iso(NOW), "kind": "rebalance", "attempt": 0, "step": 12,
                     "count": 1, "reason": entry["reason"], "predictedGain": 0.5,
                     "measuredSamplesPerSecond": 32.0, "predictedSamplesPerSecond": 48.0}
    (kind, reason, message), = [e for e in adapted.events if e[1] == api.Reason.REBALANCED]
    assert kind == "Normal" and "step 12" in message and "50 %" in message
    api.SpanTrainJobStatus.model_validate(adapted.status)
    # the same counter on the next read: nothing new
    again = decide(adapted.status, page_report(13))
    assert again.status["adaptations"] == adapted.status["adaptations"]
    assert not [e for e in again.events if e[1] == api.Reason.REBALANCED]
    # two more between reads: one entry that says so
    wm.adapted("rebalance", 0.2, 20)
    wm.adapted("rebalance", 0.25, 24)
    two = decide(again.status, page_report(25))
    assert [a["count"] for a in two.status["adaptations"]] == [1, 2]
    assert two.status["adaptations"][-1]["step"] == 24


# a page as prometheus_client writes it (abridged), with the edge cases of the text format
PAGE = r'''# HELP spantrain_worker_step_seconds Wall time of one training step.
# TYPE spantrain_worker_step_seconds histogram
spantrain_worker_step_seconds_bucket{job="gpt",le="0.5",rank="0",stage="0"} 3.0
spantrain_worker_step_seconds_bucket{job="gpt",le="+Inf",rank="0",stage="0"} 41.0
spantrain_worker_step_seconds_count{job="gpt",rank="0",stage="0"} 41.0
spantrain_worker_step_seconds_sum{job="gpt",rank="0",stage="0"} 20.5
# TYPE spantrain_worker_loss gauge
spantrain_worker_loss{job="a \"quoted\", {odd} job",rank="0",stage="0"} 3.25
spantrain_worker_samples_per_second{job="gpt",rank="0",stage="0"} 64.0 1717243200000
spantrain_worker_step{job="gpt",rank="0",stage="0"} 40.0
spantrain_worker_idle_seconds_total NaN
garbage line without a value
broken{job="x" 1.0
'''


def test_parse_exposition() -> None:
    pytest.importorskip("prometheus_client")  # the operator's extra parses the page
    samples = status.parse_exposition(PAGE)
    (labels, value), = samples["spantrain_worker_loss"]
    assert value == 3.25 and labels["job"] == 'a "quoted", {odd} job' and labels["rank"] == "0"
    assert samples["spantrain_worker_step_seconds_bucket"][1][0]["le"] == "+Inf"
    assert samples["spantrain_worker_samples_per_second"][0][1] == 64.0  # timestamp ignored
    assert "garbage" not in samples and "broken" not in samples
    assert status.parse_exposition("") == {}


def test_worker_report_from_a_page() -> None:
    pytest.importorskip("prometheus_client")
    report = status.worker_report(PAGE)
    assert report == status.WorkerReport(steps_done=41, loss=3.25, samples_per_second=64.0,
                                         step_seconds=0.5)
    # before the first step (count 0), or a page of something else: nothing to report
    assert status.worker_report(PAGE.replace("_count{job=\"gpt\",rank=\"0\",stage=\"0\"} 41.0",
                                             "_count{job=\"gpt\",rank=\"0\",stage=\"0\"} 0.0")
                                ) is None
    assert status.worker_report("<html>not metrics</html>") is None


def test_worker_report_reads_the_workers_real_metrics() -> None:
    pytest.importorskip("prometheus_client")  # the worker's extra
    from prometheus_client import generate_latest

    from spantrain_worker.metrics import StepStats, WorkerMetrics

    wm = WorkerMetrics("gpt", 0, 0, namespace="ml", device="cloud-0/gpu0")
    for step in range(3):
        wm.observe(StepStats(step=step, loss=4.0 - step, step_seconds=0.25, compute_seconds=0.1,
                             communication_seconds=0.1, idle_seconds=0.05,
                             samples_per_second=64.0, grad_norm=1.0, learning_rate=1e-3))
    report = status.worker_report(generate_latest(wm.registry).decode())
    assert report == status.WorkerReport(steps_done=3, loss=2.0, samples_per_second=64.0,
                                         step_seconds=0.25)


def test_scraper_rate_limits_backs_off_and_reads_http() -> None:
    pytest.importorskip("prometheus_client")  # the operator's extra parses the page
    import http.server
    import itertools
    import threading

    from spantrain_operator import scrape

    clock = [0.0]
    calls: list[str] = []

    def fetcher(ip: str, port: int, *, timeout: float) -> str | None:
        calls.append(ip)
        return PAGE if ip == "up" else None

    sc = scrape.Scraper(interval=10, timeout=1, max_backoff=60, fetcher=fetcher,
                        clock=lambda: clock[0])
    assert sc.poll("job", "up", 9400) is not None
    assert sc.poll("job", "up", 9400) is None and len(calls) == 1  # not due yet
    clock[0] = 10.0
    assert sc.poll("job", "up", 9400) is not None and len(calls) == 2
    # nothing listening: silent, and asked again later and later (20, 40, 60, 60 s)
    seen = []
    for _ in range(200):
        clock[0] += 1
        before = len(calls)
        assert sc.poll("dead", "down", 9400) is None
        if len(calls) > before:
            seen.append(clock[0])
    assert [b - a for a, b in itertools.pairwise(seen)][:4] == [20, 40, 60, 60]

    # the real fetch: a page over HTTP, and None (quickly) where nothing listens
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = PAGE.encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert scrape.fetch("127.0.0.1", port, timeout=2) == PAGE
        server_closed = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        free = server_closed.server_address[1]
        server_closed.server_close()
        assert scrape.fetch("127.0.0.1", free, timeout=2) is None
    finally:
        server.shutdown()
        server.server_close()


def test_plan_queue_is_first_come_first_served_and_keyed() -> None:
    import threading
    import time

    from spantrain_operator.planqueue import PlanQueue

    gate = threading.Event()
    order: list[str] = []

    def compute(job: str) -> str:
        gate.wait(5)
        order.append(job)
        return f"plan-{job}"

    q: PlanQueue[str] = PlanQueue(processes=1, threads=True)  # lambdas: threads
    assert q.result("a", 1, compute, lambda: ("a",)) is None  # running, not waited for
    assert q.result("b", 1, compute, lambda: ("b",)) is None  # queued behind a
    assert q.result("c", 1, compute, lambda: ("c",)) is None
    assert q.result("c", 2, compute, lambda: ("c2",)) is None  # a new key replaces c's request
    assert q.queued() == 3
    gate.set()
    assert q.result("a", 1, compute, lambda: ("x",), wait_seconds=5) == "plan-a"
    deadline = time.monotonic() + 5
    while q.queued() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q.result("b", 1, compute, lambda: ("x",)) == "plan-b"
    assert q.result("c", 2, compute, lambda: ("x",)) == "plan-c2"
    assert order == ["a", "b", "c2"]  # c's stale request never ran

    built: list[int] = []  # the arguments are built once per submitted request, not per ask

    def args() -> tuple[str]:
        built.append(1)
        return ("e",)

    called = threading.Event()
    calls: list[int] = []
    gate.clear()
    assert q.result("f", 1, compute, lambda: ("f",)) is None
    for _ in range(3):  # asked on every timer tick: the callback is registered once
        q.when_done("f", lambda: (calls.append(1), called.set()))
    gate.set()
    assert called.wait(5)
    time.sleep(0.1)
    assert calls == [1]

    while q.result("e", 1, compute, args, wait_seconds=0.01) is None:
        pass
    assert built == [1]

    def boom() -> str:
        raise ValueError("infeasible")

    try:
        q.result("d", 1, boom, tuple, wait_seconds=5)
    except ValueError as err:
        assert str(err) == "infeasible"
    else:
        raise AssertionError("the planner's error is re-raised")


def test_planner_processes_plan_in_parallel_and_carry_errors() -> None:
    """Plans run in planner processes: two at once, and the planner's errors (with their
    fields) come back to the operator."""
    import time

    from spantrain_operator import planning
    from spantrain_operator.planqueue import PlanQueue
    from spantrain_planner.core.errors import InfeasibleError, PlanTimeoutError
    from spantrain_planner.inputs.cluster import ClusterSpec, load_cluster

    cluster = load_cluster(REPO / "examples" / "clusters" / "paper-env1.yaml")
    spec = api.parse_spec({"model": {"preset": "gpt2-small"}, "training": {"globalBatch": 32}})
    q: PlanQueue[tuple[Plan, float]] = PlanQueue(processes=2)
    try:
        assert q.result("a", 1, planning.plan_job, lambda: (spec, cluster, 60.0)) is None
        assert q.result("b", 1, planning.plan_job, lambda: (spec, cluster, 60.0)) is None
        deadline = time.monotonic() + 120
        while q.queued() and time.monotonic() < deadline:
            time.sleep(0.05)
        a = q.result("a", 1, planning.plan_job, lambda: (spec, cluster, 60.0))
        b = q.result("b", 1, planning.plan_job, lambda: (spec, cluster, 60.0))
        assert a is not None and b is not None and a[0].digest() == b[0].digest()
        assert a[0].predicted is not None and a[1] > 0

        small = api.parse_spec({"model": {"preset": "gpt2-small"},
                                "training": {"globalBatch": 8}})
        pis = ClusterSpec.model_validate({"name": "pis", "nodes": [
            {"name": f"pi-{i}", "devices": [{"computeTflops": 0.05, "memoryBytes": "1Gi"}]}
            for i in range(2)]})
        with pytest.raises(InfeasibleError) as info:
            q.result("c", 1, planning.plan_job, lambda: (small, pis, 60.0),
                     wait_seconds=120)
        assert info.value.device_id and info.value.needed_bytes and info.value.available_bytes
        assert info.value.needed_bytes > info.value.available_bytes

        with pytest.raises(PlanTimeoutError, match="time budget"):
            q.result("d", 1, planning.plan_job, lambda: (spec, cluster, 1e-6),
                     wait_seconds=120)
    finally:
        q.shutdown()


def test_waiting_for_nodes_is_pending_and_warns_once() -> None:
    first = reconcile.waiting_for_nodes(state({}, plan=False), "no eligible node among 3")
    assert first.status["phase"] == "Pending" and first.status["reason"] == "NoEligibleNodes"
    assert first.finished is None
    assert [e[1] for e in first.events] == ["NoEligibleNodes"]
    again = reconcile.waiting_for_nodes(state(first.status, plan=False), "no eligible node among 3")
    assert again.events == []  # still waiting: no event on every retry
    # still not terminal: the next pass plans again
    assert reconcile.decide(state(again.status, plan=False)).replan == "Initial"


def test_a_status_the_model_does_not_know_is_never_written() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValueError, match="progres.step"):
        status.typed({"phase": "Running", "progres": {"step": 1}})
    with pytest.raises(ValidationError, match="restarts"):
        status.typed({"phase": "Running", "restarts": "two"})


# --------------------------------------------------------------------------------------------
# a re-plan the workers asked for (exit REPLAN_EXIT_CODE, request in the termination message)


def _stopped(manifest: dict[str, Any], code: int, message: str = "") -> dict[str, Any]:
    p = pod(manifest, phase="Failed", ready=False)
    p["status"]["containerStatuses"] = [{"name": "worker", "state": {"terminated": {
        "exitCode": code, "reason": "Error", "message": message}}}]
    return p


def test_workers_that_stop_for_a_replan_are_replanned_with_their_links_not_restarted() -> None:
    from spantrain_planner.core.contract import REPLAN_EXIT_CODE
    from spantrain_planner.passes.adapt import ReplanRequest

    s = spec(training={"globalBatch": 16, "checkpoint": {"path": "/ckpt"}})
    st = planned(s)
    d0 = reconcile.decide(state(st, s=s))
    running = reconcile.decide(state(d0.status, [pod(p) for p in d0.create
                                                 if p["kind"] == "Pod"], s=s))
    manifests = [p for p in d0.create if p["kind"] == "Pod"]
    request = ReplanRequest(step=40, gain=0.3, restart_seconds=9.0,
                            measured_links={"cloud-0->edge-0": 21.5, "edge-0->cloud-0": 19.0})
    words = request.model_dump_json(by_alias=True)
    # rank 0 still running, the others stopped: already a re-plan (every rank checkpointed)
    pods = [pod(manifests[0]), *(_stopped(m, REPLAN_EXIT_CODE, words) for m in manifests[1:])]
    d = reconcile.decide(state(running.status, pods, s=s))
    assert d.replan == "Replanned" and not d.restarted
    assert d.link_speeds == {("cloud-0", "edge-0"): 21.5, ("edge-0", "cloud-0"): 19.0}
    assert d.status["restarts"] == 0
    after = reconcile.after_plan(state(running.status, pods, s=s), make_plan(), "Replanned",
                                 config_map="cm2")
    st2 = after.status
    assert st2["attempt"] == 1 and st2["replans"] == 1 and st2["restarts"] == 0
    assert {(x["a"], x["b"], x["bandwidthMbps"]) for x in st2["measuredLinks"]} == {
        ("cloud-0", "edge-0", 21.5), ("edge-0", "cloud-0", 19.0)}
    entry = st2["adaptations"][-1]
    assert entry["kind"] == "replan" and entry["step"] == 40 and entry["predictedGain"] == 0.3
    assert "cloud-0->edge-0 21.5 Mbit/s" in entry["reason"]
    kinds = [e[1] for e in after.events]
    assert kinds[:2] == ["Replanned", "PlanComputed"]
    assert set(after.delete_pods) == {p["metadata"]["name"] for p in pods}
    # later plans of the job keep the measured links
    again = reconcile.decide(state(st2, [], s=s, plan=False))
    assert again.link_speeds == {("cloud-0", "edge-0"): 21.5, ("edge-0", "cloud-0"): 19.0}


def test_a_real_failure_beside_a_replan_request_takes_the_failure_path() -> None:
    from spantrain_planner.core.contract import REPLAN_EXIT_CODE

    s = spec(failurePolicy={"maxRestarts": 2})
    st = planned(s)
    d0 = reconcile.decide(state(st, s=s))
    manifests = [p for p in d0.create if p["kind"] == "Pod"]
    pods = [_stopped(manifests[0], 137), *(_stopped(m, REPLAN_EXIT_CODE, "{not json")
                                           for m in manifests[1:])]
    d = reconcile.decide(state(d0.status, pods, s=s))
    assert d.replan is None and d.restarted and d.status["restarts"] == 1
    # a request that cannot be read still re-plans (with no measured links)
    only = [_stopped(m, REPLAN_EXIT_CODE, "{not json") for m in manifests]
    d = reconcile.decide(state(d0.status, only, s=s))
    assert d.replan == "Replanned" and d.link_speeds == {}
    views = [status.pod_view(p) for p in only]
    assert all(v.asks_replan and v.exit_code == REPLAN_EXIT_CODE for v in views)
    assert status.replan_request(views) is not None


def test_the_plan_config_map_carries_replan_inputs_only_when_the_job_may_replan() -> None:
    from spantrain_planner.core import contract

    plan = make_plan()
    with_ckpt = spec(training={"globalBatch": 16, "checkpoint": {"path": "/ckpt"}})
    cm = render.config_map(JOB, with_ckpt, plan, replan_inputs="{}")
    assert contract.REPLAN_INPUTS_FILE in cm["data"]
    no_ckpt = spec()
    assert contract.REPLAN_INPUTS_FILE not in render.config_map(
        JOB, no_ckpt, plan, replan_inputs="{}")["data"]
    off = spec(training={"globalBatch": 16, "checkpoint": {"path": "/ckpt"}},
               planner={"adapt": "rebalance"})
    assert not render.may_replan(off) and render.may_replan(with_ckpt)
