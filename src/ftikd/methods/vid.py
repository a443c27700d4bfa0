"""VID: variational information distillation with one variance head per layer (METHODS.md M10).

For each layer l of ``layers`` (default ``stage1,stage2,stage3`` = ``feat[1:-1]``, §0.3) a head
predicts the mean mu(student map) of the cached teacher map, with a learned per-channel variance;
the loss is the Gaussian negative log-likelihood, summed over layers. FTI white-box baseline
([C-CKD] ``white_box.yml``, §3.1): CE 1 + KD 1 (T = 4) + 1 * VID; RepDistiller's standard form is
``--opt w_kd=0``. Maps of different sizes: the larger is average-pooled to the smaller first (the
student map before its head). The heads (mu convs and the variance parameters alpha) are extra
trainable modules: optimised with weight decay, checkpointed, restored at each phase end.

Store cost (float32, default layers on resnet14 at 32x32): 16x32x32 + 32x16x16 + 64x8x8 floats
= 28,672 x 4 B = 114,688 B (112 KiB) per sample, besides the logits. Teacher calls: 1 per
sample, cached.

Reduction: per layer an elementwise mean over (N, C, H, W) of 1/2 [(t - mu)^2 / sigma^2 + log
sigma^2] (RepDistiller), then a plain sum over layers, so no layer weighs more for being larger;
the weight 1 belongs to that form. The loss can be negative (the log-variance term).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.methods.base import Batch, Method, MethodConfig, MethodContext, register_method
from ftikd.methods.feature_common import (
    check_nonnegative,
    check_positive,
    logit_terms,
    map_shapes,
    parse_names,
    student_maps,
    teacher_maps,
    vid_heads,
    vid_layers_loss,
)


@dataclass
class VIDConfig(MethodConfig):
    """``mid_channels`` 0 means the teacher map's channels (RepDistiller and [C-CKD])."""

    layers: str = "stage1,stage2,stage3"
    w_ce: float = 1.0
    w_kd: float = 1.0
    w_vid: float = 1.0
    temperature: float = 4.0
    init_var: float = 5.0
    eps: float = 1e-5
    mid_channels: int = 0

    def __post_init__(self) -> None:
        parse_names(self.layers)
        check_nonnegative(w_ce=self.w_ce, w_kd=self.w_kd, w_vid=self.w_vid, mid_channels=self.mid_channels)
        check_positive(temperature=self.temperature, eps=self.eps)
        if self.init_var <= self.eps:
            raise ValueError(f"init_var must exceed eps ({self.eps}), got {self.init_var}")
        if self.w_ce + self.w_kd + self.w_vid == 0:
            raise ValueError("w_ce, w_kd and w_vid are all 0: nothing to train on")


@register_method
class VID(Method):
    name = "vid"
    family = "feature"
    reads = "logits; student and cached teacher maps stage1-3"
    extras = "one variance head per layer"
    summary = "VID: CE + KD + Gaussian NLL of cached teacher maps given the student's (heads per layer)"
    reference = "Ahn et al., 2019, Variational Information Distillation for Knowledge Transfer"
    Config = VIDConfig
    teacher_features = parse_names(VIDConfig.layers)  # the default; an instance keeps its configured layers

    def __init__(self, config: VIDConfig | None = None) -> None:
        super().__init__(config)
        self.layers = parse_names(self.config.layers)
        self.teacher_features = self.layers

    def setup(self, ctx: MethodContext) -> None:
        cfg = self.config
        s_shapes, t_shapes = map_shapes(ctx, self.layers, self.layers)
        self.extra["heads"] = vid_heads(s_shapes, t_shapes, cfg.mid_channels, cfg.init_var, cfg.eps)

    def vid(self, s_maps: dict[str, torch.Tensor], t_maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unweighted VID loss summed over the layers (M10)."""
        return vid_layers_loss(self.extra["heads"], s_maps, t_maps)

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        out, feats = student_maps(student, batch.images, self.layers)
        terms = logit_terms(out.logits, batch, cfg.w_ce, cfg.w_kd, cfg.temperature)
        if cfg.w_vid > 0:
            terms["vid"] = cfg.w_vid * self.vid(feats, teacher_maps(batch, self.layers))
        return terms
