"""White-box CKD: FitNets and VID on group differences of intermediate features (METHODS.md M2.6).

Each step is a CKD step (M2.1-M2.5: the same fixed group set, 64 groups of k, two student
forwards, one for the stacked A halves and one for the B halves, no per-sample CE or KD, w_kd = 0)
whose forwards also return the named features. For every compared layer the group centroids are
taken per half and compared with CKD's phi (difference by default; the interpolation weight is
drawn once per batch and shared with the logits): the student side from the fresh augmentations
of this step, the teacher side from the store's cached maps of the same samples (the cached view,
the tensors the logits were computed from; [C-CKD] re-runs the teacher on that input, which is the
same call). The differences replace the per-sample maps of the baseline's feature loss:

- ``fitnets-ckd``: w_hint (100) * MSE(r(delta student ``stage2``), delta teacher ``stage2``), r the
  FitNets connector (conv, BN, ReLU as the reference; ``use_relu=False`` drops the ReLU, which
  cannot reach the negative half of a signed difference, A15);
- ``vid-ckd``: w_vid (1) * sum over ``stage1,stage2,stage3`` of the VID NLL of the teacher
  difference given the student's (one head per layer, M10).

Both add CKD's logit terms exactly as ``ckd`` computes them (its options k, form, comparison,
reduction, w_label, w_teacher, w_offset, ...), so the defaults are ckd's (MSE form, k = 2, A1/A4).
[C-CKD]'s white-box code (``InterCKDTrainHelpers``, ``white_box_ckd.yml``) exists only at commit
``62ba741``, whose CKD terms are the KL form with k = 3 by default: ``--opt form=kl --opt k=3``
reproduces that setting (Table 2). Connectors and heads are extra modules, restored with the
student at phase ends.

Class count. The logit terms use ckd's default ``reduction=ref`` (sum over the C classes / 100),
so their step does not shrink as 1/C. The feature MSE and VID NLL are elementwise means over the
map's (G, C_f, H, W) elements, where C_f is a layer's channel count: it is fixed by the
architecture, not by the number of classes, so the published weights 100 and 1 (tuned for this
form on these layers) keep their meaning on any dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses.feature import hint_loss
from ftikd.losses.logit import compare_groups
from ftikd.methods.base import Batch, MethodContext, register_method
from ftikd.methods.ckd import CKD, CKDConfig, group_forward
from ftikd.methods.feature_common import (
    ConvRegressor,
    map_shapes,
    parse_name,
    parse_names,
    vid_heads,
    vid_layers_loss,
)
from ftikd.methods.fitnets import FitNetsConfig
from ftikd.methods.vid import VIDConfig


@dataclass
class FitNetsCKDConfig(CKDConfig):
    """``layer``: the teacher's hint map; ``student_layer``: the student's guided map ("" = same)."""

    layer: str = "stage2"
    student_layer: str = ""
    w_hint: float = 100.0
    use_relu: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        FitNetsConfig(layer=self.layer, student_layer=self.student_layer, w_hint=self.w_hint)  # its checks


@dataclass
class VIDCKDConfig(CKDConfig):
    """``mid_channels`` 0 means the teacher map's channels (RepDistiller and [C-CKD])."""

    layers: str = "stage1,stage2,stage3"
    w_vid: float = 1.0
    init_var: float = 5.0
    eps: float = 1e-5
    mid_channels: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        VIDConfig(  # VID's checks of the same options
            layers=self.layers,
            w_vid=self.w_vid,
            init_var=self.init_var,
            eps=self.eps,
            mid_channels=self.mid_channels,
        )


class WhiteBoxCKD(CKD):
    """CKD whose groups also compare intermediate maps; subclasses name the layers and the loss.

    ``student_layers[i]`` is compared with ``teacher_features[i]`` (the cached teacher maps).
    """

    student_layers: tuple[str, ...] = ()

    def feature_terms(
        self, s_delta: dict[str, torch.Tensor], t_delta: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Weighted feature terms on the compared student / teacher maps, keyed by layer name."""
        raise NotImplementedError

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits, s_feats = group_forward(student, batch.images, self.student_layers)
        lam = self.draw_lambda()  # shared by logits and features
        out = self.group_terms(logits, batch, lam)
        s_delta = {n: compare_groups(v, cfg.comparison, lam) for n, v in s_feats.items()}
        t_delta = {
            n: compare_groups(batch.teacher_features[n].float(), cfg.comparison, lam)
            for n in self.teacher_features
        }
        return {**out, **self.feature_terms(s_delta, t_delta)}


@register_method
class FitNetsCKD(WhiteBoxCKD):
    name = "fitnets-ckd"
    family = "white-box CKD"
    reads = "group differences of logits and of stage2 maps"
    extras = "connector (conv, BN, ReLU)"
    summary = (
        "White-box CKD: ckd's logit terms + 100 * MSE(connector(student stage2 group difference), "
        "cached teacher difference)"
    )
    reference = "Xu et al., Comparative Knowledge Distillation, §4.3 / Table 2 (CKD + FitNets)"
    Config = FitNetsCKDConfig
    teacher_features = (FitNetsCKDConfig.layer,)  # the default; an instance keeps its configured layer

    def __init__(self, config: FitNetsCKDConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.teacher_features = (parse_name(cfg.layer, "layer"),)
        self.student_layers = (parse_name(cfg.student_layer or cfg.layer, "student_layer"),)

    def setup(self, ctx: MethodContext) -> None:
        s_shapes, t_shapes = map_shapes(ctx, self.student_layers, self.teacher_features)
        s_shape, t_shape = s_shapes[self.student_layers[0]], t_shapes[self.teacher_features[0]]
        self.extra["regressor"] = ConvRegressor(s_shape, t_shape, self.config.use_relu)

    def feature_terms(
        self, s_delta: dict[str, torch.Tensor], t_delta: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """w_hint * hint MSE on the differences (elementwise mean, M9)."""
        if self.config.w_hint == 0:
            return {}
        regressed = self.extra["regressor"](s_delta[self.student_layers[0]])
        return {"hint": self.config.w_hint * hint_loss(regressed, t_delta[self.teacher_features[0]])}


@register_method
class VIDCKD(WhiteBoxCKD):
    name = "vid-ckd"
    family = "white-box CKD"
    reads = "group differences of logits and of stage1-3 maps"
    extras = "one variance head per layer"
    summary = (
        "White-box CKD: ckd's logit terms + VID NLL of cached teacher group differences given the "
        "student's, stage1..stage3"
    )
    reference = "Xu et al., Comparative Knowledge Distillation, §4.3 / Table 2 (CKD + VID)"
    Config = VIDCKDConfig
    teacher_features = parse_names(VIDCKDConfig.layers)  # the default; an instance keeps its layers

    def __init__(self, config: VIDCKDConfig | None = None) -> None:
        super().__init__(config)
        self.teacher_features = self.student_layers = parse_names(self.config.layers)

    def setup(self, ctx: MethodContext) -> None:
        cfg = self.config
        s_shapes, t_shapes = map_shapes(ctx, self.student_layers, self.teacher_features)
        self.extra["heads"] = vid_heads(s_shapes, t_shapes, cfg.mid_channels, cfg.init_var, cfg.eps)

    def feature_terms(
        self, s_delta: dict[str, torch.Tensor], t_delta: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """w_vid * VID NLL summed over the layers (M10), on the differences."""
        if self.config.w_vid == 0:
            return {}
        return {"vid": self.config.w_vid * vid_layers_loss(self.extra["heads"], s_delta, t_delta)}
