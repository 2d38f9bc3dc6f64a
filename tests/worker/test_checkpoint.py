"""Kill a real run mid-training, resume it (same plan and a different plan), compare.

The uninterrupted curve is the single-process reference (the equivalence tests show every
plan reproduces it), in float64, so "as if uninterrupted" is checked to 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from spantrain_worker import launch  # noqa: E402
from spantrain_worker.baseline import PlainTrainer  # noqa: E402
from spantrain_worker.checkpoint import latest_step, load_full_params  # noqa: E402
from spantrain_worker.config import load_training  # noqa: E402

from .conftest import (  # noqa: E402
    assert_tensors_close,
    make_plan,
    read_losses,
    run_plan,
    write_plan,
    write_training,
)

pytestmark = pytest.mark.torch

STEPS = 30


def test_kill_and_resume_under_same_and_other_plan(tmp_path: Path) -> None:
    training = write_training(tmp_path, steps=STEPS, checkpoint={"intervalSteps": 5})
    first = make_plan("gpt-tiny", [(0, 2, [4]), (2, 4, [4])], schedule="1f1b",
                      num_microbatches=2)
    other = make_plan("gpt-tiny", [(0, 1, [3, 5]), (1, 2, [8]), (2, 4, [2, 3, 3])],
                      schedule="zb", num_microbatches=1)
    assert first.global_batch == other.global_batch

    # run 1: slowed down (emulated 6x slower devices) so the kill lands mid-run
    ckpt = tmp_path / "ckpt"
    emulation = tmp_path / "emulation.json"
    emulation.write_text(json.dumps({"slowdown": {"0": 6.0, "1": 6.0}}))
    run1 = tmp_path / "run1"
    run1.mkdir()
    job = launch.start(write_plan(first, run1), first.world_size, run1 / "out",
                       training_path=training, checkpoint_dir=ckpt, emulation_path=emulation)
    deadline = time.monotonic() + 120
    while (latest_step(ckpt) or 0) < 10:
        assert time.monotonic() < deadline, job.logs()[-4000:]
        assert all(c is None for c in job.poll()), job.logs()[-4000:]
        time.sleep(0.02)
    os.killpg(job.pgid, signal.SIGKILL)
    job.wait(30)
    killed_at = latest_step(ckpt)
    assert killed_at is not None and 10 <= killed_at < STEPS, "the kill did not land mid-run"

    ref = PlainTrainer(first.model, load_training(training), first.global_batch)
    ref_losses = [ref.step(t) for t in range(STEPS)]
    ref_params = {n: p.detach().clone() for n, p in ref.named_parameters().items()}

    ckpt_other = tmp_path / "ckpt-other"
    shutil.copytree(ckpt, ckpt_other)
    for name, plan, directory in (("same", first, ckpt), ("other", other, ckpt_other)):
        run = tmp_path / name
        run.mkdir()
        run_plan(plan, run, training, checkpoint_dir=directory)
        losses = read_losses(run / "out")
        assert len(losses) == STEPS - killed_at, name
        assert losses == pytest.approx(ref_losses[killed_at:], rel=1e-5), name
        params = {k: v for k, v in load_full_params(directory).items() if k in ref_params}
        assert_tensors_close(params, ref_params, rtol=1e-5)
