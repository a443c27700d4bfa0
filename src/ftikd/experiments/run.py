"""One distillation run under a teacher-call budget, from config to JSON record (DESIGN.md data flow).

dataset -> FTI split (n train + n/4 val, by seed) -> TeacherStore.fill (at most n calls, durable)
-> student built right after re-seeding (same init for every method) -> engine.fit -> test top-1/5
at the best validation point -> RunRecord JSON.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftikd.checks import MAX_SEED, bounded, check_device, check_output_dir, check_ranges
from ftikd.data import ImageDataset, fti_split, load_dataset
from ftikd.data.scenarios import imbalanced_indices, uniform_label_noise
from ftikd.data.split import FTISplit
from ftikd.distributed import init_distributed
from ftikd.engine.config import TrainConfig, resolve_step_settings
from ftikd.engine.parallel import rank_device
from ftikd.engine.record import library_versions, write_json
from ftikd.engine.trainer import TrainData, evaluate, fit
from ftikd.errors import FtikdError
from ftikd.experiments.config_check import check_run_config
from ftikd.experiments.teacher_outputs import (
    cached_subset,
    check_store_writable,
    load_teacher,
    open_paid_teacher,
    teacher_outputs_rank0_first,
    training_calls,
)
from ftikd.experiments.tracking import check_trackers, compose, open_trackers, parse_track
from ftikd.methods import build_method
from ftikd.models import build_model
from ftikd.teacher import Teacher, save_checkpoint


@dataclass
class RunConfig:
    """Everything that defines a run; a run record's ``config`` block loads back into this."""

    teacher: str | None = None
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    student: str = "resnet8"
    method: str = "ckd"
    method_options: dict[str, Any] = field(default_factory=dict)
    calls: int = bounded(2000, ge=1)
    seed: int = bounded(1, ge=0, le=MAX_SEED)
    view: int = bounded(0, ge=0, le=2**31 - 1)
    store: str | None = None
    out: str = "results/runs"
    train: TrainConfig = field(default_factory=TrainConfig)
    # KD-survey scenarios (METHODS.md §3.3): {"label_noise": sigma} and/or {"imbalance": gamma}
    scenario: dict[str, float] = field(default_factory=dict)
    # live tracking: "", "tensorboard", "mlflow" or both comma-separated (ftikd.experiments.tracking)
    track: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from a plain dict (a config file or a run record's ``config`` block)."""
        config = check_run_config(raw, cls)  # keys and value types, nested train block included
        train = TrainConfig(**(config.pop("train", None) or {}))
        return cls(**config, train=train)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """Load a JSON or YAML config (or a run record) from ``path``."""
        path = Path(path)
        if not path.is_file():
            raise FtikdError(
                f"config file {path} does not exist; pass the path of a JSON/YAML config or run record"
            )
        text = path.read_text(errors="replace")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as exc:
            raise FtikdError(
                f"config file {path} is not valid JSON/YAML ({exc.__class__.__name__}); fix its syntax"
            ) from None
        if not isinstance(raw, dict):
            raise FtikdError(f"config file {path} must hold a mapping of keys to values")
        return cls.from_dict(raw)

    def run_name(self) -> str:
        """File-name-safe run id: method and its non-default options, budget, seed."""
        opts = "".join(f"-{k}{v}" for k, v in sorted(self.method_options.items()))
        scen = "".join(f"-{k}{v}" for k, v in sorted(self.scenario.items()))
        raw = f"{self.dataset}{scen}-{self.student}-{self.method}{opts}-n{self.calls}-s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", raw)


@dataclass
class RunResult:
    """The numbers of a finished run, and where its record lies."""

    record: dict[str, Any]
    path: Path

    @property
    def test_top1(self) -> float:
        return float(self.record["metrics"]["test_top1"])


def check_run_inputs(cfg: RunConfig) -> None:
    """Refuse out-of-range numbers, a missing device and unwritable outputs before any work."""
    check_ranges(cfg)
    check_device(cfg.train.device)
    check_output_dir(cfg.out)
    check_store_writable(cfg.store, cfg.out)


def run_distillation(
    cfg: RunConfig,
    teacher: Teacher | None = None,
    dataset: ImageDataset | None = None,
    progress: bool = True,
    write: bool = True,
    resume: bool = False,
) -> RunResult:
    """Run one budgeted distillation and write its JSON record under ``cfg.out``.

    While it trains, the run keeps ``<run>.pending.json`` (its config) and ``<run>.state.pt`` (a
    checkpoint rewritten atomically every pseudo-epoch) beside the record; both are removed once
    the record is written. With ``resume``, a finished run returns its record and an unfinished one
    continues from its checkpoint (teacher outputs come back from the store at no cost).

    Under ``torchrun`` every rank runs this: rank 0 pays for the teacher outputs while the others
    wait, then all train data-parallel on slices of each global batch; only rank 0 writes files.
    """
    check_run_inputs(cfg)
    track = parse_track(cfg.track)  # an unknown tracker or a missing extra costs no teacher call
    check_trackers(track)
    paths = RunPaths.of(cfg)
    if resume and paths.record.exists():
        return RunResult(json.loads(paths.record.read_text()), paths.record)
    started = time.perf_counter()
    ctx = init_distributed(cfg.train.device)
    write = write and ctx.is_main
    progress = progress and ctx.is_main
    train_cfg = dataclasses.replace(cfg.train, device=rank_device(cfg.train.device, ctx))
    resolve_step_settings(train_cfg, ctx)  # refuse bad settings before any teacher call
    method = build_method(cfg.method, **cfg.method_options)
    if method.couples_batch_rows and ctx.world_size > 1 and ctx.is_main:
        warnings.warn(
            f"{cfg.method} compares rows within each rank's slice of the batch under torchrun "
            f"({cfg.train.batch_size // ctx.world_size} rows, not {cfg.train.batch_size}): not the "
            "single-process objective",
            stacklevel=2,
        )
    if method.queries_teacher and ctx.world_size > 1:
        raise FtikdError(
            f"method {cfg.method!r} queries the teacher during training; run it without torchrun"
        )
    dataset = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_dir)
    split, train_labels, scenario = scenario_split(cfg, dataset)
    split, train_labels = cached_subset(method, cfg.calls, split, train_labels)
    device = torch.device(train_cfg.device)
    # Re-seed right before building the student so every method starts from the same weights (A12);
    # built before any teacher call so that a bad student name costs nothing.
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, in_channels=dataset.channels, num_classes=dataset.num_classes)
    student = student.to(device)
    if method.queries_teacher and teacher is None:  # one teacher for the cached outputs and the queries
        teacher = load_teacher(
            cfg.teacher,
            f"method {cfg.method!r}",
            cfg.dataset,
            dataset,
            train_cfg.device,
            method.teacher_features,
        )
    logits, feats, calls = teacher_outputs_rank0_first(cfg, dataset, split.train_idx, method, teacher, ctx)
    paid_teacher = open_paid_teacher(cfg, method, dataset, teacher, calls)
    data = TrainData(
        train_images=dataset.train_images[split.train_idx].to(device),
        train_labels=train_labels.to(device),
        val_images=dataset.train_images[split.val_idx].to(device),
        val_labels=dataset.train_labels[split.val_idx].to(device),
        mean=dataset.mean,
        std=dataset.std,
        num_classes=dataset.num_classes,
        hflip=dataset.hflip,
        padding=dataset.crop_padding,
        teacher_logits=logits,
        teacher_features=feats,
    )
    if write:
        write_json(paths.pending, {"config": dataclasses.asdict(cfg)})
    bar = _RunProgress(cfg) if progress else None
    trackers = open_trackers(track if write else (), cfg.out, cfg.run_name(), dataclasses.asdict(cfg))
    try:
        result = fit(
            student,
            method,
            data,
            train_cfg,
            cfg.seed,
            on_epoch=compose(bar.update_record if bar else None, trackers.log_epoch if trackers else None),
            checkpoint=paths.state if write else None,
            resume=resume,
            paid_teacher=paid_teacher,
        )
        calls = training_calls(calls, paid_teacher)  # before the paid teacher's store is closed
    except BaseException:
        trackers.close()  # an MLflow run ends as FAILED
        raise
    finally:
        if bar is not None:
            bar.close()
        if paid_teacher is not None:
            paid_teacher.close()
    top1, top5 = evaluate(
        student,
        dataset.test_images,
        dataset.test_labels,
        dataset.mean,
        dataset.std,
        cfg.train.eval_batch_size,
    )
    method_metrics = method.evaluate_extra(
        dataset.test_images, dataset.test_labels, dataset.mean, dataset.std, cfg.train.eval_batch_size
    )
    record = {
        "run": cfg.run_name(),
        "config": dataclasses.asdict(cfg),
        "method": method.describe(),
        "protocol": {
            "split": "FTI-KD: n train samples + n//4 validation samples by seed; full test split",
            "n_train": int(split.train_idx.numel()),
            "n_val": int(split.val_idx.numel()),
            "n_test": int(dataset.test_images.shape[0]),
            "selection": "test accuracy at the best validation accuracy",
            **({"scenario": scenario} if scenario else {}),
        },
        "metrics": {
            "test_top1": top1,
            "test_top5": top5,
            "best_val_acc": result.best_val_acc,
            "best_epoch": result.best_epoch,
            "epochs": result.epochs,
            "steps": result.steps,
        },
        **({"method_metrics": method_metrics} if method_metrics else {}),
        "teacher_calls": calls,
        "history": result.history,
        "processes": ctx.world_size,
        # a resumed run counts the training time its earlier attempts checkpointed
        "wall_time_s": round(time.perf_counter() - started + result.resumed_from_s, 3),
        "train_time_s": round(result.wall_time_s, 3),
        "versions": library_versions(),
    }
    trackers.log_final(record["metrics"])
    trackers.close()
    if write:
        meta = {"arch": cfg.student, "in_channels": dataset.channels, "num_classes": dataset.num_classes}
        meta |= {"dataset": cfg.dataset, "test_acc": round(top1, 3), "run": cfg.run_name()}
        record["student"] = {
            "path": str(paths.student),
            **save_checkpoint(student.cpu(), paths.student, meta),
        }
        write_json(paths.record, record)
        paths.state.unlink(missing_ok=True)
        paths.pending.unlink(missing_ok=True)
    return RunResult(record, paths.record)


def scenario_split(cfg: RunConfig, dataset: ImageDataset) -> tuple[FTISplit, torch.Tensor, dict[str, Any]]:
    """The FTI split and training labels under ``cfg.scenario`` (METHODS.md §3.3), and what to record.

    Imbalance draws the split from a power-law subset of the training set (fixed by the seed); label
    noise corrupts the labels of the whole training set once by the seed and the split's training
    part takes its labels from it, so validation and test stay clean.
    """
    unknown = set(cfg.scenario) - {"label_noise", "imbalance"}
    if unknown:
        raise FtikdError(f"unknown scenario key(s) {sorted(unknown)}; use label_noise and/or imbalance")
    pool, recorded, labels = None, dict(cfg.scenario), dataset.train_labels
    try:
        if cfg.scenario.get("imbalance"):
            gamma = float(cfg.scenario["imbalance"])
            pool, recorded["class_counts"] = imbalanced_indices(dataset.train_labels, gamma, cfg.seed)
        if cfg.scenario.get("label_noise"):
            sigma = float(cfg.scenario["label_noise"])
            labels = uniform_label_noise(labels, sigma, dataset.num_classes, cfg.seed)
    except ValueError as exc:
        raise FtikdError(f"bad scenario: {exc}") from None
    split = fti_split(dataset.train_images.shape[0] if pool is None else pool.numel(), cfg.calls, cfg.seed)
    if pool is not None:
        split = FTISplit(pool[split.train_idx], pool[split.val_idx])
    if "label_noise" in cfg.scenario:
        recorded["labels_changed"] = int((labels != dataset.train_labels)[split.train_idx].sum())
    return split, labels[split.train_idx], recorded


@dataclass(frozen=True)
class RunPaths:
    """Where a run's record, pending config and training checkpoint live."""

    record: Path
    pending: Path
    state: Path
    student: Path

    @classmethod
    def of(cls, cfg: RunConfig) -> RunPaths:
        base = Path(cfg.out) / cfg.run_name()
        return cls(
            base.with_name(base.name + ".json"),
            base.with_name(base.name + ".pending.json"),
            base.with_name(base.name + ".state.pt"),
            base.with_name(base.name + ".student.safetensors"),
        )


def pending_runs(path: str | Path) -> list[RunConfig]:
    """Configs of the unfinished runs at ``path``: a ``*.pending.json`` file or a folder of them."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.pending.json"))
    elif path.is_file():
        files = [path]
    else:
        raise FtikdError(f"{path} does not exist; pass a runs folder or a <run>.pending.json file")
    return [RunConfig.from_file(f) for f in files]


class _RunProgress:
    """A tqdm bar over pseudo-epochs showing phase, loss terms and validation accuracy."""

    def __init__(self, cfg: RunConfig) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=cfg.train.max_epochs, desc=cfg.run_name(), leave=False, unit="ep", dynamic_ncols=True
        )
        self.best = -1.0

    def update_record(self, record: dict) -> None:
        self.best = max(self.best, record["val_acc"])
        terms = {
            k: f"{v:.3g}"
            for k, v in record.items()
            if isinstance(v, float) and k not in ("lr", "val_acc", "time_s")
        }
        self.bar.set_postfix(
            phase=record["phase"], val=f"{record['val_acc']:.1f}", best=f"{self.best:.1f}", **terms
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
