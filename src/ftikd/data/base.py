"""The in-memory dataset type every reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageDataset:
    """A whole dataset held in memory as uint8 image tensors.

    ``train_images``/``test_images`` are uint8 tensors of shape (N, C, H, W); labels are int64 (N,).
    ``mean``/``std`` are per-channel normalisation statistics on the [0, 1] scale; ``hflip`` says
    whether horizontal flips are a valid augmentation (False for e.g. digits); ``crop_padding`` is
    the zero padding of the random crop (4 as in the CKD paper; 1 for 8x8 digits).
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = True
    crop_padding: int = 4

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])
