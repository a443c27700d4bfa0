"""Data-parallel student training under ``torchrun``: batch norm over the global batch, DDP wrapping.

Every rank draws the same global batch (same sampler and augmentation seeds) and trains on its own
contiguous slice of rows; DDP averages the gradients. For the result to match a single process on
the whole batch, batch-norm statistics must also cover the whole batch: on CUDA this is PyTorch's
``SyncBatchNorm``; on CPU (gloo), where ``SyncBatchNorm`` is refused, :class:`GlobalBatchNorm` does
the same with an autograd-aware all-reduce of per-channel sums.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ftikd.distributed import DistContext
from ftikd.errors import FtikdError


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is again an all-reduce of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of the batch summed over all ranks.

    Same parameters and buffers as the batch norm it replaces (state dicts are interchangeable).
    Mean and biased variance come from all-reduced sums of x and x² over every dimension but the
    channel one; the running variance gets the unbiased estimate, as ``nn.BatchNorm*`` does. The
    all-reduce is differentiable, so gradients flow to every rank's activations.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        c = x.shape[1]
        count = x.new_tensor([x.numel() / c])
        stats = _SumOverRanks.apply(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp_min(0)
        self._update_running_stats(mean.detach(), var.detach(), total.detach())
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, total: torch.Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None:
            return
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (total / (total - 1).clamp_min(1))
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased, momentum)


def use_global_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every batch norm in ``model`` normalise over the global batch (in place; returns the model)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            module.__class__ = GlobalBatchNorm
    return model


def rank_rows(batch_size: int, ctx: DistContext) -> slice | None:
    """This rank's contiguous slice of a global batch's rows (None in a single process).

    The global batch must split evenly: with equal slices, DDP's mean of per-rank mean losses is the
    global batch's mean loss.
    """
    if ctx.world_size == 1:
        return None
    if batch_size % ctx.world_size:
        raise FtikdError(
            f"batch size {batch_size} does not split evenly over {ctx.world_size} processes; "
            f"pass a --batch-size divisible by {ctx.world_size}"
        )
    per_rank = batch_size // ctx.world_size
    return slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)


def wrap_data_parallel(student: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """The module training steps forward through: ``student`` inside DDP, with global batch norm.

    ``find_unused`` lets steps leave part of the student without a gradient (two-stage methods).
    """
    use_global_batchnorm(student, device)
    ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(student, device_ids=ids, find_unused_parameters=find_unused)


def average_gradients(module: nn.Module, ctx: DistContext) -> None:
    """Average the gradients of modules trained beside the student (e.g. a method's regressors)."""
    if ctx.world_size == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(ctx.world_size)


def mean_over_ranks(sums: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, torch.Tensor]:
    """Per-term loss sums averaged over ranks, so every rank logs and checks the same numbers."""
    if ctx.world_size == 1 or not sums:
        return sums
    names = sorted(sums)
    stacked = torch.stack([torch.as_tensor(sums[n], dtype=torch.float64) for n in names])
    dist.all_reduce(stacked)
    return {n: v / ctx.world_size for n, v in zip(names, stacked, strict=True)}


def rank_device(device: str, ctx: DistContext) -> str:
    """Under ``torchrun`` a bare ``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``)."""
    return f"cuda:{ctx.local_rank}" if ctx.world_size > 1 and device == "cuda" else device
