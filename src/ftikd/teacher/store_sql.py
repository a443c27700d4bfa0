"""The SQLite layer of the teacher store: schema, constants and the locking helpers.

Shared by :mod:`ftikd.teacher.store` (opening, verification, reads), :mod:`ftikd.teacher.store_pay`
(paying) and :mod:`ftikd.teacher.store_merge` (merging shards); see docs/store.md.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftikd.errors import FtikdError

FORMAT_VERSION = "1"
_TABLES = ("meta", "outputs", "features", "ledger")
# Keys lead with the view (and feature name) so that "all rows of a view" is one index range scan;
# uniqueness is the same as PRIMARY KEY (sample, view): a pair can be stored only once.
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE outputs (sample INTEGER NOT NULL, view INTEGER NOT NULL, logits BLOB NOT NULL, "
    "PRIMARY KEY (view, sample)) WITHOUT ROWID",
    "CREATE TABLE features (sample INTEGER NOT NULL, view INTEGER NOT NULL, name TEXT NOT NULL, "
    "data BLOB NOT NULL, PRIMARY KEY (view, name, sample)) WITHOUT ROWID",
    "CREATE TABLE ledger (id INTEGER PRIMARY KEY, time REAL NOT NULL, calls INTEGER NOT NULL, note TEXT)",
)
# The columns each table must have; a foreign database with tables of these names is refused on open.
_COLUMNS = {
    "meta": {"key", "value"},
    "outputs": {"sample", "view", "logits"},
    "features": {"sample", "view", "name", "data"},
    "ledger": {"id", "time", "calls", "note"},
}
# Requests up to this size are read with keyed lookups; larger ones scan the whole view once.
_KEYED_READ_MAX = 4096
_IN_CHUNK = 500
# A writer waits this long per attempt for the write lock, and gives up only after the lock holder
# has made no progress (no new ledger rows) for _STALL_S.
_BUSY_TIMEOUT_S = 10.0
_STALL_S = 600.0


def _as_index(samples: Any) -> np.ndarray:
    """Sample ids as a 1-D int64 numpy array (accepts Tensor, ndarray or a sequence of ints)."""
    if isinstance(samples, torch.Tensor):
        if samples.is_floating_point() or samples.is_complex():
            raise TypeError(f"sample ids must be integers, got a {samples.dtype} tensor")
        arr = samples.detach().to("cpu").numpy()
    else:
        arr = np.asarray(samples)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"sample ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"sample ids must be 1-D, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _unique_in_order(ids: np.ndarray) -> np.ndarray:
    """Distinct ids in order of first appearance."""
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _shown(text: str) -> str:
    """A stored name as it appears in a one-line message: as is when printable, else its repr."""
    return text if text.isprintable() else repr(text)


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def _shapes_from_json(raw: str) -> dict[str, tuple[int, ...]]:
    """Parse the ``feature_shapes`` meta value; ValueError when it is not {name: [dims]}."""
    shapes = json.loads(raw)
    if not isinstance(shapes, dict):
        raise ValueError("feature_shapes is not a mapping")
    out: dict[str, tuple[int, ...]] = {}
    for name, dims in shapes.items():
        if not isinstance(dims, list) or not all(type(d) is int and d >= 0 for d in dims):
            raise ValueError(f"feature {name!r} has shape {dims!r}")
        out[name] = tuple(dims)
    return out


def _is_busy(e: sqlite3.OperationalError) -> bool:
    name = getattr(e, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(e) or "busy" in str(e)


def _begin_write(conn: sqlite3.Connection, path: Path, progress: Callable[[], int] | None = None) -> None:
    """``BEGIN IMMEDIATE``, waiting as long as the current lock holder keeps making progress."""
    last = progress() if progress is not None else None
    since = time.monotonic()
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if not _is_busy(e):
                raise
        now = progress() if progress is not None else None
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > _STALL_S:
            raise FtikdError(
                f"store {path} has been locked by another process for over {_STALL_S:.0f}s without progress; "
                f"wait for it to finish or use a different --store path"
            )


def _ensure_wal(conn: sqlite3.Connection, path: Path) -> str:
    """Switch the database to WAL journaling if it is not already; returns the journal mode.

    Asking for WAL on a database that already uses it can still wait for a lock held by another
    process's long write transaction (ours hold the lock while the teacher runs), so the mode is
    read first and a busy answer is retried for as long as a writer may legitimately hold the lock.
    """
    since = time.monotonic()
    while True:
        try:
            mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode != "wal":
                mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
            return mode
        except sqlite3.OperationalError as e:
            if not _is_busy(e) or time.monotonic() - since > _STALL_S:
                raise
            time.sleep(0.05)
