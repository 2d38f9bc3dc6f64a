"""GradientSync: per-layer buckets launch in reverse layer order as soon as gradients are final.

Unit tests of the bucket logic on real autograd (and splitgrad's deferred W GEMMs); the
collective is a stand-in that doubles the bucket on ``wait`` (a sum over two equal ranks), so
the tests see when each bucket was launched and that the sums land in ``.grad``. The real
collective is covered by the gradient-equivalence tests (multi-device stages, gloo).
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import Tensor, nn  # noqa: E402

from spantrain_worker import splitgrad  # noqa: E402
from spantrain_worker.gradsync import GradientSync  # noqa: E402

pytestmark = pytest.mark.torch


class _Doubling:
    def __init__(self, flat: Tensor) -> None:
        self.flat = flat

    def wait(self) -> None:
        self.flat.mul_(2.0)


class Recorder:
    """Launch stand-in: remembers which bucket (by first parameter) launched at which mark."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.first = {id(next(iter(layer.parameters()))): i for i, layer in enumerate(layers)
                      if list(layer.parameters())}
        self.mark = "start"
        self.launched: list[tuple[int, str]] = []
        self.sync: GradientSync | None = None

    def __call__(self, flat: Tensor) -> Any:
        assert self.sync is not None
        bucket = self.sync.buckets[len(self.launched)]
        self.launched.append((self.first[id(bucket[0])], self.mark))
        return _Doubling(flat)


def stack(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Linear(4, 8), nn.LayerNorm(8), nn.Identity(), nn.Linear(8, 3)]


def run(layers: list[nn.Module], x: Tensor) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x.square().sum()


def make_sync(layers: list[nn.Module], passes: int) -> tuple[GradientSync, Recorder]:
    rec = Recorder(layers)
    sync = GradientSync([list(layer.parameters()) for layer in reversed(layers)], passes, rec)
    rec.sync = sync
    sync.install_hooks()
    return sync, rec


def test_buckets_launch_during_the_last_backward_last_layer_first() -> None:
    layers = stack()
    sync, rec = make_sync(layers, passes=2)
    xs = [torch.randn(5, 4), torch.randn(5, 4)]
    rec.mark = "mb0"
    run(layers, xs[0]).backward()
    assert rec.launched == []  # one more micro-batch to accumulate
    rec.mark = "mb1"
    run(layers, xs[1]).backward()
    # every bucket went out during the last backward, last layer first (Identity has none)
    assert rec.launched == [(3, "mb1"), (1, "mb1"), (0, "mb1")]
    rec.mark = "finish"
    launches = sync.finish()
    assert len(launches) == 3 and launches[0][1] == (8 * 3 + 3) * 4

    ref = stack()
    for x in xs:
        run(ref, x).backward()
    for got, want in zip(layers, ref, strict=True):
        for p, q in zip(got.parameters(), want.parameters(), strict=True):
            assert q.grad is not None
            torch.testing.assert_close(p.grad, 2.0 * q.grad)

    # the next step starts from fresh counts
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    rec.launched.clear()
    rec.mark = "step1"
    run(layers, xs[0]).backward()
    run(layers, xs[1]).backward()
    assert [m for _, m in rec.launched] == ["step1"] * 3
    sync.finish()


def test_an_unfinished_bucket_holds_back_the_later_ones_until_finish() -> None:
    layers = stack()
    sync, rec = make_sync(layers, passes=1)
    rec.mark = "backward"
    x = torch.randn(5, 4)
    # layer 3 is skipped: its bucket (the first to launch) never completes by itself
    (layers[1](layers[0](x))).square().sum().backward()
    assert rec.launched == []  # buckets launch in order, and bucket 0 is not done
    rec.mark = "finish"
    sync.finish()
    assert rec.launched == [(3, "finish"), (1, "finish"), (0, "finish")]
    assert torch.count_nonzero(layers[3].weight.grad) == 0  # zeros stand in, summed
    assert layers[0].weight.grad is not None and torch.count_nonzero(layers[0].weight.grad) > 0


def test_a_second_accumulation_after_the_sum_started_is_an_error() -> None:
    layers = stack()
    _, _ = make_sync(layers, passes=1)
    x = torch.randn(5, 4)
    run(layers, x).backward()
    with pytest.raises(RuntimeError, match="accumulated 2 times"):
        run(layers, x).backward()


def test_deferred_weight_gemms_of_a_w_pass_launch_buckets_too() -> None:
    layers = stack()
    state = splitgrad.SplitState()
    weights = {id(w) for w in splitgrad.install(layers, state)}
    sync, rec = make_sync(layers, passes=1)
    state.on_grad = sync.grad_ready
    x = torch.randn(5, 4, requires_grad=True)
    with state.record(0):
        out = run(layers, x)
    rec.mark = "B"
    with state.defer(0):
        others = [p for layer in layers for p in layer.parameters() if id(p) not in weights]
        torch.autograd.backward(out, inputs=[x, *others])
    assert rec.launched == []  # the last layer's weight is still deferred
    rec.mark = "W"
    state.flush(0)
    assert rec.launched == [(3, "W"), (1, "W"), (0, "W")]
    sync.finish()
    ref = stack()
    run(ref, x.detach()).backward()
    for got, want in zip(layers, ref, strict=True):
        for p, q in zip(got.parameters(), want.parameters(), strict=True):
            assert q.grad is not None
            torch.testing.assert_close(p.grad, 2.0 * q.grad)
