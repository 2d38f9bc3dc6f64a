"""Self-check of ``tests.e2e.prometheus``: a real Prometheus scrapes a ``prometheus_client``
endpoint on loopback and answers a query; the generated SD config passes ``promtool``; the
chart's dashboard queries all parse in Prometheus. Skips where Debian's ``prometheus``
package is missing (``apt-get install prometheus``)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.e2e import prometheus as prom

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "helm" / "spantrain" / "dashboards" / "spantrain.json"

needs_prometheus = pytest.mark.skipif(
    not prom.PROMETHEUS.exists(), reason="needs /usr/bin/prometheus: apt-get install prometheus"
)


@needs_prometheus
def test_scrapes_a_local_endpoint_and_answers_queries() -> None:
    client = pytest.importorskip("prometheus_client")
    registry = client.CollectorRegistry()
    gauge = client.Gauge("spantrain_selfcheck_value", "Self-check.", ["spantrain_job"],
                         registry=registry)
    gauge.labels("demo").set(42)
    port = prom.free_port()
    server, thread = client.start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        config = prom.static_config([f"127.0.0.1:{port}"], job_name="selfcheck")
        with prom.running_prometheus(config) as running:
            assert prom.wait_for_data(
                running.url, 'spantrain_selfcheck_value{spantrain_job="demo"} == 42', timeout=30
            ), running.log_tail()
            assert prom.query_has_data(running.url, 'up{job="selfcheck"} == 1')
            assert not prom.query_has_data(running.url, "spantrain_selfcheck_absent")
            with pytest.raises(prom.PrometheusError):
                prom.query_has_data(running.url, "rate(")
            # every dashboard expression is valid PromQL (no data needed for that)
            for title, expr in prom.dashboard_queries(DASHBOARD):
                try:
                    prom.query(running.url, expr)
                except prom.PrometheusError as err:
                    raise AssertionError(f"panel {title!r}: {err}") from None
            workdir = running.workdir
        assert running.process.poll() is not None and not workdir.exists()
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_scrape_config_keeps_operator_and_workers(tmp_path: Path) -> None:
    files = [tmp_path / n for n in ("ca.crt", "client.crt", "client.key")]
    text = prom.scrape_config("https://10.0.0.1:6443", *files, "ml",
                              operator_namespace="spantrain")
    config = yaml.safe_load(text)
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert set(jobs) == {prom.OPERATOR_JOB, prom.WORKER_JOB}
    assert config["global"]["scrape_interval"] == "2s"
    sd = jobs[prom.OPERATOR_JOB]["kubernetes_sd_configs"][0]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["ml", "spantrain"]
    assert sd["tls_config"]["cert_file"] == str(files[1])
    keep = jobs[prom.WORKER_JOB]["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == "worker;metrics"
    assert keep["source_labels"][0] == "__meta_kubernetes_pod_label_spantrain_io_role"
    targets = {r.get("target_label") for r in jobs[prom.WORKER_JOB]["relabel_configs"]}
    # never the labels the series carry themselves (they would turn into exported_*)
    assert not targets & {"job", "spantrain_job", "spantrain_namespace", "stage", "rank"}
    assert {"namespace", "pod", "node", "spantrain_attempt"} <= targets


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (package prometheus)")
@pytest.mark.parametrize("discovery", ["kubernetes", "http"])
def test_promtool_accepts_the_scrape_config(tmp_path: Path, discovery: str) -> None:
    """The config is valid; where the binary lacks Kubernetes SD (Debian's), promtool must
    refuse the kubernetes form for exactly that reason -- which is why the bridge exists."""
    lacks_k8s_sd = discovery == "kubernetes" and not prom.supports_kubernetes_sd()
    files = [tmp_path / n for n in ("ca.crt", "client.crt", "client.key")]
    for f in files:
        f.write_text("")
    config = tmp_path / "prometheus.yml"
    url = "http://127.0.0.1:1" if discovery == "http" else None
    config.write_text(prom.scrape_config("https://10.0.0.1:6443", *files, "ml",
                                         discovery_url=url))
    done = subprocess.run(["promtool", "check", "config", "--syntax-only", str(config)],
                          capture_output=True, text=True, check=False)
    if lacks_k8s_sd:
        assert done.returncode != 0
        assert "kubernetes_sd_configs" in done.stdout + done.stderr
        return
    assert done.returncode == 0, done.stdout + done.stderr


def _pod(name: str, labels: dict[str, str], port: int, port_name: str = "metrics") -> dict:
    return {
        "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}", "labels": labels},
        "spec": {"nodeName": "node-a", "containers": [
            {"name": "worker", "image": "img", "ports": [
                {"name": "rendezvous", "containerPort": 29500},
                {"name": port_name, "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_pod_targets_label_like_kubernetes_sd() -> None:
    groups = prom.pod_targets(_pod("w", {"spantrain.io/role": "worker"}, 9400))
    assert [g["targets"] for g in groups] == [["127.0.0.1:29500"], ["127.0.0.1:9400"]]
    labels = groups[1]["labels"]
    assert labels["__meta_kubernetes_pod_label_spantrain_io_role"] == "worker"
    assert labels["__meta_kubernetes_pod_container_port_name"] == "metrics"
    assert labels["__meta_kubernetes_pod_ready"] == "true"
    assert prom.pod_targets({"metadata": {}, "status": {}}) == []


@needs_prometheus
@pytest.mark.parametrize("how", ["run_prometheus", "discovery_url"])
def test_http_discovery_keeps_workers_and_operator(how: str) -> None:
    """The whole path without a cluster: a fake API server lists a worker pod, an operator pod
    and an unrelated pod (all on 127.0.0.1), the bridge turns them into targets, Prometheus
    keeps the two SpanTrain ones by the same rules as with the Kubernetes SD and scrapes them."""
    client = pytest.importorskip("prometheus_client")
    registry = client.CollectorRegistry()
    client.Gauge("spantrain_selfcheck_value", "Self-check.", registry=registry).set(7)
    port = prom.free_port()
    server, thread = client.start_http_server(port, addr="127.0.0.1", registry=registry)
    pods = {"items": [
        _pod("gpt-a0-r0", {"spantrain.io/role": "worker", "spantrain.io/attempt": "0",
                           "spantrain.io/replica-index": "0"}, port),
        _pod("spantrain-operator-x", {"app.kubernetes.io/name": "spantrain",
                                      "app.kubernetes.io/component": "operator"}, port),
        _pod("other", {"app": "other"}, port),
    ]}

    class Api(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(pods).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    api = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    api_thread = threading.Thread(target=api.serve_forever, daemon=True)
    api_thread.start()
    api_url = f"http://127.0.0.1:{api.server_address[1]}"
    try:
        with contextlib.ExitStack() as stack:
            if how == "discovery_url":
                bridge = stack.enter_context(prom.PodDiscovery(api_url))
                config = prom.scrape_config(api_url, Path("ca"), Path("c"), Path("k"), "ml",
                                            discovery_url=bridge.url)
                running = stack.enter_context(prom.running_prometheus(config))
                url = running.url
            else:  # the Kubernetes SD config, rewritten to the bridge (the e2e test's path)
                config = prom.scrape_config(api_url, Path("ca"), Path("c"), Path("k"), "ml")
                url = stack.enter_context(prom.run_prometheus(config, discovery="http"))
            assert prom.wait_for_data(
                url,
                'spantrain_selfcheck_value{job="spantrain-workers", pod="gpt-a0-r0", '
                'namespace="ml", node="node-a", spantrain_attempt="0", replica="0"}',
                timeout=40,
            )
            assert prom.wait_for_data(
                url, 'spantrain_selfcheck_value{job="spantrain-operator"}', timeout=20)
            jobs = {(t["labels"]["job"], t["labels"]["pod"])
                    for t in prom.active_targets(url)}
            assert jobs == {("spantrain-workers", "gpt-a0-r0"),
                            ("spantrain-operator", "spantrain-operator-x")}
    finally:
        api.shutdown()
        api.server_close()
        server.shutdown()
        thread.join(timeout=5)


def test_dashboard_queries_fill_variables() -> None:
    queries = prom.dashboard_queries(DASHBOARD, values={"job": "gpt"})
    assert queries and all("$" not in expr for _, expr in queries)
    measured = [e for t, e in queries if t.startswith("Throughput")]
    assert any('spantrain_job=~"gpt"' in e and 'spantrain_namespace=~".*"' in e
               for e in measured)
    assert prom.substitute("x[$__rate_interval] ${job:regex} [[job]]", {"job": "a"},
                           rate_interval="30s") == "x[30s] a a"
    with pytest.raises(KeyError):
        prom.substitute("$nope", {})
