"""``ftikd demo``: the main job on the default dataset, sized for a 2-core CPU in under 20 minutes.

Trains (or reuses) a teacher, then distills students with plain CE, KD and CKD at n = 500 teacher
calls over three seeds, prints mean ± std test accuracy, and writes run records, a summary and a
plot. Every run follows ``ftikd distill``'s defaults (LR 0.05, patience 50) except for the number
of phases: the demo stops at the first phase end (``phases=1``), ``--full`` runs the full FTI-KD
protocol (3 phases). Runs go to a pool of worker processes, one per core by default, each with its
share of the cores' threads, longest runs first. The README gives both tables, measured.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ftikd.analysis.plot import plot_accuracy_vs_calls
from ftikd.analysis.summary import format_table, summarise
from ftikd.checks import MAX_SEED, bounded, check_device, check_output_dir, check_ranges
from ftikd.data import load_dataset, validate_budget
from ftikd.engine.record import write_json
from ftikd.engine.trainer import TrainConfig
from ftikd.errors import FtikdError
from ftikd.experiments.executors import worker_threads
from ftikd.experiments.run import RunConfig, run_distillation
from ftikd.fileio import atomic_write_text
from ftikd.methods import build_method
from ftikd.options import parse_method_spec
from ftikd.teacher import read_checkpoint_meta
from ftikd.teacher.train import TeacherTrainConfig, train_teacher

DEMO_PHASES = 1  # the demo's one change to the protocol; --full restores TrainConfig().phases


@dataclass
class MethodSpec:
    """A method to run in the demo: registry name, options, and its own LR (None: the shared one)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = bounded(None, gt=0, le=10)

    @classmethod
    def parse(cls, spec: str) -> MethodSpec:
        """``name`` or ``name:key=value,...``; the key ``lr`` sets the method's learning rate."""
        name, options = parse_method_spec(spec)
        lr = options.pop("lr", None)
        return cls(name, options, None if lr is None else float(lr))


@dataclass
class DemoConfig:
    """The demo's settings; every default is stated in the README with its measured cost.

    All methods share ``ftikd distill``'s LR (0.05) and patience (50), so that the demo ranks them
    as the full protocol does (README: both tables); only the phases differ (``DEMO_PHASES``).
    CKD is the paper's group form, k = 2, MSE loss, with ftikd's class-count-free reduction.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    teacher_arch: str = "resnet14"
    teacher_epochs: int = bounded(2, ge=1, le=10**5)
    student: str = "resnet8"
    methods: list[MethodSpec] = field(
        default_factory=lambda: [MethodSpec("ce"), MethodSpec("kd"), MethodSpec("ckd")]
    )
    budgets: list[int] = bounded(factory=lambda: [500], ge=1)
    seeds: list[int] = bounded(factory=lambda: [1, 2, 3], ge=0, le=MAX_SEED)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(phases=DEMO_PHASES))
    workers: int = bounded(0, ge=0, le=4096)  # 0: one per core, at most one per run
    out: str = "results/demo"
    runs_dir: str = "runs"  # under out; --full uses runs-full (the teacher and store are shared)
    teacher: str | None = None

    def worker_count(self, runs: int) -> int:
        """``workers``, or with 0 one per core, never more than there are runs."""
        return max(1, min(self.workers or os.cpu_count() or 1, runs))


def demo_teacher(cfg: DemoConfig, progress: bool) -> tuple[Path, dict]:
    """Reuse the cached demo teacher when its metadata matches, else train and save it."""
    if cfg.teacher:
        return Path(cfg.teacher), read_checkpoint_meta(cfg.teacher)
    path = Path(cfg.out) / "teacher" / f"{cfg.dataset}-{cfg.teacher_arch}-e{cfg.teacher_epochs}.safetensors"
    if path.exists():
        try:
            meta = read_checkpoint_meta(path)
            print(f"reusing teacher {path} (test top-1 {meta.get('test_acc')}%)")
            return path, meta
        except FtikdError as exc:
            print(f"cached teacher unusable ({exc}); retraining")
    print(f"training teacher {cfg.teacher_arch} on {cfg.dataset} for {cfg.teacher_epochs} epochs ...")
    tcfg = TeacherTrainConfig(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        arch=cfg.teacher_arch,
        epochs=cfg.teacher_epochs,
        device=cfg.train.device,
        out=str(path),
    )
    _, meta = train_teacher(tcfg, progress=progress)
    print(f"teacher test top-1 {meta['test_acc']}% in {meta['train_time_s']} s -> {path}")
    return path, meta


def demo_runs(cfg: DemoConfig, teacher_path: Path) -> list[RunConfig]:
    """Every (n, seed, method) run, in the order of the table."""
    return [
        RunConfig(
            teacher=str(teacher_path),
            dataset=cfg.dataset,
            data_dir=cfg.data_dir,
            student=cfg.student,
            method=spec.name,
            method_options=dict(spec.options),
            calls=n,
            seed=seed,
            out=str(Path(cfg.out) / cfg.runs_dir),
            train=replace(cfg.train, lr=spec.lr or cfg.train.lr),
        )
        for n in cfg.budgets
        for seed in cfg.seeds
        for spec in cfg.methods
    ]


def longest_first(runs: list[RunConfig]) -> list[RunConfig]:
    """``runs`` with the costliest first, so that a pool of workers finishes together.

    The cost estimate is n times the images one step forwards per row of the method's sampler
    (k for a CKD group), which puts CKD first, then the larger budgets.
    """
    return sorted(runs, key=lambda r: -r.calls * rows_per_sample(r))


def rows_per_sample(cfg: RunConfig) -> int:
    """Images one sampler row stands for (1 for single samples, k for a group of k)."""
    method = build_method(cfg.method, **cfg.method_options)
    rows = method.sampler(max(cfg.calls, 8), 4, torch.Generator().manual_seed(0)).next_batch()
    return max(1, rows[0].numel())


_WORKER_DATASET: dict[str, Any] = {}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_in_worker(cfg: RunConfig) -> dict[str, Any]:
    """One demo run in a pool process; the dataset is loaded once per process."""
    key = f"{cfg.dataset}:{cfg.data_dir}"
    if key not in _WORKER_DATASET:
        _WORKER_DATASET[key] = load_dataset(cfg.dataset, cfg.data_dir)
    return run_distillation(cfg, dataset=_WORKER_DATASET[key], progress=False).record


def run_all(cfg: DemoConfig, runs: list[RunConfig], progress: bool) -> list[dict[str, Any]]:
    """Run ``runs`` here (one worker, with progress bars) or in a spawned pool, printing each result."""
    workers = cfg.worker_count(len(runs))
    records: list[dict[str, Any]] = []

    def report(record: dict[str, Any]) -> None:
        records.append(record)
        m = record["metrics"]
        print(
            f"[{len(records)}/{len(runs)}] {record['run']}: test top-1 {m['test_top1']:.2f}% "
            f"(best val {m['best_val_acc']:.2f}% @ep {m['best_epoch']}/{m['epochs']}, "
            f"{record['wall_time_s']:.0f} s)",
            flush=True,
        )

    if workers == 1:
        dataset = load_dataset(cfg.dataset, cfg.data_dir)
        for run in runs:
            report(run_distillation(run, dataset=dataset, progress=progress).record)
        return records
    threads = worker_threads(workers)
    print(f"{len(runs)} runs on {workers} worker processes x {threads} torch thread(s), longest first")
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads,),
    )
    with pool:
        for future in as_completed([pool.submit(_run_in_worker, run) for run in longest_first(runs)]):
            report(future.result())
    place = {run.run_name(): i for i, run in enumerate(runs)}
    return sorted(records, key=lambda rec: place[rec["run"]])


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole demo and return its summary (also written to ``<out>/<runs_dir>/summary.json``)."""
    started = time.perf_counter()
    check_ranges(cfg)
    check_device(cfg.train.device)
    check_output_dir(cfg.out)
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    for n in cfg.budgets:  # refuse an impossible budget before training the teacher
        validate_budget(dataset.train_images.shape[0], n)
    for spec in cfg.methods:  # and an unknown method or option
        build_method(spec.name, **spec.options)
    teacher_path, teacher_meta = demo_teacher(cfg, progress)
    records = run_all(cfg, demo_runs(cfg, teacher_path), progress)
    return write_summary(cfg, teacher_path, teacher_meta, records, time.perf_counter() - started)


def write_summary(
    cfg: DemoConfig, teacher_path: Path, teacher_meta: dict, records: list[dict[str, Any]], wall: float
) -> dict[str, Any]:
    """Print the table and write ``summary.json``, ``summary.md`` and the accuracy-vs-calls plot."""
    out = Path(cfg.out) / cfg.runs_dir
    cells = summarise(records)
    table = format_table(cells)
    plot = plot_accuracy_vs_calls(
        cells,
        out / "accuracy_vs_calls.png",
        title=f"{cfg.dataset}: {teacher_meta['arch']} ({teacher_meta.get('test_acc')}%) -> {cfg.student}",
    )
    summary = {
        "teacher": {"path": str(teacher_path), **teacher_meta},
        "student": cfg.student,
        "schedule": asdict(cfg.train),
        "workers": cfg.worker_count(len(records)),
        "table_markdown": table,
        "cells": [
            {
                "method": c.label,
                "n": c.calls,
                "mean": c.mean,
                "std": c.std,
                "accs": c.accs,
                "teacher_calls_per_run": c.paid,
            }
            for c in cells
        ],
        "wall_time_s": round(wall, 1),
        "plot": str(plot),
    }
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", table + "\n")
    print()
    print(
        f"teacher {teacher_meta['arch']}: test top-1 {teacher_meta.get('test_acc')}%; student {cfg.student}; "
        f"test top-1 % mean ± std over seeds {cfg.seeds}; (teacher calls per run); "
        f"schedule: patience {cfg.train.patience}, {cfg.train.phases} phase(s), LR {cfg.train.lr}"
    )
    print(table)
    print(f"\nwall time {wall / 60:.1f} min; records in {out}; plot {plot}")
    return summary
