"""Shared fixtures."""

from pathlib import Path

import pytest
import torch

from ftikd.models import build_model
from ftikd.teacher import save_checkpoint


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """An untrained, seeded digits teacher checkpoint: deterministic outputs at no training cost."""
    path = tmp_path_factory.mktemp("teacher") / "digits-resnet8-untrained.safetensors"
    torch.manual_seed(0)
    model = build_model("resnet8", in_channels=1, num_classes=10)
    save_checkpoint(
        model, path, {"arch": "resnet8", "in_channels": 1, "num_classes": 10, "dataset": "digits"}
    )
    return path
