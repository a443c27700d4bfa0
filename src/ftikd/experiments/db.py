"""The sweep results database: one SQLite row per run, claimed atomically, surviving kills.

Why SQLite: embedded, no server, and safe for several processes on one machine (or on a shared
file system that honours POSIX locks). The file is in WAL mode (readers never block the writer) and
every connection waits on a busy database instead of failing. A run's row goes
``pending -> running -> done | failed``. A claim is one ``BEGIN IMMEDIATE`` transaction (the
write lock is held from the first read), so two sweeps on one database never take the same run.
A ``running`` row whose claimer died is taken again: on this host when its pid is gone, on any
host when its heartbeat is older than ``stale_s``; the new claimer resumes the run from its
checkpoint (``run_distillation(..., resume=True)``).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftikd.errors import FtikdError

STATUSES = ("pending", "running", "done", "failed")
DEFAULT_STALE_S = 300.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    method TEXT NOT NULL,
    options TEXT NOT NULL,
    pair TEXT NOT NULL,
    dataset TEXT NOT NULL,
    n INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    lr REAL NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    claimed_by TEXT,
    host TEXT,
    pid INTEGER,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    resumed INTEGER NOT NULL DEFAULT 0,
    started REAL,
    finished REAL,
    val_acc REAL,
    test_top1 REAL,
    test_top5 REAL,
    calls_paid INTEGER,
    calls_used INTEGER,
    wall_s REAL,
    record TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep TEXT NOT NULL,
    key TEXT NOT NULL REFERENCES runs(key),
    ord INTEGER NOT NULL,
    PRIMARY KEY (sweep, key)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""


@dataclass(frozen=True)
class JobRow:
    """What the sweep writes for a run before it starts: key, grouping columns and the run config."""

    key: str
    label: str
    method: str
    options: dict[str, Any]
    pair: str
    dataset: str
    n: int
    seed: int
    lr: float
    config: dict[str, Any]


def worker_id() -> str:
    """``host:pid`` of this process, the claimer name written into claimed rows."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (a zombie counts as alive until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ResultsDB:
    """A connection to the results database at ``path`` (created with its schema if missing)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
            self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            with self.transaction() as conn:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise FtikdError(
                f"cannot open results database {self.path} ({exc}); pass a writable --db path"
            ) from None
        self.conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: the write lock is taken before the first read."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def add_jobs(self, sweep: str, jobs: Iterable[JobRow]) -> int:
        """Register ``jobs`` under ``sweep`` (a run known to any sweep keeps its row); return new rows."""
        added = 0
        with self.transaction() as conn:
            for ord_, job in enumerate(jobs):
                cur = conn.execute(
                    "INSERT OR IGNORE INTO runs (key, label, method, options, pair, dataset, n, seed, lr,"
                    " config) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        job.key,
                        job.label,
                        job.method,
                        json.dumps(job.options, sort_keys=True),
                        job.pair,
                        job.dataset,
                        job.n,
                        job.seed,
                        job.lr,
                        json.dumps(job.config, sort_keys=True),
                    ),
                )
                added += cur.rowcount
                conn.execute(
                    "INSERT OR REPLACE INTO sweep_runs (sweep, key, ord) VALUES (?,?,?)",
                    (sweep, job.key, ord_),
                )
        return added

    def drop_unlisted(self, sweep: str, keys: set[str]) -> int:
        """Take out of ``sweep`` its unfinished runs not in ``keys``; return how many.

        A sweep then claims only the runs of its latest grid (a run dropped from the grid, or one a
        staged LR choice skipped, is not run), while finished runs stay in it and their rows stay in
        the database for any sweep that lists them again.
        """
        with self.transaction() as conn:
            stale = [
                r["key"]
                for r in conn.execute(
                    "SELECT r.key FROM runs r JOIN sweep_runs s ON r.key = s.key"
                    " WHERE s.sweep = ? AND r.status != 'done'",
                    (sweep,),
                )
                if r["key"] not in keys
            ]
            conn.executemany(
                "DELETE FROM sweep_runs WHERE sweep = ? AND key = ?", [(sweep, key) for key in stale]
            )
        return len(stale)

    def claim(
        self,
        sweep: str,
        claimer: str | None = None,
        stale_s: float = DEFAULT_STALE_S,
        retry_failed: bool = False,
    ) -> sqlite3.Row | None:
        """Atomically take the next runnable run of ``sweep`` (pending, or running with a dead claimer).

        A dead claimer's run comes before pending ones: it may hold a training checkpoint, and
        finishing it first turns work already done into a result before new runs start. Returns the
        claimed row (``resumed`` tells whether it had been claimed before) or None when nothing is
        left to take.
        """
        claimer = claimer or worker_id()
        host, _, pid = claimer.rpartition(":")
        now = time.time()
        wanted = ("pending", "failed") if retry_failed else ("pending",)
        with self.transaction() as conn:
            rows = conn.execute(
                "SELECT r.* FROM runs r JOIN sweep_runs s ON r.key = s.key WHERE s.sweep = ? AND r.status"
                f" IN ({','.join('?' * len(wanted))}, 'running') ORDER BY (r.status != 'running'), s.ord",
                (sweep, *wanted),
            ).fetchall()
            for row in rows:
                if row["status"] == "running" and not self._claimer_dead(row, host, now, stale_s):
                    continue
                conn.execute(
                    "UPDATE runs SET status='running', claimed_by=?, host=?, pid=?, heartbeat=?,"
                    " attempts=attempts+1, started=?, error=NULL WHERE key=?",
                    (claimer, host, int(pid) if pid.isdigit() else None, now, now, row["key"]),
                )
                return conn.execute("SELECT * FROM runs WHERE key=?", (row["key"],)).fetchone()
        return None

    @staticmethod
    def _claimer_dead(row: sqlite3.Row, host: str, now: float, stale_s: float) -> bool:
        """A claimer is dead if its heartbeat is stale, or it ran on this host and its pid is gone."""
        if row["heartbeat"] is None or now - row["heartbeat"] > stale_s:
            return True
        return row["host"] == host and row["pid"] is not None and not pid_alive(row["pid"])

    def heartbeat(self, key: str, claimer: str) -> bool:
        """Refresh the heartbeat of a run this claimer holds; False if it lost the claim."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE runs SET heartbeat=? WHERE key=? AND claimed_by=? AND status='running'",
                (time.time(), key, claimer),
            )
        return cur.rowcount == 1

    def mark_resumed(self, key: str) -> None:
        """Note that this attempt continued from a training checkpoint."""
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET resumed=resumed+1 WHERE key=?", (key,))

    def finish(self, key: str, record: dict[str, Any]) -> None:
        """Store a finished run's record and its headline numbers; the row becomes ``done``."""
        metrics, calls = record["metrics"], record.get("teacher_calls", {})
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET status='done', finished=?, val_acc=?, test_top1=?, test_top5=?,"
                " calls_paid=?, calls_used=?, wall_s=?, record=?, error=NULL WHERE key=?",
                (
                    time.time(),
                    metrics["best_val_acc"],
                    metrics["test_top1"],
                    metrics.get("test_top5"),
                    calls.get("paid_this_run", 0),
                    calls.get("outputs_used", 0),
                    record.get("wall_time_s"),
                    json.dumps(record),
                    key,
                ),
            )

    def fail(self, key: str, error: str) -> None:
        """Mark a run ``failed`` with a one-line error (re-run it with ``retry_failed``)."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET status='failed', finished=?, error=? WHERE key=?", (time.time(), error, key)
            )

    def rows(self, sweep: str | None = None, status: str | None = None) -> list[sqlite3.Row]:
        """Runs (of ``sweep`` if given; with ``status`` if given), in the sweep's order."""
        query, args = "SELECT r.* FROM runs r", []
        clauses = []
        if sweep is not None:
            query += " JOIN sweep_runs s ON r.key = s.key"
            clauses.append("s.sweep = ?")
            args.append(sweep)
        if status is not None:
            clauses.append("r.status = ?")
            args.append(status)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY s.ord" if sweep is not None else " ORDER BY r.rowid"
        return self.conn.execute(query, args).fetchall()

    def counts(self, sweep: str | None = None) -> dict[str, int]:
        """Number of runs in each status (of ``sweep`` if given)."""
        out = dict.fromkeys(STATUSES, 0)
        for row in self.rows(sweep):
            out[row["status"]] += 1
        return out

    def sweeps(self) -> list[str]:
        """Names of the sweeps registered in this database."""
        return [r[0] for r in self.conn.execute("SELECT DISTINCT sweep FROM sweep_runs ORDER BY sweep")]

    def records(self, sweep: str | None = None) -> list[dict[str, Any]]:
        """The JSON records of the finished runs (of ``sweep`` if given)."""
        return [json.loads(r["record"]) for r in self.rows(sweep, "done")]
