"""CIFAR-style ResNets, as in the RepDistiller model zoo used by the CRD/CKD papers.

``resnet{8,14,20,26,32,44,56,110}`` have a 3x3 stem to 16 channels and three stages of widths
16/32/64 with ``n = (depth - 2) / 6`` basic blocks each; ``resnet8x4`` and ``resnet32x4`` use a
32-channel stem and stage widths 64/128/256. Stages 2 and 3 halve the resolution. Whenever a
block changes resolution or width, its shortcut is a 1x1 conv + BN (RepDistiller's choice, not
the zero-padding "option A" of the original paper). The head is global average pooling, so any
input of at least 1x1 pixels works (batch-norm training needs more than one value per channel).

Features (``forward(x, with_features=True)``), mapped to RepDistiller's ``[f0, f1, f2, f3, f4]``:

* ``stem``: stem conv + BN + ReLU (``f0``).
* ``stage{i}`` for i = 1..3: output of stage i after its final ReLU (``f{i}``).
* ``stage{i}_pre``: the same residual sum before that ReLU (``f{i}`` with ``preact=True``).
* ``embedding``: globally average-pooled ``stage3``, shape (B, embedding_dim) (``f4``).

This module also holds the two helpers the other families share (``conv3x3`` and
``init_weights``), so all zoo models initialise identically.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.models.base import ModelOutput, register_model


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with 'same' padding (halves the size when ``stride=2``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


def init_weights(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """RepDistiller initialisation: He-normal (fan-out) convs, BN weight 1 / bias 0.

    Linear layers keep PyTorch's default unless ``linear_std`` (weight ~ N(0, std^2)) or
    ``zero_linear_bias`` ask otherwise; the three families differ only there.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if (zero_linear_bias or linear_std is not None) and m.bias is not None:
                nn.init.zeros_(m.bias)


def stage_feature_names(num_stages: int) -> list[str]:
    """The shared feature-name scheme: ``stem``, then ``stage{i}``/``stage{i}_pre``, then ``embedding``."""
    names = ["stem"]
    for i in range(1, num_stages + 1):
        names += [f"stage{i}", f"stage{i}_pre"]
    return names + ["embedding"]


class BasicBlock(nn.Module):
    """Post-activation residual block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def preact(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum before the block's final ReLU (the ``_pre`` feature of a stage)."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return out + (x if self.shortcut is None else self.shortcut(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.preact(x))


class ResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2``; ``widths`` = (stem, stage1, stage2, stage3) channels."""

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int] = (16, 16, 32, 64),
        *,
        in_channels: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages = []
        prev = widths[0]
        for i, width in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(prev, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = width
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        self.embedding_dim: int = prev
        init_weights(self)

    def feature_names(self) -> list[str]:
        """Names present in ``features`` when ``with_features=True`` (see module docstring)."""
        return stage_feature_names(len(self.stages))

    def forward(self, x: torch.Tensor, with_features: bool = False) -> ModelOutput:
        h = self.stem(x)
        if not with_features:
            for stage in self.stages:
                h = stage(h)
            return ModelOutput(self.fc(torch.flatten(self.pool(h), 1)))

        feats: dict[str, torch.Tensor] = {"stem": h}
        for i, stage in enumerate(self.stages, start=1):
            for block in stage[:-1]:
                h = block(h)
            pre = stage[-1].preact(h)
            h = F.relu(pre)
            feats[f"stage{i}"] = h
            feats[f"stage{i}_pre"] = pre
        emb = torch.flatten(self.pool(h), 1)
        feats["embedding"] = emb
        return ModelOutput(self.fc(emb), feats)


_THIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)
RESNET_CONFIGS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    **{f"resnet{d}": (d, _THIN) for d in (8, 14, 20, 26, 32, 44, 56, 110)},
    "resnet8x4": (8, _X4),
    "resnet32x4": (32, _X4),
}

for _name, (_depth, _widths) in RESNET_CONFIGS.items():
    register_model(_name)(partial(ResNet, _depth, _widths))
