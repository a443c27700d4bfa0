"""FSP: match the "flow" matrices between consecutive layers, in two stages (METHODS.md M11).

``layers`` (default ``stem,stage1,stage2,stage3`` = RepDistiller's ``feat[:-1]``, §0.3) are paired
consecutively into L - 1 FSP matrices G = F_l F_l+1^T / HW per sample (the larger map of a pair
is average-pooled to the smaller's size); student and teacher need the same channel counts at
every listed layer (true for the 16/32/64-channel ResNets and WRN-40-2 -> WRN-16-2), which setup
checks.

Two stages, within the Method interface: the first ``stage1_epochs`` pseudo-epochs (default 30,
RepDistiller's 30 initialisation epochs) minimise ``stage1_w_fsp`` * FSP only; the student's
feature modules receive gradients, its classifier none (A22's stage-1 trainable set); after that
the loss is ``w_ce`` CE + ``w_kd`` KD + ``w_fsp`` FSP. Defaults are RepDistiller's stage 2 (CE
only). [S3]'s variant: ``--opt pair_weights=1,3,1 --opt w_ce=0.1 --opt w_kd=0.9`` (Table I's
stage-1 W read as per-matrix weights lambda_l, A22; stage 2 Hinton KD alpha 0.9, T 4). The stage
is decided by a step clock in ``extra`` (checkpointed, never rewound at a phase end). Not
reproducible here: a stage-1 LR of its own ([S3]: 0.001; ``stage1_w_fsp`` scales the stage-1
gradient instead). Keep ``stage1_epochs`` below the patience, or a phase may end inside stage 1.

Store cost (float32, default layers on resnet14 at 32x32): 16x32x32 + 16x32x32 + 32x16x16 +
64x8x8 floats = 45,056 x 4 B = 180,224 B (176 KiB) per sample, besides the logits (the three
teacher matrices alone would be 2,816 floats, but the store keeps named features). Teacher
calls: 1 per sample, cached.

Reduction: per pair an elementwise mean over (N, C_l, C_l+1) of the squared difference
(RepDistiller), summed over pairs with the weights lambda_l; the paper sums the matrix entries,
which is C_l * C_l+1 times larger and would need a different weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.errors import FtikdError
from ftikd.losses.feature import fsp_loss
from ftikd.methods.base import Batch, Method, MethodConfig, MethodContext, register_method
from ftikd.methods.feature_common import (
    check_nonnegative,
    check_positive,
    in_stage1,
    logit_terms,
    map_shapes,
    parse_floats,
    parse_names,
    stage1_clock,
    student_maps,
    teacher_maps,
)


@dataclass
class FSPConfig(MethodConfig):
    """``pair_weights``: one lambda per consecutive pair of ``layers`` ("" = all 1)."""

    layers: str = "stem,stage1,stage2,stage3"
    pair_weights: str = ""
    stage1_epochs: int = 30
    stage1_w_fsp: float = 1.0
    w_ce: float = 1.0
    w_kd: float = 0.0
    w_fsp: float = 0.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        layers = parse_names(self.layers)
        if len(layers) < 2:
            raise ValueError("FSP pairs consecutive layers: give at least two in 'layers'")
        weights = parse_floats(self.pair_weights, "pair_weights")
        if weights and len(weights) != len(layers) - 1:
            raise ValueError(
                f"pair_weights needs {len(layers) - 1} numbers (one per layer pair), got {weights}"
            )
        check_nonnegative(w_ce=self.w_ce, w_kd=self.w_kd, w_fsp=self.w_fsp, stage1_w_fsp=self.stage1_w_fsp)
        check_positive(temperature=self.temperature)
        if self.stage1_epochs < 0:
            raise ValueError(f"stage1_epochs must be >= 0, got {self.stage1_epochs}")
        if (self.stage1_epochs == 0 or self.stage1_w_fsp == 0) and self.w_fsp == 0:
            raise ValueError("FSP needs a stage 1 (stage1_epochs and stage1_w_fsp > 0) or w_fsp > 0")
        if self.w_ce + self.w_kd + self.w_fsp == 0:
            raise ValueError("w_ce, w_kd and w_fsp are all 0: nothing to train on after stage 1")


@register_method
class FSP(Method):
    name = "fsp"
    family = "feature"
    reads = "student and cached teacher maps stem, stage1-3"
    summary = "FSP: stage 1 matches flow matrices between consecutive maps (cached teacher), then CE"
    reference = "Yim et al., 2017, A Gift from Knowledge Distillation (FSP)"
    Config = FSPConfig
    teacher_features = parse_names(FSPConfig.layers)  # the default; an instance keeps its configured layers

    def __init__(self, config: FSPConfig | None = None) -> None:
        super().__init__(config)
        self.layers = parse_names(self.config.layers)
        self.pair_weights = parse_floats(self.config.pair_weights, "pair_weights") or (1.0,) * (
            len(self.layers) - 1
        )
        self.teacher_features = self.layers

    @property
    def leaves_student_parameters_unused(self) -> bool:
        """Stage 1 trains the student only up to the guided layer(s)."""
        return self.config.stage1_epochs > 0

    def setup(self, ctx: MethodContext) -> None:
        s_shapes, t_shapes = map_shapes(ctx, self.layers, self.layers)
        differ = [
            f"{n} ({s_shapes[n][0]} vs {t_shapes[n][0]})"
            for n in self.layers
            if s_shapes[n][0] != t_shapes[n][0]
        ]
        if differ:
            raise FtikdError(
                "FSP needs equal student and teacher channels at every layer; they differ at "
                + ", ".join(differ)
            )
        if self.config.stage1_epochs > 0 and self.config.stage1_w_fsp > 0:
            self.extra["clock"] = stage1_clock(ctx, self.config.stage1_epochs)

    def fsp(self, s_maps: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """FSP loss of the batch (M11) with the per-pair weights, before the stage weight."""
        t_maps = teacher_maps(batch, self.layers)
        return fsp_loss([s_maps[n] for n in self.layers], [t_maps[n] for n in self.layers], self.pair_weights)

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        out, feats = student_maps(student, batch.images, self.layers)
        if in_stage1(self.extra):
            return {"fsp_stage1": cfg.stage1_w_fsp * self.fsp(feats, batch)}
        terms = logit_terms(out.logits, batch, cfg.w_ce, cfg.w_kd, cfg.temperature)
        if cfg.w_fsp > 0:
            terms["fsp"] = cfg.w_fsp * self.fsp(feats, batch)
        return terms
