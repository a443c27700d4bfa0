"""The FTI-KD data split (Comparative KD protocol).

With a budget of ``n`` teacher calls the student may use ``n`` training samples plus a validation set of
``n // 4`` further samples, all drawn without replacement from the training split by a seeded generator,
so the split depends only on (dataset size, n, seed) and never on global RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftikd.errors import FtikdError


@dataclass(frozen=True)
class FTISplit:
    """``train_idx`` (n) and ``val_idx`` (n // 4) are disjoint int64 indices into the training split."""

    train_idx: torch.Tensor
    val_idx: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.train_idx.numel())

    @property
    def n_val(self) -> int:
        return int(self.val_idx.numel())


def validation_size(n: int) -> int:
    """Size of the validation set that accompanies a budget of ``n`` training samples."""
    return n // 4


def validate_budget(num_train_total: int, n: int) -> int:
    """Check that a budget ``n`` fits a training split of ``num_train_total``; return samples needed."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise FtikdError(f"budget n must be an integer, got {n!r}")
    n_val = validation_size(n)
    if n < 4 or n_val < 1:
        raise FtikdError(f"budget n={n} is too small for a validation split; use n >= 4")
    needed = n + n_val
    if needed > num_train_total:
        raise FtikdError(
            f"budget n={n} needs {needed} samples but the training split has {num_train_total} "
            f"(n plus n//4 for validation); lower --calls"
        )
    return needed


def fti_split(num_train_total: int, n: int, seed: int) -> FTISplit:
    """Draw the seeded FTI-KD split: ``n`` train and ``n // 4`` disjoint validation indices."""
    needed = validate_budget(num_train_total, n)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(num_train_total, generator=g, dtype=torch.int64)[:needed]
    return FTISplit(train_idx=perm[:n].clone(), val_idx=perm[n:].clone())
