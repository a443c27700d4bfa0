"""Class-per-subfolder image directories (the user's own data, e.g. Stanford Cars).

Layout: ``ROOT/<class>/<image>`` (a seeded per-class hold-out becomes the test split) or
``ROOT/train/<class>/...`` plus ``ROOT/test/<class>/...``. Every image is decoded once here, converted
to RGB (or L when all images are grayscale), resized so its shorter side matches the target and centre
cropped, so the training loop only ever sees a uint8 tensor.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ftikd.data.base import ImageDataset
from ftikd.errors import FtikdError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def _entries(folder: Path) -> list[Path]:
    """The entries of ``folder``; an unreadable folder is a user error."""
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise FtikdError(f"cannot list folder {folder}: {e.strerror or e}; check its permissions") from e


def _class_dirs(root: Path) -> list[Path]:
    """Visible subfolders of ``root``, sorted by name."""
    dirs = [p for p in _entries(root) if p.is_dir() and not p.name.startswith(".")]
    return sorted(dirs, key=lambda p: p.name)


def _image_files(class_dir: Path) -> list[Path]:
    """Image files (by extension) directly inside ``class_dir``, sorted; error if there are none."""
    files = sorted(
        p
        for p in _entries(class_dir)
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise FtikdError(f"class folder {class_dir} contains no images ({exts}); add images or remove it")
    return files


def _scan(root: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names and per-class file lists of one class-per-subfolder directory."""
    dirs = _class_dirs(root)
    if not dirs:
        raise FtikdError(f"{root} has no class subfolders; expected {root}/<class name>/<images>")
    return [d.name for d in dirs], [_image_files(d) for d in dirs]


def _target_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h < 1 or w < 1:
        raise FtikdError(f"image size must be positive, got {image_size}")
    return int(h), int(w)


def _unreadable(path: Path, e: Exception) -> FtikdError:
    """The one-line error for an image file PIL could not open or decode."""
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return FtikdError(f"cannot read image {path}: {why}; fix or delete the file")


def _is_gray(path: Path) -> bool:
    """Whether the image is single-channel, from its header only (no pixel decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's notes on damaged EXIF/TIFF tags
            with Image.open(path) as img:
                return img.mode in _GRAY_MODES
    except Exception as e:  # PIL's decoders raise many exception types on damaged files
        raise _unreadable(path, e) from e


def _decode(path: Path, mode: str, size_hw: tuple[int, int]) -> np.ndarray:
    """Decode one image, convert to ``mode``, scale its shorter side to cover ``size_hw``, centre crop."""
    th, tw = size_hw
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's "palette images with transparency" notes
            with Image.open(path) as img:
                w, h = img.size
                scale = max(th / h, tw / w)
                nw, nh = max(tw, math.ceil(w * scale - 1e-6)), max(th, math.ceil(h * scale - 1e-6))
                img.draft(mode, (nw, nh))  # JPEG: decode at a reduced scale when that is still large enough
                img = img.convert(mode)
                w, h = img.size
                scale = max(th / h, tw / w)
                nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
                if (nw, nh) != (w, h):
                    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
                left, top = (nw - tw) // 2, (nh - th) // 2
                img = img.crop((left, top, left + tw, top + th))
                arr = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL's decoders raise many exception types on damaged files
        raise _unreadable(path, e) from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _stack(files: list[Path], mode: str, size_hw: tuple[int, int]) -> torch.Tensor:
    c = 1 if mode == "L" else 3
    out = np.empty((len(files), c, *size_hw), dtype=np.uint8)
    for i, f in enumerate(files):  # load-time decoding, once per image
        out[i] = _decode(f, mode, size_hw)
    return torch.from_numpy(out)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale of uint8 (N, C, H, W) images (float64 accumulation)."""
    if images.shape[0] == 0:
        raise FtikdError("cannot compute normalisation statistics of an empty training split; add images")
    x = images.transpose(0, 1).reshape(images.shape[1], -1).to(torch.float64) / 255.0
    mean = x.mean(dim=1)
    std = x.std(dim=1, correction=0).clamp_min(1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _holdout(per_class: list[list[Path]], test_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded per-class split into (train, test) lists of (path, label); at least one train image each."""
    rng = np.random.default_rng(seed)
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for label, files in enumerate(per_class):
        k = len(files)
        n_test = min(k - 1, int(math.floor(k * test_fraction + 0.5)))
        order = rng.permutation(k)
        test_set = set(order[:n_test].tolist())
        for j, f in enumerate(files):
            (test if j in test_set else train).append((f, label))
    return train, test


def load_image_folder(
    root: str | Path,
    image_size: int | tuple[int, int] = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
) -> ImageDataset:
    """Load a class-per-subfolder image directory into an :class:`ImageDataset`.

    Uses ``root/train`` and ``root/test`` when both exist (test classes must be train classes), else
    holds out a seeded ``test_fraction`` of each class. Mean/std come from the train images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FtikdError(f"image folder {root} does not exist; pass an existing folder:PATH")
    if not 0.0 <= test_fraction < 1.0:
        raise FtikdError(f"test fraction must be in [0, 1), got {test_fraction}")
    size_hw = _target_size(image_size)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes, train_files = _scan(root / "train")
        test_classes, test_files = _scan(root / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise FtikdError(
                f"{root / 'test'} has classes not in {root / 'train'}: {', '.join(unknown[:5])}; "
                "make the class folders match"
            )
        index = {c: i for i, c in enumerate(classes)}
        train = [(f, i) for i, files in enumerate(train_files) for f in files]
        test = [(f, index[c]) for c, files in zip(test_classes, test_files, strict=True) for f in files]
    else:
        classes, per_class = _scan(root)
        train, test = _holdout(per_class, test_fraction, seed)
    mode = "L" if all(_is_gray(f) for f, _ in train + test) else "RGB"
    train_x = _stack([f for f, _ in train], mode, size_hw)
    test_x = _stack([f for f, _ in test], mode, size_hw)
    mean, std = channel_stats(train_x)
    return ImageDataset(
        name=name or f"folder:{root}",
        train_images=train_x,
        train_labels=torch.tensor([y for _, y in train], dtype=torch.int64),
        test_images=test_x,
        test_labels=torch.tensor([y for _, y in test], dtype=torch.int64),
        classes=classes,
        mean=mean,
        std=std,
        hflip=True,
    )
