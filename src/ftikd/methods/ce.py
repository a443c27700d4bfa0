"""Plain supervised training with cross-entropy: the no-teacher baseline (0 teacher calls)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.methods.base import Batch, Method, register_method


@register_method
class CrossEntropy(Method):
    name = "ce"
    family = "no teacher"
    reads = "labels only"
    summary = "cross-entropy on labels only; spends no teacher calls"
    reference = "baseline"
    call_cost = 0

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(student(batch.images).logits, batch.labels)}
