"""A fake paid teacher for the store tests: a deterministic image per id and logits per image."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ftikd.teacher import TeacherStore

C = 10
FP = "test-teacher-v1"


def images_fn(ids: torch.Tensor) -> torch.Tensor:
    """Deterministic (B, 3, 4, 4) 'augmented view' of each sample; pixel [0, 0, 0] holds the id."""
    ids = ids.to(torch.float32)
    x = torch.sin(ids[:, None] * 0.37 + torch.arange(48, dtype=torch.float32)[None] * 0.11).reshape(
        -1, 3, 4, 4
    )
    x[:, 0, 0, 0] = ids
    return x


def ids_of(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].round().long().tolist()


def logit_fn(x: torch.Tensor) -> torch.Tensor:
    """The deterministic teacher: logits = f(image), elementwise so rows don't depend on batch size."""
    flat = x.flatten(1)
    return torch.tanh(flat[:, :C] * 1.7 + flat[:, C : 2 * C]) * 3.0 + flat[:, 2 * C : 3 * C]


class CountingTeacher:
    """Stands for a paid API: counts the images it really saw; optional NaN outputs and delay."""

    def __init__(self, nan_ids: tuple[int, ...] = (), sleep: float = 0.0) -> None:
        self.images = 0
        self.calls = 0
        self.seen: list[int] = []
        self.nan_ids = set(nan_ids)
        self.sleep = sleep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids = ids_of(x)
        self.calls += 1
        self.images += len(ids)
        self.seen.extend(ids)
        if self.sleep:
            time.sleep(self.sleep)
        out = logit_fn(x)
        for i, s in enumerate(ids):
            if s in self.nan_ids:
                out[i, 0] = float("nan")
        return out


def open_store(path: Path, **kw) -> TeacherStore:
    return TeacherStore.open(path, fingerprint=kw.pop("fingerprint", FP), dataset="toy", num_classes=C, **kw)


def expected(ids) -> torch.Tensor:
    return logit_fn(images_fn(torch.as_tensor(ids, dtype=torch.int64)))
