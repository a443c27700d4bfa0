"""``ftikd report``: paper-style tables, plots and calls-to-target from a sweep's results database.

Per teacher/student pair: a Markdown table like CKD Table 1 (test top-1 mean ± std over seeds per
method per n at the LR chosen by mean validation accuracy, the best of each column in bold, the
winning LR beside it), a PNG of accuracy against teacher calls with std error bars, the
calls-to-target table (:mod:`ftikd.analysis.targets`) and, when the setting matches a published
one (CIFAR-100 and a pair of the CKD paper), the paper's numbers beside ours from
``paper-tables/``. Every table is also written as CSV.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftikd.analysis.paired import EXPLANATION as PAIRED_EXPLANATION
from ftikd.analysis.paired import check_baseline, paired_rows
from ftikd.analysis.plot import plot_accuracy_vs_calls
from ftikd.analysis.summary import Cell
from ftikd.analysis.targets import EXPLANATION, calls_to_target, table_rows
from ftikd.errors import FtikdError
from ftikd.experiments.db import ResultsDB
from ftikd.experiments.lr_choice import best_lr, mean_val_by_lr
from ftikd.fileio import atomic_write_text

# Our names -> the CKD paper's, for the published-number comparison ([S0] Tables 5-6, [S2] Table 1).
PAPER_PAIRS = {
    "wrn_40_2->wrn_16_2": ("WRN-40-2->WRN-16-2", "WRN-40-2->WRN-16-2"),
    "resnet110->resnet32": ("Resnet110->Resnet32", "ResNet110->ResNet32"),
    "vgg13->vgg8": ("VGG13->VGG8", "VGG13->VGG8"),
}
PAPER_METHODS = {
    "kd": "KD",
    "rkd": "RKD",
    "dist": "Dist",
    "mixup": "Mixup",
    "cutmix": "CutMix",
    "crd": "CRD",
    "ckd": "CKD",
}
PAPER_TABLES = ("ckd_table5_full_n1600-3200.csv", "ckd_table6_full_n3600-4800.csv")
POSTER_TABLE = "ckdposter_table1_calls_to_target.csv"
DEFAULT_TARGETS = (30.0, 35.0, 40.0, 45.0, 50.0, 55.0)


@dataclass
class Selected:
    """One (method, pair, n) cell at its chosen LR: test top-1 over seeds and what the LR search saw."""

    label: str
    method: str
    pair: str
    dataset: str
    n: int
    lr: float
    test: list[float]
    val_mean: float
    calls_used: int
    lr_val: dict[float, float]
    wall_s: list[float]  # wall time of each run at the chosen LR
    seeds: list[int] = field(default_factory=list)  # the seed of each entry of ``test``

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test)

    @property
    def std(self) -> float:
        return statistics.stdev(self.test) if len(self.test) > 1 else 0.0


def select_lr(rows: list[Any]) -> list[Selected]:
    """Per (method label, pair, n): the LR with the highest mean validation top-1 over seeds ([S0] A.1).

    Only finished runs count; on a tie the LR met first in the database wins. The sweep runs every LR
    (or, with ``choose_lr_at``, one LR at the other budgets); the choice is made here, when results
    are read.
    """
    groups: dict[tuple, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] == "done":
            groups[(r["label"], r["method"], r["pair"], r["dataset"], r["n"])][r["lr"]].append(r)
    out = []
    for (label, method, pair, dataset, n), by_lr in groups.items():
        lr_val = mean_val_by_lr(r for runs in by_lr.values() for r in runs)
        best = best_lr(lr_val)
        runs = sorted(by_lr[best], key=lambda x: x["seed"])
        out.append(
            Selected(
                label,
                method,
                pair,
                dataset,
                n,
                best,
                [x["test_top1"] for x in runs],
                lr_val[best],
                max(int(x["calls_used"] or 0) for x in runs),
                lr_val,
                [float(x["wall_s"] or 0.0) for x in runs],
                [int(x["seed"]) for x in runs],
            )
        )
    return sorted(out, key=lambda s: (s.pair, s.n))


def check_one_teacher_per_pair(rows: list[Any]) -> None:
    """Refuse a table that would set runs of different teachers side by side.

    A sweep that trains its teacher keys runs by the teacher's recipe, so a database carried to
    another machine and resumed there without the sweep's teacher checkpoint gets a retrained
    teacher under the same keys. Every finished run records the fingerprint of the teacher it read
    (``teacher_calls.teacher_fingerprint``); all runs of one (dataset, pair) must share it.
    """
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        if r["status"] == "done" and r["record"]:
            fp = (json.loads(r["record"]).get("teacher_calls") or {}).get("teacher_fingerprint")
            if fp:
                seen[(r["dataset"], r["pair"])].add(fp)
    for (dataset, pair), fps in seen.items():
        if len(fps) > 1:
            raise FtikdError(
                f"runs of {pair} on {dataset} read {len(fps)} different teachers ({', '.join(sorted(fps))}); "
                "report one teacher's runs (--sweep), or resume the sweep with its own teacher checkpoint "
                "in <out>/teachers/"
            )


def markdown(rows: list[list[str]]) -> str:
    """A Markdown table from a header row and data rows."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def write_table(rows: list[list[str]], path: Path) -> str:
    """Write ``rows`` as CSV at ``path`` (bold marks stripped) and return them as Markdown."""
    buf = io.StringIO()
    csv.writer(buf).writerows([[c.replace("**", "") for c in r] for r in rows])
    atomic_write_text(path, buf.getvalue())
    return markdown(rows)


def accuracy_rows(cells: list[Selected]) -> list[list[str]]:
    """Rows: method x n, ``mean ± std (lr)``, the best mean of each n in bold (CKD Table 1 layout).

    A cell whose runs tried fewer LRs than the table's widest search says ``lr X only``: with
    ``choose_lr_at``, its LR was chosen at another budget (:mod:`ftikd.experiments.lr_choice`).
    """
    budgets = sorted({c.n for c in cells})
    labels = list(dict.fromkeys(c.label for c in cells))
    by = {(c.label, c.n): c for c in cells}
    best = {n: max(c.mean for c in cells if c.n == n) for n in budgets}
    searched = max(len(c.lr_val) for c in cells)
    rows = [["method", *[f"n={n}" for n in budgets]]]
    for label in labels:
        row = [label]
        for n in budgets:
            c = by.get((label, n))
            if c is None:
                row.append("-")
                continue
            text = _mean_std(c.test, ".2f")
            only = " only" if len(c.lr_val) < searched else ""
            bold = f"**{text}**" if c.mean == best[n] else text
            seeds = "1 seed" if len(c.test) == 1 else f"{len(c.test)} seeds"
            row.append(f"{bold} (lr {c.lr:g}{only}, {seeds})")
        rows.append(row)
    return rows


def wall_rows(cells: list[Selected]) -> list[list[str]]:
    """Rows: method x n, mean ± std wall seconds per run at the chosen LR (the cost of one result)."""
    budgets = sorted({c.n for c in cells})
    by = {(c.label, c.n): c for c in cells}
    rows = [["method", *[f"n={n}" for n in budgets]]]
    for label in dict.fromkeys(c.label for c in cells):
        cells_n = [by.get((label, n)) for n in budgets]
        rows.append([label, *("-" if c is None else _mean_std(c.wall_s, ".0f") for c in cells_n)])
    return rows


def _mean_std(values: list[float], fmt: str) -> str:
    """``mean ± std`` of ``values`` in format ``fmt``; a single value alone (it has no std)."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def find_paper_tables(explicit: str | None) -> Path | None:
    """The paper-tables folder: the argument, ``$FTIKD_PAPER_TABLES``, or ``../shared/paper-tables``."""
    candidates = [
        explicit,
        os.environ.get("FTIKD_PAPER_TABLES"),
        Path.cwd().parent / "shared" / "paper-tables",
        Path(__file__).resolve().parents[3].parent / "shared" / "paper-tables",
    ]
    for c in candidates:
        if c and (Path(c) / PAPER_TABLES[0]).is_file():
            return Path(c)
    if explicit:
        raise FtikdError(f"no paper tables at {explicit}; pass the paper-tables folder")
    return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def paper_rows(cells: list[Selected], folder: Path) -> list[list[str]] | None:
    """Ours beside the CKD paper's mean ± std for the cells whose (pair, method, n) it printed."""
    if not cells or cells[0].dataset != "cifar100" or cells[0].pair not in PAPER_PAIRS:
        return None
    pair = PAPER_PAIRS[cells[0].pair][0]
    published = {}
    for name in PAPER_TABLES:
        for r in _read_csv(folder / name):
            if r["pair"] == pair and r["mean"]:
                published[(r["method"], int(r["n"]))] = f"{r['mean']} ± {r['std']}"
    rows = [["method", "n", "ours", "paper"]]
    for c in cells:
        theirs = published.get((PAPER_METHODS.get(c.method, ""), c.n))
        if theirs:
            rows.append([c.label, str(c.n), f"{c.mean:.2f} ± {c.std:.2f}", theirs])
    return rows if len(rows) > 1 else None


def poster_rows(pair: str, targets: list[float], folder: Path) -> list[list[str]] | None:
    """The poster's printed calls-to-target values (thousands) for ``pair`` at our targets."""
    if pair not in PAPER_PAIRS:
        return None
    name = PAPER_PAIRS[pair][1]
    values: dict[str, dict[float, str]] = defaultdict(dict)
    for r in _read_csv(folder / POSTER_TABLE):
        if r["pair"] == name:
            values[r["method"]][float(r["target_acc"])] = r["value"] or r["raw"].replace("_", "")
    rows = [["published method", *[f"{t:g}%" for t in targets]]]
    rows += [[m, *[v.get(t, "n/a") for t in targets]] for m, v in values.items()]
    return rows if len(rows) > 1 else None


def write_report(
    db_path: str | Path,
    out: str | Path,
    sweep: str | None = None,
    targets: list[float] | None = None,
    paper_tables: str | None = None,
    reference: str | Path | None = None,
    reference_sweep: str | None = None,
    paired_with: str | None = None,
) -> list[Path]:
    """Write ``report.md`` plus per-pair CSV and PNG files under ``out``; return the paths written.

    With ``paired_with`` (a method label), each pair's section adds every method's paired
    difference from that method with its standard error (:mod:`ftikd.analysis.paired`).

    With ``reference`` (another results database, e.g. the same grid under the full protocol), the
    report ends with how the two rank the methods in every (dataset, pair, n) both hold
    (:mod:`ftikd.analysis.ranking`).
    """
    db_path, out = Path(db_path), Path(out)
    rows, counts = _read_db(db_path, sweep)
    check_one_teacher_per_pair(rows)
    cells = select_lr(rows)
    if not cells:
        raise FtikdError(f"no finished runs in {db_path}; run (or finish) the sweep first")
    if paired_with is not None:
        check_baseline(cells, paired_with)
    ref_cells = None
    if reference is not None:
        ref_cells = select_lr(_read_db(Path(reference), reference_sweep)[0])
        if not ref_cells:
            raise FtikdError(f"no finished runs in reference {reference}; run (or finish) that sweep first")
    folder = find_paper_tables(paper_tables)
    targets = list(targets or DEFAULT_TARGETS)
    written: list[Path] = []
    run_hours = sum(float(r["wall_s"] or 0) for r in rows if r["status"] == "done") / 3600
    parts = [
        f"# Sweep report: {sweep or 'all runs'} ({db_path.name})",
        f"Runs: {counts['done']} done, {counts['failed']} failed, {counts['running']} running, "
        f"{counts['pending']} pending; {run_hours:.2f} h of run wall time in all (runs in parallel "
        "overlap). Test top-1 % (mean ± std over seeds) at the LR with the highest "
        "mean validation top-1 over seeds per (method, pair, n) (CKD paper A.1); the best mean of each "
        "column in bold; 'lr X only' marks a cell run at fewer LRs than the others (a sweep with "
        "choose_lr_at runs its other budgets at the LR chosen at that budget).",
    ]
    for dataset, pair in dict.fromkeys((c.dataset, c.pair) for c in cells):
        pc = [c for c in cells if (c.dataset, c.pair) == (dataset, pair)]
        slug = f"{dataset}-{pair.replace('->', '_to_')}"
        parts += [f"## {pc[0].dataset}: {pair}", write_table(accuracy_rows(pc), out / f"{slug}_accuracy.csv")]
        written.append(out / f"{slug}_accuracy.csv")
        plot = plot_accuracy_vs_calls(
            [Cell(c.label, c.n, c.test, c.calls_used, 0.0) for c in pc],
            out / f"{slug}_accuracy_vs_calls.png",
            title=f"{pc[0].dataset}: {pair}",
        )
        written.append(plot)
        parts.append(f"![accuracy vs calls]({plot.name})")
        parts += [
            "### Wall time per run (s, mean ± std over seeds at the chosen LR)",
            write_table(wall_rows(pc), out / f"{slug}_wall_time.csv"),
        ]
        written.append(out / f"{slug}_wall_time.csv")
        if paired_with is not None and any(c.label == paired_with for c in pc):
            path = out / f"{slug}_paired_vs_{paired_with}.csv"
            parts += [
                f"### Paired differences from {paired_with} (test top-1 points)",
                write_table(paired_rows(pc, paired_with), path),
                PAIRED_EXPLANATION,
            ]
            written.append(path)
        curves = {}
        for label in dict.fromkeys(c.label for c in pc if c.calls_used > 0):
            series = sorted((c for c in pc if c.label == label), key=lambda c: c.n)
            curves[label] = ([c.n for c in series], [c.mean for c in series])
        if curves:
            table = calls_to_target(curves, targets)
            parts += [
                "### Teacher calls to reach a target accuracy",
                write_table(table_rows(table), out / f"{slug}_calls_to_target.csv"),
                EXPLANATION,
            ]
            written.append(out / f"{slug}_calls_to_target.csv")
        parts += _published(pc, pair, targets, folder, out / slug, written)
    if ref_cells is not None:
        parts += _ranking_section(cells, ref_cells, Path(reference), reference_sweep, out, written)
    report = out / "report.md"
    atomic_write_text(report, "\n\n".join(parts) + "\n")
    return [report, *written]


def _published(
    pc: list[Selected], pair: str, targets: list[float], folder: Path | None, stem: Path, written: list[Path]
) -> list[str]:
    """Markdown sections comparing with the published numbers, when the setting matches one."""
    if folder is None:
        return ["No paper-tables folder found: published numbers not shown."]
    parts = []
    ours = paper_rows(pc, folder)
    if ours:
        path = stem.with_name(stem.name + "_vs_paper.csv")
        parts += ["### Beside the CKD paper (Tables 5-6)", write_table(ours, path)]
        written.append(path)
        poster = poster_rows(pair, targets, folder) if pc[0].dataset == "cifar100" else None
        if poster:
            path = stem.with_name(stem.name + "_calls_to_target_poster.csv")
            parts += ["### The poster's calls to target (thousands; Table 1)", write_table(poster, path)]
            written.append(path)
    else:
        parts.append("No published setting matches this dataset and pair.")
    return parts


def _read_db(db_path: Path, sweep: str | None) -> tuple[list[Any], dict[str, int]]:
    """The rows and status counts of ``sweep`` (all sweeps when None) in the database at ``db_path``."""
    if not db_path.is_file():
        raise FtikdError(
            f"no results database at {db_path}; run ftikd sweep first or pass its results.sqlite"
        )
    with ResultsDB(db_path) as db:
        if sweep is not None and sweep not in db.sweeps():
            raise FtikdError(
                f"no sweep {sweep!r} in {db_path}; sweeps there: {', '.join(db.sweeps()) or 'none'}"
            )
        return db.rows(sweep), db.counts(sweep)


def _ranking_section(
    cells: list[Selected],
    ref_cells: list[Selected],
    reference: Path,
    reference_sweep: str | None,
    out: Path,
    written: list[Path],
) -> list[str]:
    """The report's last section: method rankings here beside those of the reference sweep."""
    from ftikd.analysis.ranking import EXPLANATION, ranking_rows

    summary, detail = ranking_rows(cells, ref_cells)
    title = f"## Ranking beside the reference {reference.name}" + (
        f" (sweep {reference_sweep})" if reference_sweep else ""
    )
    if len(summary) == 1:
        return [title, "The reference shares no (dataset, pair, n) with two or more methods of this sweep."]
    paths = [out / "ranking_agreement.csv", out / "ranking_by_method.csv"]
    written += paths
    return [title, write_table(summary, paths[0]), EXPLANATION, write_table(detail, paths[1])]
