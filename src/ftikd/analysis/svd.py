"""Representation flatness by SVD (METHODS.md §3.2 (b); CKD [S0] §5.4, Fig. 4, after Manifold Mixup).

For each class the test logits of that class's samples are stacked (n_c x C) and their singular
values sorted in descending order; the spectra are averaged over classes rank by rank (A32: per
class, uncentred, raw logits, test set). A lower curve is a flatter representation: fewer directions
of variance. ``normalise`` divides each averaged spectrum by its largest value so that models of
different logit scale can be compared by shape alone (not in [S0]; off by default).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftikd.errors import FtikdError


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D matrix in descending order (float64 for a stable small spectrum)."""
    return torch.linalg.svdvals(matrix.double())


def class_spectrum(logits: torch.Tensor, labels: torch.Tensor, normalise: bool = False) -> torch.Tensor:
    """Rank-by-rank mean over classes of each class's sorted singular values of ``logits`` (N, C).

    Classes with fewer samples have shorter spectra, so every spectrum is cut to the shortest one
    (``min(n_c, C)``) before averaging. Classes absent from ``labels`` are skipped.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits (N, C) and labels (N,) must match, got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    classes = labels.unique()
    if classes.numel() == 0:
        raise FtikdError("no samples to compute a singular value spectrum from")
    spectra = [singular_values(logits[labels == c]) for c in classes.tolist()]
    rank = min(s.numel() for s in spectra)
    mean = torch.stack([s[:rank] for s in spectra]).mean(dim=0)
    if normalise:
        mean = mean / mean[0].clamp_min(torch.finfo(mean.dtype).tiny)
    return mean


def flatness(spectrum: torch.Tensor) -> float:
    """Mean of ``σ_i / σ_1``: 1/rank for a single direction, 1 for an isotropic spectrum."""
    return float((spectrum / spectrum[0].clamp_min(torch.finfo(spectrum.dtype).tiny)).mean())


def plot_spectra(spectra: dict[str, torch.Tensor], path: str | Path, normalised: bool = False) -> Path:
    """PNG of singular value against index, one line per model (CKD Fig. 4)."""
    from ftikd.analysis.plot import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=120)
    for name, sp in spectra.items():
        ax.plot(range(1, sp.numel() + 1), sp.cpu().numpy(), marker="o", markersize=3, label=name)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value / σ1" if normalised else "singular value (mean over classes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
