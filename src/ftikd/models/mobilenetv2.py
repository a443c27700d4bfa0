"""MobileNetV2 for CIFAR-sized inputs, as in the RepDistiller model zoo used by the CRD/CKD papers.

Sandler et al. (2018) inverted residual blocks: a 1x1 expansion by ``expand_ratio`` (T) + BN +
ReLU, a 3x3 depthwise conv + BN + ReLU, a linear 1x1 projection + BN, and an identity shortcut when
the block keeps stride and width. As in RepDistiller, even the T = 1 block keeps its expansion
conv, the stem is a stride-2 3x3 conv of ``32 * width`` channels, the seven block groups
``(t, c, n, s)`` below use strides 1, 1, 2, 2, 1, 2, 1 (a 32x32 input ends at 2x2), widths are
``int(c * width)`` without rounding, and the head is a 1x1 conv to 1280 channels + BN + ReLU,
global average pooling and one linear layer.

Registered names (100-class parameter counts):

* ``mobilenetv2_half``: width 0.5, T = 6, RepDistiller's ``mobile_half``. This is the
  "MobileNetV2" of the CRD/CKD benchmark tables (0.81 M parameters).
* ``mobilenetv2``: width 1.0, T = 6 (2.35 M parameters), not a benchmark model.

Global average pooling replaces RepDistiller's fixed ``AvgPool2d(2)``; both agree on 32x32 inputs.
With it any input of at least 1x1 pixels works; 28x28 (Fashion-MNIST) gives resolutions
14/14/7/4/2 for ``stem``/``stage1..4``, the same as 32x32's 16/16/8/4/2 from ``stage3`` on.

Features (``forward(x, with_features=True)``), mapped to RepDistiller's ``[f0, ..., f5]``:

* ``stem``: stem conv + BN + ReLU (``f0``).
* ``stage1``..``stage4``: outputs of block groups 2, 3, 5 and 7 (``f1``..``f4``). Block outputs
  are linear bottlenecks (no ReLU follows them), so each already is a pre-activation and there is
  no separate ``stage{i}_pre`` (RepDistiller's ``preact=True`` returns the same tensors).
* ``embedding``: the pooled 1280-channel head conv output (``f5``).

Initialisation as in RepDistiller: He-normal fan-out convs, BN weight 1 / bias 0, classifier
weights N(0, 0.01^2) with zero bias.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ftikd.models.base import ModelOutput, register_model
from ftikd.models.resnet import init_weights

#: (expansion t, width c, blocks n, first stride s) of the seven block groups; t = None means T.
BLOCK_GROUPS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)

#: Block-group index after which each stage feature is taken (RepDistiller's f1..f4).
STAGE_TAPS = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}

HEAD_WIDTH = 1280


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BN + ReLU, the building unit of stem, blocks and head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), identity shortcut when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            conv_bn_relu(in_channels, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 with width multiplier ``width`` and expansion ratio ``expand_ratio`` (T)."""

    def __init__(
        self, width: float = 0.5, expand_ratio: int = 6, *, in_channels: int = 3, num_classes: int = 100
    ) -> None:
        super().__init__()
        if int(16 * width) < 1 or expand_ratio < 1:
            raise ValueError(
                f"MobileNetV2 needs width >= 1/16 and expand_ratio >= 1, got {width} and {expand_ratio}"
            )
        prev = int(32 * width)
        self.stem = conv_bn_relu(in_channels, prev, 3, stride=2)
        groups = []
        for t, c, n, s in BLOCK_GROUPS:
            out = int(c * width)
            blocks = []
            for j in range(n):
                blocks.append(
                    InvertedResidual(prev, out, s if j == 0 else 1, expand_ratio if t is None else t)
                )
                prev = out
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        # RepDistiller widens the head only above width 1, rounding to a multiple of 8.
        self.embedding_dim: int = max(HEAD_WIDTH, 8 * round(HEAD_WIDTH * width / 8))
        self.head = conv_bn_relu(prev, self.embedding_dim, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.embedding_dim, num_classes)
        init_weights(self, linear_std=0.01)

    def feature_names(self) -> list[str]:
        """Names present in ``features`` when ``with_features=True`` (see module docstring)."""
        return ["stem", *STAGE_TAPS.values(), "embedding"]

    def forward(self, x: torch.Tensor, with_features: bool = False) -> ModelOutput:
        h = self.stem(x)
        feats: dict[str, torch.Tensor] = {"stem": h}
        for i, group in enumerate(self.blocks):
            h = group(h)
            if i in STAGE_TAPS:
                feats[STAGE_TAPS[i]] = h
        emb = torch.flatten(self.pool(self.head(h)), 1)
        feats["embedding"] = emb
        return ModelOutput(self.classifier(emb), feats if with_features else {})


register_model("mobilenetv2_half")(partial(MobileNetV2, 0.5, 6))
register_model("mobilenetv2")(partial(MobileNetV2, 1.0, 6))
