"""The LR choice of [S0] A.1, and sweeps that make it at one budget and carry it to the others.

[S0] chooses the LR per (method, pair, n) as the one with the highest mean validation top-1 over
seeds. A sweep with ``choose_lr_at: n0`` runs every LR at budget n0 only; each (method, pair) then
runs its other budgets at the LR chosen at n0, once all of its n0 runs (every seed at every LR) are
done. This halves a two-LR grid's cost at the larger budgets, at the price of assuming that the
best LR does not change with n; a report marks the cells whose LR was carried this way.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from ftikd.experiments.db import JobRow


def best_lr(lr_val: Mapping[float, float]) -> float:
    """The LR with the highest mean validation accuracy; on a tie, the one listed first."""
    return max(lr_val, key=lambda lr: lr_val[lr])


def mean_val_by_lr(rows: Iterable[Any]) -> dict[float, float]:
    """Mean validation top-1 over the given finished runs, per LR (in the order the LRs appear)."""
    by_lr: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        by_lr[float(r["lr"])].append(float(r["val_acc"]))
    return {lr: statistics.fmean(vals) for lr, vals in by_lr.items()}


def chosen_lrs(jobs: list[JobRow], rows: Iterable[Any], at: int) -> dict[tuple[str, str], float]:
    """Per (method label, pair): the LR chosen at budget ``at``, for those whose runs there are all done.

    ``jobs`` is the whole grid (it says which runs the choice needs); ``rows`` are the database rows
    of those runs. A (method, pair) with any run at ``at`` not done (pending, running or failed) has
    no choice yet.
    """
    status = {r["key"]: r for r in rows}
    needed: dict[tuple[str, str], list[JobRow]] = defaultdict(list)
    for job in jobs:
        if job.n == at:
            needed[(job.label, job.pair)].append(job)
    out = {}
    for group, group_jobs in needed.items():
        found = [status.get(j.key) for j in group_jobs]
        if all(r is not None and r["status"] == "done" for r in found):
            out[group] = best_lr(mean_val_by_lr(found))
    return out


def runnable_jobs(jobs: list[JobRow], rows: Iterable[Any], at: int | None) -> tuple[list[JobRow], int]:
    """The runs a sweep may run now, and how many wait for an LR choice at budget ``at``.

    Without ``at`` every run is runnable. With it: every run at ``at``, and at other budgets only the
    runs at their (method, pair)'s chosen LR; those of a (method, pair) not chosen yet wait.
    """
    if at is None:
        return list(jobs), 0
    choice = chosen_lrs(jobs, rows, at)
    now, waiting = [], set()
    for job in jobs:
        group = (job.label, job.pair)
        if job.n == at or choice.get(group) == job.lr:
            now.append(job)
        elif group not in choice:
            waiting.add((group, job.n, job.seed))
    return now, len(waiting)
