"""RKD: relational KD on distances and angles (Park et al. 2019; METHODS.md M3), plus the pieces the
other relational methods (DIST, SP, PKT, CC, RKD_d) share: the ``on`` option and the CE/KD terms.

FTI setting (§3.1, A14): CE 1 + KD 1 (T = 4) + 1 * (25 * distance + 50 * angle) on logits, batches
from the RKD class sampler (m = 5 images per class). One cached teacher call per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.errors import FtikdError
from ftikd.losses import kd_loss
from ftikd.losses.relational import rkd_angle_loss, rkd_distance_loss
from ftikd.methods.base import Batch, Method, MethodConfig, MethodContext, register_method
from ftikd.methods.representation import (
    LOGITS,
    check_representation,
    student_representation,
    student_width,
    teacher_feature_names,
    teacher_representation,
)
from ftikd.methods.samplers import IndexSampler, ShuffledSampler


@dataclass
class RelationalConfig(MethodConfig):
    """Options every relational method has: what it compares (``on``) and its CE/KD terms.

    ``on`` is ``logits`` (the CKD paper's fair black-box setting, A.2.3) or a feature name such as
    ``embedding`` or ``stage3`` (the original papers); CE and KD always act on the logits.
    """

    on: str = LOGITS
    w_ce: float = 1.0
    w_kd: float = 1.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        check_representation(self.on)
        if self.w_ce < 0 or self.w_kd < 0:
            raise ValueError("w_ce and w_kd must be >= 0")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")


class RelationalMethod(Method):
    """Base of the relational methods: reads ``on`` from the teacher store, adds CE and KD."""

    couples_batch_rows = True
    config: RelationalConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self.teacher_features = teacher_feature_names(self.config.on)

    def setup(self, ctx: MethodContext) -> None:
        """Check a feature name against the student early (one probe forward); logits need nothing."""
        if self.config.on != LOGITS:
            student_width(ctx, self.config.on)

    def representations(
        self, student: nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student logits, student and teacher representations ``on``, each flattened to (N, D)."""
        out, s = student_representation(student, batch.images, self.config.on)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        return logits, s, teacher_representation(batch, self.config.on)

    def label_terms(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Weighted per-sample CE and KD (§0.5) on the logits; a zero weight drops its term."""
        cfg = self.config
        terms = {}
        if cfg.w_ce > 0:
            terms["ce"] = cfg.w_ce * F.cross_entropy(logits, batch.labels.reshape(-1))
        if cfg.w_kd > 0:
            teacher = batch.teacher_logits.reshape(logits.shape)
            terms["kd"] = cfg.w_kd * kd_loss(logits, teacher, cfg.temperature)
        return terms


class ClassChunkSampler:
    """RKD's batch sampler ([C-RKD] NPairs, used by [C-CKD]; METHODS.md M3 "Sampler").

    Each batch visits the classes in a fresh random order and takes up to ``per_class`` distinct
    random samples of each until ``batch_size`` are collected, then truncates: about 13 classes per
    batch of 64 at m = 5. With fewer than ``batch_size / per_class`` classes the batch is shorter
    (10 digits classes give 50 rows), as in the reference. Vectorised, and only the classes a batch
    needs draw keys (cost ~ classes x largest class, not n log n); draws only from ``generator`` and
    keeps no other state, so resume is exact.
    """

    def __init__(
        self, labels: torch.Tensor, batch_size: int, per_class: int, generator: torch.Generator
    ) -> None:
        if labels.numel() < 1:
            raise ValueError("sampler needs at least one sample")
        _, class_of, self.sizes = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
        by_class = torch.sort(class_of, stable=True)
        rank = torch.arange(class_of.numel()) - (torch.cumsum(self.sizes, 0) - self.sizes)[by_class.values]
        # members[c, r]: the r-th training index of class c (rows padded with 0 beyond sizes[c])
        self.members = torch.zeros(self.sizes.numel(), int(self.sizes.max()), dtype=torch.long)
        self.members[by_class.values, rank] = by_class.indices
        self.batch_size, self.per_class, self.generator = batch_size, per_class, generator

    def next_batch(self) -> torch.Tensor:
        order = torch.randperm(self.sizes.numel(), generator=self.generator)
        filled = torch.cumsum(self.sizes[order].clamp(max=self.per_class), 0)
        needed = min(int(torch.searchsorted(filled, self.batch_size)) + 1, order.numel())
        chosen, width = order[:needed], self.members.shape[1]
        keys = torch.rand(needed, width, generator=self.generator)
        present = torch.arange(width) < self.sizes[chosen, None]
        picks = torch.where(present, keys, 2.0).argsort(dim=1)[:, : self.per_class]
        keep = picks < self.sizes[chosen, None]
        return self.members[chosen[:, None], picks][keep][: self.batch_size]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing beyond the generator, whose state its owner saves."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""


@dataclass
class RKDConfig(RelationalConfig):
    """RKD options: ``mode`` distance | angle | both; ``sampler`` rkd ([C-CKD]) | shuffled ([C-RD], [S3])."""

    mode: str = "both"
    w_distance: float = 25.0
    w_angle: float = 50.0
    weight: float = 1.0
    sampler: str = "rkd"
    per_class: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("distance", "angle", "both"):
            raise ValueError("RKD mode must be 'distance', 'angle' or 'both'")
        if self.sampler not in ("rkd", "shuffled"):
            raise ValueError("RKD sampler must be 'rkd' (m images per class) or 'shuffled'")
        if self.per_class < 1:
            raise ValueError("per_class must be >= 1")


@register_method
class RKD(RelationalMethod):
    name = "rkd"
    family = "relational"
    reads = "logits"
    summary = (
        "RKD, relational: CE + KD + distance (25) and angle (50) structure; on logits, class sampler m=5"
    )
    reference = "Park et al., Relational Knowledge Distillation (CVPR 2019)"
    Config = RKDConfig
    config: RKDConfig
    _train_labels: torch.Tensor | None = None  # set by setup(); the sampler needs them

    def setup(self, ctx: MethodContext) -> None:
        """Keep the training labels for the class sampler (needs ``MethodContext.train_labels``)."""
        super().setup(ctx)
        self._train_labels = ctx.train_labels

    def sampler(self, num_train: int, batch_size: int, generator: torch.Generator) -> IndexSampler:
        if self.config.sampler == "shuffled":
            return ShuffledSampler(num_train, batch_size, generator)
        labels = self._train_labels
        if labels is None:
            raise FtikdError(
                "rkd's class sampler needs the training labels (MethodContext.train_labels); "
                "pass sampler=shuffled to use plain shuffled batches"
            )
        return ClassChunkSampler(labels, batch_size, self.config.per_class, generator)

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits, s, t = self.representations(student, batch)
        terms = self.label_terms(logits, batch)
        if cfg.mode in ("distance", "both"):
            terms["rkd_distance"] = cfg.weight * cfg.w_distance * rkd_distance_loss(s, t)
        if cfg.mode in ("angle", "both"):
            terms["rkd_angle"] = cfg.weight * cfg.w_angle * rkd_angle_loss(s, t)
        return terms
