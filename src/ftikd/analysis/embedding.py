"""Model representations for the analyses, and t-SNE of penultimate embeddings (METHODS.md §3.2).

:func:`model_outputs` runs a model in eval mode over uint8 images in batches on its device and
returns the logits and the penultimate ``embedding`` feature (the pooled vector the classifier reads,
see ``ftikd.models``). :func:`tsne_embedding` maps a seeded subsample of embeddings to 2-D with
scikit-learn's t-SNE for the usual class-cluster pictures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ftikd.data.augment import normalize
from ftikd.errors import FtikdError


@dataclass
class Outputs:
    """Logits (N, C) and penultimate embeddings (N, D) of one model, on the model's device."""

    logits: torch.Tensor
    embedding: torch.Tensor


@torch.no_grad()
def model_outputs(
    model: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 1000,
) -> Outputs:
    """Eval-mode logits and ``embedding`` features of ``model`` on uint8 ``images`` (N, C, H, W)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, embeds = [], []
    for start in range(0, images.shape[0], batch_size):
        out = model(normalize(images[start : start + batch_size].to(device), mean, std), with_features=True)
        if "embedding" not in out.features:
            raise FtikdError(f"{type(model).__name__} has no 'embedding' feature; t-SNE needs one")
        logits.append(out.logits.float())
        embeds.append(out.features["embedding"].flatten(1).float())
    model.train(was_training)
    return Outputs(torch.cat(logits), torch.cat(embeds))


@dataclass
class TSNEConfig:
    """t-SNE settings: a seeded subsample of ``samples`` test images, perplexity capped by its size."""

    samples: int = 1000
    perplexity: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 10:
            raise ValueError(f"t-SNE needs at least 10 samples, got {self.samples}")
        if not self.perplexity > 0:
            raise ValueError(f"t-SNE perplexity must be > 0, got {self.perplexity}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"t-SNE seed must be in [0, 2**32), got {self.seed}")


def subsample(num: int, count: int, seed: int) -> torch.Tensor:
    """At most ``count`` distinct indices of ``range(num)`` drawn with ``seed``, sorted."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num, generator=g)[: min(count, num)].sort().values


def tsne_embedding(embedding: torch.Tensor, cfg: TSNEConfig) -> tuple[np.ndarray, float]:
    """2-D t-SNE coordinates of the rows of ``embedding`` and the final KL divergence.

    The perplexity must stay below the number of points, so it is lowered to ``(N - 1) / 3`` for
    small subsamples; PCA initialisation and ``random_state=cfg.seed`` make the picture reproducible.
    """
    from sklearn.manifold import TSNE

    points = embedding.detach().double().cpu().numpy()
    perplexity = min(cfg.perplexity, (points.shape[0] - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=cfg.seed)
    coords = tsne.fit_transform(points)
    return coords, float(tsne.kl_divergence_)


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of ``points`` grouped by ``labels`` (Euclidean): how separated the classes are."""
    from sklearn.metrics import silhouette_score

    if np.unique(labels).size < 2:
        return float("nan")
    return float(silhouette_score(points, labels))


def panel_axes(count: int, size: float = 3.2) -> tuple[Any, list[Any]]:
    """A figure with ``count`` square panels, at most 4 a row (one per model); spare panels hidden."""
    from ftikd.analysis.plot import pyplot

    cols = min(count, 4)
    rows = -(-count // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(size * cols, size * rows), dpi=110, squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat[:count])


def plot_tsne(coords: dict[str, np.ndarray], labels: np.ndarray, path: str | Path) -> Path:
    """PNG with one t-SNE scatter panel per model, coloured by true class."""
    from ftikd.analysis.plot import save_figure

    fig, axes = panel_axes(len(coords))
    cmap = "tab10" if np.unique(labels).size <= 10 else "nipy_spectral"
    for ax, (name, xy) in zip(axes, coords.items(), strict=True):
        ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=cmap, s=4)
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path)
