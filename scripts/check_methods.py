"""Run every registered method through ``ftikd distill`` on one teacher and subset, and check the budget.

    python scripts/check_methods.py --teacher T.safetensors --calls 200 --max-epochs 2 \
        --out /tmp/check-methods --table docs/methods-check-fashion.md

Each method is one ``ftikd distill`` run (seed 1, same n, same split), in this process, sharing the
default stores under ``--out`` (one per set of teacher features a method reads). Afterwards it checks
what the budget promises (docs/store.md, docs/budget-queries.md):

- every run used at most n teacher outputs (cached samples + calls paid during training);
- every store holds exactly the largest set of cached dataset outputs its runs read (n as soon as
  one run caches all n), however many runs read it: each sample paid once;
- a method that queries the teacher during training (BSS, VRM original) paid only under its own
  synthetic view, within what its cached samples left of n.

It prints a Markdown table (method, test top-1, calls used / paid by the run / paid during
training, wall time) and exits non-zero if a check fails. A smoke check, not a benchmark: the
schedule is far too short for the accuracies to rank methods.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path

from ftikd.cli import main as ftikd_main
from ftikd.experiments.bench import EXTRA_MODES
from ftikd.methods import available_methods
from ftikd.options import parse_method_spec


def distill(spec: str, args: argparse.Namespace) -> dict:
    """One ``ftikd distill`` run of ``spec`` (``name`` or ``name:k=v,...``); its run record."""
    name, options = parse_method_spec(spec)
    out = args.out / "runs" / spec.replace(":", "_").replace("=", "-").replace(",", "_")
    argv = ["distill", "--dataset", args.dataset, "--teacher", str(args.teacher), "--method", name]
    argv += [a for key, value in options.items() for a in ("--opt", f"{key}={value}")]
    argv += ["--calls", str(args.calls), "--seed", "1", "--max-epochs", str(args.max_epochs)]
    argv += ["--phases", "1", "--out", str(out), "--no-progress"]
    if args.data_dir:
        argv += ["--data-dir", str(args.data_dir)]
    started = time.perf_counter()
    code = ftikd_main(argv)
    if code != 0:
        raise SystemExit(f"{spec}: ftikd distill exited with {code}")
    [record_path] = out.glob("*.json")
    record = json.loads(record_path.read_text())
    record["check_wall_s"] = time.perf_counter() - started
    return record


def dataset_outputs(store: str) -> int:
    """Cached dataset-sample outputs in a store (views >= 0; synthetic inputs use negative views)."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT COUNT(*) FROM outputs WHERE view >= 0").fetchone()[0]


def check(records: dict[str, dict], n: int) -> list[str]:
    """The budget promises that do not hold (empty when all hold)."""
    failures = []
    for spec, rec in records.items():
        calls = rec["teacher_calls"]
        if calls["outputs_used"] > n:
            failures.append(f"{spec} used {calls['outputs_used']} teacher outputs > n = {n}")
    cached_by_store: dict[str, int] = {}
    for rec in records.values():
        calls = rec["teacher_calls"]
        if "store" in calls:  # runs cache nested prefixes of one subset: the store holds the largest
            cached = calls.get("cached", calls["outputs_used"])
            cached_by_store[calls["store"]] = max(cached_by_store.get(calls["store"], 0), cached)
    for store, expected in sorted(cached_by_store.items()):
        held = dataset_outputs(store)
        if held != expected:
            failures.append(f"store {store} holds {held} dataset outputs, expected exactly {expected}")
    return failures


def table(records: dict[str, dict]) -> str:
    """Markdown rows: method, accuracy, calls and wall time per run."""
    lines = [
        "| method | test top-1 | pseudo-epochs | outputs used | paid by this run | paid during training "
        "| store | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec, rec in records.items():
        calls, metrics = rec["teacher_calls"], rec["metrics"]
        during = calls.get("paid_during_training", 0)
        store = Path(calls["store"]).name if "store" in calls else "— (no teacher outputs read)"
        lines.append(
            f"| {spec} | {metrics['test_top1']:.2f} | {metrics['epochs']} | {calls['outputs_used']} "
            f"| {calls['paid_this_run']} | {during} | {store} | {rec['check_wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--max-epochs", type=int, default=2)
    every = f"default: every registered method and {', '.join(EXTRA_MODES)}"
    parser.add_argument("--methods", nargs="+", help=every)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    records = {spec: distill(spec, args) for spec in args.methods or [*available_methods(), *EXTRA_MODES]}
    text = table(records)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")
    failures = check(records, args.calls)
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
