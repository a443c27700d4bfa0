"""Pieces shared by the white-box feature methods (FitNets, VID, AT, FSP) and white-box CKD.

Layer lists from options, feature shapes at setup, the student's and the teacher's maps in one
step, the FitNets connector (RepDistiller's ``ConvReg``), the VID head, the CE + KD terms, and the
step clock of two-stage methods. Layer names follow METHODS.md §0.3 as ftikd names them: for the
CIFAR ResNets and WRNs ``stem`` is ``feat[0]``, ``stage{i}`` is ``feat[i]`` (after the ReLU) and
``embedding`` is ``feat[-1]``; hint layer 2 is ``stage2``, the VID/AT layers ``feat[1:-1]`` are
``stage1,stage2,stage3`` (VGG has ``stage1..stage4``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.errors import FtikdError
from ftikd.losses.feature import match_spatial, vid_loss
from ftikd.losses.logit import kd_loss
from ftikd.methods.base import Batch, MethodContext, forward_student
from ftikd.models.base import ModelOutput

Shape = tuple[int, ...]


def parse_names(value: str | Sequence[str], what: str = "layers") -> tuple[str, ...]:
    """Feature names from an option: ``"stage1,stage2"`` (the command line) or a list (a config file)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(item).strip() for item in items)
    if not names or not all(names) or len(set(names)) != len(names):
        raise ValueError(f"{what} must be distinct feature names separated by commas, got {value!r}")
    return names


def parse_name(value: str | Sequence[str], what: str) -> str:
    """Exactly one feature name from an option (FitNets' hint and guided layers)."""
    names = parse_names(value, what)
    if len(names) != 1:
        raise ValueError(f"{what} must be one feature name, got {value!r}")
    return names[0]


def parse_floats(value: str | float | Sequence[float], what: str) -> tuple[float, ...]:
    """Numbers from an option: ``"1,3,1"``, one number or a list; an empty string gives ()."""
    if isinstance(value, str):
        items: list = value.split(",") if value.strip() else []
    else:
        items = [value] if isinstance(value, int | float) else list(value)
    try:
        numbers = tuple(float(item) for item in items)
    except ValueError:
        raise ValueError(f"{what} must be numbers separated by commas, got {value!r}") from None
    if any(not math.isfinite(x) or x < 0 for x in numbers):
        raise ValueError(f"{what} must be finite and >= 0, got {value!r}")
    return numbers


def check_nonnegative(**values: float) -> None:
    """Refuse a negative or non-finite loss weight (or other option), naming it."""
    for name, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_positive(**values: float) -> None:
    """Refuse a non-positive or non-finite option (a temperature, an exponent), naming it."""
    for name, value in values.items():
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value}")


def student_feature_shapes(ctx: MethodContext, names: Sequence[str]) -> dict[str, Shape]:
    """Per-sample shapes of the student's features ``names``, from one no-grad probe forward."""
    if ctx.input_shape is None:
        raise FtikdError("feature methods need the input shape to size their modules")
    was_training = ctx.student.training
    ctx.student.eval()
    with torch.no_grad():
        out = ctx.student(torch.zeros(2, *ctx.input_shape, device=ctx.device), with_features=True)
    ctx.student.train(was_training)
    missing = [n for n in names if n not in out.features]
    if missing:
        raise FtikdError(f"student has no feature(s) {missing}; it has {sorted(out.features)}")
    return {n: tuple(out.features[n].shape[1:]) for n in names}


def teacher_feature_shapes(ctx: MethodContext, names: Sequence[str]) -> dict[str, Shape]:
    """Per-sample shapes of the cached teacher features ``names`` (read from the store)."""
    missing = [n for n in names if n not in ctx.teacher_feature_shapes]
    if missing:
        raise FtikdError(
            f"no cached teacher feature(s) {missing}; the store holds {sorted(ctx.teacher_feature_shapes)}"
        )
    return {n: tuple(ctx.teacher_feature_shapes[n]) for n in names}


def map_shapes(
    ctx: MethodContext, student_names: Sequence[str], teacher_names: Sequence[str]
) -> tuple[dict[str, Shape], dict[str, Shape]]:
    """Per-sample (C, H, W) shapes of the student's and the teacher's maps; a pooled vector such as
    ``embedding`` is refused, since these methods compare maps."""
    shapes = student_feature_shapes(ctx, student_names), teacher_feature_shapes(ctx, teacher_names)
    for side, found in zip(("student", "teacher"), shapes, strict=True):
        flat = [f"{n} {s}" for n, s in found.items() if len(s) != 3]
        if flat:
            raise FtikdError(f"{side} feature(s) {', '.join(flat)} are not (C, H, W) maps; name stage maps")
    return shapes


def student_maps(
    student: nn.Module, images: torch.Tensor, names: Sequence[str]
) -> tuple[ModelOutput, dict[str, torch.Tensor]]:
    """One student forward with features; returns the output and the maps ``names`` as (N, C, H, W)."""
    out = forward_student(student, images, with_features=True)
    return out, {n: out.features[n] for n in names}


def teacher_maps(batch: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The cached teacher maps ``names`` of the batch, leading (B,) or (B, k) dims flattened, float32."""
    out = {}
    for n in names:
        value = batch.teacher_features[n]
        out[n] = value.reshape(batch.index.numel(), *value.shape[batch.index.dim() :]).float()
    return out


def logit_terms(
    logits: torch.Tensor, batch: Batch, w_ce: float, w_kd: float, temperature: float
) -> dict[str, torch.Tensor]:
    """The weighted CE and Hinton KD terms that accompany a feature loss; zero weights are left out.

    FTI white-box baselines use CE 1 + KD 1 (METHODS.md §3.1); [S3]'s stage 2 uses 0.1 / 0.9.
    """
    terms = {}
    if w_ce > 0:
        terms["ce"] = w_ce * F.cross_entropy(logits, batch.labels)
    if w_kd > 0:
        terms["kd"] = w_kd * kd_loss(logits, batch.teacher_logits, temperature)
    return terms


class ConvRegressor(nn.Module):
    """FitNets connector (M9, RepDistiller ``ConvReg``): student map (Cs, Hs, Ws) -> teacher (Ct, Ht, Wt).

    Hs = 2 Ht: 3x3 conv stride 2; 2 Hs = Ht: 4x4 transposed conv stride 2; Hs >= Ht: a
    (1 + Hs - Ht) x (1 + Ws - Wt) conv. Then BatchNorm and, unless ``use_relu`` is False, ReLU
    (which cannot produce the signed targets of white-box CKD, A15).
    """

    def __init__(self, student_shape: Shape, teacher_shape: Shape, use_relu: bool = True) -> None:
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
        if hs == 2 * ht and ws == 2 * wt:
            self.conv: nn.Module = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif 2 * hs == ht and 2 * ws == wt:
            self.conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise FtikdError(
                f"no FitNets connector from a student map {student_shape} to a teacher map {teacher_shape}: "
                "the teacher map may be at most as large as the student's, or exactly twice its size"
            )
        self.bn = nn.BatchNorm2d(ct)
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y) if self.use_relu else y


class VIDHead(nn.Module):
    """VID regressor mu (three bias-free 1x1 convs with ReLUs) and per-channel variance (M10).

    sigma_c^2 = softplus(alpha_c) + eps, alpha initialised so that sigma^2 = ``init_var`` (5).
    """

    def __init__(
        self, in_channels: int, out_channels: int, mid_channels: int, init_var: float = 5.0, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=1, bias=False),
        )
        alpha = math.log(math.expm1(init_var - eps))
        self.alpha = nn.Parameter(torch.full((out_channels,), alpha))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        """Per-channel sigma^2, shape (C_t,)."""
        return F.softplus(self.alpha) + self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted mean mu(x) of the teacher map."""
        return self.regressor(x)


def vid_heads(
    s_shapes: dict[str, Shape],
    t_shapes: dict[str, Shape],
    mid_channels: int = 0,
    init_var: float = 5.0,
    eps: float = 1e-5,
) -> nn.ModuleDict:
    """One :class:`VIDHead` per layer of ``t_shapes`` (M10); ``mid_channels`` 0 means the teacher's C."""
    return nn.ModuleDict(
        {
            name: VIDHead(s_shapes[name][0], shape[0], mid_channels or shape[0], init_var, eps)
            for name, shape in t_shapes.items()
        }
    )


def vid_layers_loss(
    heads: nn.ModuleDict, s_maps: dict[str, torch.Tensor], t_maps: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Unweighted VID loss (M10) summed over the layers of ``heads``; the larger map of a layer is
    average-pooled to the smaller one (the student's before its head). Used on per-sample maps (VID)
    and on group differences (white-box CKD, M2.6)."""
    total = torch.zeros((), device=next(iter(t_maps.values())).device)
    for name, head in heads.items():
        s, t = match_spatial(s_maps[name], t_maps[name])
        total = total + vid_loss(head(s), t, head.variance())
    return total


class StepClock(nn.Module):
    """Counts the optimizer steps of stage 1 of a two-stage method, as a buffer in ``extra``.

    The count is checkpointed with the extra modules, so a resumed run continues the schedule
    exactly. It is a clock, not a weight: loading a state never moves it backwards, so restoring
    the best weights at a phase end (which also loads ``extra``) does not send training back into
    stage 1. Counting stops once stage 1 is over.
    """

    def __init__(self, stage1_steps: int) -> None:
        super().__init__()
        self.stage1_steps = stage1_steps
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._value = 0

    def in_stage1(self) -> bool:
        """Whether this step belongs to stage 1; advances the clock while it does."""
        if self._value >= self.stage1_steps:
            return False
        self._value += 1
        self.count.fill_(self._value)
        return True

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        before = self._value
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._value = max(before, int(self.count))
        self.count.fill_(self._value)


def stage1_clock(ctx: MethodContext, epochs: int) -> StepClock:
    """A clock for ``epochs`` pseudo-epochs of ceil(n / batch) steps each (METHODS.md §3.1)."""
    return StepClock(epochs * math.ceil(ctx.num_train / ctx.batch_size))


def in_stage1(extra: nn.ModuleDict) -> bool:
    """Whether this step is a stage-1 step of a two-stage method (False when it has no clock)."""
    return "clock" in extra and extra["clock"].in_stage1()
