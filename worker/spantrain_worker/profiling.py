"""Measure a model's layer profile with torch: what ``spantrain profile`` writes.

Role: the planner cuts a model by its ``ModelProfile`` (per layer and per sample: forward,
input-gradient (B) and weight-gradient (W) FLOPs, parameters, boundary and stashed activation
bytes). Built-in families have analytic profiles; a user model (an entry point
``module:function``, see ``models.call_entrypoint``) gets a measured one from here. Called by
``commands`` (``spantrain profile``) and the tests.

How each quantity is measured, layer by layer, on a real batch of the model's own dataset:

* forward: ``layer(x)`` with autograd on (the last layer includes the loss, as in the runtime);
* B: ``autograd.grad(out, [x])`` -- the input gradient only (zero for the first layer, whose
  input gradient nobody needs, matching the analytic profiles);
* W: ``autograd.grad(out, [x, *params])`` minus B -- what the weight gradients add;
* each time is the minimum over repeats (the least disturbed run on a shared machine), divided
  by the batch size, then converted to FLOP-equivalents by multiplying with this machine's
  measured ``float32`` matmul speed (``measure_matmul_speed``, same thread count). The planner
  divides FLOPs by a device's FLOP/s, so on a device as fast as this one it predicts the
  measured time; the fixed per-layer cost of small layers is included (amortised over the
  batch: a larger ``--batch`` measures less of it);
* stashed bytes: the tensors autograd saves for backward during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage and excluding
  parameters and buffers, per sample;
* boundary bytes: ``numel x element size`` of one sample of the layer's output;
* parameters: trainable ``numel`` and bytes.

Must not import torch.distributed, kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from spantrain_planner.inputs.profiles import LayerProfile, ModelProfile

from .models import LossFn, ModelError, call_entrypoint

Family = Literal["gpt", "resnet", "mlp", "custom"]

def clock() -> float:
    """Seconds for timing compute: this thread's CPU time when torch runs on one thread.

    On one thread every kernel (forward and CPU autograd) runs on the calling thread, so its
    CPU time excludes the time other processes hold the core, which on a shared machine is
    most of the noise of a wall clock; with several threads only the wall clock is right.
    """
    if torch.get_num_threads() == 1:
        return time.thread_time()
    return time.perf_counter()


#: Side of the square matmul that calibrates FLOP-equivalents (big enough to run near peak).
MATMUL_SIZE = 512


def measure_matmul_speed(
    size: int = MATMUL_SIZE, repeats: int = 20, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of a ``size x size`` matmul on this machine (best of ``repeats``)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen, dtype=dtype)
    b = torch.randn(size, size, generator=gen, dtype=dtype)
    torch.mm(a, b)  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        torch.mm(a, b)
        best = min(best, clock() - t0)
    return 2.0 * size**3 / best


@dataclass
class _StashMeter:
    """Sums the bytes autograd saves for backward, once per storage."""

    exclude: set[int]  # storages of parameters and buffers (not activation memory)
    seen: dict[int, int]

    def pack(self, t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            return t
        key = storage.data_ptr()
        if key and key not in self.exclude:
            self.seen.setdefault(key, storage.nbytes())
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


@contextmanager
def _saved_bytes(layer: nn.Module) -> Iterator[_StashMeter]:
    exclude = {t.untyped_storage().data_ptr()
               for t in [*layer.parameters(), *layer.buffers()]}
    meter = _StashMeter(exclude, {})
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        yield meter


@dataclass(frozen=True)
class LayerTiming:
    """Measured seconds per sample of one layer's passes."""

    forward: float
    backward_input: float
    backward_weight: float


@dataclass(frozen=True)
class Measurement:
    """A measured profile and how it was measured."""

    profile: ModelProfile
    timings: list[LayerTiming]
    flops_per_second: float  # the calibration: FLOPs = seconds x this
    batch: int
    threads: int


def _best(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def _measure_layer(
    layer: nn.Module,
    x: Tensor,
    *,
    first: bool,
    loss: Callable[[Tensor], Tensor] | None,
    repeats: int,
) -> tuple[LayerTiming, Tensor, int]:
    """(per-batch timings, output, stashed bytes of the batch) of one layer."""
    x = x.detach()
    needs_input_grad = not first and x.is_floating_point()
    if needs_input_grad:
        x.requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]

    def forward() -> tuple[Tensor, Tensor]:
        y = layer(x)
        return y, (loss(y) if loss is not None else y)

    with _saved_bytes(layer) as meter:  # also the warm-up run
        y, out = forward()
    stash = meter.total
    grad_out = None if loss is not None else torch.randn(
        out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    if not out.requires_grad:  # a layer without parameters on a non-differentiable input
        t_f = _best(forward, repeats)
        return LayerTiming(t_f, 0.0, 0.0), y.detach(), stash
    inputs_b = [x] if needs_input_grad else []
    inputs_bw = inputs_b + params
    t_f = t_b = t_bw = float("inf")
    for _ in range(repeats):
        # every backward runs on a fresh graph, so B and BW see the same (cold) state
        t0 = clock()
        _, out = forward()
        t_f = min(t_f, clock() - t0)
        if inputs_bw:
            t0 = clock()
            torch.autograd.grad(out, inputs_bw, grad_out, allow_unused=True)
            t_bw = min(t_bw, clock() - t0)
        if inputs_b:
            _, out = forward()
            t0 = clock()
            torch.autograd.grad(out, inputs_b, grad_out, allow_unused=True)
            t_b = min(t_b, clock() - t0)
    t_b = t_b if inputs_b else 0.0
    t_bw = t_bw if inputs_bw else 0.0
    return LayerTiming(t_f, t_b, max(0.0, t_bw - t_b)), y.detach(), stash


def _numel(t: Tensor) -> int:
    return int(t[0].numel()) if t.dim() else 1


def measure_profile(
    layers: Sequence[nn.Module],
    loss_fn: LossFn,
    inputs: Tensor,
    labels: Tensor,
    *,
    name: str,
    family: Family = "custom",
    config: dict[str, Any] | None = None,
    entrypoint: str | None = None,
    repeats: int = 5,
    flops_per_second: float | None = None,
    layer_names: Sequence[str] | None = None,
) -> Measurement:
    """Measure every layer of a model on one batch (``inputs``, ``labels``).

    Runs on the calling thread pool; set ``torch.set_num_threads`` first (``spantrain
    profile`` measures on one thread, like a ``spantrain local`` worker).
    """
    batch = int(inputs.shape[0])
    if batch < 1:
        raise ModelError("the profiling batch is empty; give --batch >= 1")
    speed = flops_per_second or measure_matmul_speed()
    for layer in layers:
        layer.train()
    x = inputs
    timings: list[LayerTiming] = []
    rows: list[LayerProfile] = []
    element_size = 4
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        timing, y, stash = _measure_layer(
            layer, x, first=i == 0, repeats=repeats,
            loss=(lambda out: loss_fn(out, labels)) if last else None,
        )
        if y.shape[:1] != (batch,):
            raise ModelError(f"layer {i} ({type(layer).__name__}) returns shape "
                             f"{tuple(y.shape)}; every layer must keep the batch dimension "
                             f"first ({batch} rows)")
        if y.is_floating_point():
            element_size = y.element_size()
        per_sample = LayerTiming(timing.forward / batch, timing.backward_input / batch,
                                 timing.backward_weight / batch)
        timings.append(per_sample)
        params = [p for p in layer.parameters() if p.requires_grad]
        rows.append(LayerProfile(
            name=layer_names[i] if layer_names else f"{i}.{type(layer).__name__}",
            forward_flops=_flops(per_sample.forward * speed),
            backward_input_flops=_flops(per_sample.backward_input * speed),
            backward_weight_flops=_flops(per_sample.backward_weight * speed),
            param_count=sum(p.numel() for p in params),
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            output_bytes=_numel(y) * y.element_size(),
            stash_bytes=round(stash / batch),
        ))
        x = y
    profile = ModelProfile(
        name=name, family=family, config=dict(config or {}),
        entrypoint=entrypoint, bytes_per_element=element_size, layers=rows,
    )
    return Measurement(profile, timings, speed, batch, torch.get_num_threads())


def _flops(value: float) -> float:
    """Four significant digits: the measurement is not more precise than that."""
    return float(f"{value:.4g}")


def profile_entrypoint(
    entrypoint: str,
    config: dict[str, Any] | None = None,
    *,
    batch: int,
    name: str | None = None,
    seed: int = 0,
    repeats: int = 5,
    flops_per_second: float | None = None,
) -> Measurement:
    """Build a user model from its entry point and measure it on ``batch`` samples."""
    layers, loss_fn, dataset = call_entrypoint(entrypoint, dict(config or {}), seed=seed)
    inputs, labels = dataset.batch(0, range(batch))
    default = entrypoint.split(":")[0].rsplit(".", 1)[-1].replace("_", "-").lower()
    return measure_profile(
        layers, loss_fn, inputs, labels, name=name or default, config=config,
        entrypoint=entrypoint, repeats=repeats, flops_per_second=flops_per_second,
    )


def profile_preset(
    preset_name: str,
    *,
    batch: int,
    seed: int = 0,
    repeats: int = 5,
    flops_per_second: float | None = None,
) -> Measurement:
    """Measure a built-in preset (the profile keeps its family, so the worker builds it)."""
    from spantrain_planner.inputs.profiles import preset
    from spantrain_planner.passes.assemble import model_ref

    from .models import build_model

    analytic = preset(preset_name)
    built = build_model(model_ref(analytic), seed=seed)
    assert built.dataset is not None
    inputs, labels = built.dataset.batch(0, range(batch))
    return measure_profile(
        built.stage(0, built.num_layers), built.loss_fn, inputs, labels, name=preset_name,
        family=analytic.family, config=analytic.config, repeats=repeats,
        flops_per_second=flops_per_second, layer_names=[lp.name for lp in analytic.layers],
    )
