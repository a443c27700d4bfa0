"""VGG-8/11/13/16/19 with batch norm, CIFAR variant of the RepDistiller model zoo.

Five groups of 3x3 conv + BN + ReLU layers (widths 64, 128, 256, 512, 512; the number of convs
per group is given by ``VGG_CONFIGS``), no fully connected hidden layers: global average pooling
and a single ``Linear(512, num_classes)``. Convs keep their bias, as in RepDistiller.

Pooling: a 2x2 max-pool follows groups 1, 2 and 3. As in RepDistiller, the pool between groups 4
and 5 is applied only to large inputs (there: exactly 64x64, here: at least 64 pixels high), so
a 32x32 input gives 32/16/8/4/4 resolutions. The pools use ``ceil_mode=True``, which equals
RepDistiller's floor mode on even sizes (32x32, 64x64) and keeps odd borders instead of
dropping them (28x28 gives 28/14/7/4/4). Thanks to that, any input of at least 1x1 pixels works
(8x8 gives 8/4/2/1/1; batch-norm training needs more than one value per channel).

Features, mapped to RepDistiller's ``[f0, f1, f2, f3, f4, f5]``:

* ``stem``: output of conv group 1 after its ReLU (``f0``).
* ``stage{i}`` for i = 1..4: output of conv group i + 1 after its final ReLU (``f{i}``).
* ``stage{i}_pre``: the same before that ReLU, i.e. the last BN's output (``f{i}`` with
  ``preact=True``).
* ``embedding``: globally average-pooled ``stage4``, shape (B, 512) (``f5``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.models.base import ModelOutput, register_model
from ftikd.models.resnet import conv3x3, init_weights, stage_feature_names

GROUP_WIDTHS = (64, 128, 256, 512, 512)

#: Number of conv layers in each of the five groups.
VGG_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "vgg8": (1, 1, 1, 1, 1),
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}

#: Inputs at least this high also get the max-pool between the last two groups.
LARGE_INPUT = 64


def _conv_group(in_channels: int, width: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` conv + BN layers with ReLUs between them; the trailing ReLU is left to the caller
    so that the pre-activation output is available."""
    layers: list[nn.Module] = []
    for j in range(num_convs):
        if j:
            layers.append(nn.ReLU(inplace=True))
        layers += [conv3x3(in_channels if j == 0 else width, width, bias=True), nn.BatchNorm2d(width)]
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """CIFAR VGG with batch norm; ``convs_per_group`` holds five conv counts."""

    def __init__(
        self, convs_per_group: tuple[int, ...], *, in_channels: int = 3, num_classes: int = 100
    ) -> None:
        super().__init__()
        if len(convs_per_group) != len(GROUP_WIDTHS) or min(convs_per_group) < 1:
            raise ValueError(f"VGG needs five positive conv counts, got {convs_per_group}")
        groups = []
        prev = in_channels
        for width, n in zip(GROUP_WIDTHS, convs_per_group, strict=True):
            groups.append(_conv_group(prev, width, n))
            prev = width
        self.groups = nn.ModuleList(groups)
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)
        self.embedding_dim: int = prev
        init_weights(self, linear_std=0.01)

    def feature_names(self) -> list[str]:
        """Names present in ``features`` when ``with_features=True`` (see module docstring)."""
        return stage_feature_names(len(self.groups) - 1)

    def _pools_after(self, height: int) -> tuple[bool, ...]:
        """Whether a max-pool follows each of groups 1..4 for an input of this height."""
        return (True, True, True, height >= LARGE_INPUT)

    def forward(self, x: torch.Tensor, with_features: bool = False) -> ModelOutput:
        pools = self._pools_after(x.shape[-2])
        feats: dict[str, torch.Tensor] = {}
        h = x
        for i, group in enumerate(self.groups):
            pre = group(h)
            h = F.relu(pre, inplace=not with_features)
            if with_features:
                if i == 0:
                    feats["stem"] = h
                else:
                    feats[f"stage{i}"] = h
                    feats[f"stage{i}_pre"] = pre
            if i < len(pools) and pools[i]:
                h = self.maxpool(h)
        emb = torch.flatten(self.pool(h), 1)
        if with_features:
            feats["embedding"] = emb
        return ModelOutput(self.classifier(emb), feats)


def vgg(convs_per_group: tuple[int, ...], *, in_channels: int = 3, num_classes: int = 100) -> VGG:
    """Generic constructor for a five-group VGG not in the registry."""
    return VGG(convs_per_group, in_channels=in_channels, num_classes=num_classes)


for _name, _convs in VGG_CONFIGS.items():
    register_model(_name)(partial(vgg, _convs))
