"""What a relational or contrastive method compares: the logits or a named student feature.

The CKD paper runs every black-box baseline on the logits (A.2.3), the original papers on the
penultimate embedding or on stage features. Methods take an ``on`` option naming that
representation; this module resolves it once for the student side (a forward with features only
when needed), the teacher side (logits, or a feature read from the store) and its width, and holds
the projection head that RKD_d and CRD train on top of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.methods.base import Batch, MethodContext, forward_student
from ftikd.models.base import ModelOutput

LOGITS = "logits"
EMBEDDING = "embedding"


def check_representation(on: str) -> None:
    """Refuse an empty name early (a feature name is checked against the model at setup)."""
    if not on:
        raise ValueError("'on' must be 'logits' or a student feature name such as 'embedding'")


def teacher_feature_names(on: str) -> tuple[str, ...]:
    """The teacher features a method comparing ``on`` must read from the store."""
    return () if on == LOGITS else (on,)


def student_representation(
    student: nn.Module, images: torch.Tensor, on: str
) -> tuple[ModelOutput, torch.Tensor]:
    """Forward the student; return its output and the representation ``on`` flattened to (N, D).

    Leading dims of ``images`` (plain batches or groups) are flattened into N.
    """
    out = forward_student(student, images, with_features=on != LOGITS)
    if on == LOGITS:
        return out, out.logits.reshape(-1, out.logits.shape[-1])
    if on not in out.features:
        raise ValueError(f"student has no feature {on!r}; it has {sorted(out.features)}")
    feat = out.features[on]
    return out, feat.reshape(feat.shape[0], -1)


def teacher_representation(batch: Batch, on: str) -> torch.Tensor:
    """The cached teacher representation ``on`` of the batch, flattened to (N, D)."""
    value = batch.teacher_logits if on == LOGITS else batch.teacher_features[on]
    lead = batch.index.numel()
    return value.reshape(lead, -1).float()


def student_width(ctx: MethodContext, on: str) -> int:
    """Width D of the student's flattened representation ``on`` (one probe forward, no grad)."""
    if on == LOGITS:
        return ctx.num_classes
    if on == "embedding" and hasattr(ctx.student, "embedding_dim"):
        return int(ctx.student.embedding_dim)
    return int(math.prod(_probe_shape(ctx, on)))


def teacher_width(ctx: MethodContext, on: str) -> int:
    """Width D of the teacher's flattened representation ``on``, from the store's feature shapes."""
    if on == LOGITS:
        return ctx.num_classes
    return int(math.prod(ctx.teacher_feature_shapes[on]))


def _probe_shape(ctx: MethodContext, on: str) -> tuple[int, ...]:
    if ctx.input_shape is None:
        raise ValueError(f"the width of feature {on!r} needs the input shape")
    was_training = ctx.student.training
    ctx.student.eval()
    with torch.no_grad():
        probe = torch.zeros(2, *ctx.input_shape, device=ctx.device)
        out = ctx.student(probe, with_features=True)
    ctx.student.train(was_training)
    if on not in out.features:
        raise ValueError(f"student has no feature {on!r}; it has {sorted(out.features)}")
    return tuple(out.features[on].shape[1:])


class ProjectionHead(nn.Module):
    """A trainable linear map to ``out_dim``, optionally L2-normalised (RKD_d, CRD's embed heads)."""

    def __init__(self, in_dim: int, out_dim: int, normalize: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.reshape(x.shape[0], -1))
        return F.normalize(y, dim=1) if self.normalize else y
