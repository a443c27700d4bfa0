"""Regression of student logits onto cached teacher logits (ftikd's logit MSE, not from the papers).

The single-sample counterpart of CKD's MSE form (METHODS.md M2.3): instead of matching differences
between samples, each student logit vector is matched to its own cached teacher logits.
"""

from __future__ import annotations

import torch

from ftikd.losses.logit import REF_CLASSES, CKDReduction, class_scaled_mse


def logit_mse_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    reduction: CKDReduction = "ref",
    ref_classes: int = REF_CLASSES,
) -> torch.Tensor:
    """Squared error between student and teacher logits, in float32; leading dims are rows.

    ``ref`` (default): the sum over the C classes divided by ``ref_classes`` (100), then the mean over
    rows. At C = 100 it equals the elementwise mean; unlike it, the gradient on each logit,
    2 (z_hat - z) / (100 B), does not shrink as 1/C, so one learning rate serves 10 or 1000 classes
    alike (the same scaling as CKD's ``reduction``, :func:`ftikd.losses.logit.class_count_scale`).
    ``mean``: the plain elementwise mean over rows x classes (``nn.MSELoss()``, CKD's MSE form).
    """
    return class_scaled_mse(student_logits, teacher_logits, reduction, ref_classes)
