"""Reader for IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions), one
big-endian uint32 per dimension, then the row-major payload. Files are often gzipped; compression is
detected from the gzip magic bytes, not the file name. The header is validated against the actual
payload before anything of the claimed size is allocated, so a corrupt or hostile header fails fast.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ftikd.errors import FtikdError

GZIP_MAGIC = b"\x1f\x8b"

# dtype code -> numpy dtype (IDX payloads are big-endian). Only uint8 is supported for now.
_SUPPORTED_DTYPES: dict[int, np.dtype] = {0x08: np.dtype(np.uint8)}
_KNOWN_DTYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
_CHUNK = 1 << 20
# numpy 1.x arrays have at most 32 dimensions; no IDX dataset comes close.
_MAX_NDIM = 32


def is_gzip(path: str | Path) -> bool:
    """True when the file starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _read_exact(stream: BinaryIO, size: int) -> bytearray:
    """Read up to ``size`` bytes in bounded chunks (never asks the stream for more than 1 MiB)."""
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(min(remaining, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return bytearray().join(parts)


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzipped or raw) into a numpy array of its declared shape.

    Raises :class:`FtikdError` for a wrong magic number, an unsupported dtype, a dimension count other
    than ``expected_ndim``, or a payload whose size differs from what the header claims.
    """
    path = Path(path)
    if not path.is_file():
        raise FtikdError(f"IDX file not found: {path}; check the path or pass --data-dir")
    fix = "re-download or reinstall the dataset files"
    try:
        compressed = is_gzip(path)
        stream: BinaryIO = gzip.open(path, "rb") if compressed else open(path, "rb")
        with stream:
            magic = _read_exact(stream, 4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
                raise FtikdError(f"{path} is not an IDX file (bad magic number {magic.hex()}); {fix}")
            code, ndim = magic[2], magic[3]
            if code not in _SUPPORTED_DTYPES:
                what = _KNOWN_DTYPES.get(code, f"unknown code 0x{code:02x}")
                raise FtikdError(f"{path} holds {what} data; only uint8 (0x08) IDX files are supported")
            if ndim > _MAX_NDIM:
                raise FtikdError(f"{path} claims {ndim} dimensions (at most {_MAX_NDIM} supported); {fix}")
            if ndim == 0 or (expected_ndim is not None and ndim != expected_ndim):
                want = expected_ndim if expected_ndim is not None else ">= 1"
                raise FtikdError(f"{path} has {ndim} dimensions, expected {want}; is it the right file?")
            header = _read_exact(stream, 4 * ndim)
            if len(header) < 4 * ndim:
                raise FtikdError(f"{path} is truncated inside its header; {fix}")
            shape = struct.unpack(f">{ndim}I", header)
            dtype = _SUPPORTED_DTYPES[code]
            claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if not compressed:
                actual = path.stat().st_size - 4 - 4 * ndim
                if actual != claimed:
                    raise FtikdError(
                        f"{path} header claims shape {shape} ({claimed} bytes) but the file holds {actual} "
                        f"bytes of data; {fix}"
                    )
            # For gzip the decompressed size is only known by reading; read in chunks, at most one
            # byte more than claimed, so memory is bounded by the real payload, not by the header.
            payload = _read_exact(stream, claimed + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise FtikdError(f"cannot read {path}: {e}; {fix}") from e
    if len(payload) != claimed:
        more = "more" if len(payload) > claimed else f"only {len(payload)}"
        raise FtikdError(
            f"{path} header claims shape {shape} ({claimed} bytes) but holds {more} bytes; {fix}"
        )
    data = np.frombuffer(payload, dtype=dtype.newbyteorder(">"))
    try:
        return data.astype(dtype.newbyteorder("="), copy=False).reshape(shape)
    except ValueError as e:  # e.g. an empty payload with other dimensions too large for numpy
        raise FtikdError(
            f"{path} header claims shape {shape}, which is not a valid array shape; {fix}"
        ) from e


def load_idx_pair(images_path: str | Path, labels_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an images file (N, H, W) and its labels file (N,) as uint8 (N, 1, H, W) and int64 (N,)."""
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise FtikdError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels; "
            "the files do not belong together"
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
