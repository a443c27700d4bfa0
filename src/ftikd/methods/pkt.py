"""PKT: probabilistic knowledge transfer (Passalis & Tefas 2018; METHODS.md M14).

Standard form (§4; no FTI setting exists): CE 1 + 30000 * PKT (the weight offsets the mean over B^2
entries, A36), no KD term (``w_kd`` adds one). Runs on logits by default; the paper's layer is the
penultimate embedding (``on=embedding``). One cached teacher call per sample.

Measured pitfall: the weight 30000 belongs to the embedding's scale. On logits it dominates CE (on
a resnet8 at initialisation against real teacher logits the weighted term is about 27 against CE's
2.3), and on Fashion-MNIST at n = 500 (seed 1, LR 0.1 and 0.05) training collapsed to chance (test
10.0 %). Use ``on=embedding``, or a much smaller ``weight`` on logits (not tuned here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses.relational import pkt_loss
from ftikd.methods.base import Batch, register_method
from ftikd.methods.rkd import RelationalConfig, RelationalMethod


@dataclass
class PKTConfig(RelationalConfig):
    w_kd: float = 0.0
    weight: float = 30000.0


@register_method
class PKT(RelationalMethod):
    name = "pkt"
    family = "relational"
    reads = "logits"
    summary = "PKT, relational: CE + 30000 * KL of batch cosine-similarity distributions; on logits"
    reference = (
        "Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer (ECCV 2018)"
    )
    Config = PKTConfig
    config: PKTConfig

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits, s, t = self.representations(student, batch)
        return {**self.label_terms(logits, batch), "pkt": self.config.weight * pkt_loss(s, t)}
