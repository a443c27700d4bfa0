"""CIFAR-10 / CIFAR-100 readers for the authors' "python version" pickle layout.

The official files are pickles of dicts with bytes keys (``b'data'``: uint8 (N, 3072) array in
R, G, B planes of 32x32; ``b'labels'`` or ``b'fine_labels'``: list of ints). A pickle can run arbitrary
code when loaded, so these files are read with :class:`RestrictedUnpickler`, which only resolves the
few numpy/codec globals a numpy array needs and refuses anything else.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftikd.errors import FtikdError

# ``ndarray.__reduce__`` names numpy's array-reconstruction function; taking it from there works on
# numpy 1.x (numpy.core) and 2.x (numpy._core) without importing the deprecated module path.
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


class UnsafePickleError(FtikdError):
    """The pickle asked for a global outside the allow-list, i.e. it contains code."""


def _codecs_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to latin-1, the only use protocol-2 pickles make of it (bytes)."""
    if not isinstance(obj, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(obj, "latin1", errors)


def _safe_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` that refuses object dtypes (object arrays can hold arbitrary Python objects)."""
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError("object dtype arrays are not allowed")
    return dt


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild plain numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_load_pickle(path: str | Path) -> Any:
    """Load a data pickle with :class:`RestrictedUnpickler` (``encoding='bytes'`` as the CIFAR files need).

    Raises :class:`FtikdError` if the file is missing, corrupt, or tries to call anything but numpy's
    array constructors.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"refusing to load {path}: it contains code ({e}); use the official CIFAR files"
        ) from None
    except FileNotFoundError as e:
        raise FtikdError(f"missing file {path}; download and extract the dataset into its folder") from e
    except Exception as e:  # corrupt pickles raise many different exception types
        raise FtikdError(f"cannot read {path}: {type(e).__name__}: {e}; re-download the dataset files") from e


def _get(d: Any, key: str, path: Path) -> Any:
    """Fetch ``key`` from an unpickled batch dict whose keys may be bytes (python-2 files) or str."""
    if not isinstance(d, dict):
        raise FtikdError(f"{path} does not hold a dict; is it a CIFAR python-version batch file?")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise FtikdError(f"{path} has no {key!r} entry; is it the right CIFAR file?")


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file into uint8 (N, 3072) data and int64 (N,) labels, validating both."""
    d = safe_load_pickle(path)
    data = _get(d, "data", path)
    labels = _get(d, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FtikdError(f"{path}: 'data' must be a uint8 (N, 3072) array, got {got}; re-download the files")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise FtikdError(f"{path}: {label_key!r} is not a list of integers; re-download the files") from e
    if y.shape != (data.shape[0],):
        raise FtikdError(
            f"{path}: {data.shape[0]} images but {label_key!r} has shape {y.shape}; re-download the files"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise FtikdError(
            f"{path}: labels must lie in [0, {num_classes}), found [{y.min()}, {y.max()}]; "
            "re-download the files"
        )
    return data, y


def _names(meta_path: Path, key: str, num_classes: int) -> list[str]:
    """Read the class names list from a meta file and decode them to str."""
    names = _get(safe_load_pickle(meta_path), key, meta_path)
    if not isinstance(names, list) or len(names) != num_classes:
        raise FtikdError(f"{meta_path}: {key!r} must list {num_classes} class names; re-download the files")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _to_images(parts: list[np.ndarray]) -> torch.Tensor:
    """Stack (N, 3072) batches into a fresh, writable (N, 3, 32, 32) tensor (channel planes R, G, B)."""
    data = np.concatenate(parts, axis=0) if len(parts) > 1 else np.array(parts[0], copy=True)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32))


def read_cifar_dir(
    folder: str | Path, variant: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Read an extracted CIFAR folder (``cifar-10-batches-py`` or ``cifar-100-python``).

    ``variant`` is ``"cifar10"`` or ``"cifar100"`` (fine labels). Returns train images (N, 3, 32, 32)
    uint8, train labels int64, test images, test labels, and the class names.
    """
    folder = Path(folder)
    if variant == "cifar10":
        num_classes, label_key = 10, "labels"
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, names_key = folder / "test_batch", folder / "batches.meta", "label_names"
    elif variant == "cifar100":
        num_classes, label_key = 100, "fine_labels"
        train_files = [folder / "train"]
        test_file, meta_file, names_key = folder / "test", folder / "meta", "fine_label_names"
    else:
        raise ValueError(f"unknown CIFAR variant {variant!r}")
    for p in [*train_files, test_file, meta_file]:
        if not p.is_file():
            raise FtikdError(f"missing CIFAR file {p}; re-extract the official python-version archive")
    train = [_read_batch(p, label_key, num_classes) for p in train_files]
    test_x, test_y = _read_batch(test_file, label_key, num_classes)
    classes = _names(meta_file, names_key, num_classes)
    return (
        _to_images([x for x, _ in train]),
        torch.from_numpy(np.concatenate([y for _, y in train])),
        _to_images([test_x]),
        torch.from_numpy(test_y),
        classes,
    )
