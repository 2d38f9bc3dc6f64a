"""BatchNorm over a stage's devices: a micro-batch split over them normalises as if on one.

Role: a stage on ``k > 1`` devices runs each micro-batch as ``k`` pieces of uneven row counts.
A plain ``BatchNorm`` would normalise every piece by its own statistics, so the gradients
would depend on the plan's shares. ``convert`` replaces every ``BatchNorm{1,2,3}d`` of a
stage's layers by ``StageBatchNorm``, which in training computes the statistics of the whole
micro-batch over the stage's ranks (what ``torch.nn.SyncBatchNorm`` does for DDP, but over the
stage's process group, with uneven row counts, on CPU and GPU alike):

* every rank computes the per-channel ``(count, mean, M2)`` of its rows (``M2`` the sum of
  squared deviations) and the stage gathers all of them: an all-reduce (sum) of a ``k``-row
  zero matrix in which each rank fills its own row, so the sums add zeros only, are exact, and
  every rank holds bitwise the same matrix;
* every rank combines the rows in the same order (Chan's parallel formula; numerically stable,
  unlike sums of squares), so mean and variance, hence the running statistics, are identical
  on all ranks of the stage: the checkpoint's copy (replica 0's) is every replica's;
* the rows are normalised by the combined statistics with ordinary differentiable tensor
  ops; autograd's backward of the gather all-reduces the gradients of the matrix, which is the
  exact gradient of the micro-batch's statistics (one more all-reduce of ``k x (2C + 1)``
  elements per BatchNorm in backward).

Collectives over the stage group must be issued in the same order on every rank: the stage's
ranks run the same action list over the same graph, so their forward and backward passes reach
the BatchNorms (and the gradient buckets of ``gradsync``) in the same order.

Weights, biases and buffers are the original module's tensors under the same names, so
parameter lists, optimizer state and checkpoints are unchanged. In eval mode (or with
``track_running_stats`` off, batch statistics as torch does) the behaviour is BatchNorm's.
Across micro-batches nothing is shared: each micro-batch has its own statistics, as in GPipe,
and the running statistics are updated once per micro-batch.

Must not import torch.distributed (the reduce function comes from ``comm``), kopf, the
Kubernetes client or ``spantrain_operator``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Sums a tensor in place over the stage's ranks (blocking).
Reduce = Callable[[Tensor], None]

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Gather(torch.autograd.Function):
    """Every replica's ``row``, stacked in replica order (all-reduce of a zero-padded matrix);
    backward: the sum over ranks of the gradient of the matrix, this rank's row of it."""

    @staticmethod
    def forward(ctx: Any, row: Tensor, replica: int, width: int,
                reduce: Reduce) -> Tensor:
        ctx.replica = replica
        ctx.reduce = reduce
        table = row.new_zeros((width, *row.shape))
        table[replica] = row
        reduce(table)
        return table

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        total = grad.contiguous().clone()
        ctx.reduce(total)
        return total[ctx.replica], None, None, None


class StageBatchNorm(nn.Module):
    """A BatchNorm whose training statistics span the rows of all ranks of a stage."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(self, bn: nn.Module, *, replica: int, width: int, reduce: Reduce) -> None:
        super().__init__()
        if not isinstance(bn, BATCHNORMS):
            raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = bn.momentum
        self.affine = bn.affine
        self.track_running_stats = bn.track_running_stats
        self.replica = replica
        self.width = width
        self.reduce = reduce
        # the original tensors, under the original names (parameters, optimizer, checkpoints)
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        self.train(bn.training)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"replica={self.replica} of {self.width}")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        c = self.num_features
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        xs = x.to(stat_dtype)
        dims = [0, *range(2, x.dim())]
        count = x.numel() // c if x.numel() else 0
        if count:
            var, mean = torch.var_mean(xs, dim=dims, correction=0)
            m2 = var * count
        else:  # no rows here: contributes nothing
            mean = m2 = xs.new_zeros(c)
        row = torch.cat([xs.new_full((1,), float(count)), mean, m2])
        # ``Function.apply`` is unannotated in torch (returns the forward's output)
        table = cast(Tensor, _Gather.apply(  # type: ignore[no-untyped-call]
            row, self.replica, self.width, self.reduce))
        counts, means, m2s = table[:, :1], table[:, 1:1 + c], table[:, 1 + c:]
        n = counts.sum()
        mean_all = (counts * means).sum(0) / n
        m2_all = (m2s + counts * (means - mean_all) ** 2).sum(0)
        var_all = m2_all / n
        scale = torch.rsqrt(var_all + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(stat_dtype)
        shift = -mean_all * scale
        if self.bias is not None:
            shift = shift + self.bias.to(stat_dtype)
        shape = (1, c) + (1,) * (x.dim() - 2)
        out = xs * scale.view(shape) + shift.view(shape)
        if self.running_mean is not None and self.running_var is not None:
            self._update_running(mean_all.detach(), (m2_all / (n - 1).clamp(min=1)).detach())
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, unbiased_var: Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        factor = self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if factor is None:  # cumulative moving average, as BatchNorm's momentum=None
                factor = 1.0 / float(self.num_batches_tracked)
        if factor is None:
            factor = 0.0
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype),
                                               alpha=factor)


def convert(module: nn.Module, *, replica: int, width: int, reduce: Reduce) -> nn.Module:
    """``module`` with every BatchNorm (itself included) replaced by a ``StageBatchNorm``."""
    if isinstance(module, BATCHNORMS):
        return StageBatchNorm(module, replica=replica, width=width, reduce=reduce)
    for name, child in module.named_children():
        new = convert(child, replica=replica, width=width, reduce=reduce)
        if new is not child:
            setattr(module, name, new)
    return module


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, BATCHNORMS) for m in module.modules())
