"""Mixup with a fixed teacher, over 2 or 3 images (METHODS.md M6; CKD paper §4.2 item 3, A.2.2).

This is the fixed-teacher variant the CKD paper uses (Beyer et al., 2022): the teacher target of a
mixed image is the same mixture of the cached teacher distributions of its parts, so the run pays
one teacher call per training sample (1x, FTI-compatible). It is *not* "function matching", which
would query the teacher on every mixed image (+1 call per mixed image per step).

Each step draws 64 pairs (or triplets) from a fixed set of at most ``max_groups`` distinct ordered
groups, built once per run like CKD's; the engine augments every member independently and the
images are mixed here, with one set of weights per batch from the global CPU RNG (resume-exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses.mixing import draw_mixing_weights, mix_images, mixing_loss
from ftikd.methods.base import Batch, Method, MethodConfig, register_method
from ftikd.methods.samplers import FixedSetSampler, IndexSampler, build_groups


@dataclass
class MixConfig(MethodConfig):
    """Options shared by the fixed-teacher mixing methods (FTI weights of METHODS.md §3.1).

    ``soft``: ``"ce"`` is soft CE at T = 1 against the mixed teacher distribution (the code
    default, A18); ``"kl"`` is the per-part T^2 KL at ``temperature``. There is no per-sample KD.
    """

    w_ce: float = 1.0
    w_soft: float = 1.0
    soft: str = "ce"
    temperature: float = 4.0
    max_groups: int = 100_000

    def __post_init__(self) -> None:
        if self.soft not in ("ce", "kl"):
            raise ValueError("soft must be 'ce' (soft cross-entropy, T=1) or 'kl' (T^2 KL at temperature)")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.max_groups < 1:
            raise ValueError("max_groups must be positive")


class FixedTeacherMixing(Method):
    """Shared machinery: a fixed set of k-groups, one mixed image per group, mixed-target terms.

    Subclasses implement :meth:`mix`, returning the mixed images and the weight of each part.
    """

    parts: int = 2

    def sampler(self, num_train: int, batch_size: int, generator: torch.Generator) -> IndexSampler:
        """At most ``max_groups`` distinct ordered groups of ``parts`` samples (M6 sampler, M2.5)."""
        groups = build_groups(num_train, self.parts, self.config.max_groups, generator)
        return FixedSetSampler(groups, batch_size, generator)

    def mix(self, images: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        raise NotImplementedError

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        mixed, weights = self.mix(batch.images)
        logits = student(mixed).logits
        terms = mixing_loss(logits, batch.labels, batch.teacher_logits, weights, cfg.soft, cfg.temperature)
        return {"ce": cfg.w_ce * terms["ce"], "soft": cfg.w_soft * terms["soft"]}


@dataclass
class MixupConfig(MixConfig):
    """``parts``: images per mixed input; 2 draws lambda ~ U(0, 1), more draw normalised uniforms."""

    parts: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.parts < 2:
            raise ValueError("mixup needs parts >= 2")


@register_method
class Mixup(FixedTeacherMixing):
    name = "mixup"
    family = "mixing"
    reads = "logits of mixed images"
    summary = (
        "Mixup, fixed teacher (the CKD paper's; not function matching): targets mix cached teacher outputs"
    )
    reference = "Zhang et al., 2018, mixup; fixed teacher: Beyer et al., 2022; as run in CKD (Xu et al.)"
    Config = MixupConfig

    def __init__(self, config: MixupConfig | None = None) -> None:
        super().__init__(config)
        self.parts = self.config.parts

    def mix(self, images: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """x_mix = sum_m w_m x_m with one weight vector per batch (M6, A17)."""
        weights = draw_mixing_weights(self.parts)
        return mix_images(images, weights), weights


@dataclass
class Mixup3Config(MixupConfig):
    parts: int = 3


@register_method
class Mixup3(Mixup):
    name = "mixup3"
    family = "mixing"
    reads = "logits of mixed images"
    summary = (
        "Mixup of 3 images, fixed teacher (the CKD paper's; not function matching), normalised U(0,1) weights"
    )
    Config = Mixup3Config
