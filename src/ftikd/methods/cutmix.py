"""CutMix with a fixed teacher (METHODS.md M7; CKD paper Tables 5, 6).

This is the fixed-teacher variant the CKD paper uses: the teacher target of a cut-and-pasted image is
the mixture of the parts' cached teacher distributions weighted by their pixel areas, so the run pays
one teacher call per training sample (1x, FTI-compatible). It is *not* "function matching", which
would query the teacher on every mixed image. Pairs come from the same fixed set of at most 100k
ordered pairs as Mixup; one box per batch, drawn from the global CPU RNG (resume-exact).
"""

from __future__ import annotations

import torch

from ftikd.losses.mixing import cutmix_images, draw_cutmix_box
from ftikd.methods.base import register_method
from ftikd.methods.mixup import FixedTeacherMixing, MixConfig


@register_method
class CutMix(FixedTeacherMixing):
    name = "cutmix"
    family = "mixing"
    reads = "logits of cut-and-pasted images"
    summary = (
        "CutMix, fixed teacher (the CKD paper's; not function matching): cached teacher outputs mixed by area"
    )
    reference = "Yun et al., 2019, CutMix; fixed teacher: Beyer et al., 2022; as run in CKD (Xu et al.)"
    Config = MixConfig
    parts = 2

    def mix(self, images: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Paste a box of the second image into the first; weights are the two area fractions (M7)."""
        box, lam = draw_cutmix_box(images.shape[-2], images.shape[-1])
        return cutmix_images(images[:, 0], images[:, 1], box), [lam, 1.0 - lam]
