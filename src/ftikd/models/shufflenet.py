"""ShuffleNetV1 and ShuffleNetV2 for CIFAR-sized inputs, as in the RepDistiller model zoo.

Both keep RepDistiller's CIFAR layout: a 1x1 stem conv to 24 channels + BN + ReLU without any
downsampling, then three stages whose first block halves the resolution (a 32x32 input gives
32/16/8/4, a 28x28 one 28/14/7/4, as every stride-2 layer has kernel 3 and padding 1), then global
average pooling (RepDistiller's fixed ``avg_pool2d(4)`` on 32x32) and one linear layer.

* ``shufflev1`` (Zhang et al., 2018): groups 3, stage widths 240/480/960, 4/8/4 bottleneck units.
  A unit is a grouped 1x1 conv to a quarter of its width + BN + ReLU, a channel shuffle, a 3x3
  depthwise conv + BN + ReLU (RepDistiller keeps this ReLU, which the paper drops), and a grouped
  1x1 conv + BN; the shortcut is added, or in the stride-2 first unit of a stage a 3x3 average
  pool of the input is concatenated (the unit then computes only ``width - in_channels``
  channels). The network's first 1x1 conv is not grouped. 0.95 M parameters at 100 classes.
* ``shufflev2`` (Ma et al., 2018), net size 1: stage widths 116/232/464 and a 1x1 head conv to
  1024 channels + BN + ReLU before the pooling. Each stage is a downsampling unit (two stride-2
  branches, each ending in 1x1 conv + BN + ReLU, concatenated) and 3/7/3 basic units (split the
  channels in half, keep one half, run the other through 1x1 + BN + ReLU, 3x3 depthwise + BN,
  1x1 + BN + ReLU, concatenate), each unit followed by a shuffle of 2 groups. 1.36 M parameters.

Features, mapped to RepDistiller's ``[f0, f1, f2, f3, f4]``:

* ``stem``: stem conv + BN + ReLU (``f0``).
* ``stage{i}`` for i = 1..3: output of stage i (``f{i}``).
* ``stage{i}_pre``: the last unit of stage i before its final ReLU, so that
  ``stage{i} == relu(stage{i}_pre)`` (``f{i}`` with ``preact=True``). For ShuffleNetV2 the kept
  half is already non-negative, and the tensor is channel-shuffled like ``stage{i}``
  (RepDistiller returns it unshuffled: the same values in another channel order).
* ``embedding``: the pooled ``stage3`` (V1, 960 wide) or the pooled head conv output (V2, 1024).

Initialisation is the zoo's :func:`~ftikd.models.resnet.init_weights` (He-normal fan-out convs,
BN weight 1 / bias 0, default linear) like the other families; RepDistiller leaves these two at
PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.models.base import ModelOutput, register_model
from ftikd.models.resnet import init_weights, stage_feature_names

STEM_WIDTH = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (g, C/g) channel grid transposed, so groups exchange information."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def conv_bn(
    in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BN; ``groups = in_channels`` makes it depthwise."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    )


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1 bottleneck unit; ``first_groups`` is 1 for the network's very first unit."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, groups: int, first_groups: int
    ) -> None:
        super().__init__()
        self.concat = stride == 2
        branch = out_channels - in_channels if self.concat else out_channels
        mid = branch // 4
        self.first_groups = first_groups
        self.reduce = conv_bn(in_channels, mid, groups=first_groups)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn(mid, branch, groups=groups)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if self.concat else None

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """The unit's output before its final ReLU (the ``_pre`` feature of a stage)."""
        out = channel_shuffle(F.relu(self.reduce(x)), self.first_groups)
        out = self.expand(F.relu(self.depthwise(out)))
        return torch.cat([out, self.pool(x)], 1) if self.pool is not None else out + x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.preact(x))


class ShuffleV2Down(nn.Module):
    """ShuffleNetV2 downsampling unit: two stride-2 branches of ``out_channels / 2``, concatenated."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(
            conv_bn(in_channels, in_channels, 3, 2, groups=in_channels), conv_bn(in_channels, mid)
        )
        self.right = nn.Sequential(
            conv_bn(in_channels, mid),
            nn.ReLU(inplace=True),
            conv_bn(mid, mid, 3, 2, groups=mid),
            conv_bn(mid, mid),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(F.relu(torch.cat([self.left(x), self.right(x)], 1)), 2)


class ShuffleV2Basic(nn.Module):
    """ShuffleNetV2 basic unit: keep half the channels, transform the other half, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.keep = channels // 2
        half = channels - self.keep
        self.branch = nn.Sequential(
            conv_bn(half, half),
            nn.ReLU(inplace=True),
            conv_bn(half, half, 3, groups=half),
            conv_bn(half, half),
        )

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """Shuffled concat before the branch's last ReLU; the kept half is already non-negative."""
        return channel_shuffle(torch.cat([x[:, : self.keep], self.branch(x[:, self.keep :])], 1), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.preact(x))


class ShuffleNet(nn.Module):
    """Stem, the given stages (each last unit has ``preact``), optional head conv, pool, linear.

    ``width`` is the last stage's width; ``head_width`` > 0 adds a 1x1 conv + BN + ReLU to it.
    """

    def __init__(
        self, stages: list[nn.Sequential], width: int, head_width: int, *, in_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, STEM_WIDTH), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(conv_bn(width, head_width), nn.ReLU(inplace=True)) if head_width else None
        self.embedding_dim: int = head_width or width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.embedding_dim, num_classes)
        init_weights(self)

    def feature_names(self) -> list[str]:
        """Names present in ``features`` when ``with_features=True`` (see module docstring)."""
        return stage_feature_names(len(self.stages))

    def forward(self, x: torch.Tensor, with_features: bool = False) -> ModelOutput:
        h = self.stem(x)
        feats: dict[str, torch.Tensor] = {"stem": h}
        for i, stage in enumerate(self.stages, start=1):
            if not with_features:
                h = stage(h)
                continue
            for unit in stage[:-1]:
                h = unit(h)
            pre = stage[-1].preact(h)
            h = F.relu(pre)
            feats[f"stage{i}"] = h
            feats[f"stage{i}_pre"] = pre
        emb = torch.flatten(self.pool(h if self.head is None else self.head(h)), 1)
        feats["embedding"] = emb
        return ModelOutput(self.fc(emb), feats if with_features else {})


def shufflenet_v1(
    widths: tuple[int, ...] = (240, 480, 960),
    units: tuple[int, ...] = (4, 8, 4),
    groups: int = 3,
    *,
    in_channels: int = 3,
    num_classes: int = 100,
) -> ShuffleNet:
    """ShuffleNetV1 with the given stage widths, units per stage and group count (module docstring)."""
    if len(widths) != len(units) or min(units) < 1 or any(w % (4 * groups) for w in widths):
        raise ValueError(
            f"ShuffleNetV1 needs one positive unit count per stage and widths divisible by 4 * groups; "
            f"got widths {widths}, units {units}, groups {groups}"
        )
    stages, prev = [], STEM_WIDTH
    for width, n in zip(widths, units, strict=True):
        blocks = []
        for j in range(n):
            first_groups = 1 if not stages and j == 0 else groups
            blocks.append(ShuffleV1Unit(prev, width, 2 if j == 0 else 1, groups, first_groups))
            prev = width
        stages.append(nn.Sequential(*blocks))
    return ShuffleNet(stages, prev, 0, in_channels=in_channels, num_classes=num_classes)


def shufflenet_v2(
    widths: tuple[int, ...] = (116, 232, 464),
    units: tuple[int, ...] = (3, 7, 3),
    head_width: int = 1024,
    *,
    in_channels: int = 3,
    num_classes: int = 100,
) -> ShuffleNet:
    """ShuffleNetV2 (net size 1 by default): per stage a downsampling unit, then ``units`` basic ones."""
    if len(widths) != len(units) or min(units) < 1 or any(w % 2 for w in widths) or head_width < 1:
        raise ValueError(
            f"ShuffleNetV2 needs one positive unit count per stage, even widths and a head width; "
            f"got widths {widths}, units {units}, head {head_width}"
        )
    stages, prev = [], STEM_WIDTH
    for width, n in zip(widths, units, strict=True):
        stages.append(nn.Sequential(ShuffleV2Down(prev, width), *(ShuffleV2Basic(width) for _ in range(n))))
        prev = width
    return ShuffleNet(stages, prev, head_width, in_channels=in_channels, num_classes=num_classes)


register_model("shufflev1")(shufflenet_v1)
register_model("shufflev2")(shufflenet_v2)
