"""``ftikd cache``: pay for the teacher's outputs on many training samples, data-parallel under torchrun.

Each rank pays for its own contiguous shard of the samples still missing from the main store, into
its own shard store beside it (``<store>.rank<r>-of-<w>.sqlite``); after a barrier rank 0 merges the
shards into the main store and deletes them. The outputs are those ``ftikd distill`` would pay for
(same store path, teacher view and sample ids), so later runs on these samples pay nothing.
See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ftikd.checks import MAX_SEED, bounded, check_device, check_ranges
from ftikd.data import load_dataset
from ftikd.distributed import DistContext, barrier, init_distributed, shard_indices, shutdown
from ftikd.errors import FtikdError
from ftikd.experiments.teacher_outputs import (
    check_store_writable,
    load_teacher,
    store_path,
    teacher_view_images,
)
from ftikd.teacher import TeacherStore


@dataclass
class CacheConfig:
    """Which teacher outputs to pay for, and where to keep them."""

    teacher: str | None = None
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    samples: int | None = bounded(None, ge=1)  # None: the whole training split
    # None: the first `samples` training samples; else a seeded random subset
    seed: int | None = bounded(None, ge=0, le=MAX_SEED)
    view: int = bounded(0, ge=0, le=2**31 - 1)
    store: str | None = None  # default: the store ftikd distill uses for this teacher and dataset
    out: str = "results/runs"
    device: str = "cpu"
    batch_size: int = bounded(256, ge=1, le=2**20)
    max_calls: int | None = bounded(None, ge=0)  # sets the main store's lifetime cap on paid calls


@dataclass(frozen=True)
class CacheResult:
    """What one ``run_cache`` did: the whole job's counts on rank 0 (other ranks report zero calls)."""

    store: Path
    samples: int
    paid: int
    recovered: int
    world_size: int
    pay_s: float
    merge_s: float
    wall_s: float

    def summary(self) -> str:
        """One line for the user: samples, calls paid, times and throughput."""
        rate = self.paid / self.pay_s if self.pay_s > 0 else 0.0
        procs = "1 process" if self.world_size == 1 else f"{self.world_size} processes"
        return (
            f"cached {self.samples} samples with {procs}: {self.paid} teacher calls paid now "
            f"({self.recovered} outputs recovered from earlier shards) in {self.pay_s:.1f} s = "
            f"{rate:.0f} images/s, merge {self.merge_s:.1f} s, wall {self.wall_s:.1f} s -> {self.store}"
        )


def shard_path(store: Path, ctx: DistContext) -> Path:
    """The shard store of ``ctx``'s rank, beside the main store."""
    return store.with_name(f"{store.name}.rank{ctx.rank}-of-{ctx.world_size}.sqlite")


def shard_files(store: Path) -> list[Path]:
    """Every shard file of ``store`` on disk, whatever world size wrote it (sorted)."""
    return sorted(store.parent.glob(f"{glob.escape(store.name)}.rank*-of-*.sqlite"))


def select_samples(num_train: int, samples: int | None, seed: int | None) -> torch.Tensor:
    """Training indices to cache: the first ``samples``, a seeded random subset, or all of them."""
    n = num_train if samples is None else samples
    if not 1 <= n <= num_train:
        raise FtikdError(
            f"--samples {n} is out of range: the training split has {num_train} samples; "
            f"pass 1 to {num_train} or leave it out for all"
        )
    if seed is None:
        return torch.arange(n, dtype=torch.int64)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_train, generator=g, dtype=torch.int64)[:n]


def merge_shards(store: TeacherStore) -> int:
    """Merge every shard file of ``store`` into it, deleting each once its merge has committed."""
    added = 0
    for path in shard_files(store.path):
        added += store.merge_from(path)
        TeacherStore.remove_files(path)
    return added


@contextlib.contextmanager
def job_lock(store: Path, ctx: DistContext) -> Iterator[None]:
    """On rank 0, hold ``<store>.cache-lock`` for the whole job; refuse if another job holds it.

    A second cache job on the same store would take this job's shards for leftovers of a killed job,
    merge them and delete them while this job's ranks still pay into them. The OS drops the lock
    when its holder dies, so a killed job never blocks the rerun. The empty lock file stays.
    """
    if not ctx.is_main:
        yield
        return
    lock = store.with_name(f"{store.name}.cache-lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FtikdError(
                f"another ftikd cache job is filling {store}; wait for it to finish (or kill it and rerun)"
            ) from None
        yield


def run_cache(cfg: CacheConfig, progress: bool = False) -> CacheResult:
    """Make sure the main store holds the teacher's outputs for the selected samples.

    Runs as one rank of a torchrun job (or alone). A rerun after a kill first merges the shards
    the killed job left behind, then pays only for what is still missing.
    """
    check_ranges(cfg)
    check_device(cfg.device)
    check_store_writable(cfg.store, cfg.out)
    ctx = init_distributed(cfg.device)
    try:
        return _cache(cfg, ctx, progress and ctx.is_main)
    finally:
        shutdown()


def _cache(cfg: CacheConfig, ctx: DistContext, progress: bool) -> CacheResult:
    started = time.perf_counter()
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    teacher = load_teacher(cfg.teacher, "ftikd cache", cfg.dataset, dataset, cfg.device)
    ids = select_samples(dataset.train_images.shape[0], cfg.samples, cfg.seed)
    path = store_path(cfg.store, cfg.out, cfg.dataset, teacher.fingerprint)
    binding = (teacher.fingerprint, cfg.dataset, dataset.num_classes)
    with job_lock(path, ctx):
        recovered = 0
        if ctx.is_main:  # create the store once, and take in what an earlier, killed job paid for
            with TeacherStore.open(path, *binding, max_calls=cfg.max_calls) as store:
                recovered = merge_shards(store)
        barrier()
        with TeacherStore.open(path, *binding) as store:
            missing = store.missing(ids, cfg.view)
            store.check_cap(int(missing.numel()))  # every rank sees the same store: all refuse together
            paid_before = store.paid_calls()
        pay_started = time.perf_counter()
        mine = shard_indices(missing, ctx)
        if mine.numel():
            with TeacherStore.open(shard_path(path, ctx), *binding) as shard:
                images = teacher_view_images(dataset, cfg.view, torch.device(cfg.device))
                shard.fill(mine, cfg.view, images, teacher, int(mine.numel()), cfg.batch_size, progress)
        barrier()
        merge_started = time.perf_counter()
        paid = 0
        if ctx.is_main:
            with TeacherStore.open(path, *binding) as store:
                merge_shards(store)
                paid = store.paid_calls() - paid_before
        barrier()
    done = time.perf_counter()
    return CacheResult(
        store=path,
        samples=int(ids.numel()),
        paid=paid,
        recovered=recovered,
        world_size=ctx.world_size,
        pay_s=merge_started - pay_started,
        merge_s=done - merge_started,
        wall_s=done - started,
    )
