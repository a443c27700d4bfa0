"""TeacherStore: the durable, budget-enforcing cache of teacher outputs.

Teacher outputs reach training only through this store, so the store is where the teacher-call
budget is enforced and where every paid call is made durable. Design (see docs/store.md):

* one SQLite file in WAL mode with ``synchronous=FULL``: each committed batch survives a crash or
  ``kill -9``; readers never block the writer;
* ``fill`` pays for one batch of missing ``(sample, view)`` pairs at a time and commits its logits,
  features and ledger row in one transaction before calling the teacher again, so a crash loses at
  most the batch in flight and a rerun pays only for what is missing;
* the write transaction is ``BEGIN IMMEDIATE`` and re-checks what is missing (and the lifetime
  ``max_calls`` cap) under the lock, so concurrent fillers never pay twice for a sample nor exceed the
  cap together. The teacher is called while holding the write lock: simple and correct, at the cost
  of serialising concurrent fillers of the same store.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ftikd.errors import BudgetExceededError, FtikdError
from ftikd.fileio import fsync_dir
from ftikd.teacher.teacher import Teacher, TeacherOutputError, coerce_output

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


class TeacherStore:
    """Durable cache of teacher outputs for one teacher version and one dataset.

    Create with :meth:`open`. Outputs are keyed by ``(sample, view)``: ``sample`` is the training
    index, ``view`` numbers one augmented rendering of it (the caller decides what a view is).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, meta: dict[str, str]) -> None:
        self._conn = conn
        self.path = path
        self.fingerprint = meta["fingerprint"]
        self.dataset = meta["dataset"]
        self.num_classes = int(meta["num_classes"])
        self.feature_names: tuple[str, ...] = tuple(json.loads(meta["feature_names"]))
        self.max_calls: int | None = int(meta["max_calls"]) if meta.get("max_calls") else None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        fingerprint: str,
        dataset: str,
        num_classes: int,
        feature_names: Iterable[str] = (),
        max_calls: int | None = None,
    ) -> TeacherStore:
        """Open the store at ``path``, creating it (and its directory) if missing.

        An existing store must have been written by the same teacher (``fingerprint``) for the same
        ``dataset`` and ``num_classes``, and keep every requested feature. ``max_calls``, if given,
        sets the store's lifetime cap on paid teacher calls (kept for later opens).
        """
        p = Path(path)
        names = tuple(feature_names)
        if max_calls is not None and max_calls < 0:
            raise ValueError("max_calls must be >= 0")
        if p.is_dir():
            raise FtikdError(
                f"store path {p} is a directory; pass a file path such as {p / 'teacher.sqlite'}"
            )
        p.parent.mkdir(parents=True, exist_ok=True)
        conn = cls._connect(p)
        initialising = False
        try:
            mode = _ensure_wal(conn, p)
            if mode != "wal":
                raise FtikdError(f"store {p} cannot use WAL journaling (mode {mode}); put it on a local disk")
            conn.execute("PRAGMA synchronous=FULL")
            if not _tables(conn):
                # Create all tables and the meta rows in one transaction: a failure leaves no
                # half-initialised store, and a concurrent opener waits and then sees the full store.
                _begin_write(conn, p)
                try:
                    if not _tables(conn):
                        initialising = True
                        for stmt in _SCHEMA:
                            conn.execute(stmt)
                        meta = {
                            "format_version": FORMAT_VERSION,
                            "fingerprint": str(fingerprint),
                            "dataset": str(dataset),
                            "num_classes": str(int(num_classes)),
                            "feature_names": json.dumps(list(names)),
                            "feature_shapes": json.dumps({}),
                            "created": str(time.time()),
                            "store_id": uuid.uuid4().hex,
                        }
                        if max_calls is not None:
                            meta["max_calls"] = str(int(max_calls))
                        conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", sorted(meta.items()))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            if not initialising:
                conn.execute("BEGIN")  # one consistent read snapshot; readers never wait in WAL mode
                try:
                    meta = cls._read_meta(conn, p, _tables(conn))
                finally:
                    conn.execute("COMMIT")
                cls._verify(p, meta, fingerprint, dataset, num_classes, names)
                if max_calls is not None and meta.get("max_calls") != str(int(max_calls)):
                    meta["max_calls"] = str(int(max_calls))
                    _begin_write(conn, p)
                    conn.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES ('max_calls', ?)",
                        (meta["max_calls"],),
                    )
                    conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            conn.close()
            if initialising:
                cls.remove_files(p)
            raise cls._corrupt(p, str(e)) from e
        except BaseException:
            conn.close()
            if initialising:
                cls.remove_files(p)
            raise
        if initialising:
            fsync_dir(p.parent)
        return cls(conn, p, meta)

    @classmethod
    def _connect(cls, p: Path) -> sqlite3.Connection:
        """An autocommit connection to ``p`` (created if missing), refusing a file that is not SQLite."""
        try:
            if p.exists() and p.stat().st_size > 0:
                with open(p, "rb") as f:
                    if f.read(16) != b"SQLite format 3\x00":
                        raise cls._corrupt(p, "not an SQLite file")
            return sqlite3.connect(str(p), timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise FtikdError(f"cannot open store {p}: {e}; check the path and its permissions") from e

    @staticmethod
    def _corrupt(p: Path, why: str) -> FtikdError:
        why = " ".join(why.split())  # one line, whatever the SQLite or JSON message held
        return FtikdError(
            f"store {p} is not a valid ftikd teacher store ({why}); delete it or use a different --store path"
        )

    @contextlib.contextmanager
    def _db(self) -> Iterator[None]:
        """Turn SQLite errors while using an open store into one-line errors naming the store.

        A store damaged after it was opened (truncated, overwritten, tables altered) fails here
        rather than with a raw ``sqlite3`` exception.
        """
        try:
            yield
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and _is_busy(e):
                raise FtikdError(
                    f"store {self.path} is locked by another process ({e}); wait for it to finish "
                    f"or use a different --store path"
                ) from e
            raise self._corrupt(self.path, str(e)) from e

    @staticmethod
    def remove_files(path: str | os.PathLike[str]) -> None:
        """Delete a store's file and its WAL side files (close every connection to it first)."""
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(str(path) + suffix)
            except FileNotFoundError:
                pass

    @classmethod
    def _read_meta(cls, conn: sqlite3.Connection, p: Path, tables: set[str]) -> dict[str, str]:
        absent = [t for t in _TABLES if t not in tables]
        if absent:
            raise cls._corrupt(p, f"missing tables {absent}")
        for table, need_cols in _COLUMNS.items():
            lacking_cols = sorted(need_cols - _columns(conn, table))
            if lacking_cols:
                raise cls._corrupt(p, f"table {table} lacks columns {lacking_cols}")
        meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        need = ("format_version", "fingerprint", "dataset", "num_classes", "feature_names", "feature_shapes")
        lacking = [k for k in need if k not in meta]
        if lacking:
            raise cls._corrupt(p, f"meta lacks {lacking}")
        if meta["format_version"] != FORMAT_VERSION:
            raise FtikdError(
                f"store {p} has format version {_shown(meta['format_version'])} but this ftikd reads version "
                f"{FORMAT_VERSION}; use a different --store path"
            )
        try:
            names = json.loads(meta["feature_names"])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("feature_names is not a list of names")
            _shapes_from_json(meta["feature_shapes"])
            if int(meta["num_classes"]) < 1:
                raise ValueError("num_classes < 1")
            if meta.get("max_calls") and int(meta["max_calls"]) < 0:
                raise ValueError("max_calls < 0")
        except (ValueError, RecursionError) as e:
            raise cls._corrupt(p, f"unreadable meta: {e}") from e
        return meta

    @staticmethod
    def _verify(
        p: Path, meta: dict[str, str], fingerprint: str, dataset: str, num_classes: int, names: Sequence[str]
    ) -> None:
        if meta["fingerprint"] != str(fingerprint):
            raise FtikdError(
                f"store {p} was written by teacher {_shown(meta['fingerprint'])} but this teacher is "
                f"{_shown(fingerprint)}; use a different --store path"
            )
        if meta["dataset"] != str(dataset):
            raise FtikdError(
                f"store {p} holds outputs for dataset {meta['dataset']!r}, not {dataset!r}; "
                f"use a different --store path"
            )
        if int(meta["num_classes"]) != int(num_classes):
            raise FtikdError(
                f"store {p} holds {_shown(meta['num_classes'])}-class logits but {num_classes} classes were "
                f"expected; use a different --store path"
            )
        kept = set(json.loads(meta["feature_names"]))
        extra = [n for n in names if n not in kept]
        if extra:
            raise FtikdError(
                f"store {p} keeps features {sorted(kept)} but this run needs {extra} too; "
                f"use a different --store path"
            )

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the database connection (committed data is already durable)."""
        self._conn.close()

    def __enter__(self) -> TeacherStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TeacherStore({str(self.path)!r}, fingerprint={self.fingerprint!r}, dataset={self.dataset!r})"

    # ------------------------------------------------------------------ queries

    def _stored_among(self, uniq: np.ndarray, view: int) -> np.ndarray:
        """Which of the distinct ids ``uniq`` have stored outputs for ``view`` (ids, any order)."""
        if uniq.size <= _KEYED_READ_MAX:
            found: list[int] = []
            for start in range(0, uniq.size, _IN_CHUNK):
                chunk = uniq[start : start + _IN_CHUNK].tolist()
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT sample FROM outputs WHERE view=? AND sample IN ({marks})"
                found.extend(r[0] for r in self._conn.execute(sql, (int(view), *chunk)))
            return np.asarray(found, dtype=np.int64)
        rows = self._conn.execute("SELECT sample FROM outputs WHERE view=?", (int(view),)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _missing_np(self, ids: np.ndarray, view: int) -> np.ndarray:
        uniq = _unique_in_order(ids)
        if uniq.size == 0:
            return uniq
        return uniq[~np.isin(uniq, self._stored_among(uniq, view))]

    def missing(self, samples: Any, view: int) -> torch.Tensor:
        """Distinct sample ids (int64, in first-appearance order) with no stored output for ``view``."""
        ids = _as_index(samples)
        with self._db():
            return torch.from_numpy(self._missing_np(ids, view).copy())

    def count(self, view: int | None = None) -> int:
        """Number of stored outputs, for one view or all."""
        with self._db():
            if view is None:
                return int(self._conn.execute("SELECT COUNT(*) FROM outputs").fetchone()[0])
            return int(
                self._conn.execute("SELECT COUNT(*) FROM outputs WHERE view=?", (int(view),)).fetchone()[0]
            )

    def paid_calls(self) -> int:
        """Teacher calls paid over the store's lifetime (sum of the ledger)."""
        with self._db():
            return int(self._conn.execute("SELECT COALESCE(SUM(calls), 0) FROM ledger").fetchone()[0])

    def ledger(self) -> list[tuple[int, float, int, str]]:
        """All ledger rows ``(id, time, calls, note)``, oldest first."""
        with self._db():
            rows = self._conn.execute("SELECT id, time, calls, note FROM ledger ORDER BY id").fetchall()
        return [tuple(r) for r in rows]

    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each stored feature (known once a batch has been stored)."""
        with self._db():
            row = self._conn.execute("SELECT value FROM meta WHERE key='feature_shapes'").fetchone()
        try:
            if row is None:
                raise ValueError("no feature_shapes entry")
            return _shapes_from_json(row[0])
        except (ValueError, TypeError, RecursionError) as e:
            raise self._corrupt(self.path, f"unreadable feature_shapes meta: {e}") from e

    def _read_blobs(
        self, ids: np.ndarray, view: int, name: str | None, width: int, what: str
    ) -> tuple[np.ndarray, bytes, int]:
        """Stored ``(sample ids, concatenated blobs, row count)`` covering ``ids`` for ``view``."""
        if name is None:
            base, extra = "SELECT sample, logits FROM outputs WHERE view=?", ()
        else:
            base, extra = "SELECT sample, data FROM features WHERE view=? AND name=?", (name,)
        uniq = np.unique(ids)
        if uniq.size <= _KEYED_READ_MAX:
            rows: list[tuple[int, bytes]] = []
            for start in range(0, uniq.size, _IN_CHUNK):
                chunk = uniq[start : start + _IN_CHUNK].tolist()
                marks = ",".join("?" * len(chunk))
                rows.extend(
                    self._conn.execute(f"{base} AND sample IN ({marks})", (int(view), *extra, *chunk))
                )
        else:
            rows = self._conn.execute(base, (int(view), *extra)).fetchall()
        return self._checked_rows(rows, 4 * width, what)

    def _checked_rows(
        self, rows: list[tuple[Any, Any]], nbytes: int, what: str
    ) -> tuple[np.ndarray, bytes, int]:
        """Validate every ``(sample, blob)`` row, then return ``(ids, joined blobs, row count)``.

        Each blob must be exactly ``nbytes`` long: checking only the total would let a short blob and
        a long one cancel out and shift every later row into the wrong sample.
        """
        bad = next(
            (r for r in rows if type(r[0]) is not int or type(r[1]) is not bytes or len(r[1]) != nbytes), None
        )
        if bad is not None:
            got = f"{len(bad[1])} bytes" if type(bad[1]) is bytes else f"a {type(bad[1]).__name__} value"
            raise self._corrupt(self.path, f"{what} of sample {bad[0]!r} has {got}, expected {nbytes} bytes")
        got = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return got, b"".join(r[1] for r in rows), len(rows)

    def _gather(self, samples: Any, view: int, name: str | None, per_sample: tuple[int, ...]) -> np.ndarray:
        ids = _as_index(samples)
        what = "logits" if name is None else f"feature {name!r}"
        width = int(math.prod(per_sample))
        if ids.size == 0:
            return np.zeros((0, *per_sample), dtype=np.float32)
        with self._db():
            got, buf, n = self._read_blobs(ids, view, name, width, what)
        table = np.frombuffer(buf, dtype=np.float32).reshape(n, width)
        order = np.argsort(got, kind="stable")
        sorted_ids = got[order]
        if n > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
            raise self._corrupt(self.path, f"{what} are stored twice for some samples")
        pos = np.searchsorted(sorted_ids, ids)
        clipped = np.minimum(pos, max(n - 1, 0))
        found = (pos < n) & (sorted_ids[clipped] == ids) if n else np.zeros(ids.shape, dtype=bool)
        if not found.all():
            lacking = _unique_in_order(ids[~found])
            example = ", ".join(str(int(s)) for s in lacking[:5])
            raise FtikdError(
                f"store {self.path} has no teacher {what} for {lacking.size} requested samples of "
                f"view {view} (e.g. {example}); call fill for them first"
            )
        return table[order[clipped]].reshape(ids.size, *per_sample)

    def logits(self, samples: Any, view: int, device: str | torch.device | None = None) -> torch.Tensor:
        """Stored logits (B, C) float32 for ``samples`` of ``view``, in the order given."""
        out = torch.from_numpy(self._gather(samples, view, None, (self.num_classes,)))
        return out.to(device) if device is not None else out

    def features(
        self, samples: Any, view: int, name: str, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Stored feature ``name`` (B, ...) float32 for ``samples`` of ``view``, in the order given."""
        if name not in self.feature_names:
            raise FtikdError(
                f"store {self.path} keeps features {list(self.feature_names)}, not {name!r}; "
                f"open a store created with that feature"
            )
        shapes = self.feature_shapes()
        if name not in shapes:
            raise FtikdError(f"store {self.path} has no stored {name!r} features yet; call fill first")
        out = torch.from_numpy(self._gather(samples, view, name, shapes[name]))
        return out.to(device) if device is not None else out

    # ------------------------------------------------------------------ paying

    def fill(
        self,
        samples: Any,
        view: int,
        images_fn: Callable[[torch.Tensor], torch.Tensor],
        teacher: Callable[[torch.Tensor], Any],
        budget: int,
        batch_size: int = 256,
        progress: bool = False,
    ) -> int:
        """Make sure every sample in ``samples`` has a stored output for ``view``; return calls paid now.

        ``budget`` is the number of teacher calls this request may use in total (the run's n): a
        request for more distinct samples than that is refused before any call, as is one that would
        take the store past its lifetime ``max_calls``. Missing samples are paid for in batches of
        ``batch_size``: ``x = images_fn(batch_ids)`` builds the (augmented, normalised) teacher input,
        ``teacher(x)`` is called once, and the batch is committed before the next call.
        """
        if budget < 0:
            raise ValueError("budget must be >= 0")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        view = int(view)
        ids = _as_index(samples)
        needed = int(np.unique(ids).size)
        if needed > budget:
            raise BudgetExceededError(
                f"this run needs {needed} teacher outputs but its budget is {budget}; "
                f"raise the budget or request fewer samples"
            )
        t_fp = getattr(teacher, "fingerprint", None)
        if t_fp is not None and str(t_fp) != self.fingerprint:
            raise FtikdError(
                f"store {self.path} was written by teacher {_shown(self.fingerprint)} but this teacher is "
                f"{_shown(str(t_fp))}; use a different --store path"
            )
        if isinstance(teacher, Teacher) and not set(self.feature_names) <= set(teacher.feature_names):
            teacher = teacher.with_features(
                tuple(dict.fromkeys((*teacher.feature_names, *self.feature_names)))
            )
        with self._db():
            todo = self._missing_np(ids, view)
        if todo.size == 0:
            return 0
        self._check_cap(self.paid_calls(), int(todo.size))

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=int(todo.size), desc="teacher calls", unit="img")
        paid = 0
        try:
            for start in range(0, todo.size, batch_size):
                with self._db():
                    n = self._pay_batch(todo[start : start + batch_size], view, images_fn, teacher)
                paid += n
                if bar is not None:
                    bar.update(n)
        finally:
            if bar is not None:
                bar.close()
        return paid

    def check_cap(self, more: int) -> None:
        """Refuse (BudgetExceededError, zero calls) a plan to pay ``more`` calls past ``max_calls``.

        For callers that pay elsewhere first, e.g. into shard stores merged here later.
        """
        self._check_cap(self.paid_calls(), int(more))

    def _check_cap(self, paid_so_far: int, more: int) -> None:
        if self.max_calls is not None and paid_so_far + more > self.max_calls:
            raise BudgetExceededError(
                f"store {self.path} has paid {paid_so_far} of its lifetime max_calls={self.max_calls} "
                f"teacher calls and this request needs {more} more; raise max_calls or request fewer samples"
            )

    def _pay_batch(
        self,
        batch: np.ndarray,
        view: int,
        images_fn: Callable[[torch.Tensor], torch.Tensor],
        teacher: Callable[[torch.Tensor], Any],
    ) -> int:
        """Pay for and commit one batch under the write lock; return the calls paid."""
        conn = self._conn
        _begin_write(conn, self.path, self.paid_calls)
        try:
            # Re-read under the lock: another process may have stored some of these meanwhile,
            # or changed the cap / paid calls.
            cap = conn.execute("SELECT value FROM meta WHERE key='max_calls'").fetchone()
            self.max_calls = int(cap[0]) if cap else None
            batch = self._missing_np(batch, view)
            if batch.size == 0:
                conn.execute("COMMIT")
                return 0
            self._check_cap(self.paid_calls(), int(batch.size))
            b = int(batch.size)
            x = images_fn(torch.from_numpy(batch.copy()))
            try:
                out = coerce_output(teacher(x), getattr(teacher, "name", "teacher"))
                problem = self._validate(out, b, batch)
            except TeacherOutputError as e:
                problem = str(e)
            if problem is not None:
                # The calls were made (and possibly charged): record them, store no outputs.
                conn.execute(
                    "INSERT INTO ledger(time, calls, note) VALUES (?, ?, ?)",
                    (time.time(), b, f"view={view} refused: {problem}"),
                )
                conn.execute("COMMIT")
                raise FtikdError(
                    f"teacher output refused for samples {self._describe(batch)} (view {view}): {problem}; "
                    f"nothing was stored for that batch (its {b} calls are recorded in the ledger)"
                )
            self._insert(batch, view, out)
            conn.execute(
                "INSERT INTO ledger(time, calls, note) VALUES (?, ?, ?)",
                (time.time(), b, f"view={view} samples={b}"),
            )
            conn.execute("COMMIT")
            return b
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # keep the original error
                    conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _describe(batch: np.ndarray) -> str:
        head = ", ".join(str(int(s)) for s in batch[:8])
        return f"[{head}{', ...' if batch.size > 8 else ''}] ({batch.size} samples)"

    def _validate(self, out: Any, b: int, batch: np.ndarray) -> str | None:
        """A one-line reason the batch's teacher output is unusable, or None."""
        logits = out.logits
        if tuple(logits.shape) != (b, self.num_classes):
            return f"logits have shape {tuple(logits.shape)}, expected ({b}, {self.num_classes})"
        bad = ~torch.isfinite(logits).all(dim=1)
        if bad.any():
            return f"non-finite logits (NaN/inf) for samples {self._describe(batch[bad.cpu().numpy()])}"
        shapes = self._stored_feature_shapes()
        for name in self.feature_names:
            f = out.features.get(name)
            if f is None:
                return f"teacher did not return feature {name!r} that this store keeps"
            if f.dim() < 1 or f.shape[0] != b:
                return f"feature {name!r} has shape {tuple(f.shape)} for a batch of {b}"
            if name in shapes and tuple(f.shape[1:]) != shapes[name]:
                return f"feature {name!r} has per-sample shape {tuple(f.shape[1:])}, store has {shapes[name]}"
            bad = ~torch.isfinite(f.reshape(b, -1)).all(dim=1)
            if bad.any():
                return f"non-finite feature {name!r} for samples {self._describe(batch[bad.cpu().numpy()])}"
        return None

    def _stored_feature_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.feature_shapes()

    def _insert(self, batch: np.ndarray, view: int, out: Any) -> None:
        """Insert one validated batch (inside the caller's transaction)."""
        conn = self._conn
        logits = out.logits.detach().to("cpu", torch.float32).contiguous().numpy()
        conn.executemany(
            "INSERT INTO outputs(sample, view, logits) VALUES (?, ?, ?)",
            ((int(s), view, logits[i].tobytes()) for i, s in enumerate(batch)),
        )
        if not self.feature_names:
            return
        shapes = self._stored_feature_shapes()
        for name in self.feature_names:
            f = out.features[name].detach().to("cpu", torch.float32).contiguous().numpy()
            if name not in shapes:
                shapes[name] = tuple(int(d) for d in f.shape[1:])
            flat = f.reshape(f.shape[0], -1)
            conn.executemany(
                "INSERT INTO features(sample, view, name, data) VALUES (?, ?, ?, ?)",
                ((int(s), view, name, flat[i].tobytes()) for i, s in enumerate(batch)),
            )
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('feature_shapes', ?)",
            (json.dumps({k: list(v) for k, v in shapes.items()}),),
        )

    # ------------------------------------------------------------------ merging

    def merge_from(self, shard: str | os.PathLike[str] | TeacherStore) -> int:
        """Copy a shard store's outputs, features and ledger into this store; return the outputs added.

        The shard must hold the same teacher, dataset, classes and feature names. Everything is copied
        in one transaction: a kill during the merge leaves this store as it was, and merging again
        completes it. A ``(sample, view)`` already stored here keeps its row, so merging never adds a
        sample twice. The shard's ledger rows are appended once each (the shard's ``store_id`` and last
        merged ledger row are remembered here), so merging the same shard again adds nothing: merged
        calls count in :meth:`paid_calls` exactly as if they had been paid into this store. They are
        recorded even past ``max_calls``, because they were already paid; check the plan beforehand with
        :meth:`check_cap`. The shard's files are left in place (see :meth:`remove_files`).
        """
        src = Path(shard.path if isinstance(shard, TeacherStore) else shard)
        if not src.is_file():
            raise FtikdError(f"shard store {src} does not exist; check the path")
        if src.resolve() == self.path.resolve():
            raise FtikdError(f"cannot merge store {src} into itself; pass a different shard store")
        shard_id = self._shard_id(src)
        conn = self._conn
        with self._db():
            conn.execute("ATTACH DATABASE ? AS shard", (str(src),))
            try:
                _begin_write(conn, self.path, self.paid_calls)
                try:
                    added = self._copy_shard(src, shard_id)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):  # keep the original error
                            conn.execute("ROLLBACK")
                    raise
            finally:
                conn.execute("DETACH DATABASE shard")
        return added

    def _shard_id(self, src: Path) -> str:
        """Check that the shard at ``src`` fits this store and return its store id.

        A store created before store ids existed is given one here, so its ledger rows can be told apart.
        """
        conn = self._connect(src)
        try:
            conn.execute("BEGIN")
            try:
                meta = self._read_meta(conn, src, _tables(conn))
            finally:
                conn.execute("COMMIT")
            self._check_same_binding(src, meta)
            if "store_id" not in meta:
                _begin_write(conn, src)
                conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('store_id', ?)", (uuid.uuid4().hex,)
                )
                conn.execute("COMMIT")
            shard_id = str(conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()[0])
        except sqlite3.DatabaseError as e:
            raise self._corrupt(src, str(e)) from e
        finally:
            conn.close()
        with self._db():
            own = self._conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
        if own is not None and own[0] == shard_id:
            raise FtikdError(
                f"shard {src} is a copy of store {self.path} (same store id); "
                f"merge only stores that were filled separately"
            )
        return shard_id

    def _check_same_binding(self, src: Path, meta: dict[str, str]) -> None:
        """Refuse a shard written for another teacher, dataset, class count or feature set."""
        pairs = (
            ("teacher", meta["fingerprint"], self.fingerprint),
            ("dataset", meta["dataset"], self.dataset),
            ("number of classes", meta["num_classes"], str(self.num_classes)),
            ("features", str(sorted(json.loads(meta["feature_names"]))), str(sorted(self.feature_names))),
        )
        for what, theirs, mine in pairs:
            if theirs != mine:
                raise FtikdError(
                    f"shard {src} holds {what} {_shown(theirs)} but store {self.path} holds {_shown(mine)}; "
                    f"merge it into a store with the same {what} (or a new store path)"
                )

    def _copy_shard(self, src: Path, shard_id: str) -> int:
        """Inside the merge transaction: validate the attached shard's rows, then copy them."""
        conn = self._conn
        shapes = self._merged_feature_shapes(src)
        self._check_shard_rows(src, "outputs", "logits", 4 * self.num_classes)
        for name, shape in shapes.items():
            self._check_shard_rows(src, "features", "data", 4 * int(math.prod(shape)), name)
        bad = conn.execute(
            "SELECT id FROM shard.ledger WHERE typeof(calls) != 'integer' OR calls < 0 LIMIT 1"
        ).fetchone()
        if bad is not None:
            raise self._corrupt(src, f"ledger row {bad[0]!r} has an invalid call count")
        added = conn.execute(
            "INSERT OR IGNORE INTO outputs(sample, view, logits) "
            "SELECT sample, view, logits FROM shard.outputs"
        ).rowcount
        conn.executemany(  # only the features validated above; a stored row is kept, as for outputs
            "INSERT OR IGNORE INTO features(sample, view, name, data) "
            "SELECT sample, view, name, data FROM shard.features WHERE name = ?",
            ((name,) for name in shapes),
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('feature_shapes', ?)",
            (json.dumps({k: list(v) for k, v in shapes.items()}),),
        )
        key = f"merged:{shard_id}"
        row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        done = int(row[0]) if row is not None else 0
        rows = conn.execute(
            "SELECT id, time, calls, note FROM shard.ledger WHERE id > ? ORDER BY id", (done,)
        ).fetchall()
        conn.executemany(
            "INSERT INTO ledger(time, calls, note) VALUES (?, ?, ?)",
            ((t, c, f"merged from {src.name}: {note}") for _, t, c, note in rows),
        )
        if rows:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(rows[-1][0])))
        return int(added)

    def _merged_feature_shapes(self, src: Path) -> dict[str, tuple[int, ...]]:
        """This store's feature shapes completed with the shard's; refuses a shape that disagrees."""
        mine = self.feature_shapes()
        row = self._conn.execute("SELECT value FROM shard.meta WHERE key='feature_shapes'").fetchone()
        try:
            theirs = _shapes_from_json(row[0]) if row is not None else {}
        except (ValueError, TypeError, RecursionError) as e:
            raise self._corrupt(src, f"unreadable feature_shapes meta: {e}") from e
        for name, shape in theirs.items():
            if mine.setdefault(name, shape) != shape:
                raise FtikdError(
                    f"shard {src} has feature {_shown(name)} of per-sample shape {shape} but store "
                    f"{self.path} has {mine[name]}; merge it into a store with the same features "
                    f"(or a new store path)"
                )
        return mine

    def _check_shard_rows(
        self, src: Path, table: str, column: str, nbytes: int, name: str | None = None
    ) -> None:
        """Refuse the shard if a row (of feature ``name``) lacks integer keys or a blob of ``nbytes``."""
        where = "name = ? AND " if name is not None else ""
        bad = self._conn.execute(
            f"SELECT sample FROM shard.{table} WHERE {where}(typeof(sample) != 'integer' OR "
            f"typeof(view) != 'integer' OR typeof({column}) != 'blob' OR length({column}) != ?) LIMIT 1",
            (*((name,) if name is not None else ()), nbytes),
        ).fetchone()
        if bad is not None:
            what = "logits" if name is None else f"feature {name!r}"
            raise self._corrupt(src, f"{what} of sample {bad[0]!r} is not {nbytes} bytes of float32")
