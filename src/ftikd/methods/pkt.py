"""PKT: probabilistic knowledge transfer (Passalis & Tefas 2018; METHODS.md M14).

Standard form (§4; no FTI setting exists): CE 1 + 30000 * PKT (the weight offsets the mean over B^2
entries, A36), no KD term (``w_kd`` adds one). Runs on the penultimate embedding by default, the
paper's layer (M14) and the one its weight belongs to; ``on=logits`` is the CKD paper's black-box
setting (A.2.3). One cached teacher call per sample.

Measured pitfall, and why the default is the embedding (unlike the other relational methods): on
logits the weight 30000 dominates CE (on a resnet8 at initialisation against real teacher logits the
weighted term is about 27 against CE's 2.3), and on Fashion-MNIST at n = 500 (seeds 1-2, LR 0.1 and
0.05) training collapsed to chance (test 10.0 %) in 3 of 4 runs, where the embedding gave 80.9-82.8
(docs/results/cpu-fashion-baselines). On logits, use a much smaller ``weight`` (not tuned here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftikd.losses.relational import pkt_loss
from ftikd.methods.base import Batch, register_method
from ftikd.methods.representation import EMBEDDING
from ftikd.methods.rkd import RelationalConfig, RelationalMethod


@dataclass
class PKTConfig(RelationalConfig):
    on: str = EMBEDDING
    w_kd: float = 0.0
    weight: float = 30000.0


@register_method
class PKT(RelationalMethod):
    name = "pkt"
    family = "relational"
    reads = "embedding"
    summary = "PKT, relational: CE + 30000 * KL of batch cosine-similarity distributions; on the embedding"
    reference = (
        "Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer (ECCV 2018)"
    )
    Config = PKTConfig
    config: PKTConfig

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits, s, t = self.representations(student, batch)
        return {**self.label_terms(logits, batch), "pkt": self.config.weight * pkt_loss(s, t)}
