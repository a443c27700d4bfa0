"""CRD's noise-contrastive objective against a memory bank (METHODS.md M8; Tian et al., 2019).

Scores are computed against the whole bank at once: s = <v, M_j> / tau for all n rows (a B x n
matrix), then gathered at each anchor's K + 1 contrast indices. This equals the reference's gather of
B x (K + 1) x d memory rows followed by a batched product, but holds B x n floats instead of
B x (K + 1) x d (at B = 64, K = 16384, d = 128: 13 MB for n = 50,000 instead of 537 MB). Everything
runs in float32 (exp(1 / 0.07) ~ e^14.3 overflows fp16), in log space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def contrast_log_scores(
    anchors: torch.Tensor, memory: torch.Tensor, contrast_idx: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log of exp(<M[idx_ik], v_i> / tau), i.e. <M[idx_ik], v_i> / tau, shaped (B, K + 1) (M8 steps 1-2).

    ``memory`` (n, d) is treated as a constant (no gradient); column 0 of ``contrast_idx`` is the
    positive.
    """
    with torch.autocast(anchors.device.type, enabled=False):
        full = anchors.float() @ memory.detach().float().T
    return full.gather(1, contrast_idx) / temperature


def nce_log_normalizer(log_scores: torch.Tensor, num_memory: int) -> torch.Tensor:
    """log Z with Z = mean(exp(s)) * n over every entry of the batch (M8 step 3), detached."""
    s = log_scores.detach().float()
    return torch.logsumexp(s.reshape(-1), 0) - math.log(s.numel()) + math.log(num_memory)


def crd_nce_loss(log_scores: torch.Tensor, log_z: torch.Tensor, num_memory: int) -> torch.Tensor:
    """NCE loss of one side (M8 step 4), with o = exp(s) / Z and noise probability P_n = 1 / n.

    -(1/B) sum_i [log o_i0 / (o_i0 + K P_n) + sum_k log K P_n / (o_ik + K P_n)], in log space; the
    reference's epsilon of 1e-7 in both denominators is left out (K P_n > 0, so nothing is singular).
    """
    k = log_scores.shape[1] - 1
    if k < 1:
        raise ValueError("CRD needs at least one negative")
    log_o = log_scores.float() - log_z
    log_noise = torch.full_like(log_o, math.log(k / num_memory))
    log_denominator = torch.logaddexp(log_o, log_noise)
    positive = log_o[:, 0] - log_denominator[:, 0]
    negatives = (log_noise[:, 1:] - log_denominator[:, 1:]).sum(dim=1)
    return -(positive + negatives).mean()


def momentum_rows(rows: torch.Tensor, values: torch.Tensor, momentum: float) -> torch.Tensor:
    """Updated memory rows normalize(m M[y] + (1 - m) v) (M8 step 5); the caller writes them back."""
    return F.normalize(momentum * rows.float() + (1.0 - momentum) * values.float(), dim=1)
