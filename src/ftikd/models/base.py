"""Model output type and the model registry.

Every architecture returns a :class:`ModelOutput`: logits plus a dict of named intermediate
features, so white-box methods ask for features by name (``stage2``, ``embedding``), never by list
position (see DESIGN.md, "Model output").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ftikd.errors import FtikdError


@dataclass
class ModelOutput:
    """Student or teacher forward result: ``logits`` (B, C) and named ``features``."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(in_channels=..., num_classes=...)`` under ``name``."""

    def wrap(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, in_channels: int = 3, num_classes: int = 100) -> nn.Module:
    """Instantiate a registered architecture or ``timm:NAME`` (optional extra); unknown names: user error."""
    if name.startswith("timm:"):
        from ftikd.models.timm_adapter import timm_student

        return timm_student(name.removeprefix("timm:"), in_channels=in_channels, num_classes=num_classes)
    if name not in _REGISTRY:
        raise FtikdError(f"unknown model {name!r}; choose one of: {', '.join(available_models())}")
    return _REGISTRY[name](in_channels=in_channels, num_classes=num_classes)
