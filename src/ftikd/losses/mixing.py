"""Input mixing with a fixed teacher: Mixup (2 or 3 parts) and CutMix (METHODS.md M6, M7).

The student sees a mixed image; its targets are the same mixture of the parts' labels and of the
parts' *cached* teacher distributions ("fixed teacher", Beyer et al. 2022), so no teacher call is made
on the mixed image. "Function matching" would instead query the teacher on every mixed image and is
not FTI-compatible (METHODS.md §0.4). Mixing weights and boxes are drawn once per batch from torch's
global CPU RNG, which the engine checkpoints, so a resumed run draws the same values.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ftikd.losses.logit import kd_loss

SoftLoss = Literal["ce", "kl"]
Box = tuple[int, int, int, int]


def _weights_on(like: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The per-batch weights as a tensor with ``like``'s dtype and device."""
    return torch.tensor(weights, dtype=like.dtype).to(like.device, non_blocking=True)


def _weighted_parts(values: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """sum_m w_m values[:, m] for values shaped (B, k, ...), by elementwise ops (no autocast downcast)."""
    if values.shape[1] != len(weights):
        raise ValueError(f"{len(weights)} weights for {values.shape[1]} parts")
    w = _weights_on(values, weights).reshape(1, -1, *([1] * (values.dim() - 2)))
    return (values * w).sum(dim=1)


def draw_mixing_weights(parts: int) -> list[float]:
    """Per-batch mixing weights over ``parts`` images (CKD paper A.2.2; METHODS.md M6, A17).

    Two parts: lambda ~ U(0, 1) = Beta(1, 1), weights (lambda, 1 - lambda). Three or more parts:
    iid U(0, 1) draws normalised by their sum (not a Dirichlet draw, as in the authors' code).
    """
    if parts < 2:
        raise ValueError("mixing needs at least 2 parts")
    if parts == 2:
        lam = float(torch.rand(()))
        return [lam, 1.0 - lam]
    u = torch.rand(parts, dtype=torch.float64)
    return (u / u.sum()).tolist()


def mix_images(images: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Mixup input: sum_m w_m x_m over the parts axis of ``images`` shaped (B, k, C, H, W)."""
    return _weighted_parts(images, weights)


def draw_cutmix_box(height: int, width: int) -> tuple[Box, float]:
    """A CutMix box and the fraction of pixels kept from the first image (METHODS.md M7 steps 1-4, 6).

    lambda ~ Beta(1, 1); the cut is floor(W sqrt(1 - lambda)) x floor(H sqrt(1 - lambda)) around a
    centre drawn uniformly on the pixel grid, clipped to the image. Returns the half-open box
    (y0, y1, x0, x1) and lambda recomputed from the clipped area, 1 - area / (H W).
    """
    lam = float(torch.rand(()))
    cut = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def cutmix_images(first: torch.Tensor, second: torch.Tensor, box: Box) -> torch.Tensor:
    """CutMix input (M7 step 5): ``first`` outside the box, ``second`` inside it, (B, C, H, W)."""
    y0, y1, x0, x1 = box
    mixed = first.clone()
    mixed[..., y0:y1, x0:x1] = second[..., y0:y1, x0:x1]
    return mixed


def mixed_teacher_target(teacher_logits: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The fixed teacher's target: sum_m w_m softmax(z_m) from the parts' cached logits (B, k, C).

    Soft CE is linear in its target, so CE against this mixture equals the weighted sum of the
    per-part soft CEs of the authors' code (METHODS.md M6): probabilities are mixed, not logits.
    """
    return _weighted_parts(F.softmax(teacher_logits.float(), dim=-1), weights)


def mixed_label_ce(student_logits: torch.Tensor, labels: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Hard-label term: sum_m w_m CE(z_hat, y_m), each CE a batch mean; labels shaped (B, k)."""
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    per_part = -log_p.gather(1, labels).mean(dim=0)  # (k,)
    return (per_part * _weights_on(per_part, weights)).sum()


def soft_cross_entropy(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE_soft(z_hat, p) = -(1/B) sum_i sum_c p_ic log softmax(z_hat_i)_c at T = 1 (METHODS.md M6)."""
    return -(target * F.log_softmax(student_logits.float(), dim=-1)).sum(dim=-1).mean()


def mixing_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: list[float],
    soft: SoftLoss = "ce",
    temperature: float = 4.0,
) -> dict[str, torch.Tensor]:
    """The two terms of fixed-teacher Mixup/CutMix (METHODS.md M6, M7), weights applied by the caller.

    ``ce``: lambda-mixed hard-label CE. ``soft``: with ``soft="ce"`` (the code default, A18) the soft
    CE against the mixed teacher distribution at T = 1; with ``soft="kl"`` the authors' option
    ``--loss_fn 1``: sum_m w_m T^2 KL(softmax(z_m / T) || softmax(z_hat / T)). ``labels`` is (B, k),
    ``teacher_logits`` (B, k, C), ``student_logits`` (B, C) for the B mixed images.
    """
    if soft == "ce":
        soft_term = soft_cross_entropy(student_logits, mixed_teacher_target(teacher_logits, weights))
    elif soft == "kl":
        soft_term = sum(
            w * kd_loss(student_logits, teacher_logits[:, m], temperature) for m, w in enumerate(weights)
        )
    else:
        raise ValueError(f"unknown soft loss {soft!r}")
    return {"ce": mixed_label_ce(student_logits, labels, weights), "soft": soft_term}
