"""PGD adversarial transferability between models (METHODS.md §3.3 "Transferability"; survey [S3] Fig. 1).

Untargeted L∞ PGD with cross-entropy on the true label in [0, 1] pixel space: a uniform random start
in [-ε, ε] (A34, Madry et al.), then K steps ``x ← clip₀₁(Π_ε(x + η·sign ∇ₓ CE))``. Examples crafted
on a source model are shown to every target model. The attack success rate counts only test images
that both the source and the target classify correctly when clean; the target's accuracy on all the
adversarial images is reported beside it. Everything runs batched on the models' device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ftikd.data.augment import Normalizer


@dataclass
class PGDConfig:
    """The survey's settings: ε = 0.031 (≈ 8/255), step η = 0.003, K = 20, random start (A34)."""

    eps: float = 0.031
    step: float = 0.003
    steps: int = 20
    random_start: bool = True
    batch_size: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.eps <= 1:
            raise ValueError(f"PGD eps must be in [0, 1] (pixel scale), got {self.eps}")
        if not self.step >= 0:
            raise ValueError(f"PGD step size must be >= 0, got {self.step}")
        if self.steps < 0:
            raise ValueError(f"PGD steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"PGD batch size must be >= 1, got {self.batch_size}")


class PixelModel(nn.Module):
    """A model that takes [0, 1] pixels: dataset normalisation first, then the model's logits."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        norm = Normalizer(mean, std, next(model.parameters()).device)
        self.register_buffer("mean", norm.mean)
        self.register_buffer("std", norm.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std).logits


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: PGDConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L∞ PGD adversarial examples for ``model`` (pixels → logits) on a batch ``x`` in [0, 1]."""
    was_training = model.training
    model.eval()
    adv = x.detach().clone()
    if cfg.random_start and cfg.eps > 0:
        noise = torch.rand(x.shape, generator=generator, device=x.device)
        adv = (adv + (noise * 2 - 1) * cfg.eps).clamp(0, 1)
    for _ in range(cfg.steps):
        adv.requires_grad_(True)
        with torch.enable_grad():  # also inside a caller's no_grad block
            loss = F.cross_entropy(model(adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + cfg.step * grad.sign()
            adv = torch.minimum(torch.maximum(adv, x - cfg.eps), x + cfg.eps).clamp(0, 1)
    model.train(was_training)
    return adv.detach()


@dataclass
class TransferResult:
    """Source x target matrices: attack success rate (%), adversarial accuracy (%), evaluated counts."""

    success: torch.Tensor
    adv_accuracy: torch.Tensor
    clean_accuracy: torch.Tensor
    counted: torch.Tensor


def transfer_matrix(
    models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, cfg: PGDConfig
) -> TransferResult:
    """Craft PGD on each model and evaluate on every model; ``images`` are uint8 (N, C, H, W).

    ``models`` take [0, 1] pixels (see :class:`PixelModel`) and share one device. Success rate of
    source s on target t: the fraction of images correct on both s and t when clean that t
    misclassifies after the attack on s (NaN when no image qualifies).
    """
    device = next(models[0].parameters()).device
    m = len(models)
    fooled = torch.zeros(m, m, dtype=torch.long, device=device)
    counted = torch.zeros_like(fooled)
    adv_correct = torch.zeros_like(fooled)
    clean_correct = torch.zeros(m, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    for start in range(0, images.shape[0], cfg.batch_size):
        x = images[start : start + cfg.batch_size].to(device).float() / 255.0
        y = labels[start : start + cfg.batch_size].to(device)
        with torch.no_grad():
            clean = torch.stack([net(x).argmax(dim=1) == y for net in models])  # (m, B)
        clean_correct += clean.sum(dim=1)
        for s, source in enumerate(models):
            adv = pgd_attack(source, x, y, cfg, generator)
            with torch.no_grad():
                hit = torch.stack([net(adv).argmax(dim=1) == y for net in models])  # (m, B)
            both = clean[s][None, :] & clean  # (m targets, B)
            counted[s] += both.sum(dim=1)
            fooled[s] += (both & ~hit).sum(dim=1)
            adv_correct[s] += hit.sum(dim=1)
    n = images.shape[0]
    return TransferResult(
        success=(100.0 * fooled / counted.clamp_min(1)).masked_fill(counted == 0, float("nan")).cpu(),
        adv_accuracy=(100.0 * adv_correct / n).cpu(),
        clean_accuracy=(100.0 * clean_correct / n).cpu(),
        counted=counted.cpu(),
    )


def plot_success(result: TransferResult, names: Sequence[str], path: str | Path) -> Path:
    """PNG heatmap of the attack success rate, source rows by target columns, values written in."""
    from ftikd.analysis.plot import pyplot, save_figure

    m = len(names)
    fig, ax = pyplot().subplots(figsize=(0.9 * m + 3, 0.8 * m + 2), dpi=120)
    image = ax.imshow(result.success.numpy(), cmap="magma", vmin=0, vmax=100)
    for (i, j), value in np.ndenumerate(result.success.numpy()):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black")
    ax.set_xticks(range(m), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(m), names, fontsize=7)
    ax.set_xlabel("target")
    ax.set_ylabel("source (crafted on)")
    fig.colorbar(image, ax=ax, label="attack success rate (%)")
    fig.tight_layout()
    return save_figure(fig, path)


def result_tables(result: TransferResult, names: Sequence[str]) -> list[tuple[str, list[list[str]]]]:
    """The success-rate matrix (with evaluated counts) and the accuracy matrix as captioned table rows."""
    head = ["source \\ target", *names]
    success = [head] + [
        [names[i], *[f"{v:.1f} ({c})" for v, c in zip(row, count, strict=True)]]
        for i, (row, count) in enumerate(zip(result.success.tolist(), result.counted.tolist(), strict=True))
    ]
    acc = [head, ["(clean)", *[f"{v:.1f}" for v in result.clean_accuracy.tolist()]]]
    acc += [[names[i], *[f"{v:.1f}" for v in row]] for i, row in enumerate(result.adv_accuracy.tolist())]
    return [("Attack success rate (%)", success), ("Target accuracy on the adversarial images (%)", acc)]
