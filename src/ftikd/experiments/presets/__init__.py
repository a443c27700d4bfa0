"""Sweep presets shipped with ftikd: ``<name>.yaml`` files in this package, read via importlib.resources.

``paper-cifar100`` is the CKD paper's grid ([S0] §4.1, METHODS.md §3.1); ``paper-cifar100-*`` its
ablations; ``survey-cifar`` the KD survey's protocol as far as the FTI engine expresses it (§3.3);
``cpu-fashion`` a scaled Fashion-MNIST grid for a 2-core CPU. Presets may name methods that are not
registered yet: the sweep then refuses with one line naming the missing method.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from ftikd.errors import FtikdError


def preset_names() -> list[str]:
    """Names of the shipped presets (file names without ``.yaml``)."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The raw mapping of preset ``name`` (its ``name`` key defaults to the preset name)."""
    import yaml

    if name not in preset_names():
        raise FtikdError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())} or a YAML path")
    raw = yaml.safe_load(resources.files(__name__).joinpath(f"{name}.yaml").read_text())
    raw.setdefault("name", name)
    return raw
