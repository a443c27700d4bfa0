"""Logit MSE: CE plus squared error to the cached teacher logits (ftikd's own baseline, not a paper's).

One teacher call per training sample (1x cached, FTI-compatible). It is the single-sample counterpart
of CKD's MSE form (METHODS.md M2.3): CKD matches logit *differences* between samples, this matches
each sample's logits directly, so comparing the two isolates what the comparison itself adds. The
default reduction divides the per-row sum over classes by 100 (see
:func:`ftikd.losses.regression.logit_mse_loss`), so its step size does not depend on the class count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.losses.logit import CKD_REDUCTIONS, REF_CLASSES
from ftikd.losses.regression import logit_mse_loss
from ftikd.methods.base import Batch, Method, MethodConfig, register_method


@dataclass
class LogitMSEConfig(MethodConfig):
    """``reduction``: ``ref`` (sum over classes / ``ref_classes``, as CKD's) or ``mean`` (elementwise)."""

    w_ce: float = 1.0
    w_mse: float = 1.0
    reduction: str = "ref"
    ref_classes: int = REF_CLASSES

    def __post_init__(self) -> None:
        if self.reduction not in CKD_REDUCTIONS:
            raise ValueError("reduction must be 'ref' (class sum / ref_classes) or 'mean' (elementwise)")
        if self.ref_classes < 1:
            raise ValueError("ref_classes must be positive")


@register_method
class LogitMSE(Method):
    name = "logit-mse"
    family = "logit"
    reads = "logits"
    summary = "ftikd baseline (not a paper's): CE + MSE to cached teacher logits, per-sample analogue of CKD"
    reference = "ftikd; the single-sample counterpart of CKD's MSE form (Xu et al.)"
    Config = LogitMSEConfig

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits = student(batch.images).logits
        mse = logit_mse_loss(logits, batch.teacher_logits, cfg.reduction, cfg.ref_classes)
        return {"ce": cfg.w_ce * F.cross_entropy(logits, batch.labels), "mse": cfg.w_mse * mse}
