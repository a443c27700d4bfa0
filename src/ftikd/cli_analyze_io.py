"""The inputs and outputs of ``ftikd analyze``: saved students resolved and checked, files written.

A student argument is its safetensors checkpoint (``<run>.student.safetensors``) or its run record
(``<run>.json``, whose ``student.path`` names the checkpoint). Every input is checked before any
work: a missing file, a model of another dataset or class count, or an unwritable ``--out`` ends in
a one-line :class:`FtikdError` with nothing written (``prepare``). ``write_outputs`` writes
``<name>.md`` (title, notes and tables), one CSV per table and the plot.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftikd.errors import FtikdError

STUDENT_SUFFIX = ".student.safetensors"


@dataclass
class Subject:
    """One analysed model: display label, checkpoint, its metadata and (when found) its run record."""

    label: str
    path: Path
    meta: dict[str, Any]
    record: dict[str, Any] | None = None
    model: nn.Module | None = None


def _read_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise FtikdError(
            f"run record {path} is not readable JSON; pass a run record or a checkpoint"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise FtikdError(f"{path} is not a run record (no config block); pass a run record or a checkpoint")
    return data


def _student_files(arg: str) -> tuple[Path, dict[str, Any] | None]:
    """The checkpoint of a student argument and its run record (the argument itself, or beside it)."""
    path = Path(arg)
    if not path.is_file():
        raise FtikdError(f"student {path} does not exist; pass a <run>.student.safetensors or <run>.json")
    if path.suffix == ".json":
        record = _read_record(path)
        saved = record.get("student")
        if not isinstance(saved, dict) or not isinstance(saved.get("path"), str):
            raise FtikdError(f"run record {path} saved no student; re-run it with this ftikd version")
        ckpt = Path(saved["path"])
        if not ckpt.is_file() and (path.parent / ckpt.name).is_file():
            ckpt = path.parent / ckpt.name  # the runs folder was moved as a whole
        return ckpt, record
    beside = path.with_name(path.name.removesuffix(STUDENT_SUFFIX) + ".json")
    return path, _read_record(beside) if path.name.endswith(STUDENT_SUFFIX) and beside.is_file() else None


def _checked_meta(path: Path, role: str, spec: str, dataset: Any) -> dict[str, Any]:
    """The checkpoint's metadata, refused unless it was trained on ``--dataset`` with its shapes."""
    from ftikd.teacher import read_checkpoint_meta

    meta = read_checkpoint_meta(path)
    shape = (meta["in_channels"], meta["num_classes"])
    if meta["dataset"] not in (spec, dataset.name) or shape != (dataset.channels, dataset.num_classes):
        raise FtikdError(
            f"{role} {path} was trained on {meta['dataset']} ({meta['in_channels']} channels, "
            f"{meta['num_classes']} classes) but --dataset {spec} has {dataset.channels} channels "
            f"and {dataset.num_classes} classes; pass models of one dataset"
        )
    return meta


def _label(meta: dict[str, Any], record: dict[str, Any] | None, path: Path) -> str:
    from ftikd.analysis.summary import method_label

    if record is not None:
        cfg = record["config"]
        return f"{method_label(record)} n={cfg.get('calls')} s={cfg.get('seed')}"
    return str(meta.get("run") or path.name.removesuffix(STUDENT_SUFFIX).removesuffix(".safetensors"))


def _subjects(args: argparse.Namespace, dataset: Any, with_teacher: bool) -> list[Subject]:
    """The teacher (first, when asked for) and the students, all checked against ``dataset``."""
    subjects = []
    if with_teacher:
        if not args.teacher:
            raise FtikdError(f"ftikd analyze {args.analysis} needs --teacher PATH")
        teacher = Path(args.teacher)
        subjects.append(Subject("teacher", teacher, _checked_meta(teacher, "teacher", args.dataset, dataset)))
    for arg in args.students:
        ckpt, record = _student_files(arg)
        meta = _checked_meta(ckpt, "student", args.dataset, dataset)
        subjects.append(Subject(_label(meta, record, ckpt), ckpt, meta, record))
    seen: dict[str, int] = {}
    for s in subjects:
        seen[s.label] = seen.get(s.label, 0) + 1
        if seen[s.label] > 1:
            s.label = f"{s.label} #{seen[s.label]}"
    return subjects


def _load_models(subjects: list[Subject], device: torch.device) -> None:
    from ftikd.teacher.checkpoint import load_checkpoint

    for s in subjects:
        s.model, _ = load_checkpoint(s.path, map_location=device)


def _device(name: str | None) -> torch.device:
    from ftikd.checks import check_device

    return check_device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def prepare(
    args: argparse.Namespace, with_teacher: bool = True, load: bool = True
) -> tuple[Any, list[Subject]]:
    """Check ``--out``, load the dataset and every model: all failures happen before any output."""
    from ftikd.checks import check_output_dir
    from ftikd.data import load_dataset

    check_output_dir(args.out)
    dataset = load_dataset(args.dataset, args.data_dir)
    subjects = _subjects(args, dataset, with_teacher)
    if load:
        _load_models(subjects, _device(args.device))
    return dataset, subjects


Tables = list[tuple[str, list[list[str]]]]


def write_outputs(
    args: argparse.Namespace, title: str, notes: str, tables: Tables, plot: Callable[[Path], Path]
) -> list[Path]:
    """Write ``<analysis>.md`` (title, notes, each table), one CSV per table and ``plot(<analysis>.png)``."""
    from ftikd.analysis.report import write_table
    from ftikd.fileio import atomic_write_text

    folder, name = Path(args.out), args.analysis
    written, parts = [], [f"# {title}", notes]
    for i, (caption, rows) in enumerate(tables):
        csv_path = folder / (f"{name}.csv" if i == 0 else f"{name}_{i + 1}.csv")
        parts += [f"## {caption}" if caption else "", write_table(rows, csv_path)]
        written.append(csv_path)
    written.append(plot(folder / f"{name}.png"))
    parts.append(f"![{name}]({name}.png)")
    md = folder / f"{name}.md"
    atomic_write_text(md, "\n\n".join(p for p in parts if p) + "\n")
    return [md, *written]


def checked_config(cls: type, **values: Any) -> Any:
    """Build an analysis config; its ``ValueError`` becomes a one-line user error."""
    try:
        return cls(**values)
    except ValueError as exc:
        raise FtikdError(f"{exc}; pass a value in range") from None


def logits_of(s: Subject, dataset: Any, images: torch.Tensor) -> torch.Tensor:
    from ftikd.analysis.embedding import model_outputs

    return model_outputs(s.model, images, dataset.mean, dataset.std).logits
