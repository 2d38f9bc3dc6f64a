"""pytest fixtures for tests that need a real Kubernetes control plane.

Role: provide the session-scoped ``k8s_bin_dir``, ``control_plane`` and ``kube_api`` fixtures.
Load it with ``-p tests.cluster.fixtures`` or ``pytest_plugins = ["tests.cluster.fixtures"]`` in
the top-level ``tests/conftest.py``.
Must not import: the SpanTrain code under test (``spantrain_planner``, ``spantrain_worker``,
``spantrain_operator``), kopf or torch.

* ``SPANTRAIN_TEST_KUBECONFIG`` set -> the tests use that existing cluster (see
  :meth:`tests.cluster.controlplane.ControlPlane.from_env`); nothing is built or started.
* otherwise ``scripts/k8s-binaries`` builds (first time, 10-25 min) or reuses the binaries, and a
  :class:`~tests.cluster.controlplane.ControlPlane` runs for the whole session.
* Go module proxy unreachable (script exit code 3) -> the cluster tests are skipped, except when
  ``CI=true``, where a missing cluster is a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s_client

from tests.cluster.controlplane import ClusterHelpers, ControlPlane

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_BINARIES_SCRIPT = REPO_ROOT / "scripts" / "k8s-binaries"
PROXY_UNREACHABLE_RC = 3


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pinned_versions() -> dict[str, str]:
    """The versions ``scripts/k8s-binaries`` pins: keys ``KVER``, ``KWOK_VER``, ``HELM_VER``."""
    text = K8S_BINARIES_SCRIPT.read_text()
    found = dict(re.findall(r"^(KVER|KWOK_VER|HELM_VER)=(\S+)", text, flags=re.MULTILINE))
    missing = {"KVER", "KWOK_VER", "HELM_VER"} - found.keys()
    if missing:
        raise RuntimeError(f"{K8S_BINARIES_SCRIPT}: no pin for {sorted(missing)}")
    return found


def _skip_or_fail(message: str) -> None:
    if _in_ci():
        pytest.fail(message + "\n(CI=true: a missing cluster is a failure, not a skip)")
    pytest.skip(message)


def build_binaries(timeout: float = 3600.0) -> Path:
    """Run ``scripts/k8s-binaries`` and return its bin directory (skip/fail as documented)."""
    try:
        proc = subprocess.run(
            [str(K8S_BINARIES_SCRIPT)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{K8S_BINARIES_SCRIPT} could not run: {exc!r}")
    tail = "\n".join(proc.stderr.splitlines()[-30:])
    if proc.returncode == PROXY_UNREACHABLE_RC:
        _skip_or_fail(
            "Kubernetes test binaries are missing and cannot be built because the Go module "
            "proxy is unreachable. Get them by running `scripts/k8s-binaries` where the proxy "
            "(and Go >= 1.23) is available, or run against an existing cluster with "
            "SPANTRAIN_TEST_KUBECONFIG=<kubeconfig>.\n" + tail
        )
    if proc.returncode != 0:
        pytest.fail(f"scripts/k8s-binaries failed with exit code {proc.returncode}:\n{tail}")
    lines = proc.stdout.strip().splitlines()
    if not lines or not Path(lines[-1]).is_dir():
        pytest.fail(f"scripts/k8s-binaries printed no bin directory:\n{proc.stdout}\n{tail}")
    return Path(lines[-1])


@pytest.fixture(scope="session")
def k8s_bin_dir() -> Path:
    """Directory with kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok
    and helm (built or reused by ``scripts/k8s-binaries``)."""
    return build_binaries()


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ClusterHelpers]:
    """A running cluster for the whole session: an existing one (``SPANTRAIN_TEST_KUBECONFIG``)
    or a fresh :class:`ControlPlane`.  ``KUBECONFIG`` points at it while the session runs, so
    subprocesses and ``kopf.testing.KopfRunner`` talk to it too."""
    existing = ControlPlane.from_env()
    cluster: ClusterHelpers
    if existing is not None:
        cluster = existing
        yield cluster
        return
    bin_dir: Path = request.getfixturevalue("k8s_bin_dir")
    old = os.environ.get("KUBECONFIG")
    with ControlPlane(bin_dir) as cp:
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        try:
            yield cp
        finally:
            if old is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = old


@pytest.fixture(scope="session")
def kube_api(control_plane: ClusterHelpers) -> Iterator[k8s_client.ApiClient]:
    """A ``kubernetes.client.ApiClient`` configured for ``control_plane`` (admin)."""
    with control_plane.api_client() as api:
        yield api


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs a real Kubernetes control plane (tests/cluster/fixtures.py)"
    )
