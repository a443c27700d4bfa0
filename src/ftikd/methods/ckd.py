"""Comparative KD over groups of k samples (METHODS.md M2; Xu et al., CKD, ICLR/WACV).

Each step draws 64 groups from a fixed set of at most ``max_groups`` groups; the student runs once
on the stacked A halves and once on the B halves (so BatchNorm sees the halves separately, as in
the authors' code), centroids are compared by phi, and the student difference is matched to the
cached teacher difference and to the label difference. There is no per-sample cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses import ckd_group_loss, group_split_sizes
from ftikd.methods.base import Batch, Method, MethodConfig, forward_student, register_method
from ftikd.methods.samplers import FixedSetSampler, IndexSampler, build_groups


@dataclass
class CKDConfig(MethodConfig):
    k: int = 2
    form: str = "mse"
    comparison: str = "difference"
    max_groups: int = 100_000
    temperature: float = 4.0
    w_label: float = 1.0
    w_teacher: float = 1.0

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError("CKD needs k >= 2")
        if self.form not in ("mse", "kl"):
            raise ValueError("CKD form must be 'mse' or 'kl'")
        if self.comparison not in ("difference", "addition", "interpolation"):
            raise ValueError("CKD comparison must be difference, addition or interpolation")


def ckd_weighted_terms(terms: dict[str, torch.Tensor], cfg: CKDConfig) -> dict[str, torch.Tensor]:
    """Apply the label and teacher weights to the two CKD terms."""
    return {
        "ckd_label": cfg.w_label * terms["ckd_label"],
        "ckd_teacher": cfg.w_teacher * terms["ckd_teacher"],
    }


@register_method
class CKD(Method):
    name = "ckd"
    summary = "Comparative KD: match teacher differences between groups of k samples (MSE or KL form)"
    reference = "Xu et al., Comparative Knowledge Distillation (ICLR submission; WACV 2025)"
    Config = CKDConfig

    def sampler(self, num_train: int, batch_size: int, generator: torch.Generator) -> IndexSampler:
        groups = build_groups(num_train, self.config.k, self.config.max_groups, generator)
        return FixedSetSampler(groups, batch_size, generator)

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        a, _ = group_split_sizes(cfg.k)
        logits = torch.cat(
            [
                forward_student(student, batch.images[:, :a]).logits,
                forward_student(student, batch.images[:, a:]).logits,
            ],
            dim=1,
        )
        lam = None
        if cfg.comparison == "interpolation":
            lam = float(torch.rand((), device="cpu"))
        terms = ckd_group_loss(
            logits, batch.teacher_logits, batch.onehot(), cfg.comparison, cfg.form, cfg.temperature, lam
        )
        return ckd_weighted_terms(terms, cfg)
