"""Wide ResNets WRN-d-k for CIFAR, as in the RepDistiller model zoo (no dropout).

A 3x3 stem conv to 16 channels, then three groups of ``n = (d - 4) / 6`` pre-activation wide
blocks of widths 16k, 32k, 64k (groups 2 and 3 halve the resolution), a final BN + ReLU, global
average pooling and a linear classifier. A block whose input and output differ in width or
resolution uses a 1x1 conv shortcut on the activated input; otherwise the shortcut is the
identity on the raw input. Any input of at least 1x1 pixels works.

Features. Being pre-activation, the network has no ReLU at the end of a group: a group's output
is a raw residual sum that the *next* BN + ReLU (the first BN of the next group, or the final BN
after the last group) activates. Following RepDistiller's ``preact=True`` convention, that BN is
applied to define the features, and it is the very BN the network runs anyway (it is computed
once and fed on, so running statistics are updated exactly once per forward):

* ``stem``: ReLU(BN(stem conv)), i.e. the activation entering group 1 (RepDistiller's ``f0`` is the
  raw conv output).
* ``stage{i}_pre``: BN_next(output of group i), before the ReLU (RepDistiller's ``f{i}`` with
  ``preact=True``).
* ``stage{i}``: ReLU(``stage{i}_pre``), the activation entering the next group; ``stage3`` is the
  tensor after the final BN + ReLU that gets pooled. (RepDistiller's non-preact ``f1``, ``f2``,
  ``f3`` are the raw group sums, which are not post-ReLU; we do not expose them.)
* ``embedding``: globally average-pooled ``stage3``, shape (B, 64k) (``f4``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.models.base import ModelOutput, register_model
from ftikd.models.resnet import conv3x3, init_weights, stage_feature_names


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor, act: torch.Tensor | None = None) -> torch.Tensor:
        """``act`` is ReLU(bn1(x)) when the caller already computed it (feature path)."""
        if act is None:
            act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act)), inplace=True))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``; ``depth`` must be ``6n + 4``."""

    def __init__(self, depth: int, widen: int, *, in_channels: int = 3, num_classes: int = 100) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        if widen < 1:
            raise ValueError(f"WRN widen factor must be >= 1, got {widen}")
        blocks_per_group = (depth - 4) // 6
        self.stem = conv3x3(in_channels, 16)
        groups = []
        prev = 16
        for i, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            stride = 1 if i == 0 else 2
            blocks = [WideBlock(prev, width, stride)]
            blocks += [WideBlock(width, width) for _ in range(blocks_per_group - 1)]
            groups.append(nn.Sequential(*blocks))
            prev = width
        self.groups = nn.ModuleList(groups)
        self.bn_final = nn.BatchNorm2d(prev)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        self.embedding_dim: int = prev
        init_weights(self, zero_linear_bias=True)

    def feature_names(self) -> list[str]:
        """Names present in ``features`` when ``with_features=True`` (see module docstring)."""
        return stage_feature_names(len(self.groups))

    def _next_bn(self, group_index: int) -> nn.BatchNorm2d:
        """The BN that activates the output of group ``group_index`` (-1: the stem)."""
        if group_index + 1 < len(self.groups):
            return self.groups[group_index + 1][0].bn1
        return self.bn_final

    def forward(self, x: torch.Tensor, with_features: bool = False) -> ModelOutput:
        h = self.stem(x)
        if not with_features:
            for group in self.groups:
                h = group(h)
            h = F.relu(self.bn_final(h), inplace=True)
            return ModelOutput(self.fc(torch.flatten(self.pool(h), 1)))

        act = F.relu(self._next_bn(-1)(h))
        feats: dict[str, torch.Tensor] = {"stem": act}
        for i, group in enumerate(self.groups):
            h = group[0](h, act)
            for block in group[1:]:
                h = block(h)
            pre = self._next_bn(i)(h)
            act = F.relu(pre)
            feats[f"stage{i + 1}"] = act
            feats[f"stage{i + 1}_pre"] = pre
        emb = torch.flatten(self.pool(act), 1)
        feats["embedding"] = emb
        return ModelOutput(self.fc(emb), feats)


def wrn(depth: int, widen: int, *, in_channels: int = 3, num_classes: int = 100) -> WideResNet:
    """Generic WRN-``depth``-``widen`` constructor for configurations not in the registry."""
    return WideResNet(depth, widen, in_channels=in_channels, num_classes=num_classes)


WRN_CONFIGS: dict[str, tuple[int, int]] = {
    "wrn_10_2": (10, 2),
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_28_2": (28, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}

for _name, (_depth, _widen) in WRN_CONFIGS.items():
    register_model(_name)(partial(wrn, _depth, _widen))
