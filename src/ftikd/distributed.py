"""Small helpers for running ftikd data-parallel under ``torchrun``.

``torchrun --nproc_per_node N`` starts N copies of the same command and tells each one its place
through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). These helpers read that, start
the process group when there is more than one process, and split work between ranks. Run without
torchrun, everything degrades to a single process (rank 0 of 1) and the collective calls do nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ftikd.errors import FtikdError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its global ``rank`` of ``world_size``, and its rank on this node."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 does the once-only work (merging, printing)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise FtikdError(
            f"environment variable {name}={raw!r} is not an integer; launch with torchrun or unset it"
        ) from None


def dist_context() -> DistContext:
    """This process's place as set by torchrun (single process 0 of 1 when launched without it)."""
    ctx = DistContext(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if ctx.world_size < 1 or not 0 <= ctx.rank < ctx.world_size or ctx.local_rank < 0:
        raise FtikdError(
            f"inconsistent torchrun environment RANK={ctx.rank} WORLD_SIZE={ctx.world_size} "
            f"LOCAL_RANK={ctx.local_rank}; launch with torchrun or unset these variables"
        )
    return ctx


def init_distributed(device: str) -> DistContext:
    """Join the process group when torchrun started several processes; return this process's context.

    The backend is gloo for CPU and nccl for CUDA; on CUDA each process is bound to the GPU of its
    ``LOCAL_RANK``, so ``"cuda"`` means that GPU from then on. Calling it twice is harmless.
    """
    ctx = dist_context()
    if ctx.world_size > 1 and not dist.is_initialized():
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda:
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return ctx


def barrier() -> None:
    """Wait until every rank gets here (does nothing in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_indices(indices: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous slice of ``indices``.

    Split rule: with ``n`` indices and ``w`` ranks, every rank gets ``n // w`` consecutive indices
    and the first ``n % w`` ranks one more, in rank order (rank 0 takes the head). The shards are
    disjoint, cover ``indices`` exactly, and differ in size by at most one.
    """
    base, extra = divmod(int(indices.numel()), ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return indices[start : start + base + (1 if ctx.rank < extra else 0)]


def shutdown() -> None:
    """Leave the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
