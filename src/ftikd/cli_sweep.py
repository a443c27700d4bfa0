"""``ftikd sweep`` and ``ftikd report``: argument parsing only, each a thin call into the API.

``ftikd.cli`` adds them with ``add_sweep_commands(sub)``. User errors print one line and exit 2,
with nothing written.
"""

from __future__ import annotations

import argparse
from typing import Any

from ftikd.errors import FtikdError

# flag -> (sweep key, is a train override)
_GRID_FLAGS = {
    "name": ("name", False),
    "dataset": ("dataset", False),
    "data_dir": ("data_dir", False),
    "methods": ("methods", False),
    "pairs": ("pairs", False),
    "budgets": ("budgets", False),
    "seeds": ("seeds", False),
    "lrs": ("lrs", False),
    "choose_lr_at": ("choose_lr_at", False),
    "targets": ("targets", False),
    "out": ("out", False),
    "db": ("db", False),
    "track": ("track", False),
    "max_epochs": ("max_epochs", True),
    "patience": ("patience", True),
    "phases": ("phases", True),
    "batch_size": ("batch_size", True),
    "device": ("device", True),
}


def sweep_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep keys the command line sets (train flags go into the ``train`` block)."""
    out: dict[str, Any] = {}
    for flag, (key, is_train) in _GRID_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if is_train:
            out.setdefault("train", {})[key] = value
        else:
            out[key] = value
    if args.teacher_epochs is not None:
        out["teacher_train"] = {"epochs": args.teacher_epochs}
    return out


def cmd_sweep(args: argparse.Namespace) -> int:
    from ftikd.experiments.sweep import load_sweep, prepare, run_sweep

    if args.workers < 1:
        raise FtikdError(f"--workers must be at least 1, got {args.workers}")
    cfg = load_sweep(args.source, sweep_overrides(args))
    if args.dry_run:
        jobs = prepare(cfg, f"sweep {cfg.name}")
        print(f"sweep {cfg.name}: {len(jobs)} runs -> {cfg.db_path}")
        for job in jobs:
            carried = cfg.choose_lr_at is not None and job.n != cfg.choose_lr_at
            note = f"  (runs if chosen at n={cfg.choose_lr_at})" if carried else ""
            print(f"{job.key}  {job.pair}  {job.label}  n={job.n}  seed={job.seed}  lr={job.lr:g}{note}")
        return 0
    counts = run_sweep(
        cfg,
        workers=args.workers,
        executor=args.executor,
        address=args.address,
        progress=not args.no_progress,
        retry_failed=args.retry_failed,
    )
    waiting = ""
    if counts["waiting"]:
        waiting = f", {counts['waiting']} wait for an LR choice at n={cfg.choose_lr_at}"
    print(
        f"sweep {cfg.name}: {counts['done']} done, {counts['failed']} failed, "
        f"{counts['pending'] + counts['running']} left{waiting} -> {cfg.db_path}"
    )
    return 0 if counts["failed"] == 0 else 1


def cmd_report(args: argparse.Namespace) -> int:
    from ftikd.analysis.report import write_report

    paths = write_report(
        args.db,
        args.out,
        sweep=args.sweep,
        targets=args.targets,
        paper_tables=args.paper_tables,
        reference=args.reference,
        reference_sweep=args.reference_sweep,
        paired_with=args.paired_with,
    )
    for path in paths:
        print(path)
    return 0


def add_sweep_commands(sub: Any) -> None:
    """Add the ``sweep`` and ``report`` sub-commands to an argparse sub-parsers object."""
    p = sub.add_parser("sweep", help="run a grid of distillation runs into a results database")
    p.add_argument("source", help="a preset name (e.g. cpu-fashion, paper-cifar100) or a sweep YAML file")
    g = p.add_argument_group("grid overrides (replace the preset's value)")
    g.add_argument("--name", help="sweep name in the database (default: the preset's)")
    g.add_argument("--dataset")
    g.add_argument("--data-dir")
    g.add_argument("--methods", nargs="+", help="e.g. ce kd ckd:k=3,form=kl")
    g.add_argument("--pairs", nargs="+", help="teacher->student, e.g. resnet14->resnet8")
    g.add_argument("--budgets", nargs="+", type=int, help="teacher-call budgets n")
    g.add_argument("--seeds", nargs="+", type=int)
    g.add_argument("--lrs", nargs="+", type=float, help="learning rates searched per (method, pair, n)")
    g.add_argument(
        "--choose-lr-at",
        type=int,
        metavar="N",
        help="search the LRs at budget N only; run the other budgets at each method's LR chosen there",
    )
    g.add_argument("--targets", nargs="+", type=float, help="accuracies for the calls-to-target table")
    g.add_argument("--out", help="sweep folder: teachers, stores, run checkpoints")
    g.add_argument("--db", help="results database (default <out>/results.sqlite)")
    g.add_argument("--track", help="log every run live to tensorboard and/or mlflow (comma-separated)")
    g.add_argument("--max-epochs", type=int)
    g.add_argument("--patience", type=int)
    g.add_argument("--phases", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--device")
    g.add_argument("--teacher-epochs", type=int, help="epochs of the teachers the sweep trains")
    e = p.add_argument_group("execution")
    e.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    e.add_argument("--executor", choices=["local", "ray"], default="local")
    e.add_argument("--address", help="Ray cluster address (default: start or join a local instance)")
    e.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    e.add_argument("--dry-run", action="store_true", help="list the runs and write nothing")
    e.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="tables, plots and calls-to-target from a results database")
    r.add_argument("db", help="results database (results.sqlite of a sweep)")
    r.add_argument("--out", default="report", help="folder for the Markdown, CSV and PNG files")
    r.add_argument("--sweep", help="report this sweep only (default: all runs in the database)")
    r.add_argument("--targets", nargs="+", type=float, help="accuracies for the calls-to-target table")
    r.add_argument("--paper-tables", help="folder of paper-tables CSVs (default $FTIKD_PAPER_TABLES)")
    r.add_argument(
        "--reference",
        metavar="DB",
        help="a second results database (e.g. the full protocol): add how both rank the methods per n",
    )
    r.add_argument("--reference-sweep", help="compare with this sweep of --reference only (default: all)")
    r.add_argument(
        "--paired-with",
        metavar="METHOD",
        help="add every method's seed-paired difference from METHOD (a method label, e.g. ckd) with its SE",
    )
    r.set_defaults(func=cmd_report)
