"""In-batch CKD: ftikd's own variant, not in the CKD paper.

A batch of B distinct samples gets one student forward per image, and every one of its
B(B-1)/2 pairs is a difference comparison (k = 2). The group form needs k forwards per
comparison; this form gets quadratically many comparisons from linear compute. With the MSE form
the objective equals matching batch-centred student logits to batch-centred teacher logits
(sum over pairs |r_i - r_j|^2 = B * sum_i |r_i - mean r|^2), i.e. logit-MSE distillation with the
batch-mean direction removed; ``w_offset`` puts that direction back.
"""

from __future__ import annotations

import torch
from torch import nn

from ftikd.losses.logit import ckd_inbatch_loss
from ftikd.methods.base import Batch, Method, register_method
from ftikd.methods.ckd import CKDLossConfig, ckd_weighted_terms


@register_method
class InBatchCKD(Method):
    name = "ckd-inbatch"
    family = "comparative"
    reads = "logit differences between all pairs of a batch"
    couples_batch_rows = True
    summary = (
        "ftikd variant (not the paper's): CKD over all pairs of a batch, one forward per image; "
        "MSE summed over classes / 100 like ckd"
    )
    reference = "ftikd; builds on Xu et al., Comparative Knowledge Distillation"
    Config = CKDLossConfig

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits = student(batch.images).logits
        terms = ckd_inbatch_loss(
            logits,
            batch.teacher_logits,
            batch.onehot(),
            cfg.form,
            cfg.temperature,
            cfg.reduction,
            cfg.ref_classes,
        )
        return ckd_weighted_terms(terms, cfg, logits, batch.teacher_logits)
