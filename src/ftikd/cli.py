"""The ``ftikd`` command line: argument parsing and messages only, each verb a thin API call.

User errors (:class:`FtikdError`) print one line on stderr and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from ftikd.checks import check_output_file
from ftikd.cli_analyze import add_analyze_commands
from ftikd.cli_sweep import add_sweep_commands
from ftikd.errors import FtikdError


def _add_train_flags(p: argparse.ArgumentParser, title: str) -> None:
    g = p.add_argument_group(title)
    g.add_argument("--lr", type=float, help="initial learning rate (default 0.05)")
    g.add_argument("--batch-size", type=int, help="rows per step: images, or groups for CKD (default 64)")
    g.add_argument(
        "--patience", type=int, help="evaluations without improvement that end a phase (default 50)"
    )
    g.add_argument("--phases", type=int, help="phases (LR /10 after each) before stopping (default 3)")
    g.add_argument(
        "--max-epochs", type=int, help="cap on pseudo-epochs of ceil(n/batch) steps (default 1000)"
    )
    g.add_argument("--device", help="training device, e.g. cpu or cuda (default cpu)")
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="autocast of forward and loss (default auto: bf16 on a CUDA GPU that has it, else fp32)",
    )
    g.add_argument(
        "--memory-format",
        choices=["auto", "contiguous", "channels_last"],
        help="student weight layout (default auto: channels_last on CUDA, contiguous on CPU)",
    )
    g.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile the student (default off)"
    )


_TRAIN_FLAGS = {
    "lr": "lr",
    "batch_size": "batch_size",
    "patience": "patience",
    "phases": "phases",
    "max_epochs": "max_epochs",
    "device": "device",
    "precision": "precision",
    "memory_format": "memory_format",
    "compile": "compile",
}


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(args, flag) is not None
    }


def cmd_demo(args: argparse.Namespace) -> int:
    from ftikd.engine.trainer import TrainConfig
    from ftikd.experiments.demo import DemoConfig, MethodSpec, run_demo

    cfg = DemoConfig()
    if args.full:  # the full FTI-KD protocol: distill's defaults, runs kept apart from the demo's
        cfg.train, cfg.runs_dir = TrainConfig(), "runs-full"
    cfg.train = dataclasses.replace(cfg.train, **_train_overrides(args))
    for flag in ("data_dir", "out", "budgets", "seeds", "teacher_epochs", "teacher", "workers"):
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    if args.methods:
        cfg.methods = [MethodSpec.parse(spec) for spec in args.methods]
    if args.lr is not None:  # an explicit --lr applies to every method
        cfg.methods = [dataclasses.replace(spec, lr=None) for spec in cfg.methods]
    run_demo(cfg, progress=not args.no_progress)
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from ftikd.teacher.train import TeacherTrainConfig, train_teacher

    cfg = TeacherTrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        arch=args.arch,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        schedule=args.schedule,
        milestones=args.milestones,
        seed=args.seed,
        device=args.device,
        out=args.out,
    )
    _, meta = train_teacher(cfg, progress=not args.no_progress)
    print(
        f"teacher {meta['arch']} on {meta['dataset']}: test top-1 {meta['test_acc']}% "
        f"(fingerprint {meta['fingerprint']}) -> {args.out}"
    )
    return 0


def distill_config(args: argparse.Namespace):
    """The RunConfig of ``ftikd distill``: the --config file (if any) overridden by the flags."""
    from ftikd.experiments.run import RunConfig
    from ftikd.options import parse_options

    cfg = RunConfig.from_file(args.config) if args.config else RunConfig()
    flags = "teacher dataset data_dir student method calls seed view store out track".split()
    for flag in flags:
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    if args.opt:
        cfg.method_options = {**cfg.method_options, **parse_options(args.opt)}
    cfg.train = dataclasses.replace(cfg.train, **_train_overrides(args))
    return cfg


def cmd_distill(args: argparse.Namespace) -> int:
    from ftikd.experiments.run import run_distillation

    print_run(run_distillation(distill_config(args), progress=not args.no_progress, resume=args.resume))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from ftikd.experiments.run import pending_runs, run_distillation

    configs = pending_runs(args.path)
    if not configs:
        print(f"no unfinished runs at {args.path}")
    for cfg in configs:
        print_run(run_distillation(cfg, progress=not args.no_progress, resume=True))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from ftikd.distributed import dist_context
    from ftikd.experiments.cache import CacheConfig, run_cache

    cfg = CacheConfig()
    for field in dataclasses.fields(cfg):  # every field has a flag of the same name
        if getattr(args, field.name) is not None:
            setattr(cfg, field.name, getattr(args, field.name))
    result = run_cache(cfg, progress=not args.no_progress)
    if dist_context().is_main:
        print(result.summary())
    return 0


def print_run(result) -> None:
    """One line per finished run: accuracy, best validation point, teacher calls, record path.

    Under torchrun only rank 0 prints, as it alone wrote the record.
    """
    from ftikd.distributed import dist_context

    if not dist_context().is_main:
        return
    m, calls = result.record["metrics"], result.record["teacher_calls"]
    print(
        f"{result.record['run']}: test top-1 {m['test_top1']:.2f}%  top-5 {m['test_top5']:.2f}%  "
        f"(best val {m['best_val_acc']:.2f}% at epoch {m['best_epoch']}; teacher calls: "
        f"{calls['paid_this_run']} paid now, {calls['outputs_used']} used of budget {calls['budget']})"
        f" -> {result.path}"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from ftikd.engine.record import write_json
    from ftikd.experiments.bench import BenchConfig, format_bench, run_bench

    cfg = BenchConfig()
    flags = (
        "students",
        "methods",
        "teacher",
        "device",
        "threads",
        "steps",
        "repeats",
        "batch_size",
        "cache_samples",
        "torchdistill_python",
        "precision",
        "memory_format",
        "compile",
    )
    for flag in flags:
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    if args.out:
        check_output_file(args.out)  # before minutes of measuring
    result = run_bench(cfg)
    print(format_bench(result))
    if args.out:
        write_json(args.out, result)
        print(f"-> {args.out}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from ftikd.methods.catalogue import COLUMNS, catalogue, markdown_table

    cards = catalogue()
    if args.markdown:
        print(markdown_table(cards), end="")
        return 0
    for card in cards:
        print(f"{card.name}: {card.summary}")
        for label, value in zip(COLUMNS[1:-1], card.cells()[1:-1], strict=True):
            print(f"    {label:24s} {value}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ftikd.models import available_models

    print("\n".join(available_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftikd", description="Knowledge distillation under a teacher-call budget."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a teacher, distill CE/KD/CKD at n=500 x 3 seeds, print the table")
    p.add_argument(
        "--data-dir", help="folder with the Fashion-MNIST IDX files (default: the Debian package's)"
    )
    p.add_argument("--out", help="results folder (default results/demo)")
    p.add_argument("--budgets", type=int, nargs="+", help="teacher-call budgets n (default 500)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 1 2 3)")
    p.add_argument("--teacher-epochs", type=int, help="teacher training epochs")
    p.add_argument("--teacher", help="use this teacher checkpoint instead of training/reusing the demo's")
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="SPEC",
        help="methods to compare, e.g. ce kd ckd:k=3,lr=0.01 ckd-inbatch (default: see README)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the full FTI-KD protocol (3 phases, distill's defaults) instead of the demo's 1 phase; "
        "runs go to OUT/runs-full",
    )
    p.add_argument(
        "--workers", type=int, help="runs at once, each on its share of the cores (default: one per core)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_train_flags(p, "training schedule (demo defaults: distill's, but 1 phase)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train-teacher", help="train a teacher on the full training split and save a checkpoint"
    )
    p.add_argument(
        "--dataset", default="fashion-mnist", help="fashion-mnist, cifar10, cifar100, digits or folder:PATH"
    )
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--arch", default="resnet20", help="architecture (see ftikd models)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "multistep"])
    p.add_argument(
        "--milestones",
        type=int,
        nargs="+",
        default=[150, 180, 210],
        help="epochs of x0.1 LR steps for multistep",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="distill a student from a teacher under a budget of n teacher calls")
    p.add_argument("--config", help="JSON/YAML config or a run record to repeat; flags override it")
    p.add_argument("--dataset", help="fashion-mnist (default), cifar10, cifar100, digits or folder:PATH")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--teacher", help="teacher checkpoint (.safetensors from ftikd train-teacher)")
    p.add_argument("--student", help="student architecture (default resnet8; see ftikd models)")
    p.add_argument("--method", help="method name (default ckd; see ftikd methods)")
    p.add_argument(
        "--opt", action="append", metavar="KEY=VALUE", help="method option, repeatable, e.g. --opt k=3"
    )
    p.add_argument("--calls", type=int, help="budget n: teacher calls = training samples (default 2000)")
    p.add_argument(
        "--seed", type=int, help="seed of the split, the student's init and the sampler (default 1)"
    )
    p.add_argument("--view", type=int, help="seed of the teacher's single augmented view (default 0)")
    p.add_argument(
        "--store", help="teacher-output store (default: <out>/../stores/<dataset>-<fingerprint>.sqlite)"
    )
    p.add_argument("--out", help="folder for the run record (default results/runs)")
    p.add_argument(
        "--resume", action="store_true", help="continue this run from its last checkpoint if it was killed"
    )
    p.add_argument(
        "--track",
        metavar="TRACKERS",
        help="log each pseudo-epoch live to tensorboard and/or mlflow (comma-separated; optional extras)",
    )
    p.add_argument("--no-progress", action="store_true")
    _add_train_flags(p, "training schedule (defaults: the FTI-KD protocol)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("resume", help="continue killed runs from their checkpoints")
    p.add_argument("path", help="a runs folder (resumes every unfinished run in it) or a <run>.pending.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser(
        "cache", help="pay for teacher outputs on many training samples; data-parallel under torchrun"
    )
    p.add_argument("--teacher", help="teacher checkpoint (.safetensors from ftikd train-teacher)")
    p.add_argument("--dataset", help="fashion-mnist (default), cifar10, cifar100, digits or folder:PATH")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--samples", type=int, help="how many training samples (default: all)")
    p.add_argument("--seed", type=int, help="cache a random subset drawn with this seed (default: the first)")
    p.add_argument("--view", type=int, help="seed of the teacher's augmented view, as in distill (default 0)")
    p.add_argument("--store", help="teacher-output store (default: the one ftikd distill --out OUT uses)")
    p.add_argument("--out", help="runs folder whose default store to fill (default results/runs)")
    p.add_argument("--device", help="cpu or cuda (default cpu; under torchrun each rank uses its GPU)")
    p.add_argument("--batch-size", type=int, help="samples per teacher call and commit (default 256)")
    p.add_argument("--max-calls", type=int, help="set the store's lifetime cap on paid teacher calls")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("bench", help="ftikd's training step and teacher caching against the bare model")
    p.add_argument("--students", nargs="+", help="student architectures (default resnet8 wrn_16_2 resnet8x4)")
    p.add_argument(
        "--methods",
        nargs="+",
        help="methods to time (name or name:key=value,...), or 'all' for every registered one and vrm's "
        "original mode (default ce kd ckd ckd-inbatch)",
    )
    p.add_argument("--teacher", help="teacher for caching and torchdistill's KD (default resnet14)")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="as in distill (default auto)")
    p.add_argument("--memory-format", choices=["auto", "contiguous", "channels_last"], help="as in distill")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the students")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--steps", type=int, help="optimizer steps per timed repetition (default 10)")
    p.add_argument("--repeats", type=int, help="timed repetitions; the median is reported (default 5)")
    p.add_argument("--batch-size", type=int, help="rows per step (default 64)")
    p.add_argument(
        "--cache-samples", type=int, help="samples in the teacher-caching benchmark (default 1024)"
    )
    p.add_argument(
        "--torchdistill-python",
        metavar="PATH",
        help="python of a venv with torchdistill: also time the same KD training there (docs/bench)",
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("methods", help="list the registered methods")
    p.add_argument("--markdown", action="store_true", help="print the README's method table")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("models", help="list the registered architectures")
    p.set_defaults(func=cmd_models)
    add_sweep_commands(sub)
    add_analyze_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FtikdError as exc:
        print(f"ftikd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ftikd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
