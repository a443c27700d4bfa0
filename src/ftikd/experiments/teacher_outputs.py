"""Teacher outputs of a run: the store it uses, what it caches before training, and the paid
teacher of methods that query during training (BSS, VRM original mode; docs/budget-queries.md).

Split from :mod:`ftikd.experiments.run`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ftikd.checks import check_output_dir, check_output_file
from ftikd.data import ImageDataset, normalize, view_crop_flip
from ftikd.data.split import FTISplit
from ftikd.distributed import DistContext, barrier
from ftikd.engine.config import NOT_RESULT_FIELDS
from ftikd.errors import FtikdError
from ftikd.methods import Method
from ftikd.teacher import Teacher, TeacherStore, read_checkpoint_meta
from ftikd.teacher.oracle import PaidTeacher

if TYPE_CHECKING:
    from ftikd.experiments.run import RunConfig


def default_store_path(out: str, dataset: str, fingerprint: str, feature_names: tuple[str, ...] = ()) -> Path:
    """Stores live next to the run records and are shared by every run with this teacher and dataset.

    A store keeps the teacher features it was created with, so runs that need other features get a
    store of their own (:func:`with_feature_names`); logit-only methods all share one.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)
    return with_feature_names(Path(out).parent / "stores" / f"{slug}-{fingerprint}.sqlite", feature_names)


def with_feature_names(path: Path, feature_names: tuple[str, ...]) -> Path:
    """``path`` with the sorted feature names before its suffix (unchanged for logits only)."""
    if not feature_names:
        return path
    return path.with_name(f"{path.stem}+{'+'.join(sorted(feature_names))}{path.suffix}")


def teacher_view_images(dataset: ImageDataset, view: int, device: torch.device):
    """Function mapping dataset indices to the teacher's one fixed augmented view, normalised.

    The crop offsets and flip of sample i depend only on (i, view), so the cached output of a sample
    is the same whichever run, batch or order asked for it first.
    """

    def images_for(indices: torch.Tensor) -> torch.Tensor:
        x = view_crop_flip(dataset.train_images[indices], indices, view, dataset.crop_padding, dataset.hflip)
        return normalize(x.to(device), dataset.mean, dataset.std)

    return images_for


def check_teacher_fits(path: str, dataset_name: str, dataset: ImageDataset) -> None:
    """A checkpoint teacher must take the dataset's channels and predict its number of classes."""
    meta = read_checkpoint_meta(path)
    if (meta["in_channels"], meta["num_classes"]) != (dataset.channels, dataset.num_classes):
        raise FtikdError(
            f"teacher {path} was trained on {meta.get('dataset')} ({meta['in_channels']} channels, "
            f"{meta['num_classes']} classes) but {dataset_name} has {dataset.channels} channels and "
            f"{dataset.num_classes} classes; pass a teacher trained on {dataset_name}"
        )


def load_teacher(
    path: str | None,
    needed_by: str,
    dataset_name: str,
    dataset: ImageDataset,
    device: str,
    feature_names: tuple[str, ...] = (),
) -> Teacher:
    """The checkpoint teacher at ``path``, refused (user error) if missing or not fitting the dataset."""
    if not path:
        raise FtikdError(f"{needed_by} needs a teacher; pass --teacher PATH (see ftikd train-teacher)")
    check_teacher_fits(path, dataset_name, dataset)
    return Teacher.from_checkpoint(path, feature_names=feature_names, device=device)


def store_path(
    store: str | None, out: str, dataset: str, fingerprint: str, feature_names: tuple[str, ...] = ()
) -> Path:
    """The store a run or cache job uses: ``store`` if given, else :func:`default_store_path`."""
    return Path(store) if store else default_store_path(out, dataset, fingerprint, feature_names)


def check_store_writable(store: str | None, out: str) -> None:
    """Refuse a store path (given, or the default folder beside ``out``) that cannot be written."""
    if store:
        check_output_file(store, "--store")
    else:
        check_output_dir(default_store_path(out, "-", "-").parent, "--out")


def cached_teacher_outputs(
    cfg: RunConfig, dataset: ImageDataset, train_idx: torch.Tensor, method: Method, teacher: Teacher | None
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], dict[str, Any]]:
    """Fill the store for this run's n samples (paying only what is missing) and read them back."""
    if not method.needs_teacher:
        return None, {}, {"budget": cfg.calls, "outputs_used": 0, "paid_this_run": 0}
    if teacher is None:
        teacher = load_teacher(
            cfg.teacher,
            f"method {cfg.method!r}",
            cfg.dataset,
            dataset,
            cfg.train.device,
            method.teacher_features,
        )
    path = store_path(cfg.store, cfg.out, cfg.dataset, teacher.fingerprint, tuple(method.teacher_features))
    device = torch.device(cfg.train.device)
    with TeacherStore.open(
        path,
        teacher.fingerprint,
        cfg.dataset,
        dataset.num_classes,
        feature_names=method.teacher_features,
    ) as store:
        paid = store.fill(
            train_idx,
            cfg.view,
            teacher_view_images(dataset, cfg.view, device),
            teacher,
            budget=cfg.calls,
        )
        logits = store.logits(train_idx, cfg.view, device=device)
        feats = {
            name: store.features(train_idx, cfg.view, name).to(device) for name in method.teacher_features
        }
        total_paid = store.paid_calls()
    calls = {
        "budget": cfg.calls,
        "outputs_used": int(train_idx.numel()) * method.call_cost,
        "paid_this_run": paid,
        "store": str(path),
        "store_paid_total": total_paid,
        "teacher_fingerprint": teacher.fingerprint,
        "teacher_name": teacher.name,
    }
    return logits, feats, calls


def teacher_outputs_rank0_first(
    cfg: RunConfig,
    dataset: ImageDataset,
    train_idx: torch.Tensor,
    method: Method,
    teacher: Teacher | None,
    ctx: DistContext,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`cached_teacher_outputs` on rank 0 first; the other ranks then find everything stored.

    One process pays, so data-parallel training never races to pay for the same sample; the other
    ranks' ``fill`` pays nothing and only reads.
    """
    if not ctx.is_main:
        barrier()
    try:
        return cached_teacher_outputs(cfg, dataset, train_idx, method, teacher)
    finally:
        if ctx.is_main:
            barrier()


def cached_subset(
    method: Method, calls: int, split: FTISplit, train_labels: torch.Tensor
) -> tuple[FTISplit, torch.Tensor]:
    """The first ``method.train_samples(n)`` training samples of the FTI split and their labels.

    The validation set stays the one every method gets at this n; the rest of n pays for the teacher
    queries of a method that calls the teacher during training (docs/budget-queries.md).
    """
    n_train = method.train_samples(calls)
    if not 1 <= n_train <= calls:
        raise FtikdError(f"method {method.name!r} asks for {n_train} training samples of a budget of {calls}")
    if n_train >= split.train_idx.numel():
        return split, train_labels
    return FTISplit(split.train_idx[:n_train], split.val_idx), train_labels[:n_train]


# Settings that change where or how a run is seen, not what it computes: kept out of its query keys.
_NOT_RESULT = ("out", "store", "data_dir", "track")


def open_paid_teacher(
    cfg: RunConfig, method: Method, dataset: ImageDataset, teacher: Teacher | None, calls: dict[str, Any]
) -> PaidTeacher | None:
    """The run's :class:`PaidTeacher` (budget: n minus the cached samples), or None if the method
    does not query the teacher. Its store view is keyed by the run's config (paths left out)."""
    if not method.queries_teacher or teacher is None:
        return None
    run_key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_RESULT}
    run_key["train"] = {k: v for k, v in run_key["train"].items() if k not in NOT_RESULT_FIELDS}
    return PaidTeacher.open(
        calls["store"],
        teacher,
        cfg.dataset,
        dataset.num_classes,
        cfg.calls - calls["outputs_used"],
        json.dumps(run_key, sort_keys=True),
        method.teacher_features,
    )


def training_calls(calls: dict[str, Any], paid: PaidTeacher | None) -> dict[str, Any]:
    """``calls`` with the teacher calls paid during training: ``cached`` + ``paid_during_training``
    = ``total`` (= ``outputs_used``) <= n; ``paid_this_run`` adds the calls this attempt paid and
    ``store_paid_total`` is read again from the store's ledger (``paid`` must still be open)."""
    if paid is None:
        return calls
    cached, during = calls["outputs_used"], paid.paid
    return calls | {
        "cached": cached,
        "paid_during_training": during,
        "total": cached + during,
        "outputs_used": cached + during,
        "paid_this_run": calls["paid_this_run"] + during - paid.paid_at_open,
        "store_paid_total": paid.store.paid_calls(),
    }
