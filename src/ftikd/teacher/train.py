"""Supervised teacher training on the full training split, saved as a safetensors checkpoint.

Standard recipe: SGD with momentum and weight decay, batched crop+flip augmentation on the device,
cosine or multi-step LR schedule; the checkpoint metadata records architecture, dataset, test
accuracy and the weights' fingerprint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ftikd.checks import MAX_SEED, bounded, check_device, check_output_file, check_ranges
from ftikd.data import ImageDataset, load_dataset, normalize, random_crop_flip
from ftikd.errors import FtikdError
from ftikd.models import build_model
from ftikd.teacher.checkpoint import save_checkpoint


@dataclass
class TeacherTrainConfig:
    """Teacher recipe; the defaults are a short schedule, set ``epochs=240`` and ``milestones`` for CIFAR."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    arch: str = "resnet20"
    epochs: int = bounded(30, ge=1, le=10**5)
    batch_size: int = bounded(128, ge=1, le=2**20)
    lr: float = bounded(0.05, gt=0, le=10)
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(5e-4, ge=0, le=1)
    schedule: str = "cosine"
    milestones: list[int] = bounded(factory=lambda: [150, 180, 210], ge=0, le=10**5)
    seed: int = bounded(0, ge=0, le=MAX_SEED)
    device: str = "cpu"
    out: str = "results/teachers/teacher.safetensors"

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "multistep"):
            raise FtikdError(f"unknown schedule {self.schedule!r}; use 'cosine' or 'multistep'")
        check_ranges(self)


def lr_at(cfg: TeacherTrainConfig, epoch_float: float) -> float:
    """Learning rate at a fractional epoch: half-cosine to 0, or x0.1 at each milestone."""
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * epoch_float / cfg.epochs))
    return cfg.lr * 0.1 ** sum(epoch_float >= m for m in cfg.milestones)


def train_teacher(
    cfg: TeacherTrainConfig, dataset: ImageDataset | None = None, progress: bool = True
) -> tuple[torch.nn.Module, dict]:
    """Train ``cfg.arch`` on the full training split, evaluate on test, save the checkpoint."""
    from ftikd.engine.trainer import evaluate

    device = check_device(cfg.device)
    check_output_file(cfg.out)  # before the training it would otherwise throw away
    dataset = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_dir)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, in_channels=dataset.channels, num_classes=dataset.num_classes).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )
    images = dataset.train_images.to(device)
    labels = dataset.train_labels.to(device)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    aug_generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    steps = math.ceil(images.shape[0] / cfg.batch_size)
    started = time.perf_counter()
    bar = _bar(cfg.epochs * steps, f"teacher {cfg.arch}", progress)
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(images.shape[0], generator=generator).to(device)
        for step in range(steps):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = random_crop_flip(images[idx], dataset.crop_padding, dataset.hflip, aug_generator)
            x = normalize(x, dataset.mean, dataset.std)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, epoch + step / steps)
            loss = F.cross_entropy(model(x).logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
                bar.update(1)
    if bar is not None:
        bar.close()
    top1, top5 = evaluate(model, dataset.test_images, dataset.test_labels, dataset.mean, dataset.std)
    meta = {
        "arch": cfg.arch,
        "dataset": cfg.dataset,
        "in_channels": dataset.channels,
        "num_classes": dataset.num_classes,
        "test_acc": round(top1, 3),
        "test_top5": round(top5, 3),
        "epochs": cfg.epochs,
        "train_time_s": round(time.perf_counter() - started, 1),
        "seed": cfg.seed,
    }
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    meta = save_checkpoint(model.cpu(), cfg.out, meta)
    return model, meta


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)
