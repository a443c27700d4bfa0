"""VRM losses: cross-view inter-sample (ISV) and inter-class (ICV) edge matching on logits.

METHODS.md M19 ([S4] §3.3-3.8) with the A28 choices: edges are unit difference vectors, ISV edges
are pruned by the joint entropy H(p_i) + H(p~_j) of the student's predictions at the m-th
percentile of the batch (m = 90, detached, ISV only), and phi is the MSE averaged over the entries
of the retained edges (sum of squared errors / (retained edges x edge length)), so the loss is
normalised by the number of retained edges, never by B^2.

Class-count scaling: an ISV edge is a unit vector in R^C, so its mean squared entry is 1/C and the
ISV term shrinks like 1/C (the ICV term like 1/B) for the same geometry. [S4]'s alpha = 128 and
beta = 32 are tuned for CIFAR-100 (C = 100) at B = 64 (METHODS.md's scale check); on a 10-class set
the ISV term is 10x larger per edge. This is the spec's phi, kept as is.

Memory: ISV builds (B, B, C) tensors and ICV (C, C, B) tensors (differences, unit vectors, errors,
and their gradients: about 8 such float32 buffers per term). At B = 64 and C = 100 each buffer is
1.6 MB; at C = 1000 and B = 256 an ICV buffer would be 1 GB, so this form suits CIFAR-size label
sets. Everything runs in float32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EDGE_EPS = 1e-8  # a difference shorter than this is a zero edge (no direction, no gradient)


def unit_differences(a: torch.Tensor, b: torch.Tensor, eps: float = EDGE_EPS) -> torch.Tensor:
    """All normalised differences u(a_i - b_j), shape (N, M, D), for rows a (N, D) and b (M, D).

    u(v) = v / ||v|| ([S4] eq. 1). A difference with ||v|| <= eps (identical rows) becomes the zero
    vector with zero gradient, where v / max(||v||, eps) would have a Jacobian of I / eps (1e8); the
    squared norm is guarded before the square root, so no NaN can enter the backward pass.
    """
    d = a[:, None, :] - b[None, :, :]
    sq = d.square().sum(dim=-1, keepdim=True)
    safe = sq > eps * eps
    norm = torch.where(safe, sq, torch.ones_like(sq)).sqrt()
    return torch.where(safe, d / norm, torch.zeros_like(d))


def isv_edges(real: torch.Tensor, virtual: torch.Tensor) -> torch.Tensor:
    """Cross-view inter-sample edges E_ij = u(z_i - z~_j), (B, B, C), from (B, C) logits (M19 ISV)."""
    return unit_differences(real, virtual)


def icv_edges(real: torch.Tensor, virtual: torch.Tensor) -> torch.Tensor:
    """Cross-view inter-class edges E_kl = u(Z[:, k] - Z~[:, l]), (C, C, B) (M19 ICV, [S4] §3.6)."""
    return unit_differences(real.T, virtual.T)


def zscore_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """ZSNorm: per-sample z-score (z - mean) / std over the classes (M19 optional extra, off by default)."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True, unbiased=False)
    return (logits - mean) / (std + eps)


def joint_entropy_keep(
    student_real: torch.Tensor,
    student_virtual: torch.Tensor,
    percentile: float,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (B, B) mask of the ISV edges kept by unreliable-edge pruning ([S4] eq. 2, A28).

    H_ij = H(p_i) + H(p~_j) with p = softmax of the student's logits at T = 1 (the joint entropy
    of independent predictions); an edge is dropped when H_ij exceeds the ``percentile``-th
    percentile (linear interpolation, as numpy's default) of H over the ``candidates`` edges
    (all B x B when None). Computed without gradient; ``percentile`` 100 keeps every candidate.
    """
    with torch.no_grad():
        joint = _entropy(student_real)[:, None] + _entropy(student_virtual)[None, :]
        if candidates is None:
            candidates = torch.ones_like(joint, dtype=torch.bool)
        if percentile >= 100 or not candidates.shape[0]:
            return candidates
        # nanquantile over the candidates (others NaN) avoids a boolean gather and its device sync
        values = torch.where(candidates, joint, torch.full_like(joint, float("nan"))).flatten()
        threshold = torch.nanquantile(values, percentile / 100.0)
        return candidates & (joint <= threshold)


def edge_mse(student_edges: torch.Tensor, teacher_edges: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """phi: mean squared error over the entries of the kept edges (A28).

    ``*_edges`` are (N, M, D), ``keep`` a boolean (N, M) mask; the sum of squared errors of the kept
    edges is divided by (number kept x D); with no edge kept the term is 0.
    """
    err = (student_edges - teacher_edges.detach()).square().sum(dim=-1)
    kept = keep.to(err.dtype)
    return (err * kept).sum() / (kept.sum().clamp(min=1.0) * student_edges.shape[-1])


def vrm_relation_losses(
    student_real: torch.Tensor,
    student_virtual: torch.Tensor,
    teacher_real: torch.Tensor,
    teacher_virtual: torch.Tensor,
    percentile: float = 90.0,
    cross_diagonals: bool = True,
    prune_on: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Unweighted VRM relation terms ``{"isv": ..., "icv": ...}`` from (B, C) logits of both views.

    ``cross_diagonals=False`` leaves out the ISV edges (i, i) and the ICV edges (k, k): used when the
    teacher's virtual view is its real view (ftikd's strict mode), where those teacher edges are
    zero vectors that no unit student edge can match (their error is the constant 1 / D). Pruning
    uses ``prune_on`` (the student's raw logits, when the edges are built from adapted or
    z-scored ones) or else the student's edge inputs. Teacher inputs are detached.
    """
    with torch.autocast(student_real.device.type, enabled=False):
        s, sv = student_real.float(), student_virtual.float()
        t, tv = teacher_real.detach().float(), teacher_virtual.detach().float()
        b, c = s.shape
        p_real, p_virtual = prune_on if prune_on is not None else (s, sv)
        isv_cand = _cross_mask(b, cross_diagonals, s.device)
        isv_keep = joint_entropy_keep(p_real, p_virtual, percentile, isv_cand)
        icv_keep = _cross_mask(c, cross_diagonals, s.device)
        return {
            "isv": edge_mse(isv_edges(s, sv), isv_edges(t, tv), isv_keep),
            "icv": edge_mse(icv_edges(s, sv), icv_edges(t, tv), icv_keep),
        }


def two_view_cross_entropy(real: torch.Tensor, virtual: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE over the 2B student predictions of both views, i.e. the mean of the two views' CE (A28)."""
    return F.cross_entropy(torch.cat([real, virtual]).float(), torch.cat([labels, labels]))


def _cross_mask(size: int, diagonal: bool, device: torch.device) -> torch.Tensor:
    """All (size, size) pairs, without the diagonal unless ``diagonal``."""
    mask = torch.ones(size, size, dtype=torch.bool, device=device)
    return mask if diagonal else ~torch.eye(size, dtype=torch.bool, device=device)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
