"""Training settings and how a step runs: the FTI-KD protocol's defaults, precision, memory layout.

Split from the engine's loop (:mod:`ftikd.engine.trainer`) so that configuration can be read,
checked and hashed (sweep keys, paid-query views) without the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ftikd.checks import bounded
from ftikd.distributed import DistContext
from ftikd.engine.parallel import rank_rows
from ftikd.errors import FtikdError


@dataclass
class TrainConfig:
    """Optimisation and early-stopping settings (defaults: the FTI-KD protocol, METHODS.md §3.1)."""

    batch_size: int = bounded(64, ge=1, le=2**20)
    lr: float = bounded(0.05, gt=0, le=10)
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(5e-4, ge=0, le=1)
    patience: int = bounded(50, ge=1, le=10**6)
    phases: int = bounded(3, ge=1, le=100)
    max_epochs: int = bounded(1000, ge=1, le=10**6)
    lr_decay: float = bounded(0.1, gt=0, le=1)
    eval_batch_size: int = bounded(1000, ge=1, le=2**20)
    device: str = "cpu"
    precision: str = "auto"
    memory_format: str = "auto"
    compile: bool = False
    # history ``train_acc``: eval-mode top-1 after each pseudo-epoch on the first n//4 training images
    # (as many as the validation split, so it costs what validation costs; off: False)
    eval_train: bool = True


# TrainConfig fields that change where or how fast a run goes, not what it computes: kept out of
# the keys that identify a run's result (sweep job keys, paid-query views).
NOT_RESULT_FIELDS = frozenset({"device", "eval_batch_size", "compile", "memory_format", "eval_train"})

PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


@dataclass(frozen=True)
class StepOptions:
    """How a training step runs: autocast dtype (None: fp32), this rank's rows of the global batch, and
    a hook run between backward and the update (data-parallel averaging of extra modules' gradients)."""

    autocast_dtype: torch.dtype | None = None
    rows: slice | None = None
    before_update: Callable[[], None] | None = None


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto`` means bf16 autocast on a CUDA device that supports it and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise FtikdError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else None
    return torch.bfloat16 if precision == "bf16" else None


def resolve_channels_last(memory_format: str, device: torch.device) -> bool:
    """``auto`` means channels_last on CUDA (tensor-core convolutions) and the default layout on CPU."""
    if memory_format not in MEMORY_FORMATS:
        raise FtikdError(
            f"unknown memory format {memory_format!r}; choose one of: {', '.join(MEMORY_FORMATS)}"
        )
    return memory_format == "channels_last" or (memory_format == "auto" and device.type == "cuda")


def resolve_step_settings(
    cfg: TrainConfig, ctx: DistContext
) -> tuple[torch.dtype | None, bool, slice | None]:
    """Autocast dtype, channels_last, and this rank's rows of each batch, for ``cfg`` on its device.

    Refuses an unknown precision or memory format, or a batch that does not split over the ranks;
    runs call it before any teacher call, so that a bad setting costs nothing.
    """
    device = torch.device(cfg.device)
    return (
        resolve_autocast(cfg.precision, device),
        resolve_channels_last(cfg.memory_format, device),
        rank_rows(cfg.batch_size, ctx),
    )
