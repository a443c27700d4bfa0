"""Does a shortened schedule rank methods as a reference protocol does? Rank agreement of two sweeps.

A short schedule (fewer phases, small patience) is only useful if it orders methods as the full
FTI-KD protocol does; this module measures that for every (dataset, pair, n) the two sweeps share.
For each such cell it gives both orders by mean test top-1 at the LR each sweep chose, Kendall's
tau-b and Spearman's rho between them (ties get average ranks), and every discordant pair of
methods with its gap in both sweeps and the larger of the two seed stds, so that a swap inside the
seed noise can be told from a real one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftikd.analysis.report import Selected

EXPLANATION = (
    "Ranks: 1 = highest mean test top-1 over seeds at the LR each sweep chose; ties share the average "
    "rank. Kendall's tau-b and Spearman's rho compare the two orders over the methods both sweeps ran "
    "(1 = the same order, -1 = reversed). A discordant pair is two methods ordered differently; its "
    "gaps are mean(first) - mean(second) in this sweep / in the reference, and 'noise' is the larger "
    "seed std of the two methods in either sweep: a swap whose gaps are both smaller than it is "
    "within seed noise."
)


def average_ranks(values: Sequence[float]) -> list[float]:
    """Rank 1 for the largest value; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two paired sequences (tie-corrected); NaN when either is constant."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else math.nan


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks; NaN when either is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else math.nan


def _shared_cells(
    cells: list[Selected], reference: list[Selected]
) -> dict[tuple[str, str, int], list[tuple[Selected, Selected]]]:
    """(dataset, pair, n) -> the (this, reference) cells of every method label both sweeps ran."""
    ref = {(c.dataset, c.pair, c.n, c.label): c for c in reference}
    shared: dict[tuple[str, str, int], list[tuple[Selected, Selected]]] = {}
    for c in cells:
        other = ref.get((c.dataset, c.pair, c.n, c.label))
        if other is not None:
            shared.setdefault((c.dataset, c.pair, c.n), []).append((c, other))
    return shared


def ranking_rows(cells: list[Selected], reference: list[Selected]) -> tuple[list[list[str]], list[list[str]]]:
    """Two tables: per shared cell the agreement summary, and per method its means and ranks in both.

    Cells with fewer than two shared methods are left out (no order to compare).
    """
    summary = [
        [
            "dataset",
            "pair",
            "n",
            "methods",
            "Kendall tau-b",
            "Spearman rho",
            "best here",
            "best reference",
            "discordant pairs (gap here / reference; noise)",
        ]
    ]
    detail = [["dataset", "pair", "n", "method", "here: mean (rank)", "reference: mean (rank)"]]
    for (dataset, pair, n), both in sorted(_shared_cells(cells, reference).items()):
        if len(both) < 2:
            continue
        here = [a.mean for a, _ in both]
        there = [b.mean for _, b in both]
        rank_here, rank_there = average_ranks(here), average_ranks(there)
        swaps = []
        for i, j in combinations(range(len(both)), 2):
            gap_here, gap_there = here[i] - here[j], there[i] - there[j]
            if gap_here * gap_there < 0:
                noise = max(x.std for x in (*both[i], *both[j]))
                swaps.append(
                    f"{both[i][0].label}/{both[j][0].label} ({gap_here:+.2f} / {gap_there:+.2f}; {noise:.2f})"
                )
        summary.append(
            [
                dataset,
                pair,
                str(n),
                str(len(both)),
                f"{kendall_tau_b(here, there):.3f}",
                f"{spearman_rho(here, there):.3f}",
                both[min(range(len(both)), key=lambda i: rank_here[i])][0].label,
                both[min(range(len(both)), key=lambda i: rank_there[i])][0].label,
                "; ".join(swaps) or "none",
            ]
        )
        for (a, b), r1, r2 in sorted(zip(both, rank_here, rank_there, strict=True), key=lambda t: t[2]):
            detail.append(
                [dataset, pair, str(n), a.label, f"{a.mean:.2f} ({r1:g})", f"{b.mean:.2f} ({r2:g})"]
            )
    return summary, detail
