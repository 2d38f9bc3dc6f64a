"""A plain single-process PyTorch training loop on the same model, data and optimizer.

Role: the reference every plan must reproduce (the gradient-equivalence and resume tests
compare the distributed runtime against it) and the denominator of the benchmark's
``overhead_ratio``. It is deliberately textbook: ``nn.Sequential`` of the same layers, one
forward and backward over the whole global batch, ``clip_grad_norm_``, AdamW, with the
runtime's learning-rate schedule — nothing of the runtime is reused except the pure
``learning_rate`` function, so agreement is evidence, not tautology.

With ``pieces`` (row counts of consecutive pieces of the global batch) it is textbook gradient
accumulation instead: each piece runs forward and backward alone, its mean loss weighted by
its rows ÷ the global batch. Without BatchNorm this changes only summation order; with it,
each piece is normalised by its own statistics and the running statistics are updated once
per piece. ``pieces=microbatch_pieces(plan)`` is the reference of a plan for such a model.

Must not import torch.distributed, kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from spantrain_planner.inputs.plan import ModelRef, Plan

from .config import TrainingConfig
from .models import build_model
from .runtime import adamw, dtype_of, learning_rate


class PlainTrainer:
    """Single-process training on the global batch."""

    def __init__(self, ref: ModelRef, cfg: TrainingConfig, global_batch: int, *,
                 pieces: Sequence[int] | None = None) -> None:
        self.cfg = cfg
        self.global_batch = global_batch
        self.pieces = list(pieces) if pieces is not None else [global_batch]
        if sum(self.pieces) != global_batch or min(self.pieces) < 1:
            raise ValueError(f"pieces {self.pieces} must be positive and sum to the global "
                             f"batch {global_batch}")
        built = build_model(ref, seed=cfg.seed, dtype=dtype_of(cfg.precision),
                            corpus=cfg.data.corpus)
        self.model = nn.Sequential(*built.stage(0, built.num_layers))
        self.loss_fn = built.loss_fn
        assert built.dataset is not None
        self.dataset = built.dataset
        self.dtype = dtype_of(cfg.precision)
        self.optimizer = adamw(self.model.parameters(), cfg)
        self.grad_hook: Callable[[int, dict[str, Tensor]], None] | None = None

    def named_parameters(self) -> dict[str, Tensor]:
        """Parameters named like the runtime and checkpoints: ``<layer>.<name>``."""
        return {name: p for name, p in self.model.named_parameters()}

    def step(self, step: int) -> float:
        total = 0.0
        start = 0
        for rows in self.pieces:
            x, labels = self.dataset.batch(step, range(start, start + rows))
            start += rows
            if x.is_floating_point():
                x = x.to(self.dtype)
            loss = self.loss_fn(self.model(x), labels)
            if len(self.pieces) > 1:
                loss = loss * (rows / self.global_batch)
            torch.autograd.backward(loss)  # typed, unlike Tensor.backward
            total += float(loss.detach())
        if self.grad_hook is not None:
            self.grad_hook(step, {n: p.grad.detach().clone()
                                  for n, p in self.model.named_parameters()
                                  if p.grad is not None})
        if self.cfg.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


def microbatch_pieces(plan: Plan) -> list[int]:
    """The pieces that reproduce ``plan``: its micro-batches, one after the other."""
    return [plan.microbatch_size] * plan.num_microbatches
