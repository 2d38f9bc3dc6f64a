"""BatchNorm under plans: exactly which single-process training a plan reproduces.

What holds (README, "The worker"): a stage on several devices normalises each micro-batch by
the statistics of all its rows (``syncbn``), and each micro-batch by its own statistics, as in
GPipe. So the reference of a plan for a BatchNorm model is single-process training that runs
the plan's micro-batches one after the other and accumulates gradients
(``PlainTrainer(pieces=microbatch_pieces(plan))``). Every plan test also checks that the two
wrong references differ by far more than the tolerance: one pass over the global batch (what
the README claimed before), and — where a stage has several devices — every device's share of
every micro-batch normalised alone (a plain BatchNorm per device).

float64 throughout, so the only differences from the right reference are summation order.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import Tensor, nn  # noqa: E402

from spantrain_worker import syncbn  # noqa: E402
from spantrain_worker.baseline import PlainTrainer, microbatch_pieces  # noqa: E402
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
WRONG = 1e-3  # a wrong reference's gradients differ by at least this (relative, some tensor)


# --------------------------------------------------------------------------------------------
# StageBatchNorm alone: replicas as threads, the stage's all-reduce as a barrier


class ThreadStage:
    """An in-place sum over ``width`` threads, added in replica order on every thread."""

    def __init__(self, width: int) -> None:
        self.barrier = threading.Barrier(width, timeout=30)
        self.slots: list[Tensor | None] = [None] * width

    def reduce_for(self, replica: int) -> syncbn.Reduce:
        def reduce(t: Tensor) -> None:
            self.slots[replica] = t.clone()
            self.barrier.wait()
            total = self.slots[0]
            assert total is not None
            for other in self.slots[1:]:
                assert other is not None
                total = total + other
            self.barrier.wait()
            t.copy_(total)
        return reduce


def _bn_block(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None))
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return block.double()


def _loss_weights(rows: int) -> Tensor:
    """A fixed per-element weighting of the block's output (a loss that is not symmetric)."""
    return torch.linspace(-1, 1, rows * 4 * 36, dtype=torch.float64).view(rows, 4, 6, 6)


@pytest.mark.parametrize("shares", [[1, 3], [2, 3, 1]])
def test_stage_batchnorm_equals_batchnorm_on_the_whole_microbatch(shares: list[int]) -> None:
    """Outputs, input and parameter gradients and running statistics of ``k`` replicas with
    uneven shares equal one BatchNorm over their concatenated rows; replicas' buffers agree
    bitwise."""
    gen = torch.Generator().manual_seed(1)
    passes = [torch.randn(sum(shares), 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1
              for _ in range(2)]  # two micro-batches: running statistics updated twice
    ref = _bn_block(0)
    ref_outs = []
    for x in passes:
        x = x.clone().requires_grad_(True)
        out = ref(x)
        (out * _loss_weights(len(x))).sum().backward()
        ref_outs.append((out.detach(), x.grad))

    stage = ThreadStage(len(shares))
    replicas = [syncbn.convert(_bn_block(0), replica=r, width=len(shares),
                               reduce=stage.reduce_for(r)) for r in range(len(shares))]
    assert not any(syncbn.has_batchnorm(m) for m in replicas)
    results: dict[int, list[tuple[Tensor, Tensor]]] = {r: [] for r in range(len(shares))}
    errors: list[BaseException] = []

    def run(r: int) -> None:
        try:
            lo = sum(shares[:r])
            for x in passes:
                piece = x[lo:lo + shares[r]].clone().requires_grad_(True)
                out = replicas[r](piece)
                (out * _loss_weights(len(x))[lo:lo + shares[r]]).sum().backward()
                assert piece.grad is not None
                results[r].append((out.detach(), piece.grad))
        except BaseException as err:  # reported below
            errors.append(err)
            stage.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(shares))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for m, (ref_out, ref_grad) in enumerate(ref_outs):
        got_out = torch.cat([results[r][m][0] for r in range(len(shares))])
        got_grad = torch.cat([results[r][m][1] for r in range(len(shares))])
        assert_tensors_close({"out": got_out, "dx": got_grad},
                             {"out": ref_out, "dx": ref_grad}, rtol=1e-12)
    # parameter gradients: the stage's sum (what gradsync computes) is the whole batch's
    summed = {n: sum(dict(rep.named_parameters())[n].grad for rep in replicas)
              for n, _ in ref.named_parameters()}
    assert_tensors_close(summed, {n: p.grad for n, p in ref.named_parameters()}, rtol=1e-12)
    # running statistics: identical on every replica, equal to the whole batch's
    buffers = [dict(rep.named_buffers()) for rep in replicas]
    for other in buffers[1:]:
        assert all(torch.equal(other[n], buffers[0][n]) for n in buffers[0])
    ref_buffers = dict(ref.named_buffers())
    assert sorted(buffers[0]) == sorted(ref_buffers)
    assert_tensors_close({n: b.double() for n, b in buffers[0].items()},
                         {n: b.double() for n, b in ref_buffers.items()}, rtol=1e-12)
    # the state dict keeps BatchNorm's names (checkpoints are unchanged)
    assert sorted(replicas[0].state_dict()) == sorted(ref.state_dict())


# --------------------------------------------------------------------------------------------
# Whole plans on real gloo processes


PLANS = {
    # several micro-batches, one device per stage
    "microbatches": ([(0, 2, [4]), (2, 5, [4])], "1f1b", 3),
    # data parallel only, uneven shares 1 and 3, two micro-batches
    "dp-1-3": ([(0, 5, [1, 3])], "gpipe", 2),
    # widths 2-1-2 with uneven shares, zero bubble (B/W split), each multi-device stage's
    # gradients summed layer by layer during the last weight pass (the BatchNorms' collectives
    # interleave with the gradient buckets on the same process group)
    "widths-2-1-2-zb-overlap": ([(0, 2, [3, 2]), (2, 3, [5]), (3, 5, [1, 4])], "zb", 2),
}


def _reference(plan, training: Path, pieces: list[int], steps: int):  # type: ignore[no-untyped-def]
    trainer = PlainTrainer(plan.model, load_training(training), plan.global_batch, pieces=pieces)
    grads: dict[str, Tensor] = {}
    trainer.grad_hook = lambda step, g: grads.update(g) if step == 0 else None
    losses = [trainer.step(t) for t in range(steps)]
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return losses, grads, state


def _max_rel_diff(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    return max(float((got[n] - w).abs().max()) / max(float(w.abs().max()), 1e-12)
               for n, w in want.items())


@pytest.mark.parametrize("name", sorted(PLANS))
def test_resnet_plan_matches_microbatched_single_process(name: str, tmp_path: Path) -> None:
    stages, schedule, num_microbatches = PLANS[name]
    plan = make_plan("resnet-tiny", stages, schedule=schedule, num_microbatches=num_microbatches)
    if name.endswith("-overlap"):
        plan = plan.model_copy(update={"stages": [
            st.model_copy(update={"grad_buckets": [[i] for i in reversed(st.layers)]
                                  if st.dp_degree > 1 else []})
            for st in plan.stages]})
    if schedule == "zb":
        assert any(a.startswith("W") for st in plan.stages for a in st.actions), "no split B/W"
    assert plan.num_microbatches > 1 or any(st.dp_degree > 1 for st in plan.stages)
    training = write_training(tmp_path, steps=STEPS)
    run_plan(plan, tmp_path, training, checkpoint_dir=tmp_path / "ckpt",
             extra_env={"SPANTRAIN_DUMP_GRADS_STEP": "0"})
    losses, ref_grads, ref_state = _reference(plan, training, microbatch_pieces(plan), STEPS)

    grads: dict[str, Tensor] = {}
    for path in sorted((tmp_path / "out").glob("grads-step0-stage*.pt")):
        grads.update(torch.load(path, weights_only=True))
    assert_tensors_close(grads, ref_grads, rtol=1e-9)
    assert read_losses(tmp_path / "out") == pytest.approx(losses, rel=1e-9)

    # parameters and running statistics after 20 steps (replica 0's buffers are checkpointed;
    # all replicas of a stage hold the same ones)
    state = load_full_params(tmp_path / "ckpt")
    assert sorted(state) == sorted(ref_state)
    counts = {k: v for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert counts and all(int(v) == STEPS * plan.num_microbatches for v in counts.values())
    assert_tensors_close({k: v for k, v in state.items() if k not in counts},
                         {k: v for k, v in ref_state.items() if k not in counts}, rtol=1e-9)

    # the wrong references are far off, so the comparison above decides
    _, whole_batch, _ = _reference(plan, training, [plan.global_batch], 1)
    assert _max_rel_diff(grads, whole_batch) > WRONG
    for stage in plan.stages:
        if stage.dp_degree > 1:
            shares = [d.microbatch_share for d in stage.devices]
            _, per_device, _ = _reference(plan, training, shares * plan.num_microbatches, 1)
            assert _max_rel_diff(grads, per_device) > WRONG
