"""Teacher/student logit correlation difference (METHODS.md §3.2 (a); CKD [S0] §5.4, Table 4).

Following Tian et al. (CRD), 100 test images drawn with a fixed seed (the same for every model) are
passed through each model; each model's class-correlation matrix of logits is compared with the
teacher's by the mean absolute difference over all C² entries (A31: the always-zero diagonal is
included). Lower means the student reproduces the teacher's inter-class structure more closely.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftikd.errors import FtikdError

SAMPLES = 100
SAMPLE_SEED = 0
SIGMA_EPS = 1e-12


def sample_indices(num_test: int, count: int = SAMPLES, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """``count`` distinct test indices drawn by a seeded generator, sorted: the same for every model."""
    if count < 2:
        raise FtikdError(f"the correlation needs at least 2 samples, got --samples {count}")
    if count > num_test:
        raise FtikdError(f"the test split has {num_test} images but {count} were asked; lower --samples")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_test, generator=g)[:count].sort().values


def correlation_matrix(logits: torch.Tensor, eps: float = SIGMA_EPS) -> torch.Tensor:
    """The C x C Pearson correlation of logit columns over the N rows of ``logits`` (N, C).

    Columns are centred by their mean over the samples, ``S = Lcᵀ Lc / (N - 1)`` and
    ``R_kl = S_kl / ((σ_k + eps)(σ_l + eps))``; ``eps`` keeps a constant class column finite (its
    row and column of R are 0 off the diagonal).
    """
    if logits.ndim != 2 or logits.shape[0] < 2:
        raise ValueError(f"logits must be (N >= 2, C), got shape {tuple(logits.shape)}")
    x = logits.double()
    centred = x - x.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / (x.shape[0] - 1)
    sigma = cov.diagonal().clamp_min(0).sqrt() + eps
    return cov / (sigma[:, None] * sigma[None, :])


def correlation_difference(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise ``|R_student - R_teacher|`` (C x C) of two models' logits on the same samples."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} must come from the same samples and classes"
        )
    return (correlation_matrix(student_logits) - correlation_matrix(teacher_logits)).abs()


def mean_correlation_difference(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """The Table 4 metric: ``(1/C²) Σ_kl |R^s_kl - R^t_kl|`` (all C² entries, A31)."""
    return float(correlation_difference(teacher_logits, student_logits).mean())


def plot_differences(diffs: dict[str, torch.Tensor], path: str | Path) -> Path:
    """PNG heatmaps of ``|R_student - R_teacher|`` per student on one colour scale (as in CRD's figure)."""
    from ftikd.analysis.embedding import panel_axes
    from ftikd.analysis.plot import save_figure

    fig, axes = panel_axes(len(diffs))
    vmax = max(float(d.max()) for d in diffs.values()) or 1.0
    for ax, (name, d) in zip(axes, diffs.items(), strict=True):
        image = ax.imshow(d.cpu().numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{name}\nmean {float(d.mean()):.4f}", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="|R_student - R_teacher|")
    return save_figure(fig, path)
