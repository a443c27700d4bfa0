"""Datasets (in-memory uint8 tensors), the FTI-KD split, and batched on-device augmentation."""

from ftikd.data.augment import (
    Normalizer,
    apply_crop_flip,
    crop_flip_with_params,
    draw_crop_flip,
    normalize,
    random_crop_flip,
    view_crop_flip,
    view_params,
)
from ftikd.data.base import ImageDataset
from ftikd.data.datasets import available_datasets, load_dataset, register_dataset
from ftikd.data.split import FTISplit, fti_split, validate_budget

__all__ = [
    "FTISplit",
    "ImageDataset",
    "Normalizer",
    "available_datasets",
    "crop_flip_with_params",
    "fti_split",
    "load_dataset",
    "normalize",
    "apply_crop_flip",
    "draw_crop_flip",
    "random_crop_flip",
    "register_dataset",
    "validate_budget",
    "view_crop_flip",
    "view_params",
]
