"""In-batch CKD: ftikd's own variant, not in the CKD paper.

A batch of B distinct samples gets one student forward per image, and every one of its
B(B-1)/2 pairs is a difference comparison (k = 2). The group form needs k forwards per
comparison; this form gets quadratically many comparisons from linear compute. With the MSE form
the objective equals matching batch-centred student logits to batch-centred teacher logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses import ckd_inbatch_loss
from ftikd.methods.base import Batch, Method, MethodConfig, register_method
from ftikd.methods.ckd import ckd_weighted_terms


@dataclass
class InBatchCKDConfig(MethodConfig):
    form: str = "mse"
    temperature: float = 4.0
    w_label: float = 1.0
    w_teacher: float = 1.0

    def __post_init__(self) -> None:
        if self.form not in ("mse", "kl"):
            raise ValueError("CKD form must be 'mse' or 'kl'")


@register_method
class InBatchCKD(Method):
    name = "ckd-inbatch"
    summary = "ftikd variant (not the paper's): CKD over all pairs of a batch, one forward per image"
    reference = "ftikd; builds on Xu et al., Comparative Knowledge Distillation"
    Config = InBatchCKDConfig

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits = student(batch.images).logits
        terms = ckd_inbatch_loss(logits, batch.teacher_logits, batch.onehot(), cfg.form, cfg.temperature)
        return ckd_weighted_terms(terms, cfg)
