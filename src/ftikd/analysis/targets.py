"""Teacher calls needed to reach a target accuracy (CKD poster [S2] Table 1; METHODS.md §3.2(c)).

For each method, the mean-over-seeds test accuracy at the chosen LR is a curve over the budget
grid n. The calls to reach a target are where that curve first crosses it, by linear interpolation
between the two grid points around the crossing (A33). "below grid" (blank in the poster) means the
curve is already at or above the target at the smallest n; "never" (- in the poster) that it does
not reach it on the grid. The reduction is Δ = 100 (n_base - n_ckd) / n_base, n_base being the
fewest calls of any non-CKD method that reaches the target and n_ckd the fewest of the CKD rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BELOW_GRID = "below grid"
NEVER = "never"

EXPLANATION = (
    "Teacher calls (thousands) each method needs to reach the target test top-1: the first crossing "
    "of its mean-over-seeds accuracy curve (at the LR chosen on validation) by linear interpolation "
    "between adjacent budgets n. Blank: already above the target at the smallest n; -: not reached on "
    "the grid. Δ = 100 (n_base - n_ckd) / n_base with n_base the fewest calls among non-CKD methods "
    "that reach the target and n_ckd the fewest among CKD rows; methods paying no teacher calls (ce) "
    "are left out. As the CKD poster's Table 1 (METHODS.md §3.2(c), A33)."
)


def crossing(ns: Sequence[float], accs: Sequence[float], target: float) -> float | str:
    """First n where the piecewise-linear curve through (ns, accs) reaches ``target``.

    Returns a number of calls, :data:`BELOW_GRID` if ``accs[0] >= target``, or :data:`NEVER`.
    ``ns`` must be increasing.
    """
    if not ns:
        return NEVER
    if accs[0] >= target:
        return BELOW_GRID
    for i in range(1, len(ns)):
        if accs[i] >= target:
            return ns[i - 1] + (target - accs[i - 1]) * (ns[i] - ns[i - 1]) / (accs[i] - accs[i - 1])
    return NEVER


def is_ckd(label: str) -> bool:
    """CKD rows are the ``ckd`` family (``ckd``, ``ckd-inbatch``, ``ckd[k=3]``, ...)."""
    return label.split("[")[0].startswith("ckd")


@dataclass
class TargetTable:
    """Calls per (method, target) and the CKD reduction per target."""

    targets: list[float]
    calls: dict[str, list[float | str]]
    reduction: list[float | None]


def calls_to_target(
    curves: dict[str, tuple[list[int], list[float]]], targets: Sequence[float]
) -> TargetTable:
    """The table for ``curves`` (label -> (increasing ns, mean accuracies)) at each target accuracy."""
    calls = {label: [crossing(ns, accs, t) for t in targets] for label, (ns, accs) in curves.items()}
    reduction: list[float | None] = []
    for i in range(len(targets)):
        base = [row[i] for label, row in calls.items() if not is_ckd(label) and isinstance(row[i], float)]
        ckd = [row[i] for label, row in calls.items() if is_ckd(label) and isinstance(row[i], float)]
        reduction.append(100.0 * (min(base) - min(ckd)) / min(base) if base and ckd else None)
    return TargetTable(list(targets), calls, reduction)


def format_cell(value: float | str | None) -> str:
    """Thousands with 2 decimals; blank for below grid, '-' for never (the poster's marks)."""
    if value == BELOW_GRID:
        return ""
    if value == NEVER or value is None:
        return "-"
    return f"{value / 1000:.2f}"


def table_rows(table: TargetTable) -> list[list[str]]:
    """Header plus one row per method and the Δ row, as strings (for Markdown and CSV alike)."""
    rows = [["method", *[f"{t:g}%" for t in table.targets]]]
    for label, values in table.calls.items():
        rows.append([label, *[format_cell(v) for v in values]])
    rows.append(["Δ (%)", *["-" if r is None else f"{r:.2f}" for r in table.reduction]])
    return rows
