"""Accuracy against training wall time, from the per-pseudo-epoch history in run records.

A run's curve is its best validation accuracy so far against the training time at which each
pseudo-epoch ended (``history[*].time_s``): what an early stop at that time would have kept. Curves
of one (method, budget) are averaged over seeds on a common time grid, a finished run holding its
final value. This compares compute, not only end points: group CKD pushes k images through the
student per sample, in-batch CKD one.

``python -m ftikd.analysis.curves RUNS_DIR --out curve.png`` plots them and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftikd.analysis.plot import pyplot, save_figure
from ftikd.analysis.summary import load_records, method_label
from ftikd.errors import FtikdError


@dataclass
class TimeCurve:
    """Mean (over seeds) best-validation accuracy on a time grid, plus each run's end point."""

    label: str
    calls: int
    times: np.ndarray
    mean_val: np.ndarray
    run_times: list[float]
    test_top1: list[float]

    def time_to_reach(self, accuracy: float) -> float | None:
        """First grid time at which the mean curve reaches ``accuracy`` (None if it never does)."""
        hits = np.nonzero(self.mean_val >= accuracy)[0]
        return float(self.times[hits[0]]) if hits.size else None


def best_so_far(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Epoch end times (s) and the running maximum of validation accuracy at each."""
    history = record.get("history") or []
    if not history:
        raise FtikdError(f"run record {record.get('run')} has no history; re-run it with this ftikd")
    times = np.array([h["time_s"] for h in history], dtype=float)
    return times, np.maximum.accumulate(np.array([h["val_acc"] for h in history], dtype=float))


def value_at(times: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Step function of ``values`` at ``grid`` times: NaN before the first epoch ends, then the last value."""
    pos = np.searchsorted(times, grid, side="right") - 1
    out = values[np.clip(pos, 0, None)].astype(float)
    out[pos < 0] = np.nan
    return out


def time_curves(records: list[dict[str, Any]], points: int = 200) -> list[TimeCurve]:
    """One averaged curve per (method label, budget), on a grid up to the slowest run of that pair."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(method_label(rec), int(rec["config"]["calls"]))].append(rec)
    curves = []
    for (label, calls), recs in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        runs = [best_so_far(r) for r in recs]
        grid = np.linspace(0.0, max(t[-1] for t, _ in runs), points)
        stacked = np.stack([value_at(t, v, grid) for t, v in runs])
        started = ~np.isnan(stacked).any(axis=0)  # average only once every seed has a value
        curves.append(
            TimeCurve(
                label=label,
                calls=calls,
                times=grid[started],
                mean_val=stacked[:, started].mean(axis=0),
                run_times=[float(t[-1]) for t, _ in runs],
                test_top1=[float(r["metrics"]["test_top1"]) for r in recs],
            )
        )
    return curves


def format_time_table(curves: list[TimeCurve], targets: tuple[float, ...] = (60.0, 70.0)) -> str:
    """Markdown table: mean training time, time to reach target validation accuracies, final test top-1."""
    head = "| method | n | seeds | train s/run | " + " | ".join(f"s to val {a:g}%" for a in targets)
    rows = [head + " | final val % | test top-1 % |", "|---|---|---|---|" + "---|" * (len(targets) + 2)]
    for c in curves:
        reach = [c.time_to_reach(a) for a in targets]
        std = statistics.stdev(c.test_top1) if len(c.test_top1) > 1 else 0.0
        rows.append(
            f"| {c.label} | {c.calls} | {len(c.test_top1)} | {statistics.fmean(c.run_times):.0f} | "
            + " | ".join("never" if r is None else f"{r:.0f}" for r in reach)
            + f" | {c.mean_val[-1]:.1f} | {statistics.fmean(c.test_top1):.2f} ± {std:.2f} |"
        )
    return "\n".join(rows)


def plot_accuracy_vs_time(curves: list[TimeCurve], path: str | Path, title: str = "") -> Path:
    """PNG with one panel per budget: mean best validation accuracy against training seconds."""
    budgets = sorted({c.calls for c in curves})
    fig, axes = pyplot().subplots(1, len(budgets), figsize=(5 * len(budgets), 4), dpi=120, squeeze=False)
    for ax, n in zip(axes[0], budgets, strict=True):
        for c in (c for c in curves if c.calls == n):
            (line,) = ax.plot(
                c.times, c.mean_val, label=f"{c.label} (test {statistics.fmean(c.test_top1):.1f}%)"
            )
            ax.plot(c.times[-1], c.mean_val[-1], "o", color=line.get_color())
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("best validation top-1 so far (%)")
        ax.set_title(f"n = {n}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ftikd.analysis.curves", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", help="folder of run records (e.g. results/demo/runs)")
    parser.add_argument("--out", help="write the plot here (PNG)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        curves = time_curves(load_records(args.runs))
        if not curves:
            raise FtikdError(f"no run records in {args.runs}; run ftikd distill or ftikd demo first")
        print(format_time_table(curves))
        if args.out:
            print(f"-> {plot_accuracy_vs_time(curves, args.out, args.title)}")
    except FtikdError as exc:
        print(f"ftikd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
