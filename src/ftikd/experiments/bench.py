"""``ftikd bench``: ftikd's training step and teacher caching against the bare model, side by side.

In one process, on the same model, batch size, device and thread count:

- *bare student*: forward, backward and SGD step on a normalised batch already in memory, the limit
  a distillation step can approach;
- *ftikd step* per method: the engine's own ``train_step`` (index sampling, gather on the device,
  batched crop+flip, normalisation, teacher-output lookup, method loss, update); throughput counts
  the images pushed through the student (64·k per step for group CKD);
- *teacher caching*: ``TeacherStore.fill`` (view augmentation, teacher, SQLite commit per batch)
  against the teacher's bare batched inference on the same images.

Times are medians over repetitions after warm-up; ratios are images/s over the bare rate.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ftikd.data import normalize, view_crop_flip
from ftikd.engine.record import library_versions
from ftikd.engine.trainer import TrainConfig, TrainData, build_training, train_step
from ftikd.methods import build_method
from ftikd.models import build_model
from ftikd.teacher import Teacher, TeacherStore


@dataclass
class BenchConfig:
    """What to measure; the defaults match the demo's student on Fashion-MNIST-shaped data."""

    students: list[str] = field(default_factory=lambda: ["resnet8", "wrn_16_2"])
    teacher: str = "resnet14"
    methods: list[str] = field(default_factory=lambda: ["ce", "kd", "ckd", "ckd-inbatch"])
    channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    num_train: int = 2000
    batch_size: int = 64
    steps: int = 10
    warmup: int = 3
    repeats: int = 5
    cache_samples: int = 1024
    device: str = "cpu"
    threads: int | None = None


def median_time(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def synthetic_data(cfg: BenchConfig, device: torch.device) -> TrainData:
    """Random uint8 images, labels and teacher logits of the configured shape, on the device."""
    g = torch.Generator().manual_seed(0)
    shape = (cfg.num_train, cfg.channels, cfg.image_size, cfg.image_size)
    return TrainData(
        train_images=torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device),
        train_labels=torch.randint(0, cfg.num_classes, (cfg.num_train,), generator=g).to(device),
        val_images=torch.zeros(1, *shape[1:], dtype=torch.uint8, device=device),
        val_labels=torch.zeros(1, dtype=torch.long, device=device),
        mean=(0.5,) * cfg.channels,
        std=(0.25,) * cfg.channels,
        num_classes=cfg.num_classes,
        teacher_logits=torch.randn(cfg.num_train, cfg.num_classes, generator=g).to(device),
    )


def bench_student(cfg: BenchConfig, arch: str, data: TrainData, sync: Callable[[], None]) -> list[dict]:
    """Bare step and every method's ftikd step for one student architecture."""
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    student = build_model(arch, in_channels=cfg.channels, num_classes=cfg.num_classes).to(device)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = normalize(data.train_images[: cfg.batch_size], data.mean, data.std)
    y = data.train_labels[: cfg.batch_size]

    def bare_steps() -> None:
        for _ in range(cfg.steps):
            loss = F.cross_entropy(student(x).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    bare_s = median_time(bare_steps, cfg.warmup, cfg.repeats, sync)
    bare_rate = cfg.steps * cfg.batch_size / bare_s
    rows = [{"student": arch, "what": "bare student step", "images_per_s": bare_rate, "ratio": 1.0}]
    for name in cfg.methods:
        rate, per_step = ftikd_step_rate(cfg, arch, name, data, sync)
        rows.append(
            {
                "student": arch,
                "what": f"ftikd step: {name} ({per_step} images/step)",
                "images_per_s": rate,
                "ratio": rate / bare_rate,
            }
        )
    return rows


def ftikd_step_rate(
    cfg: BenchConfig, arch: str, method_name: str, data: TrainData, sync: Callable[[], None]
) -> tuple[float, int]:
    """Images per second through the student in the engine's ``train_step``, and images per step."""
    torch.manual_seed(0)
    model = build_model(arch, in_channels=cfg.channels, num_classes=cfg.num_classes)
    method = build_method(method_name)
    parts = build_training(
        model, method, data, TrainConfig(batch_size=cfg.batch_size, device=cfg.device), seed=0
    )
    per_step = parts.sampler.next_batch().numel()

    def steps() -> None:
        for _ in range(cfg.steps):
            train_step(model, method, data, parts.sampler, parts.optimizer, parts.aug_generator)

    return cfg.steps * per_step / median_time(steps, cfg.warmup, cfg.repeats, sync), per_step


def bench_caching(cfg: BenchConfig, data: TrainData, sync: Callable[[], None]) -> list[dict]:
    """Teacher caching through the store against the teacher's bare batched inference."""
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    module = build_model(cfg.teacher, in_channels=cfg.channels, num_classes=cfg.num_classes).to(device).eval()
    teacher = Teacher.from_module(module)
    n = min(cfg.cache_samples, data.num_train)
    samples = torch.arange(n)
    cpu_images = data.train_images[:n].cpu()
    batch = 256

    def images_for(idx: torch.Tensor) -> torch.Tensor:
        x = view_crop_flip(cpu_images[idx], idx, 0, 4, True)
        return normalize(x.to(device), data.mean, data.std)

    def bare() -> None:
        with torch.no_grad():
            for start in range(0, n, batch):
                module(normalize(cpu_images[start : start + batch].to(device), data.mean, data.std))

    bare_rate = n / median_time(bare, 1, cfg.repeats, sync)
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**9))

        def cached() -> None:
            path = Path(tmp) / f"store{next(counter)}.sqlite"
            with TeacherStore.open(path, teacher.fingerprint, "bench", cfg.num_classes) as store:
                store.fill(samples, 0, images_for, teacher, budget=n, batch_size=batch)

        cached_rate = n / median_time(cached, 1, cfg.repeats, sync)
    return [
        {"student": cfg.teacher, "what": "bare teacher inference", "images_per_s": bare_rate, "ratio": 1.0},
        {
            "student": cfg.teacher,
            "what": "teacher caching (store.fill)",
            "images_per_s": cached_rate,
            "ratio": cached_rate / bare_rate,
        },
    ]


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure everything in ``cfg`` and return the rows with the settings and versions."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    data = synthetic_data(cfg, device)
    rows = []
    for arch in cfg.students:
        rows += bench_student(cfg, arch, data, sync)
    rows += bench_caching(cfg, data, sync)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "config": asdict(cfg),
        "rows": rows,
        "peak_rss_mib": round(peak, 1),
        "cuda_peak_allocated_mib": (
            round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None
        ),
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
    }


def format_bench(result: dict[str, Any]) -> str:
    """The rows as a markdown table."""
    lines = ["| model | measured | images/s | ratio to bare |", "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['student']} | {row['what']} | {row['images_per_s']:.0f} | {row['ratio']:.2f} |")
    lines.append(f"\npeak RSS {result['peak_rss_mib']} MiB; torch threads {result['threads']}")
    return "\n".join(lines)
