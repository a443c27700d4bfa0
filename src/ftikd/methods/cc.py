"""CC: correlation congruence, in the reference code's form (Peng et al. 2019; METHODS.md M15).

Two trainable linear embeddings (D -> 128, no normalisation) for student and teacher; the loss
couples consecutive rows of the batch (A36). FTI setting (§3.1 white-box row): CE 1 + KD 1 (T = 4)
+ 0.02 * CC; ``w_kd=0`` gives the standard CE 1 + 0.02 * CC. Runs on logits by default; the
reference uses the penultimate embedding (``on=embedding``). One cached teacher call per sample.
The embeddings live in ``self.extra``: optimised, checkpointed and restored with the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses.relational import cc_loss
from ftikd.methods.base import Batch, MethodContext, register_method
from ftikd.methods.representation import ProjectionHead, student_width, teacher_width
from ftikd.methods.rkd import RelationalConfig, RelationalMethod


@dataclass
class CCConfig(RelationalConfig):
    embed_dim: int = 128
    weight: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embed_dim < 1:
            raise ValueError("embed_dim must be >= 1")


@register_method
class CC(RelationalMethod):
    name = "cc"
    family = "relational"
    reads = "logits"
    extras = "student and teacher linear embeddings (D -> 128)"
    summary = (
        "CC, relational: CE + KD + 0.02 * consecutive-pair congruence of trainable embeddings; on logits"
    )
    reference = "Peng et al., Correlation Congruence for Knowledge Distillation (ICCV 2019)"
    Config = CCConfig
    config: CCConfig

    def setup(self, ctx: MethodContext) -> None:
        """Build the student and teacher embeddings (Linear to ``embed_dim``, no normalisation)."""
        on, dim = self.config.on, self.config.embed_dim
        self.extra["embed_s"] = ProjectionHead(student_width(ctx, on), dim)
        self.extra["embed_t"] = ProjectionHead(teacher_width(ctx, on), dim)

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits, s, t = self.representations(student, batch)
        e_s, e_t = self.extra["embed_s"](s), self.extra["embed_t"](t)
        return {**self.label_terms(logits, batch), "cc": self.config.weight * cc_loss(e_s, e_t)}
