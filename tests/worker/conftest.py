"""Helpers for the worker tests: plans from layouts, real worker processes, the reference."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from spantrain_planner.inputs.cluster import ClusterSpec, Topology, resolve  # noqa: E402
from spantrain_planner.inputs.plan import Plan  # noqa: E402
from spantrain_planner.inputs.profiles import preset  # noqa: E402
from spantrain_planner.passes.assemble import StageLayout, assemble  # noqa: E402
from spantrain_worker import launch  # noqa: E402


def topology(num_devices: int, tflops: Sequence[float] | None = None) -> Topology:
    speeds = list(tflops or [1.0] * num_devices)
    spec = ClusterSpec.model_validate({
        "name": "test",
        "nodes": [{"name": f"n{i}", "devices": [{"computeTflops": speeds[i],
                                                   "memoryBytes": "8Gi"}]}
                  for i in range(num_devices)],
    })
    return resolve(spec)


def make_plan(
    model: str,
    stages: Sequence[tuple[int, int, Sequence[int]]],
    *,
    schedule: str,
    num_microbatches: int,
) -> Plan:
    """``stages``: (layer_start, layer_end, shares per device); devices numbered in order."""
    layouts = []
    next_device = 0
    for start, end, shares in stages:
        devices = tuple(range(next_device, next_device + len(shares)))
        next_device += len(shares)
        layouts.append(StageLayout(start, end, devices, tuple(shares)))
    plan, _ = assemble(layouts, topology(next_device), preset(model), schedule=schedule,
                       num_microbatches=num_microbatches)
    return plan


def write_plan(plan: Plan, directory: Path, name: str = "plan.json") -> Path:
    path = directory / name
    path.write_text(plan.to_json())
    return path


def write_training(directory: Path, **overrides: object) -> Path:
    block = {"steps": 20, "precision": "fp64", "learningRate": 3e-3, "warmupSteps": 3,
             "gradClipNorm": 1.0, "weightDecay": 0.01, "seed": 7, "logIntervalSteps": 50}
    block.update(overrides)
    path = directory / "training.json"
    path.write_text(json.dumps(block))
    return path


def run_plan(
    plan: Plan, directory: Path, training: Path, *, timeout: float = 180.0,
    checkpoint_dir: Path | None = None, extra_env: dict[str, str] | None = None,
    emulation: Path | None = None,
) -> launch.LocalJob:
    plan_path = write_plan(plan, directory)
    job = launch.start(plan_path, plan.world_size, directory / "out", training_path=training,
                       checkpoint_dir=checkpoint_dir, extra_env=extra_env,
                       emulation_path=emulation)
    codes = job.wait(timeout)
    assert codes == [0] * plan.world_size, job.logs()[-6000:]
    return job


def read_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


def assert_tensors_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                         rtol: float) -> None:
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        diff = float((got[name] - ref).abs().max())
        scale = float(ref.abs().max())
        assert diff <= rtol * scale + 1e-12, f"{name}: max diff {diff:.3g} vs scale {scale:.3g}"
