"""CRD's noise-contrastive objective against a memory bank (METHODS.md M8; Tian et al., 2019).

The reference gathers B x (K + 1) x d memory rows and scores each against its anchor. Here every
anchor is scored against the whole bank at once, s = <v, M_j> / tau (a B x n matrix), and the
contrast set of an anchor is its positive row plus a count per bank row of how often that row was
drawn among its K negatives (``counts``, B x n; draws are with replacement when K exceeds the pool).
Every sum over the K + 1 contrast entries becomes a count-weighted sum over the n rows: the same
value, with B x n floats instead of B x (K + 1) x d (at B = 64, K = 16384, d = 128: 128 KB for the
FTI's n = 500 and 13 MB for n = 50,000, instead of 537 MB), and every elementwise step on B x n
instead of B x (K + 1) entries. Everything runs in float32 (exp(1 / 0.07) ~ e^14.3 overflows fp16),
in log space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def contrast_scores(anchors: torch.Tensor, memory: torch.Tensor, temperature: float) -> torch.Tensor:
    """<M_j, v_i> / tau for every anchor i and bank row j, shaped (B, n) (M8 steps 1-2, before the exp).

    ``memory`` (n, d) is treated as a constant (no gradient).
    """
    with torch.autocast(anchors.device.type, enabled=False):
        return (anchors.float() / temperature) @ memory.detach().float().T


def contrast_weights(positive: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, n): how often each bank row is in each anchor's contrast set (its negatives, plus 1 at its
    positive); an (i, j) entry drawn m times counts m times, as the reference's gather does."""
    return counts.float().scatter_add(1, positive.reshape(-1, 1), torch.ones_like(counts[:, :1]).float())


def nce_log_normalizer(scores: torch.Tensor, positive: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """log Z with Z = mean(exp(s)) * n over every contrast entry of the batch (M8 step 3), detached."""
    w = contrast_weights(positive, counts.detach())
    s = scores.detach().float() + w.log()  # log 0 = -inf: rows outside the contrast set add nothing
    return torch.logsumexp(s.reshape(-1), 0) - w.sum().log() + math.log(scores.shape[1])


def crd_nce_loss(
    scores: torch.Tensor, positive: torch.Tensor, counts: torch.Tensor, log_z: torch.Tensor
) -> torch.Tensor:
    """NCE loss of one side (M8 step 4), with o = exp(s) / Z and noise probability P_n = 1 / n.

    -(1/B) sum_i [log o_i0 / (o_i0 + K P_n) + sum_k log K P_n / (o_ik + K P_n)]. With
    x = log o - log(K P_n) the two terms are -softplus(-x_i0) and -softplus(x_ik), so the loss is
    mean_i [softplus(-x_i0) + sum_j counts_ij softplus(x_ij)]. The reference's epsilon of 1e-7 in
    both denominators is left out (K P_n > 0, so nothing is singular).
    """
    k = counts.float().sum(dim=1, keepdim=True)  # K per anchor (the sampler draws K >= 1)
    x = scores.float() - log_z - torch.log(k / scores.shape[1])
    positive_term = F.softplus(-x.gather(1, positive.reshape(-1, 1))).squeeze(1)
    negative_term = (counts.float() * F.softplus(x)).sum(dim=1)
    return (positive_term + negative_term).mean()


def momentum_rows(rows: torch.Tensor, values: torch.Tensor, momentum: float) -> torch.Tensor:
    """Updated memory rows normalize(m M[y] + (1 - m) v) (M8 step 5); the caller writes them back."""
    return F.normalize(momentum * rows.float() + (1.0 - momentum) * values.float(), dim=1)
