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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ftikd.errors import FtikdError
from ftikd.fileio import fsync_dir
from ftikd.teacher import store_sql as sql
from ftikd.teacher.store_merge import StoreMerging
from ftikd.teacher.store_pay import StorePaying


class TeacherStore(StorePaying, StoreMerging):
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
            mode = sql._ensure_wal(conn, p)
            if mode != "wal":
                raise FtikdError(f"store {p} cannot use WAL journaling (mode {mode}); put it on a local disk")
            conn.execute("PRAGMA synchronous=FULL")
            if not sql._tables(conn):
                # Create all tables and the meta rows in one transaction: a failure leaves no
                # half-initialised store, and a concurrent opener waits and then sees the full store.
                sql._begin_write(conn, p)
                try:
                    if not sql._tables(conn):
                        initialising = True
                        for stmt in sql._SCHEMA:
                            conn.execute(stmt)
                        meta = {
                            "format_version": sql.FORMAT_VERSION,
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
                    meta = cls._read_meta(conn, p, sql._tables(conn))
                finally:
                    conn.execute("COMMIT")
                cls._verify(p, meta, fingerprint, dataset, num_classes, names)
                if max_calls is not None and meta.get("max_calls") != str(int(max_calls)):
                    meta["max_calls"] = str(int(max_calls))
                    sql._begin_write(conn, p)
                    conn.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES ('max_calls', ?)",
                        (meta["max_calls"],),
                    )
                    conn.execute("COMMIT")
        except (
            sqlite3.DatabaseError,
            UnicodeDecodeError,
        ) as e:  # a text value that is not UTF-8 is corruption too
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
            return sqlite3.connect(str(p), timeout=sql._BUSY_TIMEOUT_S, isolation_level=None)
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
            if isinstance(e, sqlite3.OperationalError) and sql._is_busy(e):
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
        absent = [t for t in sql._TABLES if t not in tables]
        if absent:
            raise cls._corrupt(p, f"missing tables {absent}")
        for table, need_cols in sql._COLUMNS.items():
            lacking_cols = sorted(need_cols - sql._columns(conn, table))
            if lacking_cols:
                raise cls._corrupt(p, f"table {table} lacks columns {lacking_cols}")
        meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        need = ("format_version", "fingerprint", "dataset", "num_classes", "feature_names", "feature_shapes")
        lacking = [k for k in need if k not in meta]
        if lacking:
            raise cls._corrupt(p, f"meta lacks {lacking}")
        if meta["format_version"] != sql.FORMAT_VERSION:
            raise FtikdError(
                f"store {p} has format version {sql._shown(meta['format_version'])} but this ftikd reads "
                f"version {sql.FORMAT_VERSION}; use a different --store path"
            )
        try:
            names = json.loads(meta["feature_names"])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("feature_names is not a list of names")
            sql._shapes_from_json(meta["feature_shapes"])
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
                f"store {p} was written by teacher {sql._shown(meta['fingerprint'])} but this teacher is "
                f"{sql._shown(fingerprint)}; use a different --store path"
            )
        if meta["dataset"] != str(dataset):
            raise FtikdError(
                f"store {p} holds outputs for dataset {meta['dataset']!r}, not {dataset!r}; "
                f"use a different --store path"
            )
        if int(meta["num_classes"]) != int(num_classes):
            raise FtikdError(
                f"store {p} holds {sql._shown(meta['num_classes'])}-class logits but {num_classes} classes "
                f"were expected; use a different --store path"
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
        if uniq.size <= sql._KEYED_READ_MAX:
            found: list[int] = []
            for start in range(0, uniq.size, sql._IN_CHUNK):
                chunk = uniq[start : start + sql._IN_CHUNK].tolist()
                marks = ",".join("?" * len(chunk))
                query = f"SELECT sample FROM outputs WHERE view=? AND sample IN ({marks})"
                found.extend(r[0] for r in self._conn.execute(query, (int(view), *chunk)))
            return np.asarray(found, dtype=np.int64)
        rows = self._conn.execute("SELECT sample FROM outputs WHERE view=?", (int(view),)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _missing_np(self, ids: np.ndarray, view: int) -> np.ndarray:
        uniq = sql._unique_in_order(ids)
        if uniq.size == 0:
            return uniq
        return uniq[~np.isin(uniq, self._stored_among(uniq, view))]

    def missing(self, samples: Any, view: int) -> torch.Tensor:
        """Distinct sample ids (int64, in first-appearance order) with no stored output for ``view``."""
        ids = sql._as_index(samples)
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
            return sql._shapes_from_json(row[0])
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
        if uniq.size <= sql._KEYED_READ_MAX:
            rows: list[tuple[int, bytes]] = []
            for start in range(0, uniq.size, sql._IN_CHUNK):
                chunk = uniq[start : start + sql._IN_CHUNK].tolist()
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
        ids = sql._as_index(samples)
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
            lacking = sql._unique_in_order(ids[~found])
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
