"""Type checks for run configs read from JSON/YAML files or run records.

``RunConfig(**raw)`` accepts any value, so without a check a config holding ``"calls": "abc"`` or
``"train": 5`` fails later with a bare TypeError (or not at all). :func:`check_run_config` compares a
raw mapping with the config dataclass's annotated field types and raises :class:`FtikdError` naming
the first bad key and the type it needs. It imports nothing from the engine, so ``run.py`` can call
it without an import cycle.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from ftikd.errors import FtikdError

_NONE = type(None)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    """The members of ``X | Y`` / ``Optional[X]``, or None if ``tp`` is not a union."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return None


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON/YAML ``value`` has annotated type ``tp`` (dataclass types: any mapping)."""
    if tp is Any:
        return True
    members = _union_args(tp)
    if members is not None:
        return any(_matches(value, m) for m in members)
    if tp is _NONE or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if _is_dataclass_type(tp):
        return isinstance(value, Mapping)
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping):
        args = typing.get_args(tp) or (Any, Any)
        return isinstance(value, Mapping) and all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()
        )
    if origin in (list, tuple):
        args = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    return isinstance(value, origin or tp) if isinstance(origin or tp, type) else True


def _describe(tp: Any) -> str:
    """Human wording of an annotated type, for error messages."""
    members = _union_args(tp)
    if members is not None:
        return " or ".join(_describe(m) for m in members)
    if tp is _NONE or tp is None:
        return "null"
    if _is_dataclass_type(tp):
        return f"a mapping of {tp.__name__} settings"
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping):
        return "a mapping of names to values"
    if origin in (list, tuple):
        return "a list"
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return words.get(tp, getattr(tp, "__name__", str(tp)))


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _yaml_hint(value: Any, tp: Any) -> str:
    """A hint for numbers YAML 1.1 reads as text (``1e-3`` needs a dot: ``1.0e-3``)."""
    if isinstance(value, str) and _matches(1.0, tp) and not _matches(value, tp):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML reads numbers like 1e-3 as text: write 1.0e-3)"
    return ""


def _check_mapping(raw: Mapping[Any, Any], cls: type, where: str, source: str) -> None:
    """Check the keys and value types of ``raw`` against the fields of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
    odd = [k for k in raw if not isinstance(k, str)]
    if odd:
        raise FtikdError(
            f"{source}: {where} key {odd[0]!r} is not a name; keys are names such as "
            f"{', '.join(sorted(fields)[:3])}"
        )
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise FtikdError(
            f"{source}: unknown {where} key(s) {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    for key, value in raw.items():
        tp = fields[key]
        label = key if where == "config" else f"{where}.{key}"
        if _is_dataclass_type(tp):
            if value is None:
                continue  # ``train: null`` means the defaults
            if not isinstance(value, Mapping):
                raise FtikdError(
                    f"{source}: key {label!r} must be {_describe(tp)}, got {_shown(value)}; fix the config"
                )
            _check_mapping(value, tp, label, source)
        elif not _matches(value, tp):
            hint = _yaml_hint(value, tp)
            raise FtikdError(
                f"{source}: key {label!r} must be {_describe(tp)}, got {_shown(value)}{hint}; fix the config"
            )


def check_run_config(raw: Any, config_cls: type, source: str = "config") -> dict[str, Any]:
    """Validate a raw run config (or a run record holding one under ``config``); return the config dict.

    Keys must be fields of the dataclass ``config_cls`` and values must have the annotated types
    (``int`` refuses floats and booleans, ``float`` refuses NaN/inf); dataclass-typed fields such as
    ``train`` are checked recursively and may be null. Raises :class:`FtikdError` naming the first
    bad key and the type it needs; ``source`` (e.g. the file path) starts the message.
    """
    if not isinstance(raw, Mapping):
        raise FtikdError(f"{source} must be a mapping of keys to values, got {type(raw).__name__}")
    config = raw.get("config", raw)
    if not isinstance(config, Mapping):
        raise FtikdError(
            f"{source}: the run record's 'config' must be a mapping of keys to values, got {_shown(config)}"
        )
    _check_mapping(config, config_cls, "config", source)
    return dict(config)
