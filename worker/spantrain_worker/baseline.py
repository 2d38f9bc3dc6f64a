"""A plain single-process PyTorch training loop on the same model, data and optimizer.

Role: the reference every plan must reproduce (the gradient-equivalence and resume tests
compare the distributed runtime against it) and the denominator of the benchmark's
``overhead_ratio``. It is deliberately textbook: ``nn.Sequential`` of the same layers, one
forward and backward over the whole global batch, ``clip_grad_norm_``, AdamW, with the
runtime's learning-rate schedule — nothing of the runtime is reused except the pure
``learning_rate`` function, so agreement is evidence, not tautology.

Must not import torch.distributed, kopf, the Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from spantrain_planner.plan import ModelRef

from .config import TrainingConfig
from .models import build_model
from .runtime import adamw, dtype_of, learning_rate


class PlainTrainer:
    """Single-process training on the global batch."""

    def __init__(self, ref: ModelRef, cfg: TrainingConfig, global_batch: int) -> None:
        self.cfg = cfg
        self.global_batch = global_batch
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
        x, labels = self.dataset.batch(step, range(self.global_batch))
        if x.is_floating_point():
            x = x.to(self.dtype)
        loss = self.loss_fn(self.model(x), labels)
        torch.autograd.backward(loss)  # typed, unlike Tensor.backward
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
        return float(loss.detach())
