"""`spantrain profile`: measured profiles agree with the analytic ones, and a user model
given as an entry point is measured, planned and trained end to end with real processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from spantrain_planner.cli import main  # noqa: E402
from spantrain_planner.inputs.profiles import ModelProfile, load_profile, preset  # noqa: E402
from spantrain_worker.checkpoint import latest_step  # noqa: E402
from spantrain_worker.models import ModelError, call_entrypoint  # noqa: E402
from spantrain_worker.profiling import (  # noqa: E402
    measure_matmul_speed,
    profile_entrypoint,
    profile_preset,
)

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
SPANTRAIN = [sys.executable, "-m", "spantrain_planner.cli"]
EXAMPLE = "examples.models.tiny_cnn:build"
EXAMPLE_PROFILE = ROOT / "examples" / "models" / "tiny_cnn.profile.yaml"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Measure as `spantrain profile` does (one thread), and find the example model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.syspath_prepend(str(ROOT))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def speed() -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure_matmul_speed()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["gpt-tiny", "mlp-tiny", "resnet-tiny"])
def test_measured_sizes_equal_the_analytic_profile(name: str, speed: float) -> None:
    measured = profile_preset(name, batch=4, repeats=1, flops_per_second=speed).profile
    analytic = preset(name)
    assert measured.family == analytic.family and measured.config == analytic.config
    assert measured.bytes_per_element == analytic.bytes_per_element
    assert [lp.name for lp in measured.layers] == [lp.name for lp in analytic.layers]
    for got, want in zip(measured.layers, analytic.layers, strict=True):
        assert got.param_count == want.param_count, want.name
        assert got.param_bytes == want.param_bytes, want.name
        assert got.output_bytes == want.output_bytes, want.name
        assert got.stash_bytes > 0, want.name
    # the first layer's input gradient is never needed, as in the analytic profiles
    assert measured.layers[0].backward_input_flops == 0.0


def test_measured_flops_are_within_a_factor_3_of_the_analytic_ones(speed: float) -> None:
    """gpt-mini: layers big enough that time tracks arithmetic, not per-call overhead."""
    measured = profile_preset("gpt-mini", batch=16, repeats=3, flops_per_second=speed).profile
    analytic = preset("gpt-mini")

    def total(profile: ModelProfile, field: str) -> float:
        return float(sum(getattr(lp, field) for lp in profile.layers))

    for field in ("forward_flops", "backward_input_flops", "backward_weight_flops"):
        ratio = total(measured, field) / total(analytic, field)
        assert 1 / 3 <= ratio <= 3, (field, ratio)
    for got, want in zip(measured.layers[1:-1], analytic.layers[1:-1], strict=True):
        work = [got.forward_flops + got.backward_input_flops + got.backward_weight_flops,
                want.forward_flops + want.backward_input_flops + want.backward_weight_flops]
        assert 1 / 3 <= work[0] / work[1] <= 3, (want.name, work)
    # the stash counts what autograd really keeps: the analytic estimate is of that order
    ratio = total(measured, "stash_bytes") / total(analytic, "stash_bytes")
    assert 0.5 <= ratio <= 2, ratio


def test_example_profile_matches_the_example_model(speed: float) -> None:
    """The committed example profile is the model's (sizes exactly; times are this machine's)."""
    committed = load_profile(EXAMPLE_PROFILE)
    measured = profile_entrypoint(EXAMPLE, batch=16, repeats=5, flops_per_second=speed).profile
    assert committed.family == measured.family == "custom"
    assert committed.entrypoint == measured.entrypoint == EXAMPLE
    assert committed.name == measured.name == "tiny-cnn"
    assert committed.num_layers == measured.num_layers == 5
    for got, want in zip(measured.layers, committed.layers, strict=True):
        assert (got.name, got.param_count, got.param_bytes, got.output_bytes,
                got.stash_bytes) == (want.name, want.param_count, want.param_bytes,
                                     want.output_bytes, want.stash_bytes)
        assert got.forward_flops > 0 and got.backward_weight_flops > 0


def test_entrypoint_errors_name_the_problem() -> None:
    with pytest.raises(ModelError, match="module:function"):
        call_entrypoint("examples.models.tiny_cnn", {}, seed=0)
    with pytest.raises(ModelError, match="cannot load entrypoint"):
        call_entrypoint("examples.models.no_such_model:build", {}, seed=0)
    with pytest.raises(ModelError, match="rejects config"):
        call_entrypoint(EXAMPLE, {"depth": 3}, seed=0)
    with pytest.raises(ModelError, match=r"\(layers, loss_fn, dataset\)"):
        call_entrypoint("builtins:dict", {}, seed=0)


def test_profile_command_writes_a_profile_that_plans(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cnn.yaml"
    code = main(["profile", EXAMPLE, "--batch", "4", "--repeats", "1",
                 "--config", json.dumps({"width": 8}), "--output", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    assert "GFLOP/s" in printed.out and "0.ConvBlock" in printed.out
    text = out.read_text()
    assert text.startswith("# Measured by `spantrain profile") and "GFLOP/s" in text
    profile = load_profile(out)
    assert profile.family == "custom" and profile.entrypoint == EXAMPLE
    assert profile.config == {"width": 8}
    assert profile.layers[0].param_count == 3 * 8 * 9 + 2 * 8
    for path in (out, EXAMPLE_PROFILE):
        code = main(["plan", str(ROOT / "examples/clusters/local-cpu.yaml"),
                     "--model", str(path), "--batch", "16", "--no-baselines"])
        printed = capsys.readouterr()
        assert code == 0, printed.out + printed.err
        assert "tiny-cnn" in printed.out and "predicted" in printed.out
    with pytest.raises(SystemExit) as exit_:
        main(["profile", "--help"])
    printed = capsys.readouterr()
    assert exit_.value.code == 0 and "--batch" in printed.out and "--output" in printed.out
    assert main(["profile", "not-a-model"]) == 2
    assert "neither module:function nor a preset" in capsys.readouterr().err


def test_user_model_trains_through_spantrain_local(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The entry-point path end to end: manifest -> plan -> 2 worker processes over gloo."""
    ckpt = tmp_path / "ckpt"
    job = {
        "apiVersion": "spantrain.io/v1alpha1", "kind": "SpanTrainJob",
        "metadata": {"name": "tiny-cnn"},
        "spec": {
            "model": {"entrypoint": EXAMPLE,
                      "profile": yaml.safe_load(EXAMPLE_PROFILE.read_text())},
            "training": {"globalBatch": 16, "steps": 3, "warmupSteps": 1,
                         "learningRate": 0.01, "checkpoint": {"path": str(ckpt)}},
        },
    }
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    devices = {"name": "two", "nodes": [
        {"name": "a", "devices": [{"computeTflops": 0.02, "memoryBytes": "1Gi"}]},
        {"name": "b", "tier": "edge", "devices": [{"computeTflops": 0.01, "memoryBytes": "1Gi"}]},
    ]}
    (tmp_path / "devices.yaml").write_text(yaml.safe_dump(devices))
    out = tmp_path / "out"
    command = ["local", str(job_path), "--out", str(out), "--no-emulation",
               "--devices", str(tmp_path / "devices.yaml")]
    done = subprocess.run([*SPANTRAIN, *command], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tiny-cnn" in done.stdout and f"checkpoints: {ckpt}" in done.stdout
    rows = [json.loads(x) for x in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(10), rel=0.2)  # 10 classes, near chance
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"]["entrypoint"] == EXAMPLE
    assert sum(len(st["devices"]) for st in plan["stages"]) == 2
    assert latest_step(ckpt) == 3
    # a second run must not overwrite the checkpoint silently (refused before any worker)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint at step 3" in err
    assert "--resume" in err and "--fresh" in err
    assert latest_step(ckpt) == 3
