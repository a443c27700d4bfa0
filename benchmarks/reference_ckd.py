"""The CKD authors' training path on the CPU, as a control for ftikd's CKD (issue 13).

An independent second implementation of how ``alextxu/ckd`` (commit f8cc6bd, MSE form) trains a
CKD student, kept apart from ftikd's engine on purpose: it shares only ftikd's FTI split (so the
two pipelines see the same training and validation samples for a seed) and its checkpoint loader
(so they distil the same teacher). Everything else is done the authors' way, one sample at a time:

- teacher outputs: every sample of the subset (training and validation) is augmented once with the
  training transform and sent through the teacher in eval mode, batch 1;
- groups (k = 2): all ordered (positive, negative) pairs of the training samples, then 100,000 of
  them drawn with Python's ``random`` when there are more; a ``DataLoader`` with ``shuffle=True``
  over that fixed set, a partial last batch per pass and a new pass after every phase end;
- every member gets its own crop (zero padding 4, before normalisation) and flip at every visit,
  drawn from torch's global RNG in torchvision's order (row offset, column offset, flip);
- the student (the authors' CIFAR ResNet, written out here) runs on the 64 positives, then on the 64
  negatives; the loss is ``nn.MSELoss`` (class mean) on the label difference plus the same on the
  cached teacher difference; SGD with momentum 0.9 and weight decay 5e-4 on every parameter;
- validation every ceil(0.8 * subset / 64) steps, a float32 running mean over batches of 32; a
  strict improvement saves the state and measures the test accuracy; 50 evaluations without one
  end a phase: reload the best state, keep the momentum, LR x 0.1; three phases.

CE runs (``--method ce``) use the same loop over the training samples with a batch-64 loader.

    python benchmarks/reference_ckd.py --data-dir DIR --teacher T.safetensors --seed 1 --out r.json

``DIR`` holds the CIFAR-100 python layout (``scripts/fashion_as_cifar100.py`` writes Fashion-MNIST
in it). The result is one JSON object: test top-1 at the best validation point, best validation
accuracy and its pseudo-epoch, pseudo-epochs run, wall time and the validation curve.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import pickle
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ftikd.data.split import fti_split  # noqa: E402
from ftikd.teacher.checkpoint import load_checkpoint  # noqa: E402

MEAN = torch.tensor((0.5071, 0.4867, 0.4408)).view(3, 1, 1)
STD = torch.tensor((0.2675, 0.2565, 0.2761)).view(3, 1, 1)


def to_normalised_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> normalised CHW float, as ToTensor then Normalize."""
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255)
    return (t - MEAN) / STD


def augment(img: np.ndarray, padding: int = 4) -> torch.Tensor:
    """Zero-pad, crop back to size at a random offset, flip with probability 0.5, normalise."""
    h, w = img.shape[:2]
    padded = np.pad(img, ((padding, padding), (padding, padding), (0, 0)))
    top = int(torch.randint(0, 2 * padding + 1, size=(1,)))
    left = int(torch.randint(0, 2 * padding + 1, size=(1,)))
    out = padded[top : top + h, left : left + w]
    if torch.rand(1) < 0.5:
        out = out[:, ::-1]
    return to_normalised_tensor(out)


class Block(nn.Module):
    """Two 3x3 conv + BN, a 1x1 conv + BN shortcut when the shape changes, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of the authors' model zoo (depth 6n + 2, widths 16/16/32/64), their init."""

    def __init__(self, depth: int = 8, num_classes: int = 100, widths=(16, 16, 32, 64)) -> None:
        super().__init__()
        n = (depth - 2) // 6
        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        cin = widths[0]
        for stage, width in enumerate(widths[1:]):
            for b in range(n):
                layers.append(Block(cin, width, 2 if stage > 0 and b == 0 else 1))
                cin = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


class TrainSamples(Dataset):
    """The training samples: a fresh augmented view per access, the label, the cached teacher logits."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, logits: torch.Tensor) -> None:
        self.images, self.labels, self.logits = images, labels, logits

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return augment(self.images[i]), int(self.labels[i]), self.logits[i]


class PairGroups(Dataset):
    """k = 2 groups: every ordered (positive, negative) pair, at most ``max_groups`` of them kept."""

    def __init__(self, samples: TrainSamples, num_classes: int, max_groups: int = 100_000) -> None:
        self.samples, self.num_classes = samples, num_classes
        pairs = [p for a, b in itertools.combinations(range(len(samples)), 2) for p in ((a, b), (b, a))]
        if len(pairs) > max_groups:
            pairs = [pairs[i] for i in random.sample(range(len(pairs)), max_groups)]
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, g: int):
        (x_pos, y_pos, t_pos), (x_neg, y_neg, t_neg) = (self.samples[i] for i in self.pairs[g])
        onehot = torch.eye(self.num_classes)
        return x_pos, x_neg, onehot[y_pos], onehot[y_neg], t_pos, t_neg


class EvalSamples(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return to_normalised_tensor(self.images[i]), int(self.labels[i])


def load_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.asarray(d[b"fine_labels"], dtype=np.int64)


@torch.no_grad()
def accuracy(loader: DataLoader, model: nn.Module) -> float:
    """Top-1 %, as a float32 running mean of per-batch accuracies weighted by batch size."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float32), 0
    for x, y in loader:
        batch_acc = (model(x).argmax(1) == y).float().sum() * (100.0 / y.size(0))
        total, count = total + batch_acc * y.size(0), count + y.size(0)
    model.train()
    return float(total / count)


def step_loss(method: str, model: nn.Module, batch) -> torch.Tensor:
    if method == "ce":
        x, y, _ = batch
        return F.cross_entropy(model(x), y)
    x_pos, x_neg, y_pos, y_neg, t_pos, t_neg = batch
    ds = model(x_pos) - model(x_neg)
    return F.mse_loss(ds, y_pos - y_neg) + F.mse_loss(ds, t_pos - t_neg)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    teacher, meta = load_checkpoint(args.teacher)
    num_classes = int(meta["num_classes"])
    folder = Path(args.data_dir) / "cifar-100-python"
    train_x, train_y = load_cifar_pickle(folder / "train")
    test_x, test_y = load_cifar_pickle(folder / "test")
    split = fti_split(len(train_x), args.n, args.seed)
    tr, va = split.train_idx.numpy(), split.val_idx.numpy()
    with torch.no_grad():
        cached = {int(i): teacher(augment(train_x[i])[None]).logits[0] for i in np.concatenate([tr, va])}
    samples = TrainSamples(train_x[tr], train_y[tr], torch.stack([cached[int(i)] for i in tr]))
    train_set = samples if args.method == "ce" else PairGroups(samples, num_classes)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    val_loader = DataLoader(EvalSamples(train_x[va], train_y[va]), batch_size=32)
    test_loader = DataLoader(EvalSamples(test_x, test_y), batch_size=500)

    model = CifarResNet(8, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    eval_every = (int((len(tr) + len(va)) * 0.8) + 63) // 64
    steps, last_improve, phase = 0, 0, 0
    best_val, best_epoch, test_acc, best_state, curve = -1.0, 0, 0.0, None, []
    while steps // eval_every < args.max_epochs and phase < 3:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.1**phase
        model.train()
        phase_over = False
        for batch in train_loader:
            loss = step_loss(args.method, model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps % eval_every:
                continue
            val = accuracy(val_loader, model)
            curve.append(round(val, 2))
            if val > best_val:
                best_val, best_epoch, last_improve = val, steps // eval_every, steps
                best_state = copy.deepcopy(model.state_dict())
                test_acc = accuracy(test_loader, model)
            if (
                steps // eval_every >= args.max_epochs
                or (steps - last_improve) // eval_every >= args.patience
            ):
                phase_over = True
                break
        if phase_over:
            model.load_state_dict(best_state)
            last_improve, phase = steps, phase + 1
    return {
        "pipeline": "authors' path (benchmarks/reference_ckd.py)",
        "method": args.method,
        "seed": args.seed,
        "n": args.n,
        "test_top1": round(test_acc, 2),
        "best_val_acc": round(best_val, 2),
        "best_epoch": best_epoch,
        "epochs": steps // eval_every,
        "wall_s": round(time.perf_counter() - started, 1),
        "val_curve": curve,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder holding cifar-100-python/")
    ap.add_argument("--teacher", required=True, help="ftikd teacher checkpoint (.safetensors)")
    ap.add_argument("--method", default="ckd", choices=["ckd", "ce"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=500, help="training samples (ftikd's budget n)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--patience", type=int, default=50)
    ap.add_argument("--max-epochs", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="JSON result file")
    args = ap.parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "val_curve"}))


if __name__ == "__main__":
    main()
