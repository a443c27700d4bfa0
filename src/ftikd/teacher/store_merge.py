"""Merging shard stores: the half of :class:`~ftikd.teacher.store.TeacherStore` that copies stores.

Data-parallel caching pays into one shard per rank; rank 0 merges them here in one transaction per
shard, refusing a shard of another teacher, dataset, class count or feature set (docs/store.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ftikd.errors import FtikdError
from ftikd.teacher import store_sql as sql

if TYPE_CHECKING:
    from ftikd.teacher.store import TeacherStore


class StoreMerging:
    """Mixin of :class:`~ftikd.teacher.store.TeacherStore`: ``merge_from`` and its checks."""

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
        src = Path(shard.path if isinstance(shard, StoreMerging) else shard)
        if not src.is_file():
            raise FtikdError(f"shard store {src} does not exist; check the path")
        if src.resolve() == self.path.resolve():
            raise FtikdError(f"cannot merge store {src} into itself; pass a different shard store")
        shard_id = self._shard_id(src)
        conn = self._conn
        with self._db():
            conn.execute("ATTACH DATABASE ? AS shard", (str(src),))
            try:
                sql._begin_write(conn, self.path, self.paid_calls)
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
                meta = self._read_meta(conn, src, sql._tables(conn))
            finally:
                conn.execute("COMMIT")
            self._check_same_binding(src, meta)
            if "store_id" not in meta:
                sql._begin_write(conn, src)
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
                    f"shard {src} holds {what} {sql._shown(theirs)} but store {self.path} holds "
                    f"{sql._shown(mine)}; "
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
            theirs = sql._shapes_from_json(row[0]) if row is not None else {}
        except (ValueError, TypeError, RecursionError) as e:
            raise self._corrupt(src, f"unreadable feature_shapes meta: {e}") from e
        for name, shape in theirs.items():
            if mine.setdefault(name, shape) != shape:
                raise FtikdError(
                    f"shard {src} has feature {sql._shown(name)} of per-sample shape {shape} but store "
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
