"""Checks of user-given values made before any work: numeric ranges, devices, output paths.

A config dataclass declares each numeric field's range with :func:`bounded`; :func:`check_ranges`
walks a config (nested dataclasses and lists included) and refuses the first value that is NaN,
infinite or out of range with a one-line :class:`FtikdError` naming the flag and config key. Every
command calls these before it trains, pays a teacher call or writes a file, so a bad value costs
nothing and leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ftikd.errors import FtikdError

MAX_SEED = 2**63 - 1


def bounded(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rule: float) -> Any:
    """A dataclass field whose number (or each number of a list) must satisfy ``rule``.

    ``rule`` takes ``gt``, ``ge``, ``lt`` and ``le`` bounds; ``None`` values always pass.
    """
    unknown = set(rule) - {"gt", "ge", "lt", "le"}
    if unknown:
        raise TypeError(f"unknown bound(s) {sorted(unknown)}")
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"bounds": rule})
    return dataclasses.field(default=default, metadata={"bounds": rule})


_WORDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


_TESTS = {
    "gt": lambda v, b: v > b,
    "ge": lambda v, b: v >= b,
    "lt": lambda v, b: v < b,
    "le": lambda v, b: v <= b,
}


def _within(value: float, rule: dict[str, float]) -> bool:
    return all(_TESTS[key](value, bound) for key, bound in rule.items())


def _describe_rule(rule: dict[str, float]) -> str:
    return " and ".join(f"{_WORDS[k]} {b:g}" for k, b in rule.items())


def _label(name: str, key: str) -> str:
    """How a message names a field: its flag and, when nested, its config key."""
    flag = "--" + name.replace("_", "-")
    return flag if key == name else f"{flag} (config key {key})"


def _check_number(value: Any, rule: dict[str, float], name: str, key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise FtikdError(f"{_label(name, key)} must be a finite number, got {value}; pass a number")
    if not _within(value, rule):
        raise FtikdError(
            f"{_label(name, key)} must be {_describe_rule(rule)}, got {value:g}; pass a value in range"
        )


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Refuse the first NaN, infinite or out-of-range number in dataclass ``cfg`` (recursively)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        rule = f.metadata.get("bounds", {})
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, f"{key}.")
        elif isinstance(value, (list, tuple)):
            for item in value:
                if dataclasses.is_dataclass(item) and not isinstance(item, type):
                    check_ranges(item, f"{key}.")
                else:
                    _check_number(item, rule, f.name, key)
        else:
            _check_number(value, rule, f.name, key)


def check_device(name: str) -> torch.device:
    """The torch device ``name``, refused with a one-line fix when it does not exist on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise FtikdError(f"unknown device {name!r}; use --device cpu or --device cuda[:N]") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FtikdError(
                f"device {name!r} is not available: this machine has no CUDA GPU; use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FtikdError(f"device {name!r} does not exist: this machine has {count} CUDA GPU(s)")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise FtikdError(f"device {name!r} is not available on this machine; use --device cpu or cuda")


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_writable(folder: Path, path: Path, flag: str) -> None:
    """Create and remove a temporary folder in ``folder``: the only reliable test (root, read-only mounts)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ftikd-probe-", dir=folder))
    except OSError as exc:
        raise FtikdError(
            f"cannot write {path} ({exc.strerror} in {folder}); pass a writable {flag}"
        ) from None


def check_output_dir(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be created or written, without creating it."""
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise FtikdError(f"cannot create folder {path}: {existing} is a file; pass another {flag}")
    _probe_writable(existing, path, flag)


def check_output_file(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output file path that is a folder or whose folder cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise FtikdError(f"{flag} {path} is a folder; pass a file path")
    check_output_dir(path.parent, flag)
