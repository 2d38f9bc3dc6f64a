"""Real processes: rendezvous errors, `spantrain local` end to end, Ctrl-C, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from spantrain_worker.launch import free_port  # noqa: E402
from spantrain_worker.metrics import StepStats, WorkerMetrics  # noqa: E402

from .conftest import make_plan, write_plan  # noqa: E402

pytestmark = pytest.mark.torch

SPANTRAIN = [sys.executable, "-m", "spantrain_planner.cli"]


def _worker_env(plan_path: Path, rank: int, port: int, world: int) -> dict[str, str]:
    return dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                WORLD_SIZE=str(world), RANK=str(rank), SPANTRAIN_PLAN=str(plan_path),
                SPANTRAIN_METRICS_PORT="0", SPANTRAIN_RENDEZVOUS_TIMEOUT="3",
                SPANTRAIN_NUM_THREADS="1")


def test_rendezvous_timeout_names_the_missing_ranks(tmp_path: Path) -> None:
    plan = make_plan("gpt-tiny", [(0, 2, [2]), (2, 4, [1, 1])], schedule="1f1b",
                     num_microbatches=1)
    plan_path = write_plan(plan, tmp_path)
    port = free_port()
    # rank 0 alone: ranks 1 and 2 never arrive
    done = subprocess.run([*SPANTRAIN, "worker"], env=_worker_env(plan_path, 0, port, 3),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert "rank 1 (n1/cpu0 on n1), rank 2 (n2/cpu0 on n2)" in done.stderr
    # rank 2 alone: nobody serves the store
    done = subprocess.run([*SPANTRAIN, "worker"], env=_worker_env(plan_path, 2, port, 3),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert "served by rank 0 (n0/cpu0 on n0)" in done.stderr


def _job(tmp_path: Path, steps: int) -> tuple[Path, Path]:
    job = {
        "apiVersion": "spantrain.io/v1alpha1", "kind": "SpanTrainJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"preset": "gpt-tiny"},
            "training": {"globalBatch": 8, "steps": steps, "learningRate": 0.003,
                         "warmupSteps": 2},
            "planner": {"schedule": "zb", "numMicrobatches": 4},
        },
    }
    devices = {
        "name": "two", "nodes": [
            {"name": "a", "devices": [{"computeTflops": 0.02, "memoryBytes": "1Gi"}]},
            {"name": "b", "tier": "edge",
             "devices": [{"computeTflops": 0.01, "memoryBytes": "1Gi"}]},
        ],
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "devices.yaml").write_text(yaml.safe_dump(devices))
    return tmp_path / "job.yaml", tmp_path / "devices.yaml"


def test_local_trains_with_falling_loss_and_draws_the_timeline(tmp_path: Path) -> None:
    job, devices = _job(tmp_path, steps=40)
    out = tmp_path / "out"
    done = subprocess.run([*SPANTRAIN, "local", str(job), "--devices", str(devices),
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stage" in done.stdout and "samples/s" in done.stdout
    rows = [json.loads(x) for x in (out / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert (out / "timeline.png").stat().st_size > 1000


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def test_ctrl_c_stops_every_worker(tmp_path: Path) -> None:
    job, devices = _job(tmp_path, steps=100_000)
    out = tmp_path / "out"
    proc = subprocess.Popen([*SPANTRAIN, "local", str(job), "--devices", str(devices),
                             "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    losses = out / "losses.jsonl"
    while not (losses.exists() and len(losses.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    pids = json.loads((out / "workers.json").read_text())["pids"]
    assert all(_alive(p) for p in pids)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "stopped every worker" in err
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "orphaned workers"


def test_metrics_endpoint_exports_the_worker_series() -> None:
    port = free_port()
    metrics = WorkerMetrics("job-a", 1, 3, port=port, namespace="ml", device="edge-0/cpu")
    metrics.observe(StepStats(step=4, loss=2.5, step_seconds=0.2, compute_seconds=0.1,
                              communication_seconds=0.05, idle_seconds=0.05,
                              samples_per_second=80.0, grad_norm=1.0, learning_rate=1e-3), 6)
    metrics.add_bytes({2: 1000}, {4: 500})
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    # the SpanTrainJob is spantrain_job (a scrape owns the target label job); sorted labels
    labels = 'device="edge-0/cpu",rank="3",spantrain_job="job-a",spantrain_namespace="ml",stage="1"'
    peer = 'device="edge-0/cpu",peer="{}",rank="3",spantrain_job="job-a",' \
        'spantrain_namespace="ml",stage="1"'
    for line in (
        f"spantrain_worker_step_seconds_count{{{labels}}} 1.0",
        f"spantrain_worker_samples_total{{{labels}}} 6.0",
        f"spantrain_worker_samples_per_second{{{labels}}} 80.0",
        f"spantrain_worker_compute_seconds_total{{{labels}}} 0.1",
        f"spantrain_worker_communication_seconds_total{{{labels}}} 0.05",
        f"spantrain_worker_idle_seconds_total{{{labels}}} 0.05",
        f"spantrain_worker_sent_bytes_total{{{peer.format(2)}}} 1000.0",
        f"spantrain_worker_received_bytes_total{{{peer.format(4)}}} 500.0",
        f"spantrain_worker_loss{{{labels}}} 2.5",
    ):
        assert line in text, line
