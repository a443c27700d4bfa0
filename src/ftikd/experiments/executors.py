"""Where sweep runs execute: a local process pool (default) or Ray tasks on a cluster.

Local: each of ``workers`` processes claims runs from the results database, one at a time, until
none is left, with ``torch.set_num_threads(max(1, cores // workers))`` so the pool does not
oversubscribe the cores. A background thread refreshes the claim's heartbeat while a run trains.
Two sweeps on one database simply share the claims. Ray: the driver claims runs, submits each as a
Ray task (``num_cpus`` per task) that returns its record, and writes that record to the database,
so the database never has to be reachable from the cluster nodes (the sweep folder, with its
teachers, stores and checkpoints, must be: a shared file system).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftikd.errors import FtikdError
from ftikd.experiments.db import DEFAULT_STALE_S, ResultsDB, worker_id
from ftikd.experiments.sweep_progress import SweepProgress


@dataclass
class ExecOptions:
    """How runs execute: pool size, display, retry of failed runs, claim liveness timings."""

    workers: int = 1
    progress: bool = True
    retry_failed: bool = False
    heartbeat_s: float = 10.0
    stale_s: float = DEFAULT_STALE_S
    cpus_per_run: int = 1


_DATASETS: dict[tuple[str, str | None], Any] = {}


def execute(job_config: dict[str, Any], on_resume: Any = None) -> dict[str, Any]:
    """Run one sweep job (train its teacher first if missing) and return its run record.

    ``resume=True``: a run whose record exists returns it, one with a checkpoint continues from it.
    The dataset is loaded once per process and reused by its later runs.
    """
    from ftikd.data import load_dataset
    from ftikd.experiments.run import RunConfig, RunPaths, run_distillation
    from ftikd.experiments.sweep import ensure_teacher

    cfg = RunConfig.from_dict(job_config["run"])
    if cfg.teacher:
        ensure_teacher(cfg.teacher, job_config.get("teacher_recipe"))
    if on_resume is not None and RunPaths.of(cfg).state.exists():
        on_resume()
    where = (cfg.dataset, cfg.data_dir)
    if where not in _DATASETS:
        _DATASETS[where] = load_dataset(cfg.dataset, cfg.data_dir)
    return run_distillation(cfg, dataset=_DATASETS[where], progress=False, resume=True).record


def _one_line(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}".replace("\n", " ")[:500]


class _Heartbeat:
    """A daemon thread refreshing one claim's heartbeat every ``period`` seconds (own connection)."""

    def __init__(self, db_path: Path, key: str, claimer: str, period: float) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(db_path, key, claimer, period), daemon=True)
        self.thread.start()

    def _beat(self, db_path: Path, key: str, claimer: str, period: float) -> None:
        with ResultsDB(db_path) as db:
            while not self.stop.wait(period):
                db.heartbeat(key, claimer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def worker_loop(
    db_path: str | Path, sweep: str, opts: ExecOptions, threads: int | None = None, parent: int | None = None
) -> int:
    """Claim and run jobs of ``sweep`` until none is left; returns how many this worker finished.

    With ``parent`` (the sweep's pid), a worker whose sweep died (even by SIGKILL) finishes the run
    it holds and claims no more, so an orphaned pool does not go on running the sweep alone.
    """
    import json

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    claimer, finished = worker_id(), 0
    with ResultsDB(db_path) as db:
        while (parent is None or os.getppid() == parent) and (
            row := db.claim(sweep, claimer, opts.stale_s, opts.retry_failed)
        ) is not None:
            beat = _Heartbeat(Path(db_path), row["key"], claimer, opts.heartbeat_s)
            try:
                record = execute(json.loads(row["config"]), on_resume=lambda k=row["key"]: db.mark_resumed(k))
            except Exception as exc:  # a failed run is recorded and the sweep goes on
                db.fail(row["key"], _one_line(exc))
                continue
            finally:
                beat.close()
            db.finish(row["key"], record)
            finished += 1
    return finished


def worker_threads(workers: int) -> int:
    """Torch threads per worker: ``max(1, cores // workers)``, capped by ``OMP_NUM_THREADS`` when set.

    Splitting the cores keeps N workers from oversubscribing them (spinning OpenMP threads on a busy
    machine slow every run many times over); the cap lets a shared machine ask for fewer.
    """
    threads = max(1, (os.cpu_count() or 1) // workers)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) > 0 else threads


def _exit_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM raise SystemExit here (so the pool's ``finally`` stops the workers, as Ctrl-C
    does); returns what puts the previous handler back. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_local(db_path: Path, sweep: str, opts: ExecOptions) -> None:
    """Run the sweep's jobs here: in this process for one worker, else in ``workers`` spawned processes."""
    import multiprocessing

    threads = worker_threads(opts.workers)
    bar = SweepProgress(db_path, sweep, opts.progress, workers=opts.workers)
    bar.update()
    if opts.workers == 1:
        progress_thread = _Ticker(bar)
        try:
            worker_loop(db_path, sweep, opts, threads)
        finally:
            progress_thread.close()
        bar.close()
        return
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=worker_loop, args=(str(db_path), sweep, opts, threads, os.getpid()))
        for _ in range(opts.workers)
    ]
    for p in procs:
        p.start()
    restore = _exit_on_sigterm()
    try:
        while any(p.is_alive() for p in procs):
            bar.update()
            for p in procs:
                p.join(timeout=2.0 / len(procs))
    finally:
        restore()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    bar.close()


class _Ticker:
    """Calls ``bar.update()`` every few seconds from a daemon thread while the in-process worker runs."""

    def __init__(self, bar: SweepProgress, period: float = 5.0) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._tick, args=(bar, period), daemon=True)
        self.thread.start()

    def _tick(self, bar: SweepProgress, period: float) -> None:
        while not self.stop.wait(period):
            bar.update()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def _ray_task(job_config: dict[str, Any], threads: int) -> dict[str, Any]:
    """Body of a Ray task: one run with ``threads`` torch threads; its record goes back to the driver."""
    import torch

    torch.set_num_threads(threads)
    return execute(job_config)


def run_ray(db_path: Path, sweep: str, opts: ExecOptions, address: str | None) -> None:
    """Run the sweep as Ray tasks; the driver claims, heartbeats and records (see the module docstring)."""
    import json

    try:
        import ray
    except ImportError:
        raise FtikdError("the ray executor needs ray: pip install 'ftikd[ray]' (or 'ray>=2.9')") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=opts.cpus_per_run)(_ray_task)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // opts.cpus_per_run))
    claimer = worker_id()
    bar = SweepProgress(db_path, sweep, opts.progress, workers=slots)
    in_flight: dict[Any, str] = {}
    last_beat = time.monotonic()
    with ResultsDB(db_path) as db:
        while True:
            while len(in_flight) < slots and (
                row := db.claim(sweep, claimer, opts.stale_s, opts.retry_failed)
            ):
                in_flight[task.remote(json.loads(row["config"]), opts.cpus_per_run)] = row["key"]
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=min(opts.heartbeat_s, 5.0))
            for ref in ready:
                key = in_flight.pop(ref)
                try:
                    db.finish(key, ray.get(ref))
                except Exception as exc:  # the task raised: record it, keep going
                    db.fail(key, _one_line(getattr(exc, "cause", None) or exc))
            if time.monotonic() - last_beat >= opts.heartbeat_s:
                for key in in_flight.values():
                    db.heartbeat(key, claimer)
                last_beat = time.monotonic()
            bar.update()
    bar.close()


def run_jobs(db_path: Path, sweep: str, executor: str, opts: ExecOptions, address: str | None = None) -> None:
    """Dispatch to :func:`run_local` or :func:`run_ray`."""
    if executor == "ray":
        run_ray(db_path, sweep, opts, address)
    else:
        run_local(db_path, sweep, opts)
