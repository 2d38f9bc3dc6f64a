"""A real, throw-away Kubernetes control plane for tests: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and KWOK (fake nodes + simulated pod lifecycle).

Role: start and stop the processes, generate the per-run PKI, write kubeconfigs, and offer small
helpers the cluster tests share (fake nodes, namespaces, forcing a fake pod to Failed).
Must not import: the SpanTrain code under test (``spantrain_planner``, ``spantrain_worker``,
``spantrain_operator``), kopf, torch or pytest.  Only the standard
library, the ``openssl`` CLI and the ``kubernetes`` Python client are used.

Binaries come from ``scripts/k8s-binaries`` (``BIN=$(scripts/k8s-binaries | tail -1)``); etcd is
Debian's ``/usr/bin/etcd`` (3.4).  Everything runs on 127.0.0.1 with random free ports, and the
work directory (etcd data, PKI, kubeconfigs, logs) lives on ``/dev/shm`` and is removed on exit.

Usage::

    with ControlPlane(bin_dir) as cp:
        api = cp.api_client()
        cp.add_nodes([{"name": "edge-0", "labels": {"spantrain.io/tier": "edge"},
                       "allocatable": {"cpu": "4", "memory": "8Gi"}}])
        cp.wait_nodes_ready(["edge-0"])

Existing cluster: set ``SPANTRAIN_TEST_KUBECONFIG`` and :meth:`ControlPlane.from_env` returns an
:class:`ExistingCluster` (same helper methods, nothing started or stopped) instead.  The variable is
either the path of a kubeconfig file, or ``1``/``true``/``env`` to use ``$KUBECONFIG`` (default
``~/.kube/config``).  Fake-node helpers then need KWOK running in that cluster with
``--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake``.

Pod lifecycle on fake nodes (KWOK stages written by :func:`kwok_config`):

* a pod bound to a fake node goes Running/Ready right away (``pod-ready``);
* a Running pod owned by a Job goes Succeeded (``pod-complete``);
* a deleted pod is removed once it has no finalizers left (``pod-delete``; unlike KWOK's default
  "fast" stage it does NOT strip finalizers, so operator finalizers on pods behave as with a
  kubelet);
* **forcing a pod to Failed** -- two ways:

  1. annotate it, before or after it runs: ``spantrain.io/kwok-fail-after: "0s"`` (any Go duration);
     KWOK then moves the Running pod to ``phase: Failed`` with every container terminated
     (exitCode 1, reason ``Error``) after that delay;
  2. or write the status yourself through the status subresource, which is what
     :func:`mark_pod_failed` does (``CoreV1Api.patch_namespaced_pod_status``).  Do it only after
     the pod is Running (KWOK's ``pod-ready`` stage fires on pods without a podIP and would
     overwrite an earlier status).

etcd 3.4 quirks handled here (Debian bookworm ships 3.4.23, below the 3.4.31 that
RequestWatchProgress needs): kube-apiserver runs with ``--feature-gates=WatchList=false`` (else
every WATCH with ``allowWatchBookmarks=true&resourceVersion=0`` -- what KWOK's informers send --
fails with "required storage feature RequestWatchProgress is disabled" and KWOK lags 10-40 s per
pod), KCM with ``WatchListClient=false``, and etcd with
``--experimental-watch-progress-notify-interval`` so a WATCH from a LIST's revision never stalls
into "Too large resource version".
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import datetime as _dt
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
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from spantrain_testbed.testbed import pid_alive

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_ANNOTATION_VALUE = "fake"
KWOK_FAIL_ANNOTATION = "spantrain.io/kwok-fail-after"

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.1/16"  # KWOK hands pod IPs out of this range (its default has only 254)
NODE_IP = "10.240.0.1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
ETCD_PROGRESS_NOTIFY = "250ms"

# Controllers that need a cloud provider; `*` would only log that they are skipped.
_KCM_CONTROLLERS = (
    "*,-cloud-node-lifecycle-controller,-service-lb-controller,-node-route-controller"
)

_LOG_TAIL_LINES = 40
WORK_PREFIX = "spantrain-k8s-"
OWNER_FILE = "owner.pid"


class ControlPlaneError(RuntimeError):
    """A component failed to start or become ready (the message carries its log tail)."""


# --------------------------------------------------------------------------------------------
# small utilities


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """Last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


_ERROR_LINE = re.compile(r"^(Error:|[EF]\d{4} |.*\"level\":\"(ERROR|error|fatal|panic)\")")


def failure_report(path: Path, lines: int = _LOG_TAIL_LINES, errors: int = 10) -> str:
    """Error lines from anywhere in a log (first ``errors``) plus its last ``lines`` lines.

    Go programs print "Error: unknown flag" above a long usage text, so the tail alone can miss
    the one line that matters.
    """
    tail = log_tail(path, lines)
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return f"--- {path} is missing ---\n"
    tail_lines = set(tail.splitlines())
    found = [ln for ln in text.splitlines() if _ERROR_LINE.match(ln) and ln not in tail_lines]
    report = ""
    if found:
        report += f"--- error lines in {path} ---\n" + "\n".join(found[:errors]) + "\n"
    return report + f"--- last lines of {path} ---\n{tail}"


def reap_stale_work_dirs(root: Path) -> list[Path]:
    """Remove work dirs left by test processes that died without cleaning up (SIGKILL).

    Only directories named ``spantrain-k8s-*`` with an ``owner.pid`` of a dead process are
    touched; their components already died with their parent (PR_SET_PDEATHSIG).
    """
    removed: list[Path] = []
    for path in root.glob(WORK_PREFIX + "*"):
        try:
            pid = int((path / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    """Ask the kernel to SIGKILL the child when the parent dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# PKI (openssl CLI)


@dataclass(frozen=True)
class Pki:
    """Paths of the per-run certificates and keys."""

    dir: Path
    ca_crt: Path
    ca_key: Path
    apiserver_crt: Path
    apiserver_key: Path
    sa_key: Path
    sa_pub: Path
    clients: dict[str, tuple[Path, Path]]  # name -> (crt, key)


def _openssl(cwd: Path, *args: str) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise ControlPlaneError(
            f"openssl {' '.join(args)} failed ({proc.returncode}):\n"
            + proc.stderr.decode("utf-8", "replace")
        )


def _default_sans(extra_ips: Sequence[str] = ()) -> list[str]:
    return [
        "IP:127.0.0.1",
        f"IP:{SERVICE_IP}",
        *(f"IP:{ip}" for ip in extra_ips),
        "DNS:localhost",
        "DNS:kubernetes",
        "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
    ]


def issue_cert(
    pki_dir: Path, stem: str, subj: str, *, server_sans: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Issue ``<stem>.crt``/``<stem>.key`` signed by the CA in ``pki_dir``.

    A client certificate unless ``server_sans`` is given (``IP:…``/``DNS:…`` entries), which
    makes it a serving certificate for those names.
    """
    d = pki_dir
    if server_sans is None:
        ext = "client.ext"
    else:
        ext = f"{stem}.ext"
        (d / ext).write_text(
            f"subjectAltName={','.join(server_sans)}\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
    _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{stem}.key",
             "-out", f"{stem}.csr", "-subj", subj)
    _openssl(d, "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "7", "-extfile", ext, "-out", f"{stem}.crt")
    return d / f"{stem}.crt", d / f"{stem}.key"


def make_pki(
    directory: Path,
    clients: Mapping[str, tuple[str, Sequence[str]]],
    server_ips: Sequence[str] = (),
) -> Pki:
    """Create a CA, the apiserver serving cert, the service-account key pair and client certs.

    ``clients`` maps a file stem to ``(common_name, groups)``; groups become O= entries, which
    is how kube-apiserver reads group membership from client certificates. ``server_ips`` are
    extra addresses the apiserver's certificate is valid for (besides 127.0.0.1).
    """
    if shutil.which("openssl") is None:
        raise ControlPlaneError("the 'openssl' CLI is required (apt-get install openssl)")
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=spantrain-test-ca")
    (d / "client.ext").write_text(
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    )
    apiserver_crt, apiserver_key = issue_cert(
        d, "apiserver", "/CN=kube-apiserver", server_sans=_default_sans(server_ips)
    )
    _openssl(d, "genrsa", "-out", "sa.key", "2048")
    _openssl(d, "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
    issued: dict[str, tuple[Path, Path]] = {}
    for stem, (cn, groups) in clients.items():
        subj = "".join(f"/O={g}" for g in groups) + f"/CN={cn}"
        issued[stem] = issue_cert(d, stem, subj)
    return Pki(
        dir=d,
        ca_crt=d / "ca.crt",
        ca_key=d / "ca.key",
        apiserver_crt=apiserver_crt,
        apiserver_key=apiserver_key,
        sa_key=d / "sa.key",
        sa_pub=d / "sa.pub",
        clients=issued,
    )


def write_kubeconfig(path: Path, server: str, ca: Path, crt: Path, key: Path, user: str) -> Path:
    """Write a self-contained kubeconfig (data embedded; JSON is valid YAML)."""

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "spantrain-test",
                "cluster": {"server": server, "certificate-authority-data": b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)},
            }
        ],
        "contexts": [
            {
                "name": "spantrain-test",
                "context": {"cluster": "spantrain-test", "user": user, "namespace": "default"},
            }
        ],
        "current-context": "spantrain-test",
        "preferences": {},
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------------------------
# KWOK stages


def _pod_stage(
    name: str,
    match: list[dict[str, Any]],
    next_: dict[str, Any],
    delay: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
        "selector": {"matchExpressions": match},
        "next": next_,
    }
    if delay is not None:
        spec["delay"] = delay
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": name},
        "spec": spec,
    }


_NOT_DELETED = {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}
_RUNNING = {"key": ".status.phase", "operator": "In", "values": ["Running"]}
_FAIL_KEY = f'.metadata.annotations["{KWOK_FAIL_ANNOTATION}"]'

# Same template as KWOK v0.7.0 kustomize/stage/pod/fast/pod-ready.yaml.
_POD_READY_TEMPLATE = """\
{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: ContainersReady
{{ range .spec.readinessGates }}
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: {{ .conditionType | Quote }}
{{ end }}
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
initContainerStatuses:
{{ range .spec.initContainers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  {{ if eq .restartPolicy "Always" }}
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
  {{ else }}
  state:
    terminated:
      exitCode: 0
      finishedAt: {{ $now | Quote }}
      reason: Completed
      startedAt: {{ $now | Quote }}
  {{ end }}
{{ end }}
hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) \
( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
phase: Running
startTime: {{ $now | Quote }}
"""


def _terminated_template(phase: str, exit_code: int, reason: str) -> str:
    return f"""\
{{{{ $now := Now }}}}
conditions:
- lastTransitionTime: {{{{ $now | Quote }}}}
  status: "False"
  type: Ready
  reason: PodCompleted
- lastTransitionTime: {{{{ $now | Quote }}}}
  status: "False"
  type: ContainersReady
  reason: PodCompleted
containerStatuses:
{{{{ range .spec.containers }}}}
- image: {{{{ .image | Quote }}}}
  name: {{{{ .name | Quote }}}}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
      exitCode: {exit_code}
      finishedAt: {{{{ $now | Quote }}}}
      reason: {reason}
      startedAt: {{{{ $now | Quote }}}}
{{{{ end }}}}
phase: {phase}
"""


def kwok_stages() -> list[dict[str, Any]]:
    """The pod stages the harness gives KWOK.

    Any pod stage in the config replaces *all* of KWOK's default pod stages, so the defaults we
    still want are repeated here; node stages are not given, so KWOK keeps its default ones
    (node-initialize -> Ready, heartbeat with leases).
    """
    return [
        _pod_stage(
            "pod-ready",
            [_NOT_DELETED, {"key": ".status.podIP", "operator": "DoesNotExist"}],
            {"statusTemplate": _POD_READY_TEMPLATE},
        ),
        _pod_stage(
            "pod-complete",
            [
                _NOT_DELETED,
                _RUNNING,
                {"key": ".metadata.ownerReferences.[].kind", "operator": "In", "values": ["Job"]},
                {"key": _FAIL_KEY, "operator": "DoesNotExist"},
            ],
            {"statusTemplate": _terminated_template("Succeeded", 0, "Completed")},
        ),
        _pod_stage(
            "spantrain-pod-fail",
            [_NOT_DELETED, _RUNNING, {"key": _FAIL_KEY, "operator": "Exists"}],
            {"statusTemplate": _terminated_template("Failed", 1, "Error")},
            delay={"durationMilliseconds": 0, "durationFrom": {"expressionFrom": _FAIL_KEY}},
        ),
        _pod_stage(
            "pod-delete",
            [
                {"key": ".metadata.deletionTimestamp", "operator": "Exists"},
                {"key": ".metadata.finalizers", "operator": "DoesNotExist"},
            ],
            {"delete": True},
        ),
    ]


def kwok_config() -> str:
    """The ``--config`` file for kwok: a KwokConfiguration plus :func:`kwok_stages`."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokConfiguration", "options": {}},
        *kwok_stages(),
    ]
    return "".join("---\n" + json.dumps(doc, indent=2) + "\n" for doc in docs)


# --------------------------------------------------------------------------------------------
# helpers shared by a started control plane and an existing cluster


def mark_pod_failed(
    api: k8s_client.ApiClient,
    name: str,
    namespace: str,
    *,
    reason: str = "Error",
    message: str = "marked Failed by the test",
    exit_code: int = 1,
) -> k8s_client.V1Pod:
    """Force a (fake) pod to ``phase: Failed`` through the pods/status subresource.

    Every container gets a ``terminated`` state with ``exit_code``/``reason``; the Ready and
    ContainersReady conditions go False.  Call it once the pod is Running.
    """
    core = k8s_client.CoreV1Api(api)
    pod = core.read_namespaced_pod(name, namespace)
    now = _now()
    started = (
        pod.status.start_time.strftime("%Y-%m-%dT%H:%M:%SZ")
        if (pod.status and pod.status.start_time)
        else now
    )
    statuses = [
        {
            "name": c.name,
            "image": c.image,
            "ready": False,
            "restartCount": 0,
            "started": False,
            "state": {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": reason,
                    "message": message,
                    "startedAt": started,
                    "finishedAt": now,
                }
            },
        }
        for c in pod.spec.containers
    ]
    conditions: list[dict[str, Any]] = []
    for cond in (pod.status.conditions or []) if pod.status else []:
        entry = api.sanitize_for_serialization(cond)
        if cond.type in ("Ready", "ContainersReady"):
            entry.update(status="False", reason="PodFailed", lastTransitionTime=now)
        conditions.append(entry)
    body = {
        "status": {
            "phase": "Failed",
            "reason": reason,
            "message": message,
            "containerStatuses": statuses,
            "conditions": conditions,
        }
    }
    return core.patch_namespaced_pod_status(name, namespace, body)


def node_manifest(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a small dict into a KWOK fake ``v1.Node`` manifest.

    Keys: ``name`` (required), ``labels``, ``annotations``, ``allocatable`` (``cpu``,
    ``memory``, ``nvidia.com/gpu``, ``pods``...; defaults cpu 8 / memory 32Gi / pods 110),
    ``capacity`` (defaults to allocatable), ``taints`` (list of {key, value, effect}).
    The KWOK annotation and the usual well-known labels are filled in.
    """
    name = str(spec["name"])
    labels = {
        "type": "kwok",
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
    }
    labels.update({k: str(v) for k, v in (spec.get("labels") or {}).items()})
    annotations = {k: str(v) for k, v in (spec.get("annotations") or {}).items()}
    annotations[KWOK_NODE_ANNOTATION] = KWOK_NODE_ANNOTATION_VALUE
    allocatable = {"cpu": "8", "memory": "32Gi", "pods": "110"}
    allocatable.update({k: str(v) for k, v in (spec.get("allocatable") or {}).items()})
    capacity = dict(allocatable)
    capacity.update({k: str(v) for k, v in (spec.get("capacity") or {}).items()})
    taints = [dict(t) for t in (spec.get("taints") or [])]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"taints": taints} if taints else {},
        "status": {
            "allocatable": allocatable,
            "capacity": capacity,
            "nodeInfo": {
                "architecture": labels["kubernetes.io/arch"],
                "operatingSystem": "linux",
                "kubeletVersion": "fake",
                "kubeProxyVersion": "fake",
            },
        },
    }


def _node_ready(node: k8s_client.V1Node, *, untainted: bool = False) -> bool:
    """Ready=True; with ``untainted`` also without the ``node.kubernetes.io/not-ready`` taint,
    which the node lifecycle controller removes some time after the condition turns True
    (under load, many seconds after: nothing can be placed there until then)."""
    if untainted and any(t.key == "node.kubernetes.io/not-ready"
                         for t in (node.spec.taints or []) if node.spec):
        return False
    for cond in (node.status.conditions or []) if node.status else []:
        if cond.type == "Ready":
            return bool(cond.status == "True")
    return False


class ClusterHelpers:
    """Helpers that only need a kubeconfig; mixed into both cluster kinds."""

    @property
    def kubeconfig(self) -> Path:
        """Path of an admin kubeconfig for this cluster."""
        raise NotImplementedError

    def api_client(self) -> k8s_client.ApiClient:
        """A new ``kubernetes.client.ApiClient`` for the admin kubeconfig (caller closes it)."""
        return k8s_config.new_client_from_config(config_file=str(self.kubeconfig))

    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``KUBECONFIG`` pointing at this cluster (for subprocesses)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def add_nodes(self, specs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Create KWOK fake nodes (see :func:`node_manifest`); returns their names."""
        names: list[str] = []
        with self.api_client() as api:
            core = k8s_client.CoreV1Api(api)
            for spec in specs:
                manifest = node_manifest(spec)
                core.create_node(manifest)
                names.append(manifest["metadata"]["name"])
        return names

    def wait_nodes_ready(self, names: Iterable[str], timeout: float = 60.0, *,
                         untainted: bool = False) -> None:
        """Wait until every named node has condition Ready=True (KWOK sets it) and, with
        ``untainted``, its not-ready taint is gone too (``_node_ready``)."""
        pending = set(names)
        deadline = time.monotonic() + timeout
        with self.api_client() as api:
            core = k8s_client.CoreV1Api(api)
            while True:
                for node in core.list_node().items:
                    if node.metadata.name in pending and _node_ready(node, untainted=untainted):
                        pending.discard(node.metadata.name)
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"nodes not Ready after {timeout:.0f}s: {sorted(pending)}"
                        + self._debug_hint("kwok")
                    )
                time.sleep(0.25)

    def create_namespace(self, name: str, timeout: float = 30.0) -> None:
        """Create a namespace and wait for its ``default`` ServiceAccount.

        The ServiceAccount admission plugin rejects pods until KCM's serviceaccount controller
        has created that account, so tests should make namespaces through this.
        """
        with self.api_client() as api:
            core = k8s_client.CoreV1Api(api)
            try:
                core.create_namespace({"metadata": {"name": name}})
            except ApiException as exc:
                if exc.status != 409:
                    raise
            deadline = time.monotonic() + timeout
            while True:
                try:
                    core.read_namespaced_service_account("default", name)
                    return
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no 'default' ServiceAccount in namespace {name} after {timeout:.0f}s"
                        + self._debug_hint("kube-controller-manager")
                    )
                time.sleep(0.2)

    def _debug_hint(self, component: str) -> str:
        return ""


class ExistingCluster(ClusterHelpers):
    """A cluster the harness did not start (``SPANTRAIN_TEST_KUBECONFIG``); nothing to stop."""

    def __init__(self, kubeconfig: Path) -> None:
        self._kubeconfig = kubeconfig
        self.log_dir: Path | None = None
        self.bin_dir: Path | None = None
        cfg = k8s_client.Configuration()
        k8s_config.load_kube_config(
            config_file=str(kubeconfig), client_configuration=cfg, persist_config=False
        )
        self.server: str = str(cfg.host)
        self.started_here = False

    @property
    def kubeconfig(self) -> Path:
        return self._kubeconfig

    def __enter__(self) -> ExistingCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


# --------------------------------------------------------------------------------------------
# the control plane


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


def spawn_logged(
    name: str, argv: list[str], log_dir: Path, *, cwd: Path | None = None, pdeathsig: bool = True
) -> _Proc:
    """Start ``argv`` in its own process group, output appended to ``log_dir/<name>.log``
    (the caller closes ``log_file``); ``KUBECONFIG`` and ``ETCD_*`` are not passed on."""
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 (the caller closes it)
    log_file.write(("$ " + " ".join(argv) + "\n").encode())
    log_file.flush()
    env = {k: val for k, val in os.environ.items() if not k.startswith("ETCD_")}
    env.pop("KUBECONFIG", None)
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        start_new_session=True,  # own process group: killpg() reaches any children too
        preexec_fn=_set_pdeathsig if pdeathsig else None,
    )
    return _Proc(name, popen, log_path, log_file)


@dataclass
class _Ports:
    etcd_client: int = field(default_factory=free_port)
    etcd_peer: int = field(default_factory=free_port)
    apiserver: int = field(default_factory=free_port)
    kcm: int = field(default_factory=free_port)
    scheduler: int = field(default_factory=free_port)
    kwok: int = field(default_factory=free_port)


class ControlPlane(ClusterHelpers):
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok, as a context
    manager.

    Attributes after :meth:`start`: ``kubeconfig`` (admin, group system:masters), ``server``
    (``https://127.0.0.1:<port>``), ``log_dir`` (one ``<component>.log`` per process),
    ``bin_dir``, ``work_dir``, ``pki``.

    Set ``keep_logs=True`` (or env ``SPANTRAIN_KEEP_CLUSTER_LOGS=1``) to copy the logs to a
    fresh temp directory on stop; its path is printed and stored in ``kept_log_dir``.
    """

    COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

    @property
    def components(self) -> tuple[str, ...]:
        return self.COMPONENTS if self.with_kwok else self.COMPONENTS[:-1]

    def __init__(
        self,
        bin_dir: str | os.PathLike[str],
        *,
        etcd_bin: str | os.PathLike[str] | None = None,
        work_root: str | os.PathLike[str] | None = None,
        start_timeout: float = 90.0,
        keep_logs: bool | None = None,
        pdeathsig: bool = True,
        verbosity: int = 1,
        host: str = "127.0.0.1",
        kwok: bool = True,
        service_cidr: str = SERVICE_CIDR,
    ) -> None:
        self.bin_dir = Path(bin_dir)
        # ``host``: where the API server listens and what it advertises. 127.0.0.1 (the
        # default) serves fake nodes; real nodes in other network namespaces need an address
        # they can reach, and pods reach it through the ``kubernetes`` Service, so the API
        # server then keeps that Service's endpoints (lease reconciler) and authorizes
        # kubelets with the Node authorizer.
        self.host = host
        self.with_kwok = kwok
        self.service_cidr = service_cidr
        etcd = etcd_bin or shutil.which("etcd") or "/usr/bin/etcd"
        self.etcd_bin = Path(etcd)
        if work_root is None:
            work_root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        self.work_root = Path(work_root)
        self.start_timeout = start_timeout
        if keep_logs is None:
            keep_logs = os.environ.get("SPANTRAIN_KEEP_CLUSTER_LOGS", "") not in ("", "0")
        self.keep_logs = keep_logs
        self.kept_log_dir: Path | None = None
        self.pdeathsig = pdeathsig
        self.verbosity = verbosity
        self.started_here = True
        self._procs: list[_Proc] = []
        self._work_dir: Path | None = None
        self._ports = _Ports()
        self._pki: Pki | None = None
        self._kubeconfigs: dict[str, Path] = {}
        self._atexit_registered = False
        self._sigterm_handler: Any = None

    # ---- construction from the environment -------------------------------------------------

    @staticmethod
    def from_env() -> ExistingCluster | None:
        """Return an :class:`ExistingCluster` when ``SPANTRAIN_TEST_KUBECONFIG`` is set.

        ``SPANTRAIN_TEST_KUBECONFIG=/path/to/kubeconfig`` uses that file;
        ``SPANTRAIN_TEST_KUBECONFIG=1`` (or ``true``/``env``) uses ``$KUBECONFIG``, falling back
        to ``~/.kube/config``.  Returns ``None`` when the variable is unset or empty, i.e. the
        caller should start its own :class:`ControlPlane`.
        """
        value = os.environ.get("SPANTRAIN_TEST_KUBECONFIG", "").strip()
        if not value:
            return None
        if value.lower() in ("1", "true", "yes", "env"):
            value = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(
                Path.home() / ".kube" / "config"
            )
        path = Path(value).expanduser()
        if not path.is_file():
            raise ControlPlaneError(f"SPANTRAIN_TEST_KUBECONFIG: kubeconfig {path} does not exist")
        return ExistingCluster(path)

    # ---- properties --------------------------------------------------------------------------

    @property
    def work_dir(self) -> Path:
        if self._work_dir is None:
            raise ControlPlaneError("control plane not started")
        return self._work_dir

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def pki(self) -> Pki:
        if self._pki is None:
            raise ControlPlaneError("control plane not started")
        return self._pki

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self._ports.apiserver}"

    @property
    def kubeconfig(self) -> Path:
        return self.work_dir / "admin.kubeconfig"

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Start every component and wait for each to be healthy (stops all on failure)."""
        self._check_binaries()
        self.work_root.mkdir(parents=True, exist_ok=True)
        reap_stale_work_dirs(self.work_root)
        self._work_dir = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=self.work_root))
        (self._work_dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.log_dir.mkdir()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        self._install_sigterm_handler()
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise
        return self

    def _check_binaries(self) -> None:
        missing = [str(p) for p in self._binary_paths().values() if not os.access(p, os.X_OK)]
        if missing:
            raise ControlPlaneError(
                "missing binaries: "
                + ", ".join(missing)
                + "\nbuild them with: scripts/k8s-binaries (etcd: apt-get install etcd-server)"
            )

    def _binary_paths(self) -> dict[str, Path]:
        paths = {name: self.bin_dir / name for name in self.components if name != "etcd"}
        paths["etcd"] = self.etcd_bin
        return paths

    def _start_all(self) -> None:
        work, ports, bins = self.work_dir, self._ports, self._binary_paths()
        timeout = self.start_timeout
        pki = self._pki = make_pki(
            work / "pki",
            {
                "admin": ("spantrain-admin", ["system:masters"]),
                "kcm": ("system:kube-controller-manager", []),
                "scheduler": ("system:kube-scheduler", []),
                "front-proxy-client": ("front-proxy-client", []),
            },
            server_ips=() if self.host == "127.0.0.1" else (self.host,),
        )
        for stem, user in (
            ("admin", "spantrain-admin"),
            ("kcm", "kube-controller-manager"),
            ("scheduler", "kube-scheduler"),
        ):
            crt, key = pki.clients[stem]
            self._kubeconfigs[stem] = write_kubeconfig(
                work / f"{stem}.kubeconfig", self.server, pki.ca_crt, crt, key, user
            )
        admin_crt, admin_key = pki.clients["admin"]
        v = f"--v={self.verbosity}"
        loopback = self.host == "127.0.0.1"
        if loopback:
            reach = ["--endpoint-reconciler-type=none", "--authorization-mode=RBAC"]
        else:
            reach = [
                "--endpoint-reconciler-type=lease",
                "--authorization-mode=Node,RBAC",
                # logs/exec/port-forward: the API server calls kubelets by their InternalIP
                f"--kubelet-client-certificate={admin_crt}",
                f"--kubelet-client-key={admin_key}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
            ]

        # etcd 3.4 (no --unsafe-no-fsync; the data dir is on tmpfs instead)
        etcd_url = f"http://127.0.0.1:{ports.etcd_client}"
        peer_url = f"http://127.0.0.1:{ports.etcd_peer}"
        etcd = self._spawn(
            "etcd",
            [
                str(bins["etcd"]),
                "--name=default",
                f"--data-dir={work / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-outputs=stderr",
                # etcd 3.4 cannot answer the apiserver's RequestWatchProgress, so a resource's
                # watch cache only learns that the global revision moved on when that resource
                # changes: a LIST (served by etcd) followed by a WATCH from its revision then
                # stalls and ends in "Too large resource version" (KWOK lagged 10-40 s per pod).
                # Periodic progress notifications keep every watch cache fresh.
                f"--experimental-watch-progress-notify-interval={ETCD_PROGRESS_NOTIFY}",
            ],
        )
        self._wait_http(
            etcd, f"{etcd_url}/health", None, timeout, check=lambda body: b'"health":"true"' in body
        )

        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(bins["kube-apiserver"]),
                f"--etcd-servers={etcd_url}",
                "--etcd-prefix=/registry",
                f"--bind-address={self.host}",
                f"--secure-port={ports.apiserver}",
                f"--advertise-address={self.host}",
                f"--cert-dir={work / 'apiserver-certs'}",
                f"--tls-cert-file={pki.apiserver_crt}",
                f"--tls-private-key-file={pki.apiserver_key}",
                f"--client-ca-file={pki.ca_crt}",
                # front-proxy (aggregation layer) config; KCM and the scheduler read it for
                # delegated authentication and log errors every few seconds without it
                f"--requestheader-client-ca-file={pki.ca_crt}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki.clients['front-proxy-client'][0]}",
                f"--proxy-client-key-file={pki.clients['front-proxy-client'][1]}",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={self.service_cidr}",
                *reach,
                "--allow-privileged=true",
                "--profiling=false",
                # WatchList (beta, on in 1.32) turns a WATCH with allowWatchBookmarks=true and
                # resourceVersion 0/"" into a watch stream, which needs etcd's
                # RequestWatchProgress (3.4.31+/3.5.13+); Debian's etcd 3.4.23 lacks it, so
                # such watches (KWOK's informers send exactly those) fail at once with "a watch
                # stream was requested by the client but the required storage feature
                # RequestWatchProgress is disabled" and KWOK fell back to relisting with
                # backoff (pods took 10-40 s to go Running).
                "--feature-gates=WatchList=false",
                v,
            ],
        )
        admin_ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
        admin_ctx.load_cert_chain(str(admin_crt), str(admin_key))
        self._wait_http(apiserver, f"{self.server}/readyz", admin_ctx, timeout)

        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        kcm_cfg = str(self._kubeconfigs["kcm"])
        kcm = self._spawn(
            "kube-controller-manager",
            [
                str(bins["kube-controller-manager"]),
                f"--kubeconfig={kcm_cfg}",
                f"--authentication-kubeconfig={kcm_cfg}",
                f"--authorization-kubeconfig={kcm_cfg}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports.kcm}",
                f"--cert-dir={work / 'kcm-certs'}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_crt}",
                "--use-service-account-credentials=true",
                f"--controllers={_KCM_CONTROLLERS}",
                f"--cluster-signing-cert-file={pki.ca_crt}",
                f"--cluster-signing-key-file={pki.ca_key}",
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                # the server's WatchList is off (see kube-apiserver); don't try it and log
                # a fallback warning for every informer
                "--feature-gates=WatchListClient=false",
                "--profiling=false",
                v,
            ],
        )
        sched_cfg = str(self._kubeconfigs["scheduler"])
        scheduler = self._spawn(
            "kube-scheduler",
            [
                str(bins["kube-scheduler"]),
                f"--kubeconfig={sched_cfg}",
                f"--authentication-kubeconfig={sched_cfg}",
                f"--authorization-kubeconfig={sched_cfg}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports.scheduler}",
                f"--cert-dir={work / 'scheduler-certs'}",
                "--profiling=false",
                v,
            ],
        )
        self._wait_http(kcm, f"https://127.0.0.1:{ports.kcm}/healthz", insecure, timeout)
        self._wait_http(
            scheduler, f"https://127.0.0.1:{ports.scheduler}/healthz", insecure, timeout
        )
        if not self.with_kwok:
            return
        kwok_cfg = work / "kwok.yaml"
        kwok_cfg.write_text(kwok_config())
        kwok = self._spawn(
            "kwok",
            [
                str(bins["kwok"]),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={kwok_cfg}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector="
                f"{KWOK_NODE_ANNOTATION}={KWOK_NODE_ANNOTATION_VALUE}",
                f"--cidr={POD_CIDR}",
                f"--node-ip={NODE_IP}",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{ports.kwok}",
            ],
        )
        self._wait_http(kwok, f"http://127.0.0.1:{ports.kwok}/healthz", None, timeout)

    def _spawn(self, name: str, argv: list[str]) -> _Proc:
        proc = spawn_logged(name, argv, self.log_dir, cwd=self.work_dir, pdeathsig=self.pdeathsig)
        self._procs.append(proc)
        return proc

    def _wait_http(
        self, proc: _Proc, url: str, ctx: ssl.SSLContext | None, timeout: float, check: Any = None
    ) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no attempt made"
        while True:
            rc = proc.popen.poll()
            if rc is not None:
                raise ControlPlaneError(
                    f"{proc.name} exited with code {rc} before it was ready ({url}).\n"
                    + failure_report(proc.log_path)
                )
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                    body = resp.read()
                    if resp.status == 200 and (check is None or check(body)):
                        return
                    last_error = f"HTTP {resp.status}: {body[:300]!r}"
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}: {exc.read()[:500]!r}"
            except (OSError, ssl.SSLError) as exc:
                last_error = repr(exc)
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{proc.name} not ready after {timeout:.0f}s ({url}: {last_error}).\n"
                    + failure_report(proc.log_path)
                )
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        """Stop all processes (SIGTERM to each process group, then SIGKILL) and clean up.

        Safe to call twice, from ``atexit``, or after a failed start.
        """
        procs, self._procs = self._procs, []
        # clients first (all at once), then etcd last so the apiserver can shut down cleanly
        clients = [p for p in reversed(procs) if p.name != "etcd"]
        storage = [p for p in procs if p.name == "etcd"]
        for group in (clients, storage):
            for proc in group:
                if proc.popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.popen.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                # the leader may be gone while others in its group survive: SIGKILL the group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=5)
                proc.log_file.close()
        work, self._work_dir = self._work_dir, None
        if work is not None and work.exists():
            if self.keep_logs and (work / "logs").exists():
                kept = Path(tempfile.mkdtemp(prefix="spantrain-cluster-logs-"))
                shutil.copytree(work / "logs", kept, dirs_exist_ok=True)
                self.kept_log_dir = kept
                print(f"[spantrain cluster] logs kept in {kept}")
            shutil.rmtree(work, ignore_errors=True)
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False
        self._restore_sigterm_handler()

    def _install_sigterm_handler(self) -> None:
        """Turn SIGTERM into SystemExit so ``finally``/``__exit__``/atexit clean-up still runs.

        Only from the main thread and only when nobody else handles SIGTERM.  (SIGKILL of the
        test process is covered by PR_SET_PDEATHSIG in the children plus
        :func:`reap_stale_work_dirs` on the next start.)
        """
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def _on_sigterm(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, _on_sigterm)
        self._sigterm_handler = _on_sigterm

    def _restore_sigterm_handler(self) -> None:
        handler, self._sigterm_handler = self._sigterm_handler, None
        if handler is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    # ---- diagnostics -----------------------------------------------------------------------

    def component_running(self, name: str) -> bool:
        return any(p.name == name and p.popen.poll() is None for p in self._procs)

    def log(self, name: str, lines: int = _LOG_TAIL_LINES) -> str:
        """Tail of one component's log (``etcd``, ``kube-apiserver``, ... ``kwok``)."""
        return log_tail(self.log_dir / f"{name}.log", lines)

    def _debug_hint(self, component: str) -> str:
        if self._work_dir is None:
            return ""
        state = "running" if self.component_running(component) else "NOT running"
        return f"\n--- {component} ({state}), last log lines ---\n{self.log(component)}"
