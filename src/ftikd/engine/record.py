"""Run records: one JSON file per run, written atomically, enough to repeat the run exactly."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ftikd
from ftikd.fileio import atomic_write_text


def library_versions() -> dict[str, str]:
    """Versions that affect numbers: ftikd, torch, numpy, python, and the thread count."""
    return {
        "ftikd": ftikd.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch_threads": str(torch.get_num_threads()),
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=False) + "\n")
