"""``ftikd bench``: ftikd's training step and teacher caching against the bare model, side by side.

In one process, on the same model, batch size, device and thread count:

- *bare student*: forward, backward and SGD step on a normalised batch already in memory, the limit
  a distillation step can approach;
- *ftikd step* per method: the engine's own ``train_step`` (index sampling, gather on the device,
  batched crop+flip, normalisation, teacher-output lookup, method loss, update); throughput counts
  the images pushed through the student (64·k per step for group CKD);
- *teacher caching*: ``TeacherStore.fill`` (view augmentation, teacher, SQLite commit per batch)
  against the teacher's bare batched inference on the same images;
- optionally *torchdistill*: the same KD training run by ``benchmarks/torchdistill_kd.py`` under
  another environment's python (torchdistill needs torchvision, which ftikd does not).

Each repetition times the bare run and then every candidate in turn (round-robin), so that every
candidate has a bare run next to it: ratios are medians of per-repetition ratios, images/s medians
over repetitions, all after warm-up.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.checks import bounded, check_device, check_ranges
from ftikd.data import normalize, view_crop_flip
from ftikd.distributed import DistContext
from ftikd.engine.config import TrainConfig, resolve_step_settings
from ftikd.engine.record import library_versions
from ftikd.engine.trainer import TrainData, build_training, train_step
from ftikd.experiments.bench_memory import step_peak_mib
from ftikd.experiments.bench_torchdistill import TORCHDISTILL_MODES, TorchdistillWorker
from ftikd.methods import Method, available_methods, build_method
from ftikd.models import build_model
from ftikd.options import parse_method_spec
from ftikd.teacher import Teacher, TeacherStore
from ftikd.teacher.oracle import PaidTeacher


@dataclass
class BenchConfig:
    """What to measure; the defaults match the demo's student on Fashion-MNIST-shaped data."""

    students: list[str] = field(default_factory=lambda: ["resnet8", "wrn_16_2", "resnet8x4"])
    teacher: str = "resnet14"
    methods: list[str] = field(default_factory=lambda: ["ce", "kd", "ckd", "ckd-inbatch"])
    channels: int = bounded(1, ge=1, le=64)
    image_size: int = bounded(28, ge=1, le=4096)
    num_classes: int = bounded(10, ge=2, le=10**6)
    num_train: int = bounded(2000, ge=2, le=10**7)
    batch_size: int = bounded(64, ge=2, le=2**20)
    steps: int = bounded(10, ge=1, le=10**6)
    warmup: int = bounded(3, ge=0, le=10**6)
    repeats: int = bounded(5, ge=1, le=10**6)
    cache_samples: int = bounded(1024, ge=1, le=10**7)
    device: str = "cpu"
    precision: str = "auto"
    memory_format: str = "auto"
    compile: bool = False
    threads: int | None = bounded(None, ge=1, le=4096)
    torchdistill_python: str | None = None


EXTRA_MODES = ("vrm:mode=original",)
"""Method settings ``--methods all`` times beside every registered method's defaults."""

ONE_PROCESS = DistContext(rank=0, world_size=1, local_rank=0)
"""The bench times one process; ``--batch-size`` is never split over ranks here."""

Round = Callable[[], dict[str, float]]
"""Runs each of its candidates once and returns their wall times by kind."""


def timed(kind: str, fn: Callable[[], None], sync: Callable[[], None]) -> Round:
    """A round of one candidate timed in this process."""

    def run() -> dict[str, float]:
        started = time.perf_counter()
        fn()
        sync()
        return {kind: time.perf_counter() - started}

    return run


def interleaved_times(rounds: list[Round], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall times per repetition of every candidate, the rounds run in turn after ``warmup`` passes.

    Timing every candidate within the same pass lets each be compared with the bare run next to it,
    so that drifts in machine load (other users of a shared machine) cancel out of the ratios.
    """
    for _ in range(warmup):
        for run in rounds:
            run()
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for run in rounds:
            for kind, seconds in run().items():
                times.setdefault(kind, []).append(seconds)
    return times


def median_ratio(rates: dict[str, list[float]], kind: str, base: str) -> float:
    """Median over repetitions of ``kind``'s rate over ``base``'s rate in the same repetition."""
    return statistics.median(a / b for a, b in zip(rates[kind], rates[base], strict=True))


def rate_rows(
    model: str,
    rates: dict[str, list[float]],
    what: dict[str, str],
    base: dict[str, str],
    peaks: dict[str, float] | None = None,
) -> list[dict]:
    """One row per timed kind: median images/s, the median per-repetition ratio to its base, and the
    peak MiB of one step where ``peaks`` has it (None otherwise)."""
    peaks = peaks or {}
    return [
        {
            "student": model,
            "what": what[kind],
            "kind": kind,
            "images_per_s": statistics.median(rates[kind]),
            "ratio": median_ratio(rates, kind, base[kind]),
            "peak_step_mib": round(peaks[kind], 2) if kind in peaks else None,
        }
        for kind in rates
    ]


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


@torch.no_grad()
def with_teacher_features(cfg: BenchConfig, data: TrainData, names: tuple[str, ...]) -> TrainData:
    """``data`` plus the bench teacher's features ``names`` on its images, as a store would hold them."""
    if not names or set(names) <= set(data.teacher_features):
        return data
    teacher = bench_teacher_module(cfg)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, data.num_train, 256):
        images = normalize(data.train_images[start : start + 256], data.mean, data.std)
        features = teacher(images, with_features=True).features
        for name in names:
            chunks[name].append(features[name].float())
    return replace(data, teacher_features={name: torch.cat(parts) for name, parts in chunks.items()})


def bench_student(
    cfg: BenchConfig,
    arch: str,
    data: TrainData,
    sync: Callable[[], None],
    worker: TorchdistillWorker | None,
    workdir: str,
) -> list[dict]:
    """Bare step, every method's ftikd step and (with a worker) torchdistill's KD for one student."""
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    student = build_model(arch, in_channels=cfg.channels, num_classes=cfg.num_classes).to(device)
    autocast_dtype, channels_last, _ = resolve_step_settings(bench_train_config(cfg), ONE_PROCESS)
    if channels_last:
        student.to(memory_format=torch.channels_last)
    if cfg.compile:
        student.compile()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = normalize(data.train_images[: cfg.batch_size], data.mean, data.std)
    y = data.train_labels[: cfg.batch_size]

    def bare_step() -> None:
        with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(student(x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one_step = {"bare": bare_step}
    what = {"bare": "bare student step"}
    images = {"bare": cfg.batch_size}
    for i, spec in enumerate(cfg.methods):
        kind = f"method:{spec}"
        one_step[kind], images[kind] = ftikd_step(cfg, arch, spec, data, Path(workdir, f"{arch}-{i}.sqlite"))
        what[kind] = f"ftikd step: {spec} ({images[kind]} images/step)"
    rounds = [timed(kind, repeated(step, cfg.steps), sync) for kind, step in one_step.items()]
    if worker:
        rounds.append(lambda: worker.round(arch))
        what |= worker.what
        images |= dict.fromkeys(worker.what, cfg.batch_size)
    times = interleaved_times(rounds, cfg.warmup, cfg.repeats)
    peaks = {kind: step_peak_mib(step, device) for kind, step in one_step.items()}
    rates = {kind: [cfg.steps * images[kind] / t for t in ts] for kind, ts in times.items()}
    base = {kind: "torchdistill-bare" if kind.startswith("torchdistill") else "bare" for kind in rates}
    return rate_rows(arch, rates, what, base, peaks) + versus_torchdistill(arch, rates)


def repeated(step: Callable[[], None], times: int) -> Callable[[], None]:
    """``step`` called ``times`` times in a row (one timed repetition)."""

    def run() -> None:
        for _ in range(times):
            step()

    return run


def bench_train_config(cfg: BenchConfig) -> TrainConfig:
    """The engine settings the bench runs ftikd's step with; the bare step uses the same ones."""
    return TrainConfig(
        batch_size=cfg.batch_size,
        device=cfg.device,
        precision=cfg.precision,
        memory_format=cfg.memory_format,
        compile=cfg.compile,
    )


def ftikd_step(
    cfg: BenchConfig, arch: str, spec: str, data: TrainData, store: Path
) -> tuple[Callable[[], None], int]:
    """One engine ``train_step`` of method ``spec`` (``name[:k=v,...]``; model built once), and the
    images it pushes through the student. A method that queries the teacher during training (BSS,
    VRM's original mode) gets a paid teacher over a new store file ``store``: its step includes paying."""
    torch.manual_seed(0)
    model = build_model(arch, in_channels=cfg.channels, num_classes=cfg.num_classes)
    name, options = parse_method_spec(spec)
    method = build_method(name, **options)
    data = with_teacher_features(cfg, data, tuple(method.teacher_features))
    paid = bench_paid_teacher(cfg, method, store) if method.queries_teacher else None
    parts = build_training(model, method, data, bench_train_config(cfg), seed=0, paid_teacher=paid)

    def step() -> None:
        train_step(
            parts.model, method, data, parts.sampler, parts.optimizer, parts.aug_generator, parts.options
        )

    return step, images_through_student(model, step)


def bench_teacher_module(cfg: BenchConfig) -> nn.Module:
    """The bench's teacher (seeded, untrained: only its cost matters) on the bench device, in eval mode."""
    torch.manual_seed(0)
    module = build_model(cfg.teacher, in_channels=cfg.channels, num_classes=cfg.num_classes)
    return module.to(cfg.device).eval()


def bench_paid_teacher(cfg: BenchConfig, method: Method, store: Path) -> PaidTeacher:
    """A paid teacher with a budget no bench can spend, over a fresh store file ``store``."""
    teacher = Teacher.from_module(bench_teacher_module(cfg))
    features = method.teacher_features
    return PaidTeacher.open(store, teacher, "bench", cfg.num_classes, 10**9, store.name, features)


def images_through_student(model: nn.Module, step: Callable[[], None]) -> int:
    """Images the student forwards in one ``step`` (a mixed image counts once, a CKD group k times)."""
    seen = [0]
    hook = model.register_forward_pre_hook(lambda _m, args: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    try:
        step()
    finally:
        hook.remove()
    return seen[0]


def bench_caching(cfg: BenchConfig, data: TrainData, sync: Callable[[], None]) -> list[dict]:
    """Teacher caching through the store against the teacher's bare batched inference."""
    device = torch.device(cfg.device)
    module = bench_teacher_module(cfg)
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

    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**9))

        def cached() -> None:
            path = Path(tmp) / f"store{next(counter)}.sqlite"
            with TeacherStore.open(path, teacher.fingerprint, "bench", cfg.num_classes) as store:
                store.fill(samples, 0, images_for, teacher, budget=n, batch_size=batch)

        times = interleaved_times(
            [timed("teacher-bare", bare, sync), timed("caching", cached, sync)], 1, cfg.repeats
        )
    rates = {kind: [n / t for t in ts] for kind, ts in times.items()}
    what = {"teacher-bare": "bare teacher inference", "caching": "teacher caching (store.fill)"}
    return rate_rows(cfg.teacher, rates, what, dict.fromkeys(rates, "teacher-bare"))


def versus_torchdistill(model: str, rates: dict[str, list[float]]) -> list[dict]:
    """Rows ftikd ``kd`` / torchdistill KD, the median of per-repetition ratios, per torchdistill mode."""
    return [
        {
            "student": model,
            "what": f"ratio ftikd kd / torchdistill KD ({mode})",
            "kind": "ftikd/torchdistill",
            "images_per_s": None,
            "ratio": median_ratio(rates, "method:kd", kind),
        }
        for kind, mode in TORCHDISTILL_MODES.items()
        if kind in rates and "method:kd" in rates
    ]


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure everything in ``cfg`` and return the rows with the settings and versions.

    The torchdistill script (if asked for) starts first, so that a broken environment fails before
    the minutes of measurement.
    """
    check_ranges(cfg)
    check_device(cfg.device)
    if cfg.methods == ["all"]:
        cfg = replace(cfg, methods=[*available_methods(), *EXTRA_MODES])
    for spec in cfg.methods:  # unknown names and options are refused before any measurement
        name, options = parse_method_spec(spec)
        build_method(name, **options)
    resolve_step_settings(bench_train_config(cfg), ONE_PROCESS)  # refuse bad settings before measuring
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with TorchdistillWorker(cfg) if cfg.torchdistill_python else nullcontext() as worker:
        device = torch.device(cfg.device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        data = synthetic_data(cfg, device)
        with tempfile.TemporaryDirectory() as tmp:
            rows = [row for arch in cfg.students for row in bench_student(cfg, arch, data, sync, worker, tmp)]
        torchdistill = worker.close() if worker else None
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
        "torchdistill": torchdistill,
    }


def format_bench(result: dict[str, Any]) -> str:
    """The rows as a markdown table."""
    lines = ["| model | measured | images/s | ratio | peak MiB/step |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        rate = "—" if row["images_per_s"] is None else f"{row['images_per_s']:.0f}"
        peak = "—" if row.get("peak_step_mib") is None else f"{row['peak_step_mib']:.1f}"
        lines.append(f"| {row['student']} | {row['what']} | {rate} | {row['ratio']:.2f} | {peak} |")
    lines.append(
        "\nratio: median over repetitions of the ratio to the bare step of the same repetition and"
        "\nenvironment; 'ratio ftikd kd / torchdistill' rows: the same median of ftikd kd over torchdistill."
        "\npeak MiB/step: memory one step holds above its start (activations, gradients, buffers; CPU: from"
        "\nthe profiler's allocation events, CUDA: max_memory_allocated)."
    )
    lines.append(f"peak RSS {result['peak_rss_mib']} MiB; torch threads {result['threads']}")
    td = result.get("torchdistill")
    if td:
        versions = ", ".join(f"{k} {v}" for k, v in td["versions"].items())
        lines.append(f"torchdistill side: {versions}; peak RSS {td['peak_rss_mib']} MiB")
    return "\n".join(lines)
