"""FitNets: a connector maps a student map onto the teacher's cached hint map (METHODS.md M9).

Single stage (default, the FTI white-box baseline of [C-CKD] ``white_box.yml``, §3.1):
CE 1 + KD 1 (T = 4) + 100 * MSE(r(student ``stage2``), teacher ``stage2``). ``stage2`` is
``feat[2]``, the output of block group 2 (§0.3); ``r`` is RepDistiller's ConvReg (conv or
transposed conv, BN, ReLU; ``use_relu=False`` drops the ReLU, A15).

Two stages ([S3], the original paper): with ``stage1_epochs`` = S > 0 the first S pseudo-epochs
minimise ``stage1_w_hint`` * hint only, then the loss becomes ``w_ce`` CE + ``w_kd`` KD +
``w_hint`` hint. [S3]'s stage 2 is Hinton KD with alpha = 0.9 and no hint: ``--opt stage1_epochs=S
--opt w_ce=0.1 --opt w_kd=0.9 --opt w_hint=0``. Interpretation (A22): in stage 1 only the
student layers up to the guided layer and the connector receive gradients (the layers above get
none, and SGD skips them, weight decay included), which is [S3]'s/the original's trainable set;
with ``w_hint=0`` the connector is dropped after stage 1 (it gets no gradient). The stage is
decided by a step clock in ``extra`` (checkpointed, never rewound at a phase end; see
:class:`~ftikd.methods.feature_common.StepClock`). What the method cannot do: [S3]'s separate
stage-1 schedule (100 epochs at LR 0.001); stage 1 runs at the run's LR, so ``stage1_w_hint``
plays the role of that LR ratio (0.02 at LR 0.05 is LR 0.001 in the gradient step, not in weight
decay). Keep S below the patience, or a phase may end, and the LR drop, inside stage 1, where the
validation accuracy means little.

Store cost (float32, default ``stage2`` on resnet14 at 32x32): 32 x 16 x 16 x 4 B = 32,768 B
(32 KiB) per sample, besides the logits. Teacher calls: 1 per sample, cached (never re-run).

Reduction: the hint MSE is an elementwise mean over (N, C, H, W) as in RepDistiller, so its scale
does not grow with the hint map's size; the weight 100 belongs to that form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses.feature import hint_loss
from ftikd.methods.base import Batch, Method, MethodConfig, MethodContext, register_method
from ftikd.methods.feature_common import (
    ConvRegressor,
    check_nonnegative,
    check_positive,
    in_stage1,
    logit_terms,
    map_shapes,
    parse_name,
    stage1_clock,
    student_maps,
    teacher_maps,
)


@dataclass
class FitNetsConfig(MethodConfig):
    """``layer``: the teacher's hint feature; ``student_layer``: the student's guided feature ("" = same)."""

    layer: str = "stage2"
    student_layer: str = ""
    w_ce: float = 1.0
    w_kd: float = 1.0
    w_hint: float = 100.0
    temperature: float = 4.0
    use_relu: bool = True
    stage1_epochs: int = 0
    stage1_w_hint: float = 1.0

    def __post_init__(self) -> None:
        parse_name(self.layer, "layer")
        if self.student_layer:
            parse_name(self.student_layer, "student_layer")
        check_nonnegative(
            w_ce=self.w_ce, w_kd=self.w_kd, w_hint=self.w_hint, stage1_w_hint=self.stage1_w_hint
        )
        if self.w_ce + self.w_kd + self.w_hint == 0:
            raise ValueError("w_ce, w_kd and w_hint are all 0: nothing to train on after stage 1")
        check_positive(temperature=self.temperature)
        if self.stage1_epochs < 0:
            raise ValueError(f"stage1_epochs must be >= 0, got {self.stage1_epochs}")
        if self.stage1_epochs > 0 and self.stage1_w_hint == 0:
            raise ValueError("stage 1 trains on the hint alone: stage1_w_hint must be > 0")


@register_method
class FitNets(Method):
    name = "fitnets"
    family = "feature"
    reads = "logits; student and cached teacher stage2 maps"
    extras = "connector (conv, BN, ReLU)"
    summary = "FitNets: CE + KD + 100 * MSE(connector(student map), cached teacher hint at stage2)"
    reference = "Romero et al., 2015, FitNets: Hints for Thin Deep Nets"
    Config = FitNetsConfig
    teacher_features = (FitNetsConfig.layer,)  # the default; an instance keeps its configured layer

    def __init__(self, config: FitNetsConfig | None = None) -> None:
        super().__init__(config)
        self.hint_layer = parse_name(self.config.layer, "layer")
        self.guided_layer = (
            parse_name(self.config.student_layer, "student_layer")
            if self.config.student_layer
            else self.hint_layer
        )
        self.teacher_features = (self.hint_layer,)

    @property
    def leaves_student_parameters_unused(self) -> bool:
        """Stage 1 trains the student only up to the guided layer(s)."""
        return self.config.stage1_epochs > 0

    def setup(self, ctx: MethodContext) -> None:
        s_shapes, t_shapes = map_shapes(ctx, (self.guided_layer,), self.teacher_features)
        self.extra["regressor"] = ConvRegressor(
            s_shapes[self.guided_layer], t_shapes[self.hint_layer], self.config.use_relu
        )
        if self.config.stage1_epochs > 0:
            self.extra["clock"] = stage1_clock(ctx, self.config.stage1_epochs)

    def hint(self, student_map: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Unweighted hint loss of the batch (M9)."""
        target = teacher_maps(batch, self.teacher_features)[self.hint_layer]
        return hint_loss(self.extra["regressor"](student_map), target)

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        out, feats = student_maps(student, batch.images, (self.guided_layer,))
        if in_stage1(self.extra):
            return {"hint_stage1": cfg.stage1_w_hint * self.hint(feats[self.guided_layer], batch)}
        terms = logit_terms(out.logits, batch, cfg.w_ce, cfg.w_kd, cfg.temperature)
        if cfg.w_hint > 0:
            terms["hint"] = cfg.w_hint * self.hint(feats[self.guided_layer], batch)
        return terms
