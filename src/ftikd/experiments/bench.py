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

import json
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.checks import bounded, check_device, check_ranges
from ftikd.data import normalize, view_crop_flip
from ftikd.distributed import DistContext
from ftikd.engine.record import library_versions
from ftikd.engine.trainer import (
    TrainConfig,
    TrainData,
    build_training,
    resolve_step_settings,
    train_step,
)
from ftikd.errors import FtikdError
from ftikd.methods import available_methods, build_method, method_class
from ftikd.models import build_model
from ftikd.teacher import Teacher, TeacherStore


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
    model: str, rates: dict[str, list[float]], what: dict[str, str], base: dict[str, str]
) -> list[dict]:
    """One row per timed kind: median images/s and the median per-repetition ratio to its base."""
    return [
        {
            "student": model,
            "what": what[kind],
            "kind": kind,
            "images_per_s": statistics.median(rates[kind]),
            "ratio": median_ratio(rates, kind, base[kind]),
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
    device = data.train_images.device
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, in_channels=cfg.channels, num_classes=cfg.num_classes)
    teacher.to(device).eval()
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, data.num_train, 256):
        images = normalize(data.train_images[start : start + 256], data.mean, data.std)
        features = teacher(images, with_features=True).features
        for name in names:
            chunks[name].append(features[name].float())
    return replace(data, teacher_features={name: torch.cat(parts) for name, parts in chunks.items()})


def bench_student(
    cfg: BenchConfig, arch: str, data: TrainData, sync: Callable[[], None], worker: TorchdistillWorker | None
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

    def bare_steps() -> None:
        for _ in range(cfg.steps):
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                loss = F.cross_entropy(student(x).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    rounds = [timed("bare", bare_steps, sync)]
    what = {"bare": "bare student step"}
    images = {"bare": cfg.batch_size}
    for name in cfg.methods:
        kind = f"method:{name}"
        steps, images[kind] = ftikd_steps(cfg, arch, name, data)
        rounds.append(timed(kind, steps, sync))
        what[kind] = f"ftikd step: {name} ({images[kind]} images/step)"
    if worker:
        rounds.append(lambda: worker.round(arch))
        what |= worker.what
        images |= dict.fromkeys(worker.what, cfg.batch_size)
    times = interleaved_times(rounds, cfg.warmup, cfg.repeats)
    rates = {kind: [cfg.steps * images[kind] / t for t in ts] for kind, ts in times.items()}
    base = {kind: "torchdistill-bare" if kind.startswith("torchdistill") else "bare" for kind in rates}
    return rate_rows(arch, rates, what, base) + versus_torchdistill(arch, rates)


def bench_train_config(cfg: BenchConfig) -> TrainConfig:
    """The engine settings the bench runs ftikd's step with; the bare step uses the same ones."""
    return TrainConfig(
        batch_size=cfg.batch_size,
        device=cfg.device,
        precision=cfg.precision,
        memory_format=cfg.memory_format,
        compile=cfg.compile,
    )


def ftikd_steps(
    cfg: BenchConfig, arch: str, method_name: str, data: TrainData
) -> tuple[Callable[[], None], int]:
    """``cfg.steps`` of the engine's ``train_step`` for one method (model built once), and images per step."""
    torch.manual_seed(0)
    model = build_model(arch, in_channels=cfg.channels, num_classes=cfg.num_classes)
    method = build_method(method_name)
    data = with_teacher_features(cfg, data, tuple(method.teacher_features))
    parts = build_training(model, method, data, bench_train_config(cfg), seed=0)

    def step() -> None:
        train_step(
            parts.model, method, data, parts.sampler, parts.optimizer, parts.aug_generator, parts.options
        )

    def steps() -> None:
        for _ in range(cfg.steps):
            step()

    return steps, images_through_student(model, step)


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


TORCHDISTILL_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "torchdistill_kd.py"
TORCHDISTILL_VENV = (
    "create one with: python3 -m venv /tmp/tdv && /tmp/tdv/bin/pip install torch==2.14.1 "
    "torchvision==0.29.1 torchdistill==1.1.5, then pass --torchdistill-python /tmp/tdv/bin/python"
)
TORCHDISTILL_MODES = {
    "torchdistill-kd-teacher": "teacher forward every step",
    "torchdistill-kd-cached": "cached teacher logits",
}


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


class TorchdistillWorker:
    """``benchmarks/torchdistill_kd.py --serve`` under another python, timing one round per request.

    Rounds on both sides of the pipe alternate (only one side computes at a time), so that ftikd and
    torchdistill are timed seconds apart under the same machine load. Use it as a context manager.
    """

    def __init__(self, cfg: BenchConfig) -> None:
        self.python = str(cfg.torchdistill_python)
        if not TORCHDISTILL_SCRIPT.is_file():
            raise FtikdError(
                f"--torchdistill-python needs a source checkout ({TORCHDISTILL_SCRIPT} is missing)"
            )
        self.log: IO[str] = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen(
                torchdistill_command(cfg),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log,
                text=True,
            )
        except OSError as exc:
            self.log.close()
            raise FtikdError(f"cannot run {self.python} ({exc.strerror}); {TORCHDISTILL_VENV}") from None
        hello = self.receive()
        self.what: dict[str, str] = hello["what"]
        self.versions: dict[str, str] = hello["versions"]

    def __enter__(self) -> TorchdistillWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def receive(self) -> dict[str, Any]:
        """The next JSON line from the script; its death or garbage is a user error."""
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self.fail()

    def fail(self) -> NoReturn:
        """Stop the script and raise one line naming the fix."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        if code == 3:
            raise FtikdError(
                f"torch, torchvision or torchdistill is missing for {self.python}; {TORCHDISTILL_VENV}"
            )
        self.log.seek(0)
        detail = (self.log.read().strip().splitlines() or [f"exit status {code}"])[-1]
        raise FtikdError(
            f"the torchdistill benchmark failed under {self.python}: {detail}; {TORCHDISTILL_VENV}"
        )

    def round(self, arch: str) -> dict[str, float]:
        """Wall times of the script's bare step and KD modes for ``arch``, one run each."""
        try:
            self.proc.stdin.write(arch + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.fail()
        return self.receive()

    def close(self) -> dict[str, Any]:
        """End the script; its peak RSS and versions."""
        self.proc.stdin.close()
        info = self.receive()
        self.proc.wait()
        return {"versions": self.versions, **info}


def torchdistill_command(cfg: BenchConfig) -> list[str]:
    """The command serving ``benchmarks/torchdistill_kd.py`` rounds with this bench's settings and threads."""
    settings = {
        "teacher": cfg.teacher,
        "channels": cfg.channels,
        "image-size": cfg.image_size,
        "num-classes": cfg.num_classes,
        "num-train": cfg.num_train,
        "batch-size": cfg.batch_size,
        "steps": cfg.steps,
        "threads": torch.get_num_threads(),
        "device": cfg.device,
    }
    flags = [arg for name, value in settings.items() for arg in (f"--{name}", str(value))]
    script = str(TORCHDISTILL_SCRIPT)
    return [str(cfg.torchdistill_python), script, "--serve", "--students", *cfg.students, *flags]


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure everything in ``cfg`` and return the rows with the settings and versions.

    The torchdistill script (if asked for) starts first, so that a broken environment fails before
    the minutes of measurement.
    """
    check_ranges(cfg)
    check_device(cfg.device)
    if cfg.methods == ["all"]:
        # methods that pay teacher calls during training (bss) need a store and teacher: not timed here
        cfg = replace(cfg, methods=[m for m in available_methods() if not method_class(m).queries_teacher])
    resolve_step_settings(bench_train_config(cfg), ONE_PROCESS)  # refuse bad settings before measuring
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with TorchdistillWorker(cfg) if cfg.torchdistill_python else nullcontext() as worker:
        device = torch.device(cfg.device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        data = synthetic_data(cfg, device)
        rows = [row for arch in cfg.students for row in bench_student(cfg, arch, data, sync, worker)]
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
    lines = ["| model | measured | images/s | ratio |", "|---|---|---|---|"]
    for row in result["rows"]:
        rate = "—" if row["images_per_s"] is None else f"{row['images_per_s']:.0f}"
        lines.append(f"| {row['student']} | {row['what']} | {rate} | {row['ratio']:.2f} |")
    lines.append(
        "\nratio: median over repetitions of the ratio to the bare step of the same repetition and"
        "\nenvironment; 'ratio ftikd kd / torchdistill' rows: the same median of ftikd kd over torchdistill."
    )
    lines.append(f"peak RSS {result['peak_rss_mib']} MiB; torch threads {result['threads']}")
    td = result.get("torchdistill")
    if td:
        versions = ", ".join(f"{k} {v}" for k, v in td["versions"].items())
        lines.append(f"torchdistill side: {versions}; peak RSS {td['peak_rss_mib']} MiB")
    return "\n".join(lines)
