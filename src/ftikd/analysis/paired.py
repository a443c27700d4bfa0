"""Paired differences against one baseline method: is a gap larger than the seed noise?

Under FTI-KD a run's seed fixes its training subset (so the n teacher outputs it reads), the split
and the student's initialisation, so two methods run with the same seed share most of their
randomness. The difference of their test accuracies seed by seed then varies much less than either
method over seeds, and its mean with the standard error std / sqrt(seeds) tells a gap outside the
seed noise from one inside it, where two mean ± std cells cannot. Each method is taken at its own
chosen LR (the cells of the accuracy table) and paired with the baseline on the seeds both ran.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from ftikd.errors import FtikdError

if TYPE_CHECKING:
    from ftikd.analysis.report import Selected

EXPLANATION = (
    "Each cell: mean over seeds of (method - baseline) test top-1, both at their chosen LR and paired "
    "on the seed (same training subset, teacher outputs and initialisation), with its standard error "
    "std / sqrt(seeds) and the number of seeds both ran; a gap more than about 2-3 SE from 0 is "
    "outside the seed noise. One common seed gives no SE."
)


def paired_difference(method: Selected, baseline: Selected) -> tuple[float, float, int] | None:
    """(mean, standard error, seeds) of the per-seed test differences; None without a common seed.

    The standard error is NaN for a single common seed.
    """
    base = dict(zip(baseline.seeds, baseline.test, strict=True))
    diffs = [acc - base[seed] for seed, acc in zip(method.seeds, method.test, strict=True) if seed in base]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), se, len(diffs)


def check_baseline(cells: list[Selected], baseline: str) -> None:
    """Refuse a baseline label that no finished cell has, naming the labels there are."""
    labels = list(dict.fromkeys(c.label for c in cells))
    if baseline not in labels:
        raise FtikdError(f"no finished runs of {baseline!r} to pair with; methods here: {', '.join(labels)}")


def paired_rows(cells: list[Selected], baseline: str) -> list[list[str]]:
    """Rows: method x n, ``+mean (SE x, k seeds)`` against ``baseline`` (a method label) at each n.

    The baseline's own row is left out; a cell is ``-`` where either side has no finished run.
    """
    budgets = sorted({c.n for c in cells})
    by = {(c.label, c.n): c for c in cells}
    rows = [[f"method - {baseline}", *[f"n={n}" for n in budgets]]]
    for label in dict.fromkeys(c.label for c in cells):
        if label == baseline:
            continue
        row = [label]
        for n in budgets:
            a, b = by.get((label, n)), by.get((baseline, n))
            diff = paired_difference(a, b) if a and b else None
            row.append("-" if diff is None else _paired_text(*diff))
        rows.append(row)
    return rows


def _paired_text(mean: float, se: float, seeds: int) -> str:
    if seeds == 1:
        return f"{mean:+.2f} (1 seed)"
    return f"{mean:+.2f} (SE {se:.2f}, {seeds} seeds)"
