"""A stage's data-parallel gradient sum, optionally overlapped with the last backward work.

Role: a stage on ``k > 1`` devices must sum its gradients over them before the optimizer
steps. Doing it after the last action puts the whole all-reduce on the critical path. Where
the plan gives ``grad_buckets`` (stages on accelerators, whose collectives run beside the
compute), this starts the sum of each bucket of layers as soon as its gradients are final,
like DDP's gradient buckets, so the ring runs while the device computes the gradients of
earlier layers. Otherwise (CPU devices, where the ring would take the compute's cycles) the
runtime passes one bucket of every parameter and no hooks: one flat all-reduce when
``finish`` is called.

* the plan's buckets, last layers first (the order a backward pass finishes them), about
  25 MiB each (``spantrain_planner.inputs.plan.gradient_buckets``); the planner's simulator times
  exactly these;
* a parameter's gradient is final once it has been accumulated once per micro-batch: autograd
  accumulations are counted by post-accumulate-grad hooks, the deferred weight GEMMs of a
  zero-bubble ``W`` pass by ``splitgrad``'s callback (``grad_ready``);
* buckets launch strictly in index order, so every rank of the stage issues the same
  collectives in the same order whatever order its gradients finish in (process groups
  require that); a bucket whose gradients never all arrive (an unused parameter) is launched,
  with zeros for the missing gradients, when the step's actions are done.

The sum is the same element-wise sum of the same values as one flat all-reduce, so gradients
are unchanged (the gradient-equivalence tests cover multi-device stages).

Must not import torch.distributed (the launch function comes from ``comm``), kopf, the
Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: Starts a sum over the stage's ranks of ``tensor`` in place; returns a handle with ``wait``.
Launch = Callable[[Tensor], Any]


@dataclass
class _Launched:
    bucket: int
    flat: Tensor
    work: Any
    at: float  # wall-clock launch time (the emulator's all-reduce clock starts there)


class GradientSync:
    """Gradient buckets of one rank's stage, each summed as soon as it is final."""

    def __init__(self, buckets: Sequence[Sequence[Tensor]], passes: int, launch: Launch) -> None:
        """``buckets``: the parameters of each bucket, in launch order (last layers first);
        ``passes``: accumulations that make a gradient final (the micro-batch count)."""
        self.buckets = [list(b) for b in buckets if b]
        self.passes = passes
        self.launch = launch
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._count = dict.fromkeys(self._bucket_of, 0)
        self._missing = [len(b) for b in self.buckets]
        self._launched: list[_Launched] = []

    def install_hooks(self) -> None:
        """Count autograd's accumulations into every parameter's ``.grad``."""
        for bucket in self.buckets:
            for p in bucket:
                hook = p.register_post_accumulate_grad_hook  # unannotated in torch
                hook(self.grad_ready)  # type: ignore[no-untyped-call]

    def grad_ready(self, param: Tensor) -> None:
        """One more accumulation into ``param.grad``; launches every bucket that is due."""
        key = id(param)
        if key not in self._count:
            return
        self._count[key] += 1
        if self._count[key] > self.passes:
            raise RuntimeError(
                f"a parameter's gradient was accumulated {self._count[key]} times in one step "
                f"(expected {self.passes}, one per micro-batch); its bucket was already summed"
            )
        if self._count[key] == self.passes:
            self._missing[self._bucket_of[key]] -= 1
            self._launch_due()

    def _launch_due(self, *, force: bool = False) -> None:
        while len(self._launched) < len(self.buckets):
            i = len(self._launched)
            if self._missing[i] and not force:
                return
            grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                     for p in self.buckets[i]]
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._launched.append(_Launched(i, flat, self.launch(flat), time.time()))

    def finish(self) -> list[tuple[float, int]]:
        """Launch what is left, wait for every sum and write the sums into ``.grad``.

        Returns ``(launch wall-clock time, bytes)`` per bucket, for the link emulator; resets
        the counts for the next step.
        """
        self._launch_due(force=True)
        launches: list[tuple[float, int]] = []
        for item in self._launched:
            if item.work is not None:
                item.work.wait()
            offset = 0
            for p in self.buckets[item.bucket]:
                n = p.numel()
                p.grad = item.flat[offset:offset + n].view_as(p)
                offset += n
            launches.append((item.at, item.flat.numel() * item.flat.element_size()))
        self._launched.clear()
        self._count = dict.fromkeys(self._count, 0)
        self._missing = [len(b) for b in self.buckets]
        return launches
