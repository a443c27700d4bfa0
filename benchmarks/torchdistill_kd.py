"""ftikd's KD training, done the torchdistill way, timed for ``ftikd bench``.

Run it with the python of a virtual environment that has torchdistill and torchvision (ftikd's own
environment does not need either)::

    /tmp/tdv/bin/python benchmarks/torchdistill_kd.py --students resnet8 --threads 2 --json

It builds ftikd's student and teacher architectures (imported from this checkout's ``src``), the
bench's synthetic uint8 images and labels, and trains with torchdistill's own machinery as a
torchdistill user would: a ``DistillationBox`` from ``get_distillation_box`` configured by a train
config dict (``WeightedSumLoss`` over ``KDLoss`` with T=4, CE weight 1 and KD weight 1, SGD momentum
0.9, weight decay 5e-4), fed by a standard ``DataLoader`` over a dataset that applies torchvision
transforms one PIL image at a time (random crop with padding 4, horizontal flip, ``ToTensor``,
``Normalize``), as torchvision's MNIST-style datasets do.

Timed for each student, in rounds that run each of these once, in turn:

- ``torchdistill-bare``: the bare student step in this environment (its torch may differ from ftikd's);
- ``torchdistill-kd-teacher``: torchdistill's default, the teacher's forward on every batch;
- ``torchdistill-kd-cached``: teacher logits computed once and read by sample index through a
  registered teacher ``forward_proc`` and dataset wrapper. torchdistill 1.x has no built-in
  teacher-output cache; this is the closest to ftikd's ``kd`` step, which reads cached logits.

On its own, the script runs warm-up and timed rounds and reports rows in ``ftikd bench``'s shape:
median images/s and ``ratio``, the median of per-round ratios to the bare step of the same round
(``--json``: one JSON object on stdout). With ``--serve`` (how ``ftikd bench --torchdistill-python``
runs it) it times one round per student name read on stdin, so that the bench can interleave these
rounds with its own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

try:
    import torch
    import torch.nn.functional as F
    import torchdistill
    import torchvision
    from torch import nn
    from torch.utils.data import Dataset, RandomSampler
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.core.interfaces.registry import register_forward_proc_func
    from torchdistill.datasets.registry import register_dataset_wrapper
    from torchdistill.datasets.wrapper import BaseDatasetWrapper
    from torchvision import transforms
except ImportError as exc:  # exit code 3: ``ftikd bench`` says how to make the venv
    print(f"torch/torchdistill/torchvision not importable in {sys.executable}: {exc}", file=sys.stderr)
    sys.exit(3)

REPO_SRC = Path(__file__).resolve().parents[1] / "src"


def import_ftikd_models() -> types.ModuleType:
    """``ftikd.models`` without running ``ftikd/__init__.py``, which imports packages this venv lacks.

    The models need only torch; a bare package object pointing at ``src/ftikd`` lets Python find the
    submodules while skipping the top-level imports (safetensors, the engine, the store).
    """
    package = types.ModuleType("ftikd")
    package.__path__ = [str(REPO_SRC / "ftikd")]
    sys.modules.setdefault("ftikd", package)
    return importlib.import_module("ftikd.models")


FTIKD_MODELS = import_ftikd_models()


@register_forward_proc_func(key="ftikd_logits")
def ftikd_logits(model: nn.Module, sample_batch: torch.Tensor, targets=None, supp_dict=None, **kwargs):
    """ftikd models return ``ModelOutput``; torchdistill's ``KDLoss`` wants the logits tensor."""
    return model(sample_batch).logits


CACHED_LOGITS: dict[str, torch.Tensor] = {}


@register_forward_proc_func(key="cached_teacher_logits")
def cached_teacher_logits(model: nn.Module, sample_batch, targets=None, supp_dict=None, **kwargs):
    """Teacher 'forward' that reads logits computed once, by sample index (no teacher call)."""
    return CACHED_LOGITS["logits"][supp_dict["index"]]


@register_dataset_wrapper(key="IndexedDataset")
class IndexedDataset(BaseDatasetWrapper):
    """Adds each sample's index to torchdistill's supplementary dict, for the cached-logits mode."""

    def __getitem__(self, index: int):
        sample, target, supp_dict = super().__getitem__(index)
        supp_dict["index"] = index
        return sample, target, supp_dict


class SyntheticImages(Dataset):
    """uint8 (N, C, H, W) images turned into PIL images one at a time, then transformed, as in torchvision."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = transforms.functional.to_pil_image(self.images[i])
        return self.transform(image), self.labels[i]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's settings; ``ftikd bench`` passes its own values for every one."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", nargs="+", default=["resnet8", "wrn_16_2", "resnet8x4"])
    p.add_argument("--teacher", default="resnet14")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--serve", action="store_true", help="for ftikd bench: time one round per stdin line")
    return p.parse_args(argv)


def synthetic_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random images and labels as ``ftikd bench`` (same generator, seed and order)."""
    g = torch.Generator().manual_seed(0)
    shape = (args.num_train, args.channels, args.image_size, args.image_size)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    labels = torch.randint(0, args.num_classes, (args.num_train,), generator=g)
    return images, labels


def train_config(args: argparse.Namespace, cached: bool) -> dict[str, Any]:
    """A torchdistill train config for KD with ftikd's ``kd`` settings (T=4, CE 1 + KD 1)."""
    loader: dict[str, Any] = {
        "dataset_id": "train",
        "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
        "kwargs": {"batch_size": args.batch_size, "num_workers": 0, "drop_last": True},
    }
    if cached:
        loader["dataset_wrapper"] = {"key": "IndexedDataset"}
    kd = {
        "student_module_path": ".",
        "student_module_io": "output",
        "teacher_module_path": ".",
        "teacher_module_io": "output",
        "temperature": 4.0,
        "alpha": 1.0,
        "beta": 1.0,
        "reduction": "batchmean",
    }
    return {
        "num_epochs": 1,
        "train_data_loader": loader,
        "teacher": {
            "forward_proc": "cached_teacher_logits" if cached else "ftikd_logits",
            "requires_grad": False,
        },
        "student": {"forward_proc": "ftikd_logits", "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}},
        },
    }


def endless_batches(box: Any, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Batches epoch after epoch, with the box's pre/post-epoch processes, as torchdistill's examples do."""
    epoch = 0
    while True:
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            yield sample_batch.to(device), targets.to(device), supp_dict
        box.post_epoch_process()
        epoch += 1


def box_steps(box: Any, device: torch.device, steps: int) -> Callable[[], None]:
    """``steps`` training steps through the box: load, forward_process, post_forward_process."""
    batches = endless_batches(box, device)

    def run() -> None:
        for _ in range(steps):
            sample_batch, targets, supp_dict = next(batches)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)

    return run


def bare_steps(student: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], None]:
    """Forward, backward and SGD step on a normalised batch already in memory."""
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def run() -> None:
        for _ in range(steps):
            loss = F.cross_entropy(student(x).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def time_round(fns: dict[str, Callable[[], None]], sync: Callable[[], None]) -> dict[str, float]:
    """Wall time of each function, run once each in order."""
    times = {}
    for kind, fn in fns.items():
        started = time.perf_counter()
        fn()
        sync()
        times[kind] = time.perf_counter() - started
    return times


WHAT = {
    "torchdistill-bare": "torchdistill venv: bare student step (torch {torch})",
    "torchdistill-kd-teacher": "torchdistill KD, teacher {teacher} forward every step (its default)",
    "torchdistill-kd-cached": "torchdistill KD, cached teacher logits (own forward_proc; no built-in cache)",
}


def student_timers(args: argparse.Namespace, arch: str, teacher: nn.Module) -> dict[str, Callable[[], None]]:
    """Bare step and both torchdistill KD modes for one student, each built once."""
    device = torch.device(args.device)
    images, labels = synthetic_data(args)
    mean, std = (0.5,) * args.channels, (0.25,) * args.channels
    plain = normalised(args, images[: args.batch_size])
    augment = transforms.Compose(
        [
            transforms.RandomCrop(args.image_size, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    dataset = SyntheticImages(images, labels, augment)
    fns = {
        "torchdistill-bare": bare_steps(
            build(args, arch), plain, labels[: args.batch_size].to(device), args.steps
        )
    }
    for kind, cached in (("torchdistill-kd-teacher", False), ("torchdistill-kd-cached", True)):
        config = train_config(args, cached)
        box = get_distillation_box(
            teacher, build(args, arch), {"train": dataset}, config, device, None, False, 1
        )
        fns[kind] = box_steps(box, device, args.steps)
    return fns


def build(args: argparse.Namespace, arch: str) -> nn.Module:
    """An ftikd architecture with the bench's shape, seeded like ``ftikd bench``."""
    torch.manual_seed(0)
    model = FTIKD_MODELS.build_model(arch, in_channels=args.channels, num_classes=args.num_classes)
    return model.to(args.device)


def cache_teacher_logits(args: argparse.Namespace, teacher: nn.Module) -> None:
    """Teacher logits of every (unaugmented) training image, once, for the cached-logits mode."""
    images, _ = synthetic_data(args)
    with torch.no_grad():
        CACHED_LOGITS["logits"] = torch.cat([teacher(normalised(args, b)).logits for b in images.split(256)])


def normalised(args: argparse.Namespace, images: torch.Tensor) -> torch.Tensor:
    """uint8 images as the bench normalises them (mean 0.5, std 0.25 per channel), on the device."""
    mean, std = (torch.full((args.channels, 1, 1), v) for v in (0.5, 0.25))
    return ((images.float() / 255 - mean) / std).to(args.device)


def rows_from_rounds(args: argparse.Namespace, arch: str, rounds: list[dict[str, float]]) -> list[dict]:
    """Rows in ``ftikd bench``'s shape: median images/s, median per-round ratio to the bare step."""
    rates = {kind: [args.steps * args.batch_size / r[kind] for r in rounds] for kind in rounds[0]}
    bare = rates["torchdistill-bare"]
    return [
        {
            "student": arch,
            "what": WHAT[kind].format(torch=torch.__version__, teacher=args.teacher),
            "kind": kind,
            "images_per_s": statistics.median(r),
            "ratio": statistics.median(a / b for a, b in zip(r, bare, strict=True)),
        }
        for kind, r in rates.items()
    ]


def serve(
    args: argparse.Namespace,
    timers: dict[str, dict[str, Callable[[], None]]],
    sync: Callable[[], None],
    out: TextIO,
) -> None:
    """For ``ftikd bench``: one JSON line of round times per student name read on stdin.

    The bench interleaves these rounds with its own, so that both sides of every ftikd/torchdistill
    ratio are timed within seconds of each other on a machine whose load changes.
    """
    what = {kind: text.format(torch=torch.__version__, teacher=args.teacher) for kind, text in WHAT.items()}
    print(json.dumps({"what": what, "versions": versions()}), file=out, flush=True)
    for line in sys.stdin:
        print(json.dumps(time_round(timers[line.strip()], sync)), file=out, flush=True)
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}), file=out, flush=True)


def versions() -> dict[str, str]:
    """Versions that affect this side's numbers."""
    return {
        "torchdistill": torchdistill.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": sys.version.split()[0],
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries only this script's own output
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    teacher = build(args, args.teacher).eval()
    cache_teacher_logits(args, teacher)
    timers = {arch: student_timers(args, arch, teacher) for arch in args.students}
    if args.serve:
        serve(args, timers, sync, out)
        return 0
    rows = []
    for arch, fns in timers.items():
        rounds = [time_round(fns, sync) for _ in range(args.warmup + args.repeats)][args.warmup :]
        rows += rows_from_rounds(args, arch, rounds)
    result = {"rows": rows, "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}
    result["versions"] = versions()
    if args.json:
        print(json.dumps(result), file=out)
    else:
        for row in rows:
            print(
                f"{row['student']} | {row['what']} | {row['images_per_s']:.0f} | {row['ratio']:.2f}", file=out
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
