"""Tests for ftikd.data.folder: image folders of any size, mode and layout, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftikd.data import load_dataset
from ftikd.data.folder import channel_stats, load_image_folder
from ftikd.errors import FtikdError


def make_png(path: Path, size_wh: tuple[int, int], color, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size_wh, color).save(path)


# ------------------------------------------------------------------------------------------- folder


def make_folder(root: Path, per_class: int = 5, gray: bool = False) -> None:
    colors = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}
    for ci, (cls, rgb) in enumerate(colors.items()):
        for k in range(per_class):
            size = (20 + 7 * k, 15 + 5 * ci)  # varied sizes and aspect ratios
            if gray:
                make_png(root / cls / f"{k}.png", size, 60 * ci + k, mode="L")
            else:
                make_png(root / cls / f"{k}.png", size, rgb)
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image extension


def test_folder_holdout_split(tmp_path):
    make_folder(tmp_path / "imgs")
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.train_images.shape == (12, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert torch.bincount(ds.test_labels).tolist() == [1, 1, 1]
    # each class is a solid colour, so every pixel must be that colour after resize/crop
    for x, y in zip(ds.train_images, ds.train_labels, strict=True):
        expect = torch.zeros(3, dtype=torch.uint8)
        expect[int(y)] = 255
        assert torch.equal(x, expect[:, None, None].expand(3, 32, 32))
    mean, std = channel_stats(ds.train_images)
    assert ds.mean == mean and ds.std == std
    again = load_image_folder(tmp_path / "imgs")
    assert torch.equal(again.test_images, ds.test_images) and torch.equal(again.train_labels, ds.train_labels)


def test_folder_grayscale_and_size(tmp_path):
    make_folder(tmp_path / "g", gray=True)
    ds = load_image_folder(tmp_path / "g", image_size=8)
    assert ds.train_images.shape[1:] == (1, 8, 8)
    assert ds.channels == 1 and ds.image_size == (8, 8)


def test_folder_centre_crop(tmp_path):
    # 60x20 image: left third red, middle green, right third blue -> centre crop keeps only green
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :20, 0] = 255
    img[:, 20:40, 1] = 255
    img[:, 40:, 2] = 255
    (tmp_path / "f" / "a").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "f" / "a" / "x.png")
    ds = load_image_folder(tmp_path / "f", image_size=10)
    x = ds.train_images[0]
    assert x.shape == (3, 10, 10)
    assert (x[1, :, 2:-2] == 255).all() and (x[0, :, 2:-2] == 0).all() and (x[2, :, 2:-2] == 0).all()


def test_folder_train_test_subfolders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls, col in (("a", (255, 255, 255)), ("b", (0, 0, 0))):
            for k in range(n):
                make_png(tmp_path / "d" / split / cls / f"{k}.jpg", (40, 30), col)
    ds = load_dataset("folder", data_dir=tmp_path / "d")
    assert ds.classes == ["a", "b"]
    assert ds.train_images.shape[0] == 6 and ds.test_images.shape[0] == 4
    assert ds.test_labels.tolist() == [0, 0, 1, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(FtikdError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FtikdError, match="no class subfolders"):
        load_image_folder(tmp_path / "empty")
    make_folder(tmp_path / "d1", per_class=2)
    (tmp_path / "d1" / "zebra").mkdir()
    with pytest.raises(FtikdError, match="zebra"):
        load_image_folder(tmp_path / "d1")
    make_folder(tmp_path / "d2", per_class=2)
    (tmp_path / "d2" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(FtikdError, match="broken.png"):
        load_image_folder(tmp_path / "d2")
    with pytest.raises(FtikdError, match="folder:PATH"):
        load_dataset("folder")
