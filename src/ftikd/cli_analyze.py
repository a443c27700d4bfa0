"""``ftikd analyze {correlation,svd,transfer,tsne,curves}``: METHODS.md §3.2 analyses of saved students.

Each analysis reads the students (checkpoints or run records, checked by
:mod:`ftikd.cli_analyze_io` before any work) and writes ``<name>.md`` (settings and table),
``<name>.csv`` and ``<name>.png`` into ``--out``. ``ftikd.cli`` adds the command with
``add_analyze_commands(sub)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ftikd.cli_analyze_io import Subject, Tables, checked_config, logits_of, prepare, write_outputs
from ftikd.errors import FtikdError

_HISTORY_KEYS = {"epoch", "phase", "lr", "val_acc", "train_acc", "improved", "time_s", "phase_end"}


def cmd_correlation(args: argparse.Namespace) -> list[Path]:
    """CKD Table 4: mean |R_student - R_teacher| of logit class correlations on seeded test images."""
    from ftikd.analysis.correlation import correlation_difference, plot_differences, sample_indices

    dataset, subjects = prepare(args)
    images = dataset.test_images[sample_indices(dataset.test_images.shape[0], args.samples, args.seed)]
    teacher = logits_of(subjects[0], dataset, images)
    diffs = {s.label: correlation_difference(teacher, logits_of(s, dataset, images)) for s in subjects[1:]}
    rows = [["model", "arch", "test top-1 %", "mean abs correlation difference"]]
    rows += [
        [
            s.label,
            s.meta["arch"],
            f"{s.meta.get('test_acc', float('nan')):.2f}",
            f"{float(diffs[s.label].mean()):.4f}",
        ]
        for s in subjects[1:]
    ]
    notes = (
        f"Teacher {subjects[0].path.name} ({subjects[0].meta['arch']}) on {args.samples} {dataset.name} test "
        f"images drawn with seed {args.seed}, the same for every model: class-correlation matrices of logits "
        "(columns centred, S = LcᵀLc/(N-1), R = S/((σ+1e-12)(σ+1e-12))), mean |R_student - R_teacher| over "
        "all C² entries (METHODS.md §3.2 (a), A31). Lower is closer to the teacher."
    )
    return _write(args, notes, [("", rows)], lambda path: plot_differences(diffs, path))


def cmd_svd(args: argparse.Namespace) -> list[Path]:
    """CKD Fig. 4: class-averaged singular value spectra of the test logits of each model."""
    from ftikd.analysis.svd import class_spectrum, flatness, plot_spectra

    dataset, subjects = prepare(args)
    # one group holding every test image gives the spectrum of the whole test logits matrix
    labels = torch.zeros_like(dataset.test_labels) if args.whole_matrix else dataset.test_labels
    spectra = {
        s.label: class_spectrum(logits_of(s, dataset, dataset.test_images).cpu(), labels, args.normalise)
        for s in subjects
    }
    shown = min(10, min(sp.numel() for sp in spectra.values()))
    rows = [["model", "arch", "flatness mean σ_i/σ_1", *[f"σ{i + 1}" for i in range(shown)]]]
    rows += [
        [
            s.label,
            s.meta["arch"],
            f"{flatness(spectra[s.label]):.4f}",
            *[f"{v:.4g}" for v in spectra[s.label][:shown].tolist()],
        ]
        for s in subjects
    ]
    scale = "each spectrum divided by its largest value" if args.normalise else "raw"
    how = (
        f"the whole {dataset.name} test logits matrix (N x C, uncentred) is decomposed"
        if args.whole_matrix
        else f"for each class, the {dataset.name} test logits of that class (n_c x C, uncentred) are "
        "decomposed and the sorted singular values averaged over classes rank by rank"
    )
    notes = (
        f"Singular value spectra of the logits: {how}; {scale} (METHODS.md §3.2 (b), A32). "
        "A lower, faster-falling curve is a flatter representation."
    )
    return _write(args, notes, [("", rows)], lambda path: plot_spectra(spectra, path, args.normalise))


def cmd_transfer(args: argparse.Namespace) -> list[Path]:
    """Survey Fig. 1: PGD crafted on each model, success rate and accuracy on every model."""
    from ftikd.analysis.embedding import subsample
    from ftikd.analysis.transfer import PGDConfig, PixelModel, plot_success, result_tables, transfer_matrix

    cfg = checked_config(
        PGDConfig,
        eps=args.eps,
        step=args.step_size,
        steps=args.steps,
        random_start=not args.no_random_start,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if args.samples is not None and args.samples < 1:
        raise FtikdError(f"--samples must be at least 1, got {args.samples}")
    dataset, subjects = prepare(args)
    idx = subsample(dataset.test_images.shape[0], args.samples or dataset.test_images.shape[0], args.seed)
    nets = [PixelModel(s.model, dataset.mean, dataset.std) for s in subjects]
    res = transfer_matrix(nets, dataset.test_images[idx], dataset.test_labels[idx], cfg)
    names = [s.label for s in subjects]
    start = "uniform random start" if cfg.random_start else "no random start"
    notes = (
        f"Untargeted L∞ PGD, cross-entropy on the true label, in [0, 1] pixels: eps={cfg.eps:g}, "
        f"step={cfg.step:g}, {cfg.steps} steps, {start} (METHODS.md §3.3, A34), on {len(idx)} {dataset.name} "
        f"test images (seed {cfg.seed}). Success rate: the share of the images correct on both source and "
        "target when clean that the target gets wrong after the attack (their count in brackets)."
    )
    return _write(args, notes, result_tables(res, names), lambda path: plot_success(res, names, path))


def cmd_tsne(args: argparse.Namespace) -> list[Path]:
    """t-SNE of the penultimate embeddings of each model on a seeded test subsample."""
    from ftikd.analysis.embedding import (
        TSNEConfig,
        model_outputs,
        plot_tsne,
        silhouette,
        subsample,
        tsne_embedding,
    )

    cfg = checked_config(TSNEConfig, samples=args.samples, perplexity=args.perplexity, seed=args.seed)
    dataset, subjects = prepare(args)
    idx = subsample(dataset.test_images.shape[0], cfg.samples, cfg.seed)
    labels = dataset.test_labels[idx].numpy()
    rows = [["model", "arch", "embedding dim", "samples", "t-SNE KL", "silhouette emb", "silhouette 2-D"]]
    coords = {}
    for s in subjects:
        emb = model_outputs(s.model, dataset.test_images[idx], dataset.mean, dataset.std).embedding.cpu()
        coords[s.label], kl = tsne_embedding(emb, cfg)
        rows.append(
            [
                s.label,
                s.meta["arch"],
                str(emb.shape[1]),
                str(len(idx)),
                f"{kl:.3f}",
                f"{silhouette(emb.numpy(), labels):.3f}",
                f"{silhouette(coords[s.label], labels):.3f}",
            ]
        )
    notes = (
        f"Penultimate ('embedding') features of {len(idx)} {dataset.name} test images (seed {cfg.seed}); "
        f"scikit-learn t-SNE, PCA init, perplexity min({cfg.perplexity:g}, (N-1)/3), "
        f"random_state {cfg.seed}. Colour = true class; silhouette of the true classes (higher = better "
        "separated)."
    )
    return _write(args, notes, [("", rows)], lambda path: plot_tsne(coords, labels, path))


def _plot_histories(subjects: list[Subject], path: Path) -> Path:
    """Two panels: validation accuracy (dashed: best so far; dotted: training accuracy, when the
    record has it) and training loss, per pseudo-epoch."""
    from ftikd.analysis.curves import best_so_far
    from ftikd.analysis.embedding import panel_axes
    from ftikd.analysis.plot import save_figure

    fig, (ax_val, ax_loss) = panel_axes(2, size=4.5)
    for s in subjects:
        history = s.record["history"]
        epochs = [h["epoch"] for h in history]
        (line,) = ax_val.plot(epochs, [h["val_acc"] for h in history], label=s.label)
        ax_val.plot(epochs, best_so_far(s.record)[1], linestyle="--", color=line.get_color())
        if "train_acc" in history[0]:
            ax_val.plot(epochs, [h["train_acc"] for h in history], linestyle=":", color=line.get_color())
        ax_loss.plot(epochs, _train_loss(history), color=line.get_color(), label=s.label)
    ax_val.set_ylabel("validation (train: dotted) top-1 (%)")
    ax_loss.set_ylabel("training loss (sum of weighted terms)")
    for ax in (ax_val, ax_loss):
        ax.set_xlabel("pseudo-epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def _train_loss(history: list[dict[str, Any]]) -> list[float]:
    """Per pseudo-epoch, the sum of the method's weighted loss terms (what the engine minimised)."""
    return [sum(v for k, v in h.items() if k not in _HISTORY_KEYS) for h in history]


def cmd_curves(args: argparse.Namespace) -> list[Path]:
    """Validation accuracy and training loss per pseudo-epoch of each run, from its record's history."""
    from ftikd.analysis.curves import best_so_far

    dataset, subjects = prepare(args, with_teacher=False, load=False)
    for s in subjects:
        if s.record is None:
            raise FtikdError(f"no run record beside {s.path}; pass the run record (<run>.json) for curves")
        best_so_far(s.record)  # refuses a record without history
    rows = [["model", "epochs", "best val %", "best epoch", "final train loss", "test top-1 %"]]
    for s in subjects:
        history, metrics = s.record["history"], s.record.get("metrics", {})
        rows.append(
            [
                s.label,
                str(len(history)),
                f"{max(h['val_acc'] for h in history):.2f}",
                str(metrics.get("best_epoch", "-")),
                f"{_train_loss(history)[-1]:.4f}",
                f"{metrics.get('test_top1', float('nan')):.2f}",
            ]
        )
    notes = (
        f"{len(subjects)} {dataset.name} runs. Validation top-1 after each pseudo-epoch on the run's n//4 "
        "validation split (dashed: best so far, the early-stopping signal); the training curve is the "
        "epoch-mean objective the engine minimised; dotted: top-1 on as many training images as the "
        "validation split holds, unaugmented, in eval mode (records from before this have none)."
    )
    return _write(args, notes, [("", rows)], lambda path: _plot_histories(subjects, path))


_TITLES = {
    "correlation": "Teacher/student logit correlation difference",
    "svd": "SVD flatness of the logit representations",
    "transfer": "PGD adversarial transferability",
    "tsne": "t-SNE of penultimate embeddings",
    "curves": "Training and validation curves",
}
_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], list[Path]], str]] = {
    "correlation": (cmd_correlation, "teacher/student logit correlation difference (CKD Table 4)"),
    "svd": (cmd_svd, "SVD flatness curves of the logits (CKD Fig. 4)"),
    "transfer": (cmd_transfer, "PGD adversarial transferability between models (survey settings)"),
    "tsne": (cmd_tsne, "t-SNE of penultimate embeddings"),
    "curves": (cmd_curves, "validation accuracy and training loss curves from run records"),
}


def _write(args: argparse.Namespace, notes: str, tables: Tables, plot: Callable[[Path], Path]) -> list[Path]:
    return write_outputs(args, _TITLES[args.analysis], notes, tables, plot)


def _run(args: argparse.Namespace) -> int:
    for path in _COMMANDS[args.analysis][0](args):
        print(path)
    return 0


def add_analyze_commands(sub: Any) -> None:
    """Add ``analyze`` and its five analyses to an argparse sub-parsers object."""
    p = sub.add_parser("analyze", help="analyses of saved students: correlation, svd, transfer, tsne, curves")
    kinds = p.add_subparsers(dest="analysis", required=True)
    for name, (_, text) in _COMMANDS.items():
        q = kinds.add_parser(name, help=text, description=text)
        q.add_argument("--teacher", required=name != "curves", help="teacher checkpoint (.safetensors)")
        q.add_argument(
            "--students",
            nargs="+",
            required=True,
            metavar="PATH",
            help="student checkpoints (<run>.student.safetensors) or run records (<run>.json)",
        )
        q.add_argument("--dataset", required=True, help="dataset the models were trained on, e.g. digits")
        q.add_argument("--data-dir", help="where the dataset files are")
        q.add_argument("--out", required=True, help="folder for the Markdown, CSV and PNG files")
        q.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
        q.set_defaults(func=_run)
        if name == "correlation":
            q.add_argument("--samples", type=int, default=100, help="test images (default 100, as Table 4)")
            q.add_argument("--seed", type=int, default=0, help="seed drawing the test images (default 0)")
        elif name == "svd":
            q.add_argument(
                "--normalise", action="store_true", help="divide each spectrum by its largest value"
            )
            q.add_argument(
                "--whole-matrix", action="store_true", help="one spectrum of all test logits, not per class"
            )
        elif name == "transfer":
            q.add_argument(
                "--eps", type=float, default=0.031, help="L∞ radius in [0, 1] pixels (default 0.031)"
            )
            q.add_argument("--step-size", type=float, default=0.003, help="PGD step (default 0.003)")
            q.add_argument("--steps", type=int, default=20, help="PGD iterations (default 20)")
            q.add_argument("--no-random-start", action="store_true", help="start at the clean image")
            q.add_argument("--samples", type=int, help="seeded subsample of test images (default: all)")
            q.add_argument(
                "--batch-size", type=int, default=500, help="images attacked at once (default 500)"
            )
            q.add_argument("--seed", type=int, default=0)
        elif name == "tsne":
            q.add_argument("--samples", type=int, default=1000, help="seeded test subsample (default 1000)")
            q.add_argument("--perplexity", type=float, default=30.0)
            q.add_argument("--seed", type=int, default=0)
