"""Live tracking of a run's metrics in TensorBoard or MLflow (optional extras).

``RunConfig.track`` names the trackers ("tensorboard", "mlflow" or both, comma-separated). Each
pseudo-epoch record of the engine's history is logged at step = epoch, and the run's final metrics
once at the end. Where the logs go:

- TensorBoard: ``<out>/tensorboard/<run>/`` (``tensorboard --logdir <out>``); flushed every epoch.
- MLflow: ``$MLFLOW_TRACKING_URI`` when set, else the SQLite store ``<out>/mlflow.db``
  (``mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db``), experiment ``$MLFLOW_EXPERIMENT_NAME``
  or ``ftikd``. MLflow 3 refuses its old ``mlruns/`` file store by default, hence SQLite.

Both libraries are imported only when asked for; a missing one is a one-line :class:`FtikdError`
naming the extra to install, raised by :func:`check_trackers` before any teacher call.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from ftikd.errors import FtikdError

TRACKERS = ("tensorboard", "mlflow")
# modules each tracker needs; the SQLite store needs SQLAlchemy and Alembic besides the client
_REQUIRED = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow",)}
_SQLITE_STORE = ("sqlalchemy", "alembic")
# the history key used as the step, not logged as a metric (flags such as ``improved`` are bools)
_NOT_METRICS = {"epoch"}


class Tracker(Protocol):
    """Where a run's metrics go while it trains."""

    def log_epoch(self, record: dict[str, Any]) -> None: ...

    def log_final(self, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def parse_track(spec: str) -> tuple[str, ...]:
    """``""`` -> no tracker, ``"tensorboard,mlflow"`` -> both; an unknown name is a user error."""
    names = tuple(dict.fromkeys(part.strip().lower() for part in spec.split(",") if part.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise FtikdError(
            f"unknown tracker(s) {', '.join(map(repr, unknown))} in track={spec!r}; "
            f"use {' and/or '.join(TRACKERS)}, comma-separated"
        )
    return names


def check_trackers(names: Iterable[str]) -> None:
    """Refuse a tracker whose package is not installed (one line naming the ftikd extra)."""
    for name in names:
        modules = _REQUIRED[name]
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            modules += _SQLITE_STORE
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError:
                raise FtikdError(
                    f"--track {name} needs the {module!r} package: pip install 'ftikd[{name}]'"
                ) from None


def epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one history record (accuracies, loss terms, LR, phase, time), flags left out."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in _NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)
    }


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A run config flattened to ``train.lr``-style keys and string values (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flat_params(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


class TensorBoardTracker:
    """Scalars per pseudo-epoch into ``log_dir`` (``final/*`` at the last step), the config as text."""

    def __init__(self, log_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=1, default=str)}\n```")
        self.step = 0

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.step = int(record["epoch"])
        for key, value in epoch_metrics(record).items():
            self.writer.add_scalar(key, value, self.step)
        self.writer.flush()  # visible to a watching TensorBoard now, not in two minutes

    def log_final(self, metrics: dict[str, Any]) -> None:
        for key, value in epoch_metrics(metrics).items():
            self.writer.add_scalar(f"final/{key}", value, self.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run per ftikd run: config as params, epoch metrics at step = epoch, final metrics.

    Uses ``MlflowClient`` (no global active run), so runs in one process never mix. The store and
    experiment are created under a file lock (beside a SQLite database, else in ``out``) so that
    parallel sweep workers do not race to create the same database or experiment.
    """

    def __init__(self, out: Path, run_name: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        out.mkdir(parents=True, exist_ok=True)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ftikd"
        db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        with open(db.with_name(db.name + ".lock") if db else out / ".mlflow.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                artifacts = (out / "mlartifacts").resolve().as_uri()
                experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_params(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.step, self.finished = 0, False

    def _log(self, values: dict[str, float], prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}{k}", v, now, self.step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.step = int(record["epoch"])
        self._log(epoch_metrics(record))

    def log_final(self, metrics: dict[str, Any]) -> None:
        self._log(epoch_metrics(metrics), "final/")
        self.finished = True

    def close(self) -> None:
        """End the MLflow run: FINISHED after :meth:`log_final`, FAILED if the run stopped before."""
        self.client.set_terminated(self.run_id, "FINISHED" if self.finished else "FAILED")


class Trackers:
    """Several trackers behind one :class:`Tracker`.

    A tracker that fails while logging (an MLflow server gone, a full disk) is dropped with one
    warning: losing the live view must not cost the run it watches.
    """

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # any library error: warn, stop using this tracker
                self.trackers.remove(tracker)
                warnings.warn(
                    f"{type(tracker).__name__} stopped logging ({exc.__class__.__name__}: {exc})",
                    stacklevel=3,
                )

    def log_epoch(self, record: dict[str, Any]) -> None:
        self._each(lambda t: t.log_epoch(record))

    def log_final(self, metrics: dict[str, Any]) -> None:
        self._each(lambda t: t.log_final(metrics))

    def close(self) -> None:
        self._each(lambda t: t.close())
        self.trackers = []


def open_trackers(names: Iterable[str], out: str | Path, run_name: str, config: dict[str, Any]) -> Trackers:
    """Start the named trackers for one run writing under ``out`` (see the module docstring)."""
    out = Path(out)
    opened = Trackers([])
    try:
        for name in names:
            if name == "tensorboard":
                opened.trackers.append(TensorBoardTracker(out / "tensorboard" / run_name, config))
            else:
                opened.trackers.append(MLflowTracker(out, run_name, config))
    except BaseException:
        opened.close()
        raise
    return opened


def compose(*callbacks: Callable[[dict], None] | None) -> Callable[[dict], None] | None:
    """One epoch callback calling each given one in order; None when none is given."""
    given = [c for c in callbacks if c is not None]
    if not given:
        return None

    def each(record: dict) -> None:
        for callback in given:
            callback(record)

    return each
