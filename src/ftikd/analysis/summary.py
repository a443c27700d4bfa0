"""Aggregate run records into mean ± std tables, and render them as text."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftikd.errors import FtikdError


@dataclass
class Cell:
    """Mean and sample std of test top-1 over seeds for one (method label, budget) pair."""

    label: str
    calls: int
    accs: list[float]
    paid: int
    wall_s: float

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accs) if len(self.accs) > 1 else 0.0


def method_label(record: dict[str, Any]) -> str:
    """A method's display name with its non-default options, e.g. ``ckd[k=3]``."""
    cfg = record["config"]
    opts = ",".join(f"{k}={v}" for k, v in sorted(cfg.get("method_options", {}).items()))
    return f"{cfg['method']}[{opts}]" if opts else cfg["method"]


def load_records(folder: str | Path) -> list[dict[str, Any]]:
    """Every run record (``*.json`` with a ``metrics`` block) under ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FtikdError(f"no run records at {folder}; run ftikd distill or ftikd demo first")
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FtikdError(f"run record {path} is corrupt; delete it and re-run that run") from None
        if isinstance(data, dict) and "metrics" in data:
            cfg = data.get("config")
            if not (isinstance(cfg, dict) and "method" in cfg and "calls" in cfg):
                raise FtikdError(f"run record {path} has no valid config block; delete it and re-run it")
            records.append(data)
    return records


def summarise(records: list[dict[str, Any]]) -> list[Cell]:
    """Group records by (method label, n) and collect test top-1 over seeds.

    Cells are ordered by n, and within one n by the order methods first appear in ``records``.
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(method_label(rec), int(rec["config"]["calls"]))].append(rec)
    return [
        Cell(
            label=label,
            calls=calls,
            accs=[r["metrics"]["test_top1"] for r in recs],
            paid=sum(int(r["teacher_calls"].get("outputs_used", 0)) for r in recs) // len(recs),
            wall_s=sum(r["wall_time_s"] for r in recs),
        )
        for (label, calls), recs in sorted(groups.items(), key=lambda item: item[0][1])
    ]


def format_table(cells: list[Cell]) -> str:
    """Markdown table: one row per method, one column per budget n (test top-1 mean ± std)."""
    budgets = sorted({c.calls for c in cells})
    labels = list(dict.fromkeys(c.label for c in cells))
    by_key = {(c.label, c.calls): c for c in cells}
    head = "| method | " + " | ".join(f"n={n}: top-1 % (calls/run)" for n in budgets) + " |"
    rows = [head, "|---|" + "---|" * len(budgets)]
    for label in labels:
        parts = []
        for n in budgets:
            c = by_key.get((label, n))
            parts.append(f"{c.mean:.2f} ± {c.std:.2f} ({c.paid}) [{len(c.accs)} seeds]" if c else "-")
        rows.append(f"| {label} | " + " | ".join(parts) + " |")
    return "\n".join(rows)
