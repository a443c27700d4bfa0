"""RKD_d: pairwise differences matched in a d-dimensional projection (CKD poster Fig. 4; METHODS.md M4).

Between RKD (one scalar distance per pair) and CKD (the whole C-dim difference): the student's
difference vector z_i - z_j and the teacher's, both projected to d dims, are matched by MSE. No code
or exact definition exists (A16); ftikd follows the recommendation:

* ``projection=fixed`` (default): theta_d is a random matrix with orthonormal rows (QR of a Gaussian,
  drawn from the run-seeded torch RNG), shared by both sides and never trained; a trainable shared
  theta would drive the loss to 0 by collapsing. It is a buffer of a module in ``self.extra``, so it
  is checkpointed and restored with the student. With d = C it is a rotation and RKD_C equals CKD's
  teacher-difference term; with d > C it is an isometric embedding (columns orthonormal).
* ``projection=learned``: the student side goes through a trainable head (in ``self.extra``,
  optimised and restored with the student; initialised to theta_d when widths agree) and the
  teacher side through the fixed theta_d, so the target cannot collapse.
* ``pairs=groups`` (default): 64 pairs per step from CKD's fixed set of at most 100k ordered pairs
  (k = 2, M2.5), one student forward per half as in CKD; loss CE (mean over both members) +
  1 * projected MSE, no KD. ``pairs=inbatch``: every ordered pair of a shuffled batch, CE + KD 1 +
  projected MSE, like the RKD baseline (the alternative reading).

One cached teacher call per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses.relational import orthonormal_projection, rkd_d_inbatch_loss, rkd_d_pair_loss
from ftikd.methods.base import Batch, MethodConfig, MethodContext, register_method
from ftikd.methods.representation import (
    ProjectionHead,
    student_representation,
    student_width,
    teacher_representation,
    teacher_width,
)
from ftikd.methods.rkd import RelationalConfig, RelationalMethod
from ftikd.methods.samplers import FixedSetSampler, IndexSampler, ShuffledSampler, build_groups


@dataclass
class RKDdConfig(RelationalConfig):
    """``w_kd`` defaults to 0 with ``pairs=groups`` and to 1 with ``pairs=inbatch`` (A16)."""

    d: int = 100
    pairs: str = "groups"
    projection: str = "fixed"
    max_pairs: int = 100_000
    weight: float = 1.0
    w_kd: float | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.pairs not in ("groups", "inbatch"):
            raise ValueError("rkd-d pairs must be 'groups' (CKD pair sampler) or 'inbatch'")
        if self.projection not in ("fixed", "learned"):
            raise ValueError("rkd-d projection must be 'fixed' or 'learned'")
        if self.d < 1 or self.max_pairs < 1:
            raise ValueError("rkd-d needs d >= 1 and max_pairs >= 1")
        if self.w_kd is None:
            self.w_kd = 0.0 if self.pairs == "groups" else 1.0
        super().__post_init__()


class FixedProjection(nn.Module):
    """x -> x @ P^T for a fixed matrix P kept as a buffer (checkpointed, never optimised)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.T.to(x.dtype)


@register_method
class RKDd(RelationalMethod):
    name = "rkd-d"
    family = "relational"
    reads = "logit differences of pairs, projected to d dims"
    summary = (
        "RKD_d, relational: CE + MSE of pair differences in a fixed orthonormal d=100 projection; on logits"
    )
    reference = "Xu et al., CKD poster (WACV 2025), Fig. 4 (RKD_d); ftikd's reading of it (A16)"
    Config = RKDdConfig
    config: RKDdConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self.couples_batch_rows = self.config.pairs == "inbatch"

    def setup(self, ctx: MethodContext) -> None:
        """Draw theta_d from the run-seeded torch RNG; add the learned student head if asked."""
        cfg = self.config
        width_s, width_t = student_width(ctx, cfg.on), teacher_width(ctx, cfg.on)
        if cfg.projection == "fixed" and width_s != width_t:
            raise ValueError(
                f"rkd-d on {cfg.on!r}: student width {width_s} != teacher width {width_t}; "
                "a shared fixed projection needs equal widths (use projection=learned)"
            )
        seed = int(torch.randint(2**62, (1,)))
        theta = orthonormal_projection(width_t, cfg.d, torch.Generator().manual_seed(seed))
        self.extra["theta"] = FixedProjection(theta)
        if cfg.projection == "learned":
            head = ProjectionHead(width_s, cfg.d)
            if width_s == width_t:
                with torch.no_grad():
                    head.linear.weight.copy_(theta)
                    head.linear.bias.zero_()
            self.extra["head"] = head

    def sampler(self, num_train: int, batch_size: int, generator: torch.Generator) -> IndexSampler:
        if self.config.pairs == "inbatch":
            return ShuffledSampler(num_train, batch_size, generator)
        pairs = build_groups(num_train, 2, self.config.max_pairs, generator)
        return FixedSetSampler(pairs, batch_size, generator)

    def _project_student(self, s: torch.Tensor) -> torch.Tensor:
        return self.extra["head" if self.config.projection == "learned" else "theta"](s)

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        if cfg.pairs == "inbatch":
            logits, s, t = self.representations(student, batch)
            terms = self.label_terms(logits, batch)
            terms["rkd_d"] = cfg.weight * rkd_d_inbatch_loss(self._project_student(s), self.extra["theta"](t))
            return terms
        # one forward per half, so BatchNorm sees the halves separately, as in CKD (M2.5)
        halves = [student_representation(student, batch.images[:, i : i + 1], cfg.on) for i in (0, 1)]
        logits = torch.cat([out.logits for out, _ in halves], dim=1)
        pairs = batch.index.shape[0]
        s = self._project_student(torch.stack([rep for _, rep in halves], dim=1).reshape(2 * pairs, -1))
        t = self.extra["theta"](teacher_representation(batch, cfg.on))
        terms = self.label_terms(logits.reshape(2 * pairs, -1), batch)
        terms["rkd_d"] = cfg.weight * rkd_d_pair_loss(s.reshape(pairs, 2, -1), t.reshape(pairs, 2, -1))
        return terms
