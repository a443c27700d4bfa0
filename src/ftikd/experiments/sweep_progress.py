"""A one-line live display of a whole sweep: runs done / running / failed / left, and an ETA.

The ETA comes from the mean wall time of the sweep's finished runs (claim to finish, as recorded in
the results database, so runs finished by an earlier session count too) and the number of workers:
running runs are assumed to need what is left of the mean, and the pending ones are handed to the
first free worker in turn (list scheduling). On a terminal the line is rewritten in place as the
ETA moves; otherwise (a log file) a new line is printed only when a run starts or ends.
"""

from __future__ import annotations

import heapq
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ftikd.experiments.db import ResultsDB


@dataclass(frozen=True)
class SweepState:
    """What the progress line shows: counts by status and the timings the ETA needs."""

    done: int = 0
    running: int = 0
    failed: int = 0
    pending: int = 0
    run_times_s: tuple[float, ...] = ()  # wall time of each finished (done) run
    running_for_s: tuple[float, ...] = ()  # how long each running run has been running

    @property
    def total(self) -> int:
        return self.done + self.running + self.failed + self.pending


def eta_seconds(state: SweepState, workers: int) -> float | None:
    """Seconds until the last run ends: list scheduling of the mean run time on ``workers`` slots.

    None while no run has finished (nothing to estimate from); 0 when nothing is left. More runs
    running than ``workers`` (other hosts claiming from the same database) count as more slots.
    """
    if not state.pending and not state.running:
        return 0.0
    if not state.run_times_s:
        return None
    mean = sum(state.run_times_s) / len(state.run_times_s)
    slots = [max(mean - elapsed, 0.0) for elapsed in state.running_for_s]
    slots += [0.0] * max(0, workers - len(slots))
    heapq.heapify(slots)
    for _ in range(state.pending):
        heapq.heapreplace(slots, slots[0] + mean)
    return max(slots)


def format_duration(seconds: float | None) -> str:
    """``?``, ``45s``, ``3m10s`` or ``2h05m``."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(name: str, state: SweepState, workers: int) -> str:
    """``sweep NAME: done 4/12 | running 2 | failed 0 | left 6 | ETA 3m10s``."""
    return (
        f"sweep {name}: done {state.done}/{state.total} | running {state.running} | "
        f"failed {state.failed} | left {state.pending} | ETA {format_duration(eta_seconds(state, workers))}"
    )


def read_state(db: ResultsDB, sweep: str, now: float | None = None) -> SweepState:
    """The :class:`SweepState` of ``sweep`` from its database (statuses and claim/finish times only)."""
    now = time.time() if now is None else now
    rows = db.conn.execute(
        "SELECT r.status, r.started, r.finished, r.wall_s FROM runs r JOIN sweep_runs s ON r.key = s.key"
        " WHERE s.sweep = ?",
        (sweep,),
    ).fetchall()
    counts = dict.fromkeys(("done", "running", "failed", "pending"), 0)
    times, running_for = [], []
    for status, started, finished, wall_s in rows:
        counts[status] += 1
        if status == "done":
            slot_s = finished - started if started is not None and finished is not None else wall_s
            if slot_s is not None:
                times.append(float(slot_s))
        elif status == "running" and started is not None:
            running_for.append(max(0.0, now - started))
    return SweepState(**counts, run_times_s=tuple(times), running_for_s=tuple(running_for))


class SweepProgress:
    """The live line of one sweep, refreshed by :meth:`update` (a drop-in for the executors' display)."""

    def __init__(
        self, db_path: Path, sweep: str, enabled: bool, workers: int = 1, stream: TextIO | None = None
    ) -> None:
        self.db_path, self.sweep, self.enabled, self.workers = db_path, sweep, enabled, workers
        self.stream = stream if stream is not None else sys.stderr
        self.in_place = self.stream.isatty()
        self.last = ""
        self.last_counts: tuple[int, ...] = ()

    def update(self) -> None:
        """Read the database and show the line: in place on a terminal, else when the counts change."""
        if not self.enabled:
            return
        with ResultsDB(self.db_path) as db:
            state = read_state(db, self.sweep)
        text = progress_line(self.sweep, state, self.workers)
        counts = (state.done, state.running, state.failed, state.pending)
        if self.in_place and text != self.last:
            self.stream.write(f"\r{text}\x1b[K")
            self.stream.flush()
        elif not self.in_place and counts != self.last_counts:
            print(text, file=self.stream, flush=True)
        self.last, self.last_counts = text, counts

    def close(self) -> None:
        """Show the final line and end it (on a terminal the cursor stays after the line otherwise)."""
        self.update()
        if self.enabled and self.in_place and self.last:
            self.stream.write("\n")
            self.stream.flush()
