"""``spantrain local --emulate``: a real job on the kernel testbed, and nothing left afterwards.

Runs the README's quick-start job (``examples/jobs/gpt-local.yaml``, 3 steps) as the user
would, with every rank inside its device's network namespace and cgroup, and checks that it
trains, prints the throughput and removes the testbed instance; and that Ctrl-C in the middle
also removes it. Instances 210 and 211 (the other testbed tests use 201-209).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from spantrain_planner.cli import main
from tests.testbed.requirements import testbed_missing

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
JOB = REPO / "examples" / "jobs" / "gpt-local.yaml"
PY = sys.executable

needs_testbed = pytest.mark.skipif(testbed_missing() is not None,
                                   reason=testbed_missing() or "")


def _job(tmp_path: Path) -> Path:
    """The quick-start job with its checkpoints in ``tmp_path`` (not the shared /tmp path)."""
    manifest = yaml.safe_load(JOB.read_text())
    manifest["spec"]["training"]["checkpoint"]["path"] = str(tmp_path / "checkpoints")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _local(tmp_path: Path, instance: int) -> list[str]:
    # run outside the checkout, so that a stale spantrain.egg-info there cannot hide the
    # installed entry points
    return [PY, "-m", "spantrain_planner.cli", "local", str(_job(tmp_path)), "--emulate",
            "--steps", "3", "--testbed-instance", str(instance), "--out", str(tmp_path / "out")]


def _nothing_left(instance: int) -> None:
    from spantrain_testbed.testbed import instances_present

    assert instance not in instances_present()
    assert f"stb{instance}-" not in subprocess.run(
        ["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"stb{instance}-" not in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True).stdout
    for root in ("cpu", "cpuacct"):
        assert not Path(f"/sys/fs/cgroup/{root}/stb{instance}").exists()


def test_emulate_needs_root(monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["local", str(JOB), "--emulate"]) == 2
    err = capsys.readouterr().err
    assert "--emulate needs root (network namespaces, cgroups)" in err
    assert "run without --emulate" in err


@pytest.mark.root
@pytest.mark.torch
@needs_testbed
@pytest.mark.timeout(90)
def test_local_emulate_trains_and_tears_down(tmp_path: Path) -> None:
    proc = subprocess.run(_local(tmp_path, 210), cwd=tmp_path, capture_output=True, text=True,
                          timeout=85)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "emulating local-cpu on the kernel testbed (instance 210): 3 network namespaces" in out
    assert "latency is not emulated (no netem)" in out
    assert "trained 3 steps" in out and "throughput" in out and "samples/s" in out
    assert "testbed instance 210 removed" in out
    _nothing_left(210)


@pytest.mark.root
@pytest.mark.torch
@needs_testbed
@pytest.mark.timeout(90)
def test_local_emulate_ctrl_c_tears_down(tmp_path: Path) -> None:
    proc = subprocess.Popen(_local(tmp_path, 211), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("started 3 workers"):
                break
        else:
            pytest.fail(f"no workers started: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(1.0)  # the workers are importing torch inside their namespaces
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "testbed instance 211 removed" in rest
    _nothing_left(211)
