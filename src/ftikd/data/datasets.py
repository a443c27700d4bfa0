"""Dataset registry: ``load_dataset("cifar10")``, ``load_dataset("folder:/path/to/images")``, ...

Each registered loader turns a data directory (or ``None`` for its default) into an in-memory
:class:`ImageDataset`. Missing files raise :class:`FtikdError` naming the expected path and how to get it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ftikd.data.base import ImageDataset
from ftikd.data.cifar import read_cifar_dir
from ftikd.data.folder import channel_stats, load_image_folder
from ftikd.data.idx import load_idx_pair
from ftikd.errors import FtikdError

#: A loader takes (data_dir or None, argument after "name:" or None) and returns the dataset.
DatasetLoader = Callable[[Path | None, str | None], ImageDataset]


@dataclass(frozen=True)
class _Entry:
    loader: DatasetLoader
    takes_arg: bool


_REGISTRY: dict[str, _Entry] = {}

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def register_dataset(name: str, takes_arg: bool = False) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering ``loader(data_dir, arg)`` under ``name``.

    With ``takes_arg`` the spec may be ``name:ARG`` (as in ``folder:PATH``); otherwise a ``:ARG`` is an error.
    """
    if not name or ":" in name:
        raise ValueError(f"invalid dataset name {name!r}")

    def deco(loader: DatasetLoader) -> DatasetLoader:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = _Entry(loader, takes_arg)
        return loader

    return deco


def available_datasets() -> list[str]:
    """Registered dataset names, sorted (``folder`` is used as ``folder:PATH``)."""
    return sorted(_REGISTRY)


def load_dataset(spec: str, data_dir: str | Path | None = None) -> ImageDataset:
    """Load dataset ``spec`` (``NAME`` or ``NAME:ARG``) from ``data_dir`` or the dataset's default place."""
    name, sep, arg = spec.strip().partition(":")
    entry = _REGISTRY.get(name.strip().lower())
    if entry is None:
        names = ", ".join(n + (":PATH" if _REGISTRY[n].takes_arg else "") for n in available_datasets())
        raise FtikdError(f"unknown dataset {spec!r}; available: {names}")
    if sep and not entry.takes_arg:
        raise FtikdError(f"dataset {name!r} takes no ':' argument; use just {name!r}")
    directory = Path(data_dir).expanduser() if data_dir is not None else None
    return entry.loader(directory, arg if sep else None)


# --------------------------------------------------------------------------------------- Fashion-MNIST


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


@register_dataset("fashion-mnist")
def _load_fashion_mnist(data_dir: Path | None, arg: str | None) -> ImageDataset:
    """Fashion-MNIST from IDX files (Debian's ``dataset-fashion-mnist`` by default)."""
    base = data_dir if data_dir is not None else FASHION_MNIST_DIR
    stems = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    for folder in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw"):
        paths = [_find_idx(folder, s) for s in stems]
        if all(p is not None for p in paths):
            break
    else:
        raise FtikdError(
            f"Fashion-MNIST not found: expected {base / stems[0]}[.gz] (and the other 3 IDX files); "
            "apt-get install dataset-fashion-mnist or pass --data-dir"
        )
    train_x, train_y = load_idx_pair(paths[0], paths[1])
    test_x, test_y = load_idx_pair(paths[2], paths[3])
    for p, y in ((paths[1], train_y), (paths[3], test_y)):
        if y.numel() and int(y.max()) >= 10:
            raise FtikdError(f"{p} has label {int(y.max())}, Fashion-MNIST has 10 classes; wrong file?")
    return ImageDataset(
        name="fashion-mnist",
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        classes=list(FASHION_MNIST_CLASSES),
        mean=(0.2860,),
        std=(0.3530,),
        hflip=True,
    )


# ----------------------------------------------------------------------------------------------- CIFAR


def _find_cifar(data_dir: Path | None, folder_name: str, marker: str, archive: str, label: str) -> Path:
    base = (data_dir if data_dir is not None else Path("data")).absolute()
    for candidate in (base / folder_name, base):
        if (candidate / marker).is_file():
            return candidate
    raise FtikdError(
        f"{label} not found: expected {base / folder_name / marker}; download {archive} from {CIFAR_URL} "
        f"and extract it into {base} (or pass --data-dir)"
    )


_CIFAR = {
    # name: (folder, marker file, archive, label, mean, std)
    "cifar10": (
        "cifar-10-batches-py", "data_batch_1", "cifar-10-python.tar.gz", "CIFAR-10",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": (
        "cifar-100-python", "train", "cifar-100-python.tar.gz", "CIFAR-100",
        (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
    ),
}  # fmt: skip


def _load_cifar(name: str, data_dir: Path | None) -> ImageDataset:
    """CIFAR-10 / CIFAR-100 (fine labels) in the authors' python layout (default under ``./data``)."""
    folder_name, marker, archive, label, mean, std = _CIFAR[name]
    folder = _find_cifar(data_dir, folder_name, marker, archive, label)
    train_x, train_y, test_x, test_y, classes = read_cifar_dir(folder, name)
    return ImageDataset(
        name=name,
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        classes=classes,
        mean=mean,
        std=std,
        hflip=True,
    )


@register_dataset("cifar10")
def _load_cifar10(data_dir: Path | None, arg: str | None) -> ImageDataset:
    return _load_cifar("cifar10", data_dir)


@register_dataset("cifar100")
def _load_cifar100(data_dir: Path | None, arg: str | None) -> ImageDataset:
    return _load_cifar("cifar100", data_dir)


# ---------------------------------------------------------------------------------------------- digits

DIGITS_SEED = 0


@register_dataset("digits")
def _load_digits(data_dir: Path | None, arg: str | None) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (no download), split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SEED).permutation(len(y))
    n_train = int(round(0.8 * len(y)))
    tr, te = np.sort(order[:n_train]), np.sort(order[n_train:])
    train_x = torch.from_numpy(np.ascontiguousarray(x[tr]))
    mean, std = channel_stats(train_x)
    return ImageDataset(
        name="digits",
        train_images=train_x,
        train_labels=torch.from_numpy(y[tr]),
        test_images=torch.from_numpy(np.ascontiguousarray(x[te])),
        test_labels=torch.from_numpy(y[te]),
        classes=[str(i) for i in range(10)],
        mean=mean,
        std=std,
        hflip=False,
        crop_padding=1,
    )


# ---------------------------------------------------------------------------------------------- folder


@register_dataset("folder", takes_arg=True)
def _load_folder(data_dir: Path | None, arg: str | None) -> ImageDataset:
    """``folder:PATH``: a class-per-subfolder image directory (``--data-dir`` if PATH is omitted)."""
    if arg:
        root = Path(arg).expanduser()
    elif data_dir is not None:
        root = data_dir
    else:
        raise FtikdError("folder dataset needs a path: use folder:PATH or pass --data-dir")
    return load_image_folder(root, name=f"folder:{root}")
