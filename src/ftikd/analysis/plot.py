"""Plot test accuracy against teacher calls, one line per method, error bars = std over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftikd.analysis.summary import Cell


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and release it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def plot_accuracy_vs_calls(cells: list[Cell], path: str | Path, title: str = "") -> Path:
    """Write a PNG of mean ± std test top-1 against the budget n for each method."""
    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=120)
    for label in dict.fromkeys(c.label for c in cells):
        series = sorted((c for c in cells if c.label == label), key=lambda c: c.calls)
        ax.errorbar(
            [c.calls for c in series],
            [c.mean for c in series],
            yerr=[c.std for c in series],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xlabel("budget n (teacher calls; 'ce' uses the n labels and no calls)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)
