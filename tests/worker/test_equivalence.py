"""Gradient equivalence: every plan computes single-process gradients (real gloo processes).

For models whose samples do not interact; with BatchNorm the reference is single-process
training over the plan's micro-batches, one after the other (``test_batchnorm``).

Runs in float64 so that the only differences are summation order (~1e-15 relative); the
1e-5 / 1e-4 tolerances of the issue are then far from any noise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from spantrain_worker.baseline import PlainTrainer  # noqa: E402
from spantrain_worker.checkpoint import load_full_params  # noqa: E402
from spantrain_worker.config import load_training  # noqa: E402

from .conftest import (  # noqa: E402
    assert_tensors_close,
    make_plan,
    read_losses,
    run_plan,
    write_training,
)

pytestmark = pytest.mark.torch

STEPS = 20

PLANS = {
    # 2 stages x 1 device, 1F1B
    "pp2": ("gpt-tiny", [(0, 2, [4]), (2, 4, [4])], "1f1b", 3),
    # 3 stages of widths 2-1-3 with uneven shares (re-sharding 2 -> 1 -> 3)
    "widths-2-1-3": ("gpt-tiny", [(0, 2, [3, 2]), (2, 3, [5]), (3, 4, [1, 2, 2])], "1f1b", 2),
    # data parallel only, uneven shares
    "dp3": ("mlp-tiny", [(0, 5, [1, 4, 2])], "gpipe", 2),
    # zero bubble with B/W split, widths 1-2-1
    "zb": ("gpt-tiny", [(0, 1, [5]), (1, 3, [2, 3]), (3, 4, [5])], "zb", 4),
    # the same two with each stage's gradients summed layer by layer during its last weight
    # pass (what plans on accelerators do, in buckets of ~25 MiB; one layer each here, so
    # several rings per stage): hooks on BW, splitgrad's callback on W
    "widths-2-1-3-overlap": ("gpt-tiny", [(0, 2, [3, 2]), (2, 3, [5]), (3, 4, [1, 2, 2])],
                             "1f1b", 2),
    "zb-overlap": ("gpt-tiny", [(0, 1, [5]), (1, 3, [2, 3]), (3, 4, [5])], "zb", 4),
}


def reference(model_ref, training: Path, global_batch: int):  # type: ignore[no-untyped-def]
    trainer = PlainTrainer(model_ref, load_training(training), global_batch)
    grads: dict[str, torch.Tensor] = {}
    trainer.grad_hook = lambda step, g: grads.update(g) if step == 0 else None
    losses = [trainer.step(t) for t in range(STEPS)]
    params = {n: p.detach().clone() for n, p in trainer.named_parameters().items()}
    return losses, grads, params


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_matches_single_process(name: str, tmp_path: Path) -> None:
    model, stages, schedule, num_microbatches = PLANS[name]
    plan = make_plan(model, stages, schedule=schedule, num_microbatches=num_microbatches)
    if name.endswith("-overlap"):
        plan = plan.model_copy(update={"stages": [
            st.model_copy(update={"grad_buckets": [[i] for i in reversed(st.layers)]
                                  if st.dp_degree > 1 else []})
            for st in plan.stages]})
    if schedule == "zb":
        assert any(a.startswith("W") for st in plan.stages for a in st.actions), "no split B/W"
    training = write_training(tmp_path, steps=STEPS)
    run_plan(plan, tmp_path, training, checkpoint_dir=tmp_path / "ckpt",
             extra_env={"SPANTRAIN_DUMP_GRADS_STEP": "0"})
    losses, ref_grads, ref_params = reference(plan.model, training, plan.global_batch)

    got_losses = read_losses(tmp_path / "out")
    assert len(got_losses) == STEPS
    assert got_losses[0] == pytest.approx(losses[0], rel=1e-5)
    assert got_losses == pytest.approx(losses, rel=1e-5)

    grads: dict[str, torch.Tensor] = {}
    for path in sorted((tmp_path / "out").glob("grads-step0-stage*.pt")):
        grads.update(torch.load(path, weights_only=True))
    assert_tensors_close(grads, ref_grads, rtol=1e-5)

    params = load_full_params(tmp_path / "ckpt")
    params = {k: v for k, v in params.items() if k in ref_params}  # drop buffers
    assert_tensors_close(params, ref_params, rtol=1e-4)
