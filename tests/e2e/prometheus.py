"""A real Prometheus for end-to-end tests: scrape configuration, process, dashboard queries.

Role: test support, no tests of its own. ``scrape_config`` writes the prometheus.yml that an
end-to-end test runs Debian's ``/usr/bin/prometheus`` with on the host: pods discovered with
``kubernetes_sd_configs`` (role ``pod``, the test cluster's API server, TLS client
certificates), kept when they are the SpanTrain operator (pod labels
``app.kubernetes.io/name=spantrain``, ``app.kubernetes.io/component=operator``, container port
named ``metrics``) or a SpanTrain worker (pod label ``spantrain.io/role=worker``, container port
named ``metrics``), scraped by pod IP every 2 s.

Debian's ``prometheus`` package (2.42 in bookworm) is built without the Kubernetes service
discovery (``kubernetes_sd_configs`` is "field not found"). ``PodDiscovery`` bridges the gap: a
loopback HTTP server that lists the namespace's pods from the API server (same TLS client
certificates, stdlib only) and answers Prometheus' ``http_sd_configs`` with the very
``__meta_kubernetes_pod_*`` labels the Kubernetes SD would give, so one set of relabelling
rules serves both. ``run_prometheus(scrape_config(...))`` uses the Kubernetes SD when the
binary has it (``promtool check config``) and rewrites it to the bridge otherwise
(``scrape_config(..., discovery_url=...)`` writes the bridged form directly).

``running_prometheus`` starts the server on a
free loopback port with its TSDB in a temporary directory, waits for ``/-/ready`` and stops it
(and removes the directory) on exit. ``dashboard_queries`` reads the chart's Grafana dashboard
and returns every panel's PromQL with the template variables filled in; ``query_has_data``
asks ``/api/v1/query`` whether an expression returns anything.

Label contract (the same as ``spantrain_worker.metrics``, ``spantrain_operator.metrics`` and
the dashboard): the series name their SpanTrainJob themselves with ``spantrain_namespace`` and
``spantrain_job`` (workers also ``stage``, ``rank``, ``device``), because Prometheus owns the
target labels ``job`` (here ``spantrain-operator`` / ``spantrain-workers``) and ``namespace``.
The scrape adds only target metadata that the exposition lacks: ``namespace``, ``pod``,
``node`` and, for workers, ``spantrain_attempt`` and ``replica`` from the pod labels.

Stdlib and PyYAML only: must not import torch, kopf, the Kubernetes client or the SpanTrain
packages (it runs beside them, not inside).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import yaml

PROMETHEUS = Path("/usr/bin/prometheus")
SCRAPE_INTERVAL = "2s"
OPERATOR_JOB = "spantrain-operator"
WORKER_JOB = "spantrain-workers"

# Prometheus requests go to 127.0.0.1 directly, whatever HTTP(S)_PROXY the test runs with.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusError(RuntimeError):
    """Prometheus did not start, or answered a query with an error."""


# ---------------------------------------------------------------------------------------------
# configuration


def _meta(name: str) -> str:
    return f"__meta_kubernetes_{name}"


def _pod_label(name: str) -> str:
    """The discovery label of a pod label (every character outside [a-zA-Z0-9_] becomes _)."""
    return _meta("pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", name))


def _target_labels() -> list[dict[str, Any]]:
    """Where a target came from: namespace, pod and node (all targets)."""
    return [
        {"source_labels": [_meta("namespace")], "target_label": "namespace"},
        {"source_labels": [_meta("pod_name")], "target_label": "pod"},
        {"source_labels": [_meta("pod_node_name")], "target_label": "node"},
    ]


def _sd(api_server: str, ca_file: Path, cert_file: Path, key_file: Path,
        namespaces: Sequence[str], discovery_url: str | None) -> dict[str, Any]:
    """The discovery part of a scrape job: Kubernetes SD, or the ``PodDiscovery`` bridge."""
    names = sorted(set(namespaces))
    if discovery_url is not None:
        base = discovery_url.rstrip("/")
        return {"http_sd_configs": [
            {"url": f"{base}/targets/{ns}", "refresh_interval": SCRAPE_INTERVAL} for ns in names
        ]}
    return {"kubernetes_sd_configs": [{
        "role": "pod",
        "api_server": api_server,
        "tls_config": {
            "ca_file": str(ca_file),
            "cert_file": str(cert_file),
            "key_file": str(key_file),
        },
        "namespaces": {"names": names},
    }]}


def scrape_config(
    api_server: str,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    namespace: str,
    *,
    operator_namespace: str | None = None,
    discovery_url: str | None = None,
) -> str:
    """prometheus.yml scraping the SpanTrain operator and worker pods every 2 s.

    ``namespace`` is where the SpanTrainJobs (their worker pods) live; the operator is looked
    for there too, and in ``operator_namespace`` when the chart went elsewhere. Pods are
    discovered with ``kubernetes_sd_configs`` against ``api_server``, or, with
    ``discovery_url`` (a running ``PodDiscovery``), with ``http_sd_configs`` through it.
    """
    namespaces = [namespace, operator_namespace or namespace]
    operator: dict[str, Any] = {
        "job_name": OPERATOR_JOB,
        "scrape_interval": SCRAPE_INTERVAL,
        "scrape_timeout": SCRAPE_INTERVAL,
        **_sd(api_server, ca_file, cert_file, key_file, namespaces, discovery_url),
        "relabel_configs": [
            {
                "action": "keep",
                "source_labels": [
                    _pod_label("app.kubernetes.io/name"),
                    _pod_label("app.kubernetes.io/component"),
                    _meta("pod_container_port_name"),
                ],
                "separator": ";",
                "regex": "spantrain;operator;metrics",
            },
            *_target_labels(),
        ],
    }
    workers: dict[str, Any] = {
        "job_name": WORKER_JOB,
        "scrape_interval": SCRAPE_INTERVAL,
        "scrape_timeout": SCRAPE_INTERVAL,
        **_sd(api_server, ca_file, cert_file, key_file, [namespace], discovery_url),
        "relabel_configs": [
            {
                "action": "keep",
                "source_labels": [
                    _pod_label("spantrain.io/role"),
                    _meta("pod_container_port_name"),
                ],
                "separator": ";",
                "regex": "worker;metrics",
            },
            *_target_labels(),
            {"source_labels": [_pod_label("spantrain.io/attempt")],
             "target_label": "spantrain_attempt"},
            {"source_labels": [_pod_label("spantrain.io/replica-index")],
             "target_label": "replica"},
        ],
    }
    return _dump({
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
        },
        "scrape_configs": [operator, workers],
    })


def static_config(targets: Sequence[str], *, job_name: str = "static") -> str:
    """prometheus.yml scraping fixed ``host:port`` targets every 2 s (self-checks)."""
    return _dump({
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
        },
        "scrape_configs": [
            {"job_name": job_name, "static_configs": [{"targets": list(targets)}]},
        ],
    })


def _dump(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# pod discovery for a Prometheus without the Kubernetes SD (Debian's)


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """HTTP SD target groups of one pod, labelled as Prometheus' Kubernetes SD (role ``pod``)
    labels them: one per container port (``<pod IP>:<port>``), or one per container without
    ports (``<pod IP>``); none before the pod has an IP."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        return []
    base: dict[str, str] = {
        _meta("namespace"): str(meta.get("namespace", "")),
        _meta("pod_name"): str(meta.get("name", "")),
        _meta("pod_uid"): str(meta.get("uid", "")),
        _meta("pod_ip"): str(ip),
        _meta("pod_node_name"): str(spec.get("nodeName", "")),
        _meta("pod_host_ip"): str(status.get("hostIP", "")),
        _meta("pod_phase"): str(status.get("phase", "")),
        _meta("pod_ready"): next(
            (str(c.get("status", "unknown")).lower()
             for c in status.get("conditions") or [] if c.get("type") == "Ready"),
            "unknown",
        ),
    }
    for key, value in (meta.get("labels") or {}).items():
        base[_meta("pod_label_" + _sanitize(key))] = str(value)
        base[_meta("pod_labelpresent_" + _sanitize(key))] = "true"
    for key, value in (meta.get("annotations") or {}).items():
        base[_meta("pod_annotation_" + _sanitize(key))] = str(value)
        base[_meta("pod_annotationpresent_" + _sanitize(key))] = "true"
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller"):
            base[_meta("pod_controller_kind")] = str(owner.get("kind", ""))
            base[_meta("pod_controller_name")] = str(owner.get("name", ""))
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    groups: list[dict[str, Any]] = []
    for container in spec.get("containers") or []:
        labels = {
            **base,
            _meta("pod_container_name"): str(container.get("name", "")),
            _meta("pod_container_image"): str(container.get("image", "")),
            _meta("pod_container_init"): "false",
        }
        ports = container.get("ports") or []
        if not ports:
            groups.append({"targets": [host], "labels": labels})
        for port in ports:
            groups.append({"targets": [f"{host}:{port.get('containerPort')}"], "labels": {
                **labels,
                _meta("pod_container_port_name"): str(port.get("name", "")),
                _meta("pod_container_port_number"): str(port.get("containerPort", "")),
                _meta("pod_container_port_protocol"): str(port.get("protocol", "TCP")),
            }})
    return groups


class PodDiscovery:
    """Loopback HTTP SD endpoint: ``GET /targets/<namespace>`` lists that namespace's pods from
    the API server (client-certificate TLS; plain ``http://`` for tests) as ``pod_targets``.
    A failed listing answers 503, so Prometheus keeps its last targets. Use as a context
    manager; ``url`` is what ``scrape_config(discovery_url=...)`` wants."""

    def __init__(
        self,
        api_server: str,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        *,
        timeout: float = 5.0,
    ) -> None:
        self.api_server = api_server.rstrip("/")
        self.timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.api_server.startswith("https://"):
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if cert_file is not None:
                context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def pods(self, namespace: str) -> list[dict[str, Any]]:
        url = f"{self.api_server}/api/v1/namespaces/{urllib.parse.quote(namespace)}/pods"
        with self._opener.open(url, timeout=self.timeout) as resp:
            items: list[dict[str, Any]] = json.loads(resp.read()).get("items") or []
        return items

    def targets(self, namespace: str) -> list[dict[str, Any]]:
        return [g for pod in self.pods(namespace) for g in pod_targets(pod)]

    def __enter__(self) -> PodDiscovery:
        discovery = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) != 2 or parts[0] != "targets":
                    self.send_error(404)
                    return
                try:
                    body = json.dumps(discovery.targets(urllib.parse.unquote(parts[1])))
                except (OSError, ValueError) as err:
                    self.send_error(503, explain=str(err))
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def supports_kubernetes_sd(binary: Path = PROMETHEUS) -> bool:
    """Whether ``binary`` was built with the Kubernetes SD (asks the ``promtool`` beside it;
    Debian's is not)."""
    promtool = binary.with_name("promtool")
    if not promtool.exists():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.yml"
        probe.write_text(_dump({"scrape_configs": [
            {"job_name": "probe", "kubernetes_sd_configs": [{"role": "pod"}]}]}))
        done = subprocess.run([str(promtool), "check", "config", "--syntax-only", str(probe)],
                              capture_output=True, check=False)
    return done.returncode == 0


# ---------------------------------------------------------------------------------------------
# the server


@dataclass(frozen=True)
class PrometheusServer:
    """A running Prometheus: its base URL and where it keeps its files."""

    url: str
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


@contextlib.contextmanager
def running_prometheus(
    config: str,
    *,
    binary: Path = PROMETHEUS,
    ready_timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> Iterator[PrometheusServer]:
    """Run ``binary`` with ``config`` (prometheus.yml text) on 127.0.0.1:<free port>, its TSDB
    in a temporary directory; yield once ``/-/ready`` answers 200; terminate it and remove the
    directory on exit. Raises ``PrometheusError`` (with its log) if it does not get ready."""
    if not binary.exists():
        raise PrometheusError(f"{binary} is missing: apt-get install prometheus")
    workdir = Path(tempfile.mkdtemp(prefix="spantrain-prometheus-"))
    try:
        config_file = workdir / "prometheus.yml"
        config_file.write_text(config)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with (workdir / "prometheus.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    str(binary),
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1d",
                    *extra_args,
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=workdir, start_new_session=True,
            )
        server = PrometheusServer(url=url, workdir=workdir, process=process)
        try:
            _wait_ready(server, ready_timeout)
            yield server
        finally:
            _stop(process)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def run_prometheus(
    config: str,
    *,
    binary: Path = PROMETHEUS,
    discovery: Literal["auto", "kubernetes", "http"] = "auto",
    ready_timeout: float = 60.0,
) -> Iterator[str]:
    """``running_prometheus`` for a ``scrape_config`` text, yielding the base URL. Where
    ``binary`` lacks the Kubernetes SD (Debian's) or ``discovery`` is ``http``, every
    ``kubernetes_sd_configs`` entry (role ``pod``) becomes ``http_sd_configs`` served by a
    ``PodDiscovery`` bridge to the same API server with the same client certificates, and
    the relabelling rules stay as they are."""
    use_http = discovery == "http" or (
        discovery == "auto" and not supports_kubernetes_sd(binary)
    )
    with contextlib.ExitStack() as stack:
        if use_http:
            config = _bridge_kubernetes_sd(config, stack)
        server = stack.enter_context(
            running_prometheus(config, binary=binary, ready_timeout=ready_timeout))
        yield server.url


def _bridge_kubernetes_sd(config: str, stack: contextlib.ExitStack) -> str:
    doc = yaml.safe_load(config)
    bridges: dict[tuple[str, str, str, str], PodDiscovery] = {}
    for job in doc.get("scrape_configs") or []:
        sds = job.pop("kubernetes_sd_configs", None)
        if not sds:
            continue
        http: list[dict[str, Any]] = list(job.get("http_sd_configs") or [])
        for sd in sds:
            if sd.get("role") != "pod":
                raise PrometheusError(f"the pod discovery bridge serves role pod, not {sd}")
            tls = sd.get("tls_config") or {}
            key = (str(sd.get("api_server", "")), str(tls.get("ca_file", "")),
                   str(tls.get("cert_file", "")), str(tls.get("key_file", "")))
            if key not in bridges:
                api, ca, cert, pkey = key
                bridges[key] = stack.enter_context(PodDiscovery(
                    api, Path(ca) if ca else None, Path(cert) if cert else None,
                    Path(pkey) if pkey else None))
            names = (sd.get("namespaces") or {}).get("names") or []
            if not names:
                raise PrometheusError("the pod discovery bridge needs namespaces.names")
            for ns in names:
                http.append({"url": f"{bridges[key].url}/targets/{ns}",
                             "refresh_interval": job.get("scrape_interval", SCRAPE_INTERVAL)})
        job["http_sd_configs"] = http
    return _dump(doc)


def _wait_ready(server: PrometheusServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise PrometheusError(
                f"prometheus exited with code {server.process.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError):
            if _get(f"{server.url}/-/ready", timeout=2.0)[0] == 200:
                return
        time.sleep(0.2)
    raise PrometheusError(f"prometheus not ready after {timeout:.0f}s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)


# ---------------------------------------------------------------------------------------------
# queries


def query(base_url: str, expr: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """The ``data`` of an instant query; ``PrometheusError`` on a query Prometheus rejects."""
    url = f"{base_url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    status, body = _get(url, timeout)
    try:
        answer = json.loads(body)
    except ValueError:
        raise PrometheusError(f"{expr!r}: HTTP {status}, not JSON: {body[:200]!r}") from None
    if answer.get("status") != "success":
        raise PrometheusError(
            f"{expr!r}: {answer.get('errorType', f'HTTP {status}')}: {answer.get('error')}"
        )
    data: dict[str, Any] = answer["data"]
    return data


def query_has_data(base_url: str, expr: str, *, timeout: float = 10.0) -> bool:
    """Whether the instant query ``expr`` returns at least one series (or a scalar/string);
    a query Prometheus rejects raises ``PrometheusError`` rather than reading as no data."""
    data = query(base_url, expr, timeout=timeout)
    if data.get("resultType") in ("scalar", "string"):
        return True
    return bool(data.get("result"))


def wait_for_data(
    base_url: str, expr: str, *, timeout: float = 60.0, interval: float = 1.0
) -> bool:
    """Poll ``query_has_data`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if query_has_data(base_url, expr):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def active_targets(base_url: str, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """``/api/v1/targets``' active targets (labels, health, lastError): what was discovered."""
    status, body = _get(f"{base_url.rstrip('/')}/api/v1/targets?state=active", timeout)
    answer = json.loads(body)
    if answer.get("status") != "success":
        raise PrometheusError(f"targets: HTTP {status}: {answer.get('error')}")
    targets: list[dict[str, Any]] = answer["data"]["activeTargets"]
    return targets


# ---------------------------------------------------------------------------------------------
# the dashboard

#: Grafana's built-in interval variables, replaced by ``rate_interval``.
_INTERVALS = {"__rate_interval", "__interval", "__range"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def substitute(
    expr: str, variables: Mapping[str, str], *, rate_interval: str = "1m"
) -> str:
    """``expr`` with Grafana's ``$name``, ``${name}``, ``${name:fmt}`` and ``[[name]]`` replaced
    from ``variables`` (built-in intervals by ``rate_interval``); an unknown name raises
    ``KeyError``."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in _INTERVALS:
            return rate_interval
        return variables[name]

    return _VARIABLE.sub(repl, expr)


def dashboard_queries(
    path: Path,
    *,
    values: Mapping[str, str] | None = None,
    rate_interval: str = "1m",
) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every target of every panel (rows' nested panels too), in
    order, with the dashboard's template variables replaced by ``values`` or else by ``.*``
    (the dashboard matches them with ``=~``), and Grafana's interval variables by
    ``rate_interval``."""
    dash = json.loads(Path(path).read_text())
    variables = {
        str(v["name"]): ".*" for v in (dash.get("templating") or {}).get("list", [])
    }
    variables.update(values or {})
    out: list[tuple[str, str]] = []

    def walk(panels: Sequence[Mapping[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets") or []:
                expr = target.get("expr")
                if expr:
                    out.append((str(panel.get("title", "")),
                                substitute(str(expr), variables, rate_interval=rate_interval)))
            walk(panel.get("panels") or [])

    walk(dash.get("panels") or [])
    return out
