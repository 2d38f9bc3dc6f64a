"""The container image, built for real: ``scripts/image`` (buildah on a local mmdebstrap base, no
Docker, no registry), then the CLI run inside the image as its non-root user.

A cold build downloads torch with its nvidia-* wheels (several GB) and may wait for
``scripts/k8s-binaries`` to build CoreDNS; a warm one reuses the cached archives in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "image"

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(3600)]


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(
            "needs root: scripts/image uses buildah's system image store, mmdebstrap and apt-get"
        )


@pytest.fixture(scope="module")
def images() -> dict[str, tuple[str, Path]]:
    _need_root()
    r = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=3500, check=False)
    assert r.returncode == 0, f"scripts/image failed ({r.returncode}):\n{r.stderr[-6000:]}"
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["spantrain", "pause", "coredns"], r.stdout
    out = {}
    for ln in lines:
        name, ref, path = ln.split()
        assert Path(path).is_file() and Path(path).stat().st_size > 0, ln
        assert ref.startswith(f"localhost/{name}:"), ln
        out[name] = (ref, Path(path))
    return out


def _ensure_in_store(ref: str, archive: Path) -> None:
    """The archive is what scripts/image guarantees; load it when the store lost the image."""
    have = subprocess.run(
        ["buildah", "inspect", "--type", "image", ref], capture_output=True, check=False
    )
    if have.returncode != 0:
        subprocess.run(
            ["buildah", "pull", "--quiet", f"docker-archive:{archive}"],
            check=True, capture_output=True, timeout=1800,
        )


def _run_in_image(ref: str, archive: Path, *args: str) -> subprocess.CompletedProcess[str]:
    _ensure_in_store(ref, archive)
    ctr = subprocess.run(
        ["buildah", "from", "--pull=never", ref],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    try:
        return subprocess.run(
            ["buildah", "run", "--user", "10001:10001", "--network", "host",
             "-v", f"{ROOT / 'examples'}:/examples:ro",
             ctr, "--", "/usr/bin/tini", "--", "spantrain", *args],
            capture_output=True, text=True, timeout=600, check=False,
        )
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False)


def test_image_config(images: dict[str, tuple[str, Path]]) -> None:
    ref, _ = images["spantrain"]
    info = json.loads(
        subprocess.run(
            ["buildah", "inspect", "--type", "image", ref],
            check=True, capture_output=True, text=True,
        ).stdout
    )
    cfg = info["Docker"]["config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["/usr/bin/tini", "--", "spantrain"]
    for name in ("pause", "coredns"):
        ref, archive = images[name]
        _ensure_in_store(ref, archive)
        info = json.loads(
            subprocess.run(
                ["buildah", "inspect", "--type", "image", ref],
                check=True, capture_output=True, text=True,
            ).stdout
        )
        assert info["Docker"]["config"]["Entrypoint"] == [f"/{name}"]


def test_version_in_image(images: dict[str, tuple[str, Path]]) -> None:
    r = _run_in_image(*images["spantrain"], "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "spantrain 0.1.0"


def test_plan_in_image(images: dict[str, tuple[str, Path]]) -> None:
    r = _run_in_image(
        *images["spantrain"], "plan", "/examples/clusters/paper-env1.yaml", "--model", "gpt2-small"
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "for gpt2-small on paper-env1" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("stage"))
    assert header.split()[:3] == ["stage", "layers", "devices"]
    assert "samples/s" in out
    assert any(ln.split()[:1] == ["spantrain"] for ln in out.splitlines()), out


# That containerd imports and runs the three archives is what scripts/e2e shows (tests/e2e/
# test_e2e.py): its nodes start from them. `scripts/image --verify` checks the import alone.
