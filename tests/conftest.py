"""Shared fixtures."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from ftikd.data import load_dataset
from ftikd.models import build_model
from ftikd.teacher import save_checkpoint
from ftikd.teacher.train import TeacherTrainConfig, train_teacher


@pytest.fixture(scope="session")
def digits():
    """sklearn's 8x8 digits, loaded once for every test module."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_digits_teacher(tmp_path_factory, digits):
    """``get(epochs)``: a resnet8 digits teacher trained for ``epochs``, trained once per session."""
    paths: dict[int, Path] = {}

    def get(epochs: int) -> Path:
        if epochs not in paths:
            path = tmp_path_factory.mktemp("teacher") / f"digits-resnet8-e{epochs}.safetensors"
            cfg = TeacherTrainConfig(dataset="digits", arch="resnet8", epochs=epochs, out=str(path))
            train_teacher(cfg, digits, progress=False)
            paths[epochs] = path
        return paths[epochs]

    return get


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


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> Path:
    """One scratch folder per fuzz module (tests/fuzzing.py ``scratch`` makes one per example in it)."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def _fuzz_counts(request):
    """After a fuzz module, print how many malformed inputs each reader got (tests/fuzzing.py)."""
    yield
    fuzzing = sys.modules.get("fuzzing")
    if fuzzing is None or not fuzzing.TRIED:
        return
    line = "[fuzz] malformed inputs tried: " + ", ".join(f"{k}={v}" for k, v in sorted(fuzzing.TRIED.items()))
    fuzzing.TRIED.clear()
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + line)
