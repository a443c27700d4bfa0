"""Losses of the online (teacher-free) methods: DML's mutual KL and ONE's ensemble distillation.

Neither calls a teacher: the targets are the students' own (detached) predictions (METHODS.md
M17, M18). Softmaxes and KL terms are computed in float32 so mixed-precision callers stay stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mutual_kl_loss(logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """DML's distillation term of each cohort member (METHODS.md M18, A27), shape (K,).

    ``logits`` is (K, B, C) for a cohort of K >= 2 students on the same batch. Member k's term is
    T^2 / (K - 1) * sum over peers l != k of batchmean KL(softmax(z_l / T) || softmax(z_k / T)), the
    peer distribution detached, so summing the K terms and back-propagating once gives every
    member the gradient of its own loss (simultaneous updates from one forward).
    """
    k = logits.shape[0]
    if logits.dim() != 3 or k < 2:
        raise ValueError(f"mutual KL needs logits of shape (K >= 2, B, C), got {tuple(logits.shape)}")
    t = temperature
    log_q = F.log_softmax(logits.float() / t, dim=-1)
    log_p = log_q.detach()
    p = log_p.exp()
    batch = logits.shape[1]
    neg_entropy = (p * log_p).sum(dim=-1).mean(dim=-1)  # (K,) over the peer index l
    cross = torch.einsum("lbc,kbc->kl", p, log_q) / batch  # mean_b sum_c p_l log q_k
    kl = neg_entropy[None, :] - cross  # kl[k, l] = batchmean KL(p_l || q_k)
    off_diagonal = 1.0 - torch.eye(k, device=logits.device, dtype=kl.dtype)
    return (kl * off_diagonal).sum(dim=1) * (t * t) / (k - 1)


def gated_ensemble(branch_logits: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """ONE's ensemble logits z^e = sum_m g_m z^(m) per sample (METHODS.md M17).

    ``branch_logits`` is (m, B, C) and ``gate`` (B, m), rows on the simplex; the result is (B, C).
    """
    return torch.einsum("bm,mbc->bc", gate.to(branch_logits.dtype), branch_logits)


def ensemble_kl_loss(
    branch_logits: torch.Tensor, ensemble_logits: torch.Tensor, temperature: float = 3.0, eps: float = 1e-7
) -> torch.Tensor:
    """ONE's distillation term (METHODS.md M17): sum over branches of T^2 batchmean KL(p_e || p_m).

    p_e = softmax(z^e / T) + ``eps`` is detached (the ensemble learns only from its own CE, as in
    [C-ONE]'s ``KLLoss``); p_m = softmax(z^(m) / T). ``branch_logits`` is (m, B, C).
    """
    t = temperature
    target = F.softmax(ensemble_logits.detach().float() / t, dim=-1) + eps
    log_q = F.log_softmax(branch_logits.float() / t, dim=-1)
    kl = (target * (target.log() - log_q)).sum(dim=-1).mean(dim=-1)  # (m,)
    return kl.sum() * (t * t)


def sigmoid_rampup(epoch: torch.Tensor | float, length: float) -> torch.Tensor:
    """ONE's consistency ramp w(e) = exp(-5 (1 - min(e, L) / L)^2), e the 0-based epoch (M17, A26).

    ``length`` 0 means no ramp (weight 1). Tensor input stays on its device (no host sync).
    """
    e = torch.as_tensor(epoch, dtype=torch.float32)
    if length <= 0:
        return torch.ones_like(e)
    phase = 1.0 - e.clamp(0.0, length) / length
    return torch.exp(-5.0 * phase * phase)
