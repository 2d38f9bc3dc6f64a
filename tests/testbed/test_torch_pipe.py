"""Root test of ``bench/torch_pipe.py``: torch.distributed.pipelining ranks inside the testbed.

Two devices (one network namespace and cgroup each, a 100 Mbit/s token bucket between them),
one rank of the rank script on each, launched as ``bench/cee.py`` does: ``rank_commands`` gives
argv and env, ``Testbed.run`` starts them, quotas are lifted during start-up and enforced once
rank 0 has written step 0's line. Checks that both ranks exit 0 and that the losses.jsonl
has the worker's format and the same losses as SpanTrain's plain single-process loop (same
model, data and optimizer; gpt has no batch statistics, so the pipelined run agrees with it).
Instance 220.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spantrain_planner.inputs.cluster import ClusterSpec, Topology, resolve
from tests.testbed.requirements import testbed_missing

pytestmark = [pytest.mark.root, pytest.mark.torch]

if (missing := testbed_missing()) is not None:
    pytest.skip(missing, allow_module_level=True)
pytest.importorskip("torch")

try:  # the testbed as an installed package, else from the checkout
    from spantrain_testbed import Testbed
except ImportError:
    from spantrain_testbed import Testbed

from bench.torch_pipe import rank_commands, read_losses, resolve_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
INSTANCE = 220
MODEL = "gpt-tiny"
TRAINING = {"learningRate": 1e-2, "warmupSteps": 0}
BATCH, MICROBATCHES, STEPS = 8, 4, 3


def two_devices() -> Topology:
    spec = ClusterSpec.model_validate({
        "name": "pipe2",
        "nodes": [
            {"name": "a", "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]},
            {"name": "b", "devices": [{"computeTflops": 1, "memoryBytes": "1Gi"}]},
        ],
        "links": {"matrix": [{"a": "a", "b": "b", "bandwidthMbps": 100}]},
    })
    return resolve(spec)


@pytest.fixture(scope="module")
def tb2() -> Iterator[Testbed]:
    with Testbed(two_devices(), instance=INSTANCE, cores_per_tflops=0.5) as tb:
        yield tb


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_two_ranks_train_in_the_testbed(tb2: Testbed, tmp_path: Path) -> None:
    out = tmp_path / "losses.jsonl"
    devices = [0, 1]
    commands = rank_commands(MODEL, [tb2.address(d) for d in devices], 29621, BATCH,
                             MICROBATCHES, STEPS, out, training=TRAINING, timeout=60)
    assert [env["RANK"] for _, env in commands] == ["0", "1"]
    assert all(env["MASTER_ADDR"] == tb2.address(0) for _, env in commands)
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"rank{r}.log" for r in devices]
    gate = tb2.startup_gate(out)  # as bench/cee.py: start-up unthrottled, steps under quotas
    try:
        for device, (argv, env), log in zip(devices, commands, logs, strict=True):
            with log.open("wb") as fh:
                procs.append(tb2.run(device, argv, env=env, stdout=fh,
                                     stderr=subprocess.STDOUT, cwd=REPO))
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            gate.poll()
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        codes = [p.poll() for p in procs]
    finally:
        _stop(procs)
        gate.close()
    text = "\n".join(f"--- rank {r}\n{log.read_text()[-2000:]}" for r, log in enumerate(logs))
    assert codes == [0, 0], text
    # each rank ran in its device's namespace, gloo bound to its interface
    for r, log in enumerate(logs):
        assert f"event=done steps={STEPS} ifname={tb2.ifname(r)}" in log.read_text(), text

    rows = read_losses(out)
    assert [r["step"] for r in rows] == list(range(STEPS)), rows
    keys = {"step", "loss", "stepSeconds", "samplesPerSecond", "gradNorm", "learningRate"}
    assert all(set(r) == keys for r in rows), rows
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
    assert all(r["stepSeconds"] > 0 for r in rows)
    print(json.dumps(rows))

    # the same losses as SpanTrain's single-process reference (same model, data, optimizer)
    import torch

    from spantrain_worker.baseline import PlainTrainer
    from spantrain_worker.config import TrainingConfig

    torch.set_num_threads(1)
    plain = PlainTrainer(resolve_model(MODEL),
                         TrainingConfig.model_validate({**TRAINING, "steps": STEPS}), BATCH)
    expected = [plain.step(s) for s in range(STEPS)]
    assert losses == pytest.approx(expected, rel=1e-4), (losses, expected)
