"""A uniform teacher interface over local modules, checkpoints and remote/paid callables.

Whatever the teacher is, ftikd sees ``Teacher(x) -> TeacherOutput``: a batch of normalised images
in, float32 logits (B, C) and the requested named features out, computed without gradients. Each
teacher carries a ``fingerprint`` naming its exact version; stores of teacher outputs are bound to
it (see :mod:`ftikd.teacher.store`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ftikd.errors import FtikdError
from ftikd.teacher.fingerprint import state_fingerprint


class TeacherOutputError(FtikdError):
    """The teacher ran but returned something unusable (wrong type, shape or missing feature)."""


@dataclass
class TeacherOutput:
    """Teacher result for one batch: ``logits`` (B, C) and named ``features`` (B, ...)."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


def _to_tensor(value: Any, what: str, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TeacherOutputError(
        f"teacher {name!r} returned {type(value).__name__} for {what}; return a Tensor or numpy array"
    )


def coerce_output(raw: Any, name: str = "teacher") -> TeacherOutput:
    """Turn what a teacher function returned into a :class:`TeacherOutput` (float32 tensors).

    Accepted: a TeacherOutput/ModelOutput-like object (``.logits``, ``.features``), a Tensor or
    numpy array of logits, or a mapping with ``'logits'`` and feature names as keys.
    """
    if isinstance(raw, (torch.Tensor, np.ndarray)):
        logits, feats = raw, {}
    elif isinstance(raw, Mapping):
        if "logits" not in raw:
            raise TeacherOutputError(
                f"teacher {name!r} returned a dict without 'logits'; add a 'logits' entry"
            )
        logits = raw["logits"]
        feats = {k: v for k, v in raw.items() if k != "logits"}
    elif hasattr(raw, "logits"):
        logits = raw.logits
        feats = dict(getattr(raw, "features", None) or {})
    else:
        raise TeacherOutputError(
            f"teacher {name!r} returned {type(raw).__name__}; return logits (Tensor/numpy) "
            f"or a dict with 'logits'"
        )
    out_logits = _to_tensor(logits, "logits", name).float()
    out_feats = {str(k): _to_tensor(v, f"feature {k!r}", name).float() for k, v in feats.items()}
    return TeacherOutput(out_logits, out_feats)


def _accepts_with_features(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "with_features" in params


class _ModuleFn:
    """Calls a module in eval mode on its own device; outputs return to the input's device."""

    def __init__(self, module: nn.Module, want_features: bool) -> None:
        self.module = module
        self.want_features = want_features
        self.pass_flag = _accepts_with_features(module)

    def __call__(self, x: torch.Tensor) -> Any:
        param = next(iter(self.module.parameters()), None)
        if param is None:
            param = next(iter(self.module.buffers()), None)
        if param is not None and x.device != param.device:
            x = x.to(param.device)
        was_training = self.module.training
        self.module.eval()
        try:
            if self.pass_flag:
                return self.module(x, with_features=self.want_features)
            return self.module(x)
        finally:
            self.module.train(was_training)


class Teacher:
    """A teacher: ``__call__(x) -> TeacherOutput`` under ``torch.no_grad()``.

    ``fn`` maps a (B, C, H, W) normalised float batch to logits or a logits+features result (see
    :func:`coerce_output`); ``fingerprint`` names the exact teacher version; ``feature_names`` are
    the features every call must return (others are dropped).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], Any],
        fingerprint: str,
        name: str,
        feature_names: Iterable[str] = (),
    ) -> None:
        if not isinstance(fingerprint, str) or not fingerprint.strip():
            raise FtikdError(
                f"teacher {name!r} has no fingerprint; name its version, e.g. fingerprint='gpt-x-2026-01'"
            )
        self.fn = fn
        self.fingerprint = fingerprint.strip()
        self.name = name
        self.feature_names: tuple[str, ...] = tuple(feature_names)

    def __repr__(self) -> str:
        return f"Teacher(name={self.name!r}, fingerprint={self.fingerprint!r}, features={self.feature_names})"

    def __call__(self, x: torch.Tensor) -> TeacherOutput:
        """Run the teacher on one batch and check its output's shapes."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"teacher input must be a (B, C, H, W) tensor, got {shape}")
        with torch.no_grad():
            out = coerce_output(self.fn(x), self.name)
        b = x.shape[0]
        if out.logits.dim() != 2 or out.logits.shape[0] != b:
            raise TeacherOutputError(
                f"teacher {self.name!r} returned logits of shape {tuple(out.logits.shape)} for a batch of "
                f"{b}; it must return (batch, num_classes)"
            )
        feats: dict[str, torch.Tensor] = {}
        for fname in self.feature_names:
            if fname not in out.features:
                have = ", ".join(sorted(out.features)) or "none"
                raise TeacherOutputError(
                    f"teacher {self.name!r} did not return feature {fname!r} (it returned: {have}); "
                    f"request only features the teacher provides"
                )
            f = out.features[fname]
            if f.dim() < 1 or f.shape[0] != b:
                raise TeacherOutputError(
                    f"teacher {self.name!r} feature {fname!r} has shape {tuple(f.shape)} for a batch of {b}; "
                    f"features must have the batch as first dimension"
                )
            feats[fname] = f
        dev = x.device
        return TeacherOutput(out.logits.to(dev), {k: v.to(dev) for k, v in feats.items()})

    def with_features(self, feature_names: Iterable[str]) -> Teacher:
        """The same teacher, returning ``feature_names``."""
        names = tuple(feature_names)
        fn = self.fn
        if isinstance(fn, _ModuleFn):
            fn = _ModuleFn(fn.module, want_features=bool(names))
        return Teacher(fn, self.fingerprint, self.name, names)

    @classmethod
    def from_module(cls, module: nn.Module, feature_names: Iterable[str] = ()) -> Teacher:
        """Wrap a local model; its fingerprint is computed from its current weights.

        Modules whose ``forward`` takes ``with_features`` are asked for features only when some are
        requested; other modules are called as ``module(x)``. Re-wrap after changing the weights.
        """
        names = tuple(feature_names)
        return cls(_ModuleFn(module, bool(names)), state_fingerprint(module), type(module).__name__, names)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        feature_names: Iterable[str] = (),
        device: str | torch.device = "cpu",
    ) -> Teacher:
        """Load a verified safetensors checkpoint (see :func:`load_checkpoint`) as a teacher."""
        from ftikd.teacher.checkpoint import load_checkpoint

        model, meta = load_checkpoint(path, map_location=device)
        names = tuple(feature_names)
        return cls(
            _ModuleFn(model, bool(names)), meta["fingerprint"], f"{meta['arch']}:{Path(path).name}", names
        )

    @classmethod
    def from_callable(
        cls, fn: Callable[[Any], Any], fingerprint: str | None, feature_names: Iterable[str] = ()
    ) -> Teacher:
        """Wrap a plain callable on a batch (e.g. a remote, paid API).

        ``fingerprint`` is required: the user names the teacher version (e.g. ``"gpt-x-2026-01"``)
        because ftikd cannot inspect a remote model's weights.
        """
        name = getattr(fn, "__name__", type(fn).__name__)
        if fingerprint is None or not str(fingerprint).strip():
            raise FtikdError(
                f"callable teacher {name!r} needs fingerprint= naming its version "
                f"(e.g. 'gpt-x-2026-01') so stored outputs are never mixed across versions"
            )
        return cls(fn, str(fingerprint), name, feature_names)


def as_teacher(obj: Any, fingerprint: str | None = None, feature_names: Iterable[str] = ()) -> Teacher:
    """Make a :class:`Teacher` from a Teacher, nn.Module, checkpoint path or callable.

    ``fingerprint`` is required for callables. For modules and checkpoints it is computed from the
    weights; if one is also given it must agree (a guard against using the wrong weights).
    """
    names = tuple(feature_names)
    if isinstance(obj, Teacher):
        t = obj.with_features(names) if names and names != obj.feature_names else obj
    elif isinstance(obj, nn.Module):
        t = Teacher.from_module(obj, names)
    elif isinstance(obj, (str, os.PathLike)):
        t = Teacher.from_checkpoint(obj, names)
    elif callable(obj):
        return Teacher.from_callable(obj, fingerprint, names)
    else:
        raise TypeError(
            f"cannot use {type(obj).__name__} as a teacher; pass a module, checkpoint path or callable"
        )
    if fingerprint is not None and str(fingerprint).strip() != t.fingerprint:
        raise FtikdError(
            f"teacher {t.name!r} has fingerprint {t.fingerprint} but {fingerprint} was expected; "
            f"check which weights you are using"
        )
    return t
