"""Feature losses of the white-box methods: FitNets hints, VID, attention transfer, FSP (METHODS.md M9-M12).

Every function takes per-sample feature maps shaped (N, C, H, W) and computes in float32, so
mixed-precision callers stay stable. Reductions are the reference code's (RepDistiller): each
docstring says which, because an elementwise mean over channels or positions makes the loss scale
depend on the map's size, and the published loss weights (100, 1, 1000) were tuned for that form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool whichever of two maps is larger down to the other's (H, W).

    M10-M12: "if the spatial sizes differ, pool the larger map to the smaller size"; a map larger in
    one dimension and smaller in the other is pooled to the smaller size of each dimension.
    """
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def hint_loss(regressed: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (M9): MSE between the regressed student map and the teacher hint.

    Reduction: elementwise mean over (N, C, H, W), as RepDistiller's ``nn.MSELoss()``; the
    weight 100 belongs to this form.
    """
    return F.mse_loss(regressed.float(), hint.float())


def vid_loss(mean: torch.Tensor, target: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """VID negative log-likelihood (M10): mean of 1/2 [(t - mu)^2 / sigma_c^2 + log sigma_c^2].

    ``mean`` and ``target`` are (N, C, H, W) (pooled to one size by the caller), ``variance`` the
    per-channel sigma^2 of shape (C,). Reduction: elementwise mean over (N, C, H, W) (RepDistiller);
    the constant log(2 pi) / 2 is dropped, so the loss can be negative.
    """
    var = variance.float().reshape(1, -1, *([1] * (target.dim() - 2)))
    nll = 0.5 * ((target.float() - mean.float()) ** 2 / var + torch.log(var))
    return nll.mean()


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT attention map Q(F) (M12): mean over channels of |F_c|^p, flattened, L2-normalised per sample.

    Returns (N, H*W); an all-zero map stays zero (``F.normalize`` clamps the norm) with finite gradients.
    """
    energy = features.float().abs().pow(p).mean(dim=1)
    return F.normalize(energy.reshape(energy.shape[0], -1), dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention-transfer loss of one layer (M12, code form of A20): mean_{n,hw} (Q_s - Q_t)^2.

    Maps of different sizes are pooled to the smaller one first. Reduction: mean over samples and
    the H*W positions (RepDistiller / official AT ``.pow(2).mean()``), so a layer's term shrinks
    with its number of positions; beta = 1000 belongs to this form.
    """
    student, teacher = match_spatial(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """FSP "flow" matrix (M11): G_ij = 1/(HW) sum_hw F1_{i,hw} F2_{j,hw}, shape (N, C1, C2).

    The larger of the two maps is pooled to the smaller's size first.
    """
    first, second = match_spatial(first.float(), second.float())
    a = first.reshape(first.shape[0], first.shape[1], -1)
    b = second.reshape(second.shape[0], second.shape[1], -1)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[-1]


def fsp_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """FSP loss (M11, RepDistiller form): sum_l lambda_l * mean((G_s^(l) - G_t^(l))^2).

    ``student`` and ``teacher`` are the maps of the same L layers; consecutive layers are paired
    into L - 1 matrices and ``weights`` holds one lambda per pair ([S3]'s W, A22). Reduction:
    elementwise mean over (N, C_l, C_l+1) per pair, where the paper sums the matrix entries
    (a factor C_l * C_l+1 larger).
    """
    if len(student) != len(teacher) or len(weights) != len(student) - 1:
        raise ValueError("fsp_loss needs L student maps, L teacher maps and L - 1 pair weights")
    total = torch.zeros((), device=student[0].device)
    for i, w in enumerate(weights):
        g_s = fsp_matrix(student[i], student[i + 1])
        g_t = fsp_matrix(teacher[i], teacher[i + 1])
        total = total + w * (g_s - g_t).pow(2).mean()
    return total
