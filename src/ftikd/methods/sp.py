"""SP: similarity-preserving KD (Tung & Mori 2019; METHODS.md M13).

Standard form (§4; no FTI setting exists): CE 1 + 3000 * SP, no KD term (``w_kd`` adds one). Runs on
logits by default; the paper's layer is the last stage map (``on=stage3`` for the CIFAR ResNets,
flattened). One cached teacher call per sample.

Measured pitfall: the weight 3000 was set for features. On logits the SP term is about 20 times CE at
initialisation, and on Fashion-MNIST at n = 500 (seeds 1-3, docs/results/cpu-fashion-baselines) SP on
logits gave 72.86 %, below CE's 75.97, where ``on=embedding`` gave 80.19.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses.relational import sp_loss
from ftikd.methods.base import Batch, register_method
from ftikd.methods.rkd import RelationalConfig, RelationalMethod


@dataclass
class SPConfig(RelationalConfig):
    w_kd: float = 0.0
    weight: float = 3000.0


@register_method
class SP(RelationalMethod):
    name = "sp"
    family = "relational"
    reads = "logits"
    summary = "SP, relational: CE + 3000 * match of row-normalised batch similarity matrices; on logits"
    reference = "Tung & Mori, Similarity-Preserving Knowledge Distillation (ICCV 2019)"
    Config = SPConfig
    config: SPConfig

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits, s, t = self.representations(student, batch)
        return {**self.label_terms(logits, batch), "sp": self.config.weight * sp_loss(s, t)}
