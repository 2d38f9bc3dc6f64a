"""Split backward for zero-bubble schedules: B (input gradient) now, W (weight GEMMs) later.

Role: make the ``B<m>`` and ``W<m>`` actions of a zero-bubble schedule cost what they should.
A naive split (``autograd.grad`` w.r.t. the stage input with ``retain_graph``, then again
w.r.t. the parameters) runs most of the backward twice, because reaching the weights of early
layers needs the activation gradients of later ones. Instead, every ``nn.Linear`` of a stage is
routed through ``_SplitLinear``: in the B pass its backward returns the input gradient (and
the cheap bias gradient) and *stashes* ``(input, grad_output)``; the W pass then computes
``grad_W = grad_output^T @ input`` from the stash, without touching the autograd graph (which
B already freed). Parameters of other modules (LayerNorm, embeddings, convolutions, BatchNorm)
get their gradients in B — correct, just not deferred. In a forward that will be followed by
a fused ``BW``, the plain ``F.linear`` is used, so non-zero-bubble schedules pay nothing.

The weight gradient is the same mathematical expression autograd uses, so gradients are
unchanged (the gradient-equivalence tests cover zb plans). Called only by ``runtime``.

Must not import torch.distributed, kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SplitState:
    """Per-rank switchboard: which micro-batch is recording, and the deferred W work."""

    def __init__(self) -> None:
        self.recording: int | None = None  # micro-batch whose forward uses the split path
        self.deferring: int | None = None  # micro-batch whose backward defers weight GEMMs
        self.pending: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = defaultdict(list)
        #: called with each weight after a W pass accumulated into its ``.grad`` (autograd's
        #: post-accumulate-grad hooks do not see these assignments)
        self.on_grad: Callable[[Tensor], None] | None = None

    @contextmanager
    def record(self, microbatch: int | None) -> Iterator[None]:
        self.recording = microbatch
        try:
            yield
        finally:
            self.recording = None

    @contextmanager
    def defer(self, microbatch: int) -> Iterator[None]:
        self.deferring = microbatch
        try:
            yield
        finally:
            self.deferring = None

    def flush(self, microbatch: int) -> None:
        """Run the deferred weight-gradient GEMMs of one micro-batch (the W pass)."""
        for weight, x, grad_out in self.pending.pop(microbatch, []):
            g = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            if weight.grad is None:
                weight.grad = g
            else:
                weight.grad += g
            if self.on_grad is not None:
                self.on_grad(weight)


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, state: SplitState
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.state = state
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (grad_out,) = grad_outputs  # one output
        x, weight = ctx.saved_tensors
        state: SplitState = ctx.state
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        grad_w = None
        # B passes exclude the weights from the wanted inputs, so ``needs_input_grad`` may be
        # False for them; the weight still needs its deferred gradient.
        if state.deferring is not None and weight.requires_grad:
            state.pending[state.deferring].append((weight, x, grad_out))
        elif ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w, grad_b, None


def _split_forward(module: nn.Linear, state: SplitState) -> Any:
    plain = module.forward

    def forward(x: Tensor) -> Tensor:
        if state.recording is None:
            return plain(x)
        # ``Function.apply`` is unannotated in torch (returns the forward's output)
        out = _SplitLinear.apply(x, module.weight, module.bias, state)  # type: ignore[no-untyped-call]
        return cast(Tensor, out)

    return forward


def install(layers: list[nn.Module], state: SplitState) -> list[Tensor]:
    """Route every ``nn.Linear`` of ``layers`` through the split path; return their weights.

    The modules keep their parameters and state-dict keys; only ``forward`` is wrapped (an
    instance attribute), so checkpoints and the plain training loop see ordinary modules.
    """
    weights: list[Tensor] = []  # the Linear weights (Parameters; torch types them Tensor)
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.forward = _split_forward(module, state)  # type: ignore[method-assign]
                weights.append(module.weight)
    return weights
