"""The training engine: the FTI-KD protocol of METHODS.md §3.1, for any registered method.

One pseudo-epoch is ceil(n / batch) optimizer steps whatever the sampler; validation accuracy is
measured after each. A phase ends after ``patience`` evaluations without improvement: the best
student and extra modules are restored and the LR divided by 10. After ``phases`` phase ends (or
``max_epochs`` pseudo-epochs) training stops and the best-validation weights are the result.
As in the CKD authors' code (A11), a phase end restores neither the momentum buffers nor the
non-trainable loss state a method names in ``phase_end_keeps`` (CRD's memory bank).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ftikd.checks import check_ranges
from ftikd.data.augment import apply_crop_flip, draw_crop_flip, normalize
from ftikd.distributed import DistContext, dist_context
from ftikd.engine.config import (
    StepOptions,
    TrainConfig,
    resolve_step_settings,
)
from ftikd.engine.parallel import average_gradients, mean_over_ranks, wrap_data_parallel
from ftikd.errors import FtikdError
from ftikd.fileio import atomic_write_bytes
from ftikd.methods.base import Batch, Method, MethodContext
from ftikd.methods.samplers import IndexSampler

if TYPE_CHECKING:
    from ftikd.teacher.oracle import PaidTeacher


@dataclass
class TrainData:
    """Everything the loop reads, as tensors on the training device.

    ``train_images`` is the run's training subset only (uint8, n x C x H x W); teacher outputs are
    aligned with it row for row. Validation and test images are never augmented.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    hflip: bool = True
    padding: int = 4
    teacher_logits: torch.Tensor | None = None
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])


@dataclass
class FitResult:
    """What training produced: per-epoch history, best validation accuracy and the best weights."""

    history: list[dict]
    best_val_acc: float
    best_epoch: int
    epochs: int
    steps: int
    wall_time_s: float  # training time, earlier attempts' checkpointed time included
    resumed_from_s: float = 0.0  # of which training time checkpointed by an earlier attempt


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """A pseudo-epoch is ceil(n / batch) steps, independent of the sampler (METHODS.md §3.1)."""
    return math.ceil(num_train / batch_size)


def make_batch(
    data: TrainData, index: torch.Tensor, generator: torch.Generator, rows: slice | None = None
) -> Batch:
    """Gather, augment and normalise the images of ``index`` ((B,) or (B, k)) plus their targets.

    Augmentation parameters are drawn for the whole batch; with ``rows`` (a data-parallel rank's
    slice) only those rows are built, so every rank's rows match a single process's batch exactly.
    """
    device = data.train_images.device
    flat = index.reshape(-1).to(device)
    params = draw_crop_flip(flat.numel(), data.padding, data.hflip, generator, device)
    if rows is not None:
        per_row = flat.numel() // max(1, index.shape[0])
        keep = slice(rows.start * per_row, rows.stop * per_row)
        index, flat = index[rows], flat[keep]
        params = tuple(p[keep] if p is not None else None for p in params)
    images = apply_crop_flip(data.train_images[flat], *params, data.padding)
    images = normalize(images, data.mean, data.std).reshape(*index.shape, *data.train_images.shape[1:])
    teacher = None if data.teacher_logits is None else data.teacher_logits[flat].reshape(*index.shape, -1)
    feats = {k: v[flat].reshape(*index.shape, *v.shape[1:]) for k, v in data.teacher_features.items()}
    return Batch(
        index=index,
        images=images,
        labels=data.train_labels[flat].reshape(index.shape),
        num_classes=data.num_classes,
        teacher_logits=teacher,
        teacher_features=feats,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 1000,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on uint8 ``images``, in eval mode."""
    was_training = model.training
    model.eval()
    top1 = top5 = 0
    device = next(model.parameters()).device
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start : start + batch_size].to(device), mean, std)
        y = labels[start : start + batch_size].to(device)
        logits = model(x).logits
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += (top[:, 0] == y).sum().item()
        top5 += (top == y[:, None]).any(dim=1).sum().item()
    model.train(was_training)
    n = max(1, images.shape[0])
    return 100.0 * top1 / n, 100.0 * top5 / n


def trainable_state(student: nn.Module, extra: nn.Module) -> dict:
    """A detached copy of the student's and extra modules' state (restored at phase ends)."""
    return {"student": copy.deepcopy(student.state_dict()), "extra": copy.deepcopy(extra.state_dict())}


def load_trainable_state(
    student: nn.Module, extra: nn.Module, state: dict, keep: tuple[str, ...] = ()
) -> None:
    """Load ``state``; extra-module entries whose names start with a prefix in ``keep`` stay as they are."""
    student.load_state_dict(state["student"])
    current = extra.state_dict() if keep else {}
    extra.load_state_dict({k: current[k] if k.startswith(keep) else v for k, v in state["extra"].items()})


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class TrainingParts:
    """What a training loop needs besides the student: extra modules, optimizer, sampler, RNGs."""

    extra: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: IndexSampler
    generator: torch.Generator
    aug_generator: torch.Generator
    model: nn.Module
    options: StepOptions
    dist: DistContext


def build_training(
    student: nn.Module,
    method: Method,
    data: TrainData,
    cfg: TrainConfig,
    seed: int,
    paid_teacher: PaidTeacher | None = None,
) -> TrainingParts:
    """Move the student to the device, let the method build its modules, make optimizer and sampler.

    The optimizer covers the student and every extra trainable module (METHODS.md §6); samplers and
    augmentation draw from their own generators seeded from ``seed`` (the same on every rank).
    ``parts.model`` is what steps forward through: the student, compiled if asked, inside DDP when
    running under ``torchrun``; checkpoints and evaluation use the plain ``student``.
    ``paid_teacher`` (methods that query the teacher during training) reaches the method's context.
    """
    check_ranges(cfg)
    device = torch.device(cfg.device)
    ctx = dist_context()
    autocast_dtype, channels_last, rows = resolve_step_settings(cfg, ctx)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    aug_generator = torch.Generator(device=device).manual_seed(seed + 1)
    student.to(device).train()
    if channels_last:
        student.to(memory_format=torch.channels_last)
    method.setup(
        MethodContext(
            num_train=data.num_train,
            num_classes=data.num_classes,
            batch_size=cfg.batch_size,
            student=student,
            device=device,
            teacher_feature_shapes={k: tuple(v.shape[1:]) for k, v in data.teacher_features.items()},
            input_shape=tuple(data.train_images.shape[1:]),
            train_labels=data.train_labels,
            paid_teacher=paid_teacher,
            mean=data.mean,
            std=data.std,
        )
    )
    extra = method.modules().to(device).train()
    params = list(student.parameters()) + list(extra.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sampler = method.sampler(data.num_train, cfg.batch_size, generator)
    if ctx.world_size > 1:
        model = wrap_data_parallel(student, device, method.leaves_student_parameters_unused)
    else:
        model = student
    sync_extra = ctx.world_size > 1 and any(p.requires_grad for p in extra.parameters())
    options = StepOptions(
        autocast_dtype=autocast_dtype,
        rows=rows,
        before_update=(lambda: average_gradients(extra, ctx)) if sync_extra else None,
    )
    if cfg.compile:
        model.compile()
    return TrainingParts(extra, optimizer, sampler, generator, aug_generator, model, options, ctx)


def train_step(
    student: nn.Module,
    method: Method,
    data: TrainData,
    sampler: IndexSampler,
    optimizer: torch.optim.Optimizer,
    aug_generator: torch.Generator,
    options: StepOptions = StepOptions(),
) -> dict[str, torch.Tensor]:
    """One optimizer step: sample indices, build the batch on the device, method loss, update.

    ``student`` is the module to forward through (``TrainingParts.model``); under autocast only the
    forward and loss run in reduced precision, the update stays fp32.
    """
    batch = make_batch(data, sampler.next_batch(), aug_generator, options.rows)
    device_type = data.train_images.device.type
    with torch.autocast(device_type, options.autocast_dtype, enabled=options.autocast_dtype is not None):
        terms = method.loss(student, batch)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if options.before_update is not None:
        options.before_update()
    optimizer.step()
    return terms


def check_finite(sums: dict[str, torch.Tensor], epoch: int, epoch_steps: int) -> None:
    """Stop with a user-facing message naming the loss term that became NaN or inf.

    Checked once per pseudo-epoch (a per-step check would force a device sync every step).
    """
    bad = [name for name, total in sums.items() if not math.isfinite(float(total))]
    if bad:
        first = (epoch - 1) * epoch_steps + 1
        raise FtikdError(
            f"loss term(s) {', '.join(bad)} became non-finite during pseudo-epoch {epoch} (steps {first}-"
            f"{epoch * epoch_steps}); lower --lr or check the teacher outputs"
        )


EpochCallback = Callable[[dict], None]


@dataclass
class LoopState:
    """The schedule's bookkeeping (METHODS.md §3.1), saved in every resumable checkpoint."""

    epoch: int = 0
    phase: int = 0
    best_val: float = -1.0
    best_epoch: int = 0
    last_improve: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)


def save_checkpoint_state(path: Path, state: dict[str, Any]) -> None:
    """Write a resumable training state atomically (temp file, fsync, rename)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    """Read a training state with ``weights_only=True``: tensors and plain containers, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FtikdError(
            f"training checkpoint {path} is unreadable ({exc.__class__.__name__}); delete it to restart"
        ) from None


def fit(
    student: nn.Module,
    method: Method,
    data: TrainData,
    cfg: TrainConfig,
    seed: int,
    on_epoch: EpochCallback | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    paid_teacher: PaidTeacher | None = None,
) -> FitResult:
    """Train ``student`` with ``method`` under the FTI-KD schedule; leaves the best weights loaded.

    With ``checkpoint``, the whole training state (weights, best weights, optimizer, sampler and
    RNG states, schedule bookkeeping) is written atomically after every pseudo-epoch; with
    ``resume`` and an existing checkpoint, training continues from it and, on CPU, ends with the
    same numbers as an uninterrupted run. Under ``torchrun`` each rank trains on its slice of every
    global batch inside DDP (see :mod:`ftikd.engine.parallel`); only rank 0 writes the checkpoint.
    """
    parts = build_training(student, method, data, cfg, seed, paid_teacher)
    extra, optimizer, sampler = parts.extra, parts.optimizer, parts.sampler
    generator, aug_generator = parts.generator, parts.aug_generator
    epoch_steps = steps_per_epoch(data.num_train, cfg.batch_size)

    loop = LoopState()
    best_state = trainable_state(student, extra)
    if resume and checkpoint is not None and checkpoint.exists():
        saved = load_checkpoint_state(checkpoint)
        load_trainable_state(student, extra, saved["current"])
        best_state = saved["best"]
        optimizer.load_state_dict(saved["optimizer"])
        sampler.load_state_dict(saved["sampler"])
        generator.set_state(saved["generator"])
        aug_generator.set_state(saved["aug_generator"])
        torch.set_rng_state(saved["torch_rng"])
        loop = LoopState(**json.loads(saved["loop"]))
    resumed_from_s = loop.elapsed_s
    started = time.perf_counter() - resumed_from_s
    while loop.phase < cfg.phases and loop.epoch < cfg.max_epochs:
        lr = cfg.lr * cfg.lr_decay**loop.phase
        sums: dict[str, torch.Tensor] = {}
        for _ in range(epoch_steps):
            terms = train_step(parts.model, method, data, sampler, optimizer, aug_generator, parts.options)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach()
        loop.epoch += 1
        sums = mean_over_ranks(sums, parts.dist)
        check_finite(sums, loop.epoch, epoch_steps)
        val_acc, _ = evaluate(
            student, data.val_images, data.val_labels, data.mean, data.std, cfg.eval_batch_size
        )
        train_metrics = {}
        if cfg.eval_train:  # the training curve, on a validation-sized part of the training subset
            seen = max(1, data.val_images.shape[0])
            train_metrics["train_acc"] = evaluate(
                student,
                data.train_images[:seen],
                data.train_labels[:seen],
                data.mean,
                data.std,
                cfg.eval_batch_size,
            )[0]
        improved = val_acc > loop.best_val
        if improved:
            loop.best_val, loop.best_epoch, loop.last_improve = val_acc, loop.epoch, loop.epoch
            best_state = trainable_state(student, extra)
        record = {
            "epoch": loop.epoch,
            "phase": loop.phase,
            "lr": lr,
            "val_acc": val_acc,
            **train_metrics,
            "improved": improved,
            "time_s": round(time.perf_counter() - started, 3),
            **{name: float(total) / epoch_steps for name, total in sums.items()},
        }
        if loop.epoch - loop.last_improve >= cfg.patience:
            load_trainable_state(student, extra, best_state, keep=method.phase_end_keeps)
            loop.last_improve, loop.phase = loop.epoch, loop.phase + 1
            set_lr(optimizer, cfg.lr * cfg.lr_decay**loop.phase)
            record["phase_end"] = True
        loop.history.append(record)
        loop.elapsed_s = time.perf_counter() - started
        if checkpoint is not None and parts.dist.is_main:
            save_checkpoint_state(
                checkpoint,
                {
                    "current": trainable_state(student, extra),
                    "best": best_state,
                    "optimizer": optimizer.state_dict(),
                    "sampler": sampler.state_dict(),
                    "generator": generator.get_state(),
                    "aug_generator": aug_generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "loop": json.dumps(dataclasses.asdict(loop)),
                },
            )
        if on_epoch is not None:
            on_epoch(record)
    load_trainable_state(student, extra, best_state)
    return FitResult(
        history=loop.history,
        best_val_acc=loop.best_val,
        best_epoch=loop.best_epoch,
        epochs=loop.epoch,
        steps=loop.epoch * epoch_steps,
        wall_time_s=time.perf_counter() - started,
        resumed_from_s=resumed_from_s,
    )
