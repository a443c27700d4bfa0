"""Teacher checkpoints: safetensors files with self-describing JSON metadata.

Checkpoints are safetensors only. A pickle-based ``torch.save`` file can run arbitrary code when
loaded, so ftikd never unpickles one implicitly; :func:`convert_torch_checkpoint` converts a trusted
file explicitly, and even then only through ``torch.load(weights_only=True)``, which refuses pickles
that carry code. Every checkpoint records the weights' fingerprint, checked on load, so a file whose
bytes changed after writing is detected rather than silently used as "the same teacher".
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from ftikd.errors import FtikdError
from ftikd.fileio import atomic_write_bytes
from ftikd.teacher.fingerprint import state_fingerprint

META_KEY = "ftikd_meta"
REQUIRED_META = ("arch", "in_channels", "num_classes", "dataset")
_TORCH_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _ftikd_version() -> str:
    from ftikd import __version__

    return __version__


def _cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Clone so that tied/shared tensors become independent (safetensors refuses shared storage).
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any]) -> dict[str, Any]:
    """Atomically write ``model``'s weights and ``meta`` to a safetensors file; return the metadata.

    ``meta`` must hold ``arch``, ``in_channels``, ``num_classes`` and ``dataset`` (so the file can be
    loaded without any other information); ``test_acc`` and any other JSON-serialisable keys are
    kept. ``fingerprint`` and ``ftikd_version`` are computed here.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"save_checkpoint meta is missing {missing}")
    state = _cpu_state(model.state_dict())
    full = dict(meta)
    full["in_channels"] = int(full["in_channels"])
    full["num_classes"] = int(full["num_classes"])
    full["fingerprint"] = state_fingerprint(state)
    full["ftikd_version"] = _ftikd_version()
    try:
        encoded = json.dumps(full, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"save_checkpoint meta must be JSON-serialisable: {e}") from e
    data = st_save(state, metadata={"format": "pt", META_KEY: encoded})
    atomic_write_bytes(Path(path), data)
    return full


def _looks_like_torch_pickle(path: Path) -> bool:
    """True for ``torch.save`` output (zip or raw pickle), judged by content, then by suffix."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return False  # safetensors: 8-byte header length, then a JSON header
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return True
    return path.suffix.lower() in _TORCH_SUFFIXES


def _check_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise FtikdError(f"checkpoint {p} does not exist; check the path or run ftikd train-teacher")
    if p.is_dir():
        raise FtikdError(f"checkpoint {p} is a directory; pass the .safetensors file inside it")
    if _looks_like_torch_pickle(p):
        raise FtikdError(
            f"{p} is a torch pickle file; ftikd loads only safetensors checkpoints "
            f"(convert a trusted file with ftikd.teacher.checkpoint.convert_torch_checkpoint)"
        )
    return p


def _corrupt(p: Path) -> FtikdError:
    return FtikdError(
        f"{p} is not a valid ftikd checkpoint (corrupt or truncated); re-run ftikd train-teacher"
    )


def _read_meta(p: Path) -> dict[str, Any]:
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for any malformed file
        raise _corrupt(p) from e
    if META_KEY not in raw:
        raise FtikdError(
            f"{p} has no ftikd metadata (not written by ftikd); re-run ftikd train-teacher "
            f"or convert it with ftikd.teacher.checkpoint.convert_torch_checkpoint"
        )
    try:
        meta = json.loads(raw[META_KEY])
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting recurses
        raise _corrupt(p) from e
    if not isinstance(meta, dict):
        raise _corrupt(p)
    absent = [k for k in (*REQUIRED_META, "fingerprint") if k not in meta]
    if absent:
        raise FtikdError(f"{p} metadata lacks {absent}; re-run ftikd train-teacher to rewrite it")
    for key in ("arch", "fingerprint", "dataset"):
        if not isinstance(meta[key], str) or not meta[key]:
            raise FtikdError(f"{p} metadata {key}={meta[key]!r} is not a name; re-run ftikd train-teacher")
    for key in ("in_channels", "num_classes"):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FtikdError(
                f"{p} metadata {key}={value!r} is not a positive integer; re-run ftikd train-teacher"
            )
    return meta


# Used only for architectures that cannot be built on the meta device: larger values are refused
# rather than allocated (ImageNet-21k has 21,841 classes; images have a handful of channels).
_MAX_IN_CHANNELS = 4096
_MAX_CLASSES = 1_000_000


def _check_fits(p: Path, meta: dict[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights whose names or shapes differ from the recorded architecture's.

    The architecture is built on the meta device first, so metadata claiming e.g. a billion classes
    costs no memory: the real model is built only once it is known to match the file's tensors.
    """
    from ftikd.models.base import build_model

    try:
        with torch.device("meta"):
            skeleton = build_model(
                meta["arch"], in_channels=meta["in_channels"], num_classes=meta["num_classes"]
            )
    except FtikdError:
        raise
    except Exception as e:  # sizes torch cannot describe, or a custom model that needs real tensors
        if meta["in_channels"] <= _MAX_IN_CHANNELS and meta["num_classes"] <= _MAX_CLASSES:
            return  # plausible sizes: build it for real and let load_state_dict compare
        raise FtikdError(
            f"{p} metadata (arch {meta['arch']!r}, in_channels={meta['in_channels']}, "
            f"num_classes={meta['num_classes']}) does not describe a buildable model ({type(e).__name__}); "
            f"re-run ftikd train-teacher"
        ) from e
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want == have:
        return
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        detail = f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    else:
        k = next(k for k in want if want[k] != have[k])
        detail = f"{k!r} has shape {list(have[k])}, the architecture needs {list(want[k])}"
    raise FtikdError(
        f"{p} weights do not fit architecture {meta['arch']!r} ({detail}); re-run ftikd train-teacher"
    )


def read_checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata dict of an ftikd checkpoint, without loading its weights."""
    return _read_meta(_check_path(path))


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the recorded architecture, load and verify its weights; return ``(model, meta)``.

    The model is in eval mode on ``map_location``. The weights' fingerprint must equal the one in
    the metadata, so a tampered or bit-rotted file is refused.
    """
    p = _check_path(path)
    meta = _read_meta(p)
    try:
        state = load_file(str(p), device="cpu")
    except Exception as e:
        raise _corrupt(p) from e
    actual = state_fingerprint(state)
    if actual != meta["fingerprint"]:
        raise FtikdError(
            f"{p} weights have fingerprint {actual} but its metadata says {meta['fingerprint']} "
            f"(file modified or damaged); re-run ftikd train-teacher"
        )
    import ftikd.models  # noqa: F401  (registers the model zoo)
    from ftikd.models.base import build_model

    _check_fits(p, meta, state)
    model = build_model(meta["arch"], in_channels=meta["in_channels"], num_classes=meta["num_classes"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "state dict mismatch"
        raise FtikdError(
            f"{p} weights do not fit architecture {meta['arch']!r} ({first}); re-run ftikd train-teacher"
        ) from e
    model.to(map_location)
    model.eval()
    return model, meta


def convert_torch_checkpoint(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], meta: dict[str, Any]
) -> dict[str, Any]:
    """Convert a *trusted* ``torch.save`` state dict into an ftikd safetensors checkpoint.

    Loads with ``torch.load(weights_only=True)`` only, which refuses pickles that carry code. The
    state dict may be top-level or under ``state_dict``/``model``; it must fit ``meta['arch']``
    exactly (checked by building the model). Returns the written metadata.
    """
    sp = Path(src)
    if not sp.exists():
        raise FtikdError(f"torch checkpoint {sp} does not exist; check the path")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise FtikdError(f"convert_torch_checkpoint needs meta keys {missing}; pass them in meta")
    try:
        obj = torch.load(sp, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FtikdError(
            f"{sp} contains objects other than tensors and was refused (weights_only=True); "
            f"re-save it as a plain state dict of tensors"
        ) from e
    except Exception as e:
        raise FtikdError(
            f"{sp} could not be read as a torch checkpoint ({type(e).__name__}); check the file"
        ) from e
    state = obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FtikdError(f"{sp} does not hold a state dict of tensors; re-save it with model.state_dict()")
    import ftikd.models  # noqa: F401  (registers the model zoo)
    from ftikd.models.base import build_model

    model = build_model(
        meta["arch"], in_channels=int(meta["in_channels"]), num_classes=int(meta["num_classes"])
    )
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "state dict mismatch"
        raise FtikdError(
            f"{sp} weights do not fit architecture {meta['arch']!r} ({first}); check meta['arch']"
        ) from e
    return save_checkpoint(model, dst, meta)
