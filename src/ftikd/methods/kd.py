"""Hinton KD from cached teacher logits (METHODS.md M1; FTI weights CE 1 + KD 1, see A13)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.losses import kd_loss
from ftikd.methods.base import Batch, Method, MethodConfig, register_method


@dataclass
class KDConfig(MethodConfig):
    temperature: float = 4.0
    w_ce: float = 1.0
    w_kd: float = 1.0


@register_method
class KD(Method):
    name = "kd"
    family = "logit"
    reads = "logits"
    summary = "Hinton KD: CE + T^2 KL to softened cached teacher logits (T=4)"
    reference = "Hinton et al., 2015, Distilling the Knowledge in a Neural Network"
    Config = KDConfig

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits = student(batch.images).logits
        return {
            "ce": cfg.w_ce * F.cross_entropy(logits, batch.labels),
            "kd": cfg.w_kd * kd_loss(logits, batch.teacher_logits, cfg.temperature),
        }
