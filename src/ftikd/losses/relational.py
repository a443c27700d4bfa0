"""Relational KD losses: RKD, RKD_d, DIST, SP, PKT and CC (METHODS.md M3, M4, M5, M13, M14, M15).

Every loss takes per-sample vectors flattened to (B, D): logits (the CKD paper's black-box setting,
A.2.3) or a named feature. Teacher-side inputs are treated as fixed targets (detached), except in CC
whose teacher embedding is a trainable module. Losses run with autocast off in float32; RKD's
geometry (distances, angles) runs in float64 so that duplicate rows are recognised as such.

Memory: every loss builds only B x B matrices (plus B x D inputs), except RKD's angle term, which is
B x B x B by nature (all triplets); it is computed from the B x B Gram matrix, so no B x B x D tensor
of pairwise differences is ever built (2 MiB per float64 B^3 buffer at B = 64, 128 MiB at B = 256).

Class-count scaling (a loss that is an elementwise mean over C logits shrinks its gradient like
1/C): checked per loss, stated in each docstring as "fixed geometry" = the per-sample gradient norm
for the same B vectors rotated into C = 10 vs C = 100 dims (ratio 1.00: no dependence on C; an
elementwise-mean MSE gives 10.0). Rotation does not apply to softmax-based DIST, compared with KD on
iid logits instead. Measured with B = 64; tests/test_relational.py checks the 1.00 cases.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

_DUPLICATE_TOL = 1e-6  # pairs closer than this times the largest row norm count as duplicates
_EPS = 1e-12

LossFn = TypeVar("LossFn", bound=Callable[..., torch.Tensor])


def _full_precision(fn: LossFn) -> LossFn:
    """Run ``fn`` with autocast off on float32 copies of its positional tensor arguments (METHODS.md §6)."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> torch.Tensor:
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        cast = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with torch.autocast(device, enabled=False):
            return fn(*cast, **kwargs)

    return wrapper  # type: ignore[return-value]


def _geometry(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram matrix, pairwise distances and the mask of distinct pairs of the rows of ``x`` (float64).

    Rows are centred first (distances and angles are translation-invariant), distances come from the
    Gram matrix (B x B, never B x B x D), and a pair counts as distinct when its distance exceeds
    ``_DUPLICATE_TOL`` times the largest row norm; the diagonal and duplicate pairs get distance 0
    and no gradient, which keeps the square root's gradient finite (the M3 pitfall).
    """
    x = x.double()
    scale2 = x.detach().square().sum(dim=1).max()
    x = x - x.mean(dim=0, keepdim=True)
    gram = x @ x.T
    sq = gram.diagonal()
    d2 = sq[:, None] + sq[None, :] - 2 * gram
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    distinct = (d2.detach() > _DUPLICATE_TOL**2 * scale2) & ~eye
    dist = torch.where(distinct, torch.where(distinct, d2, 1.0).sqrt(), 0.0)
    return gram, dist, distinct


def _normalized_distances(x: torch.Tensor) -> torch.Tensor:
    """RKD's psi: distances divided by their mean over distinct pairs (M3; guarded when none are)."""
    _, dist, distinct = _geometry(x)
    mean = dist.sum() / distinct.sum().clamp(min=1)
    return dist / mean.clamp(min=_EPS)


def _triplet_cosines(x: torch.Tensor) -> torch.Tensor:
    """cos of the angle at vertex j of every triplet, shape (B, B, B) indexed [j, i, k] (M3).

    <x_i - x_j, x_k - x_j> = G_ik - G_ij - G_jk + G_jj comes from the Gram matrix; a triplet with a
    degenerate edge (i = j, k = j or a duplicate) has cosine 0, as the reference's normalised zero
    vector gives.
    """
    gram, dist, distinct = _geometry(x)
    dot = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + gram.diagonal()[:, None, None]
    ok = distinct[:, :, None] & distinct[:, None, :]
    length = dist[:, :, None] * dist[:, None, :]
    return torch.where(ok, dot / torch.where(ok, length, 1.0), 0.0)


@_full_precision
def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D (Park et al. 2019; METHODS.md M3): SmoothL1 between mean-normalised distance matrices.

    Huber (threshold 1), elementwise mean over all B^2 entries, zero diagonal included. Class count:
    the mean runs over pairs, not logits, and psi = d / mean(d) is scale-free: no 1/C factor (fixed
    geometry ratio 1.00). On iid random logits the gradient still falls fast with C, because random
    high-dimensional distances concentrate (all psi near 1), a property of the data, not the loss.
    """
    return F.smooth_l1_loss(_normalized_distances(student), _normalized_distances(teacher.detach())).float()


@_full_precision
def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A (Park et al. 2019; METHODS.md M3): SmoothL1 between triplet-angle cosines, mean over B^3.

    B x B x B by nature (every ordered triplet); built from the Gram matrix, never B x B x D. Class
    count: cosines are scale-free and the mean runs over triplets, not logits: no 1/C factor (fixed
    geometry ratio 1.00).
    """
    return F.smooth_l1_loss(_triplet_cosines(student), _triplet_cosines(teacher.detach())).float()


def _pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation along ``dim``: cosine of centred vectors, ``eps`` added to the norm product."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


@_full_precision
def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 4.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al. 2022; METHODS.md M5): tau^2 (beta * inter + gamma * intra) Pearson relations.

    On softmax(z / tau) (B x C): inter = 1 - mean over rows of the correlation across classes, intra
    = 1 - mean over classes of the correlation across the batch. Class count: correlations are
    scale-free, but they act on probabilities of size ~1/C (and intra averages over C columns), so
    DIST scales with C like KD does, not like an elementwise mean on top of it: on iid logits
    (std 2) the per-logit gradient RMS ratio C=10 : C=100 is 8.7, KD's is 8.9. A constant class
    column (e.g. a batch of one sample) gives correlation 0 there, finite thanks to eps.
    """
    p_s = F.softmax(student_logits / tau, dim=1)
    p_t = F.softmax(teacher_logits.detach() / tau, dim=1)
    inter = 1 - _pearson(p_s, p_t, dim=1).mean()
    intra = 1 - _pearson(p_s, p_t, dim=0).mean()
    return tau**2 * (beta * inter + gamma * intra)


@_full_precision
def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SP (Tung & Mori 2019; METHODS.md M13): ||norm_rows(T T^T) - norm_rows(S S^T)||_F^2 / B^2.

    Class count: the loss depends on the vectors only through their Gram matrix, each row of which
    is L2-normalised, and it sums over B^2 entries, not C: no 1/C factor (fixed geometry ratio 1.00).
    """
    g_s = F.normalize(student @ student.T, dim=1)
    g_t = F.normalize(teacher.detach() @ teacher.detach().T, dim=1)
    return (g_t - g_s).square().sum() / student.shape[0] ** 2


def _pkt_similarity(x: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT's conditional probabilities: row-normalised (1 + cosine) / 2 (M14, steps 1-3)."""
    unit = torch.nan_to_num(x / (x.norm(dim=1, keepdim=True) + eps), nan=0.0)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


@_full_precision
def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT (Passalis & Tefas 2018; METHODS.md M14): mean over B^2 of P_t log((P_t + eps) / (P_s + eps)).

    The mean over all B^2 entries (not a per-row sum) is why the default weight is 30000 (A36).
    Class count: cosine kernels are scale-free and the mean runs over pairs, not C: no 1/C factor
    (fixed geometry ratio 1.00).
    """
    p_s = _pkt_similarity(student, eps)
    p_t = _pkt_similarity(teacher.detach(), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@_full_precision
def cc_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """CC as in the reference code (Peng et al. 2019; METHODS.md M15): consecutive-row congruence.

    With delta = |e_s - e_t| (B x d), the loss is the mean over the B - 1 consecutive pairs of
    sum_d delta_i,d * delta_i+1,d (0 for a batch of one). Both embeddings are trainable, so the
    teacher side is NOT detached; note the objective is also minimised by shrinking both embeddings.
    Class count: the sum runs over the 128 embedding dims, not over C, so there is no mean over C;
    C enters only through the embedding's default 1/sqrt(C) init (on iid logits, std 2, the
    per-logit gradient RMS ratio C=10 : C=100 is 4.9, KD's 8.9).
    """
    delta = (student_embedding - teacher_embedding).abs()
    if delta.shape[0] < 2:
        return delta.sum() * 0.0
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def orthonormal_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random (out_dim, in_dim) matrix from the QR of a Gaussian (METHODS.md M4, A16).

    Rows are orthonormal when out_dim <= in_dim (a projection; a rotation when equal, so RKD_d with
    d = C is CKD's teacher-difference MSE exactly); when out_dim > in_dim the columns are orthonormal
    instead (an isometric embedding, which keeps every difference's length).
    """
    rows, cols = max(in_dim, out_dim), min(in_dim, out_dim)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    q = q.float()
    return q.T if out_dim <= in_dim else q


@_full_precision
def rkd_d_pair_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD_d on pairs (poster Fig. 4; METHODS.md M4): MSE(theta(s_i) - theta(s_j), theta(t_i) - theta(t_j)).

    Inputs are already projected, shaped (B, 2, d) (one row per pair); elementwise mean over B x d.
    Class count: the mean runs over the d projected dims, a fixed number, so with d >= C (theta an
    isometry) the loss is C-independent (fixed geometry ratio 1.00 for d = 100 at C = 10 vs 100);
    with d < C it sees only a d/C share of each difference (ratio 3.3 for d = 10). Choosing d = C
    instead reproduces CKD's elementwise mean over C and its 1/C trap (ratio 10.0).
    """
    return F.mse_loss(student[:, 0] - student[:, 1], teacher.detach()[:, 0] - teacher.detach()[:, 1])


@_full_precision
def rkd_d_inbatch_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD_d over all ordered pairs i != j of a batch (the M4 alternative reading), inputs (B, d).

    mean_{i != j, c} ((s_i - s_j) - (t_i - t_j))_c^2 = 2 sum_i |r_i - mean r|^2 / ((B - 1) d) with
    r = s - t, so no pair tensor is built; 0 for a batch of one. Class count as :func:`rkd_d_pair_loss`.
    """
    r = student - teacher.detach()
    if r.shape[0] < 2:
        return r.sum() * 0.0
    centred = r - r.mean(dim=0, keepdim=True)
    return 2 * centred.square().sum() / ((r.shape[0] - 1) * r.shape[1])
