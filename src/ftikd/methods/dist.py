"""DIST: KD from a stronger teacher by Pearson relations (Huang et al. 2022; METHODS.md M5).

FTI setting (§3.1, A14): CE 1 + KD 1 (T = 4) + 2 * DIST (tau = 4, beta = gamma = 1) on logits, plain
shuffled batches; ``w_kd=0`` gives the official standalone form. One cached teacher call per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses.relational import dist_loss
from ftikd.methods.base import Batch, MethodContext, register_method
from ftikd.methods.representation import LOGITS, student_width, teacher_width
from ftikd.methods.rkd import RelationalConfig, RelationalMethod


@dataclass
class DISTConfig(RelationalConfig):
    tau: float = 4.0
    beta: float = 1.0
    gamma: float = 1.0
    weight: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau <= 0:
            raise ValueError("DIST tau must be > 0")


@register_method
class DIST(RelationalMethod):
    name = "dist"
    family = "relational"
    reads = "logits"
    summary = (
        "DIST, relational: CE + KD + 2 * inter/intra-class Pearson of softened outputs (tau=4); on logits"
    )
    reference = "Huang et al., Knowledge Distillation from A Stronger Teacher (NeurIPS 2022)"
    Config = DISTConfig
    config: DISTConfig

    def setup(self, ctx: MethodContext) -> None:
        """On a feature, student and teacher widths must agree (DIST correlates entry by entry)."""
        super().setup(ctx)
        on = self.config.on
        if on != LOGITS and student_width(ctx, on) != teacher_width(ctx, on):
            raise ValueError(f"dist on {on!r} needs equal student and teacher widths")

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits, s, t = self.representations(student, batch)
        terms = self.label_terms(logits, batch)
        terms["dist"] = cfg.weight * dist_loss(s, t, cfg.tau, cfg.beta, cfg.gamma)
        return terms
