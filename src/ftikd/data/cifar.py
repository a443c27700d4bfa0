"""CIFAR-10 / CIFAR-100 readers for the authors' "python version" pickle layout.

The official files are pickles of dicts with bytes keys (``b'data'``: uint8 (N, 3072) array in
R, G, B planes of 32x32; ``b'labels'`` or ``b'fine_labels'``: list of ints). A pickle can run arbitrary
code when loaded, so these files are read with :class:`RestrictedUnpickler`, which only resolves the
few numpy/codec globals a numpy array needs and refuses anything else.
"""

from __future__ import annotations

import codecs
import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

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


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a pickle: accepted by :func:`_reconstruct_empty`, never callable.

    Handing out the real class would let a pickle call ``numpy.ndarray(shape)`` and allocate an
    array of any size from a few bytes of file.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("numpy.ndarray may only be used to rebuild a pickled array")


def _reconstruct_empty(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` limited to what ``ndarray.__reduce__`` emits: an empty plain ndarray.

    The array's real shape and bytes come afterwards from its pickled state, whose size numpy checks
    against the data actually present in the file; an arbitrary ``shape`` here would allocate memory
    the file never paid for.
    """
    if subtype is not _NdarrayName:
        raise pickle.UnpicklingError("only plain numpy arrays may be reconstructed")
    dims = shape if isinstance(shape, tuple) else (shape,)
    if not all(isinstance(d, int) for d in dims) or math.prod(dims) != 0:
        raise pickle.UnpicklingError(f"array reconstruction with initial shape {shape!r} is not allowed")
    return _RECONSTRUCT(np.ndarray, shape, dtype)


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_empty,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_empty,
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only the globals needed to rebuild plain numpy arrays.

    It extends the pure-Python unpickler rather than the C one, because the C one trusts sizes
    written in the file: a memo index of 2**31 in a 9-byte pickle makes it fill a table of 32 GiB,
    and a counted string is allocated at its claimed length before it is read. Here every size is
    checked against the bytes actually read (about 0.4 s more per 50,000-image batch file). ``BUILD`` may
    only set the state of numpy arrays and dtypes, and out-of-band buffers are refused.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")

    def _load_build(self) -> None:
        if len(self.stack) < 2 or not isinstance(self.stack[-2], (np.ndarray, np.dtype)):
            raise pickle.UnpicklingError("BUILD is only allowed on numpy arrays and dtypes")
        pickle._Unpickler.load_build(self)

    def _refuse_buffer(self) -> None:
        raise pickle.UnpicklingError("out-of-band buffers and bytearrays are not allowed")

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _refuse_buffer
    dispatch[pickle.NEXT_BUFFER[0]] = _refuse_buffer
    dispatch[pickle.READONLY_BUFFER[0]] = _refuse_buffer


class _ClampedReader:
    """A binary file whose ``read(n)`` never asks for more than the bytes left in the file.

    The unpickler reads a length field, then ``read(n)``; a buffered file allocates ``n`` bytes up
    front, so a damaged length of 2**31 would allocate gigabytes for a file of a few hundred bytes.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._left = os.fstat(f.fileno()).st_size - f.tell()

    def read(self, n: int | None = -1) -> bytes:
        data = self._f.read(self._left if n is None or n < 0 else min(n, max(self._left, 0)))
        self._left -= len(data)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        data = self._f.readline(size)
        self._left -= len(data)
        return data


def safe_load_pickle(path: str | Path) -> Any:
    """Load a data pickle with :class:`RestrictedUnpickler` (``encoding='bytes'`` as the CIFAR files need).

    Raises :class:`FtikdError` if the file is missing, corrupt, or tries to call anything but numpy's
    array constructors.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(_ClampedReader(f), encoding="bytes").load()
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


def _labels_array(labels: Any, n: int, label_key: str, path: Path) -> np.ndarray:
    """Labels as int64 (n,), checking length and element types *before* converting.

    A pickle can share one nested list many times over (a few bytes of file), so converting an
    unchecked object with ``np.asarray`` could build an exponentially large array.
    """
    fix = "re-download the files"
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu" or labels.shape != (n,):
            raise FtikdError(
                f"{path}: {label_key!r} must hold {n} integer labels, got a {labels.dtype} array of shape "
                f"{labels.shape}; {fix}"
            )
    elif isinstance(labels, (list, tuple)):
        if len(labels) != n:
            raise FtikdError(f"{path}: {n} images but {len(labels)} {label_key!r} entries; {fix}")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
            raise FtikdError(f"{path}: {label_key!r} is not a list of integers; {fix}")
    else:
        raise FtikdError(f"{path}: {label_key!r} is a {type(labels).__name__}, not a list of integers; {fix}")
    try:
        return np.asarray(labels, dtype=np.int64).reshape(n)
    except (TypeError, ValueError, OverflowError) as e:
        raise FtikdError(f"{path}: {label_key!r} holds labels outside the int64 range; {fix}") from e


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file into uint8 (N, 3072) data and int64 (N,) labels, validating both."""
    d = safe_load_pickle(path)
    data = _get(d, "data", path)
    labels = _get(d, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FtikdError(f"{path}: 'data' must be a uint8 (N, 3072) array, got {got}; re-download the files")
    y = _labels_array(labels, data.shape[0], label_key, path)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise FtikdError(
            f"{path}: labels must lie in [0, {num_classes}), found [{y.min()}, {y.max()}]; "
            "re-download the files"
        )
    return data, y


def _names(meta_path: Path, key: str, num_classes: int) -> list[str]:
    """Read the class names list from a meta file and decode them to str."""
    names = _get(safe_load_pickle(meta_path), key, meta_path)
    if (
        not isinstance(names, (list, tuple))
        or len(names) != num_classes
        or not all(isinstance(n, (str, bytes)) for n in names)
    ):
        raise FtikdError(f"{meta_path}: {key!r} must list {num_classes} class names; re-download the files")
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as e:
        raise FtikdError(f"{meta_path}: class names are not UTF-8 text ({e}); re-download the files") from e


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
