"""Write Fashion-MNIST in the CIFAR-100 "python version" file layout (issue 9's 100-way setting).

The same 60,000 / 10,000 images, zero-padded from 28x28 to 32x32 and repeated over three colour
planes, with their labels 0-9 as CIFAR-100 fine labels, so a model built for ``cifar100`` has a
100-way head of which 10 classes are used. ``ftikd --dataset cifar100 --data-dir OUT`` then reads
it (with CIFAR-100's normalisation constants). Used to compare CKD on 10-way and 100-way heads
with the same images (docs/ckd-fidelity.md).

usage: python scripts/fashion_as_cifar100.py OUT_DIR
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

from ftikd.data import load_dataset


def cifar_rows(images) -> np.ndarray:
    """(N, 1, 28, 28) uint8 -> (N, 3072) uint8: padded to 32x32, grey copied to R, G and B planes."""
    x = np.pad(images.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.repeat(x, 3, axis=1).reshape(len(x), 3 * 32 * 32)


def main(out: str) -> None:
    ds = load_dataset("fashion-mnist")
    folder = Path(out) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train", ds.train_images, ds.train_labels), ("test", ds.test_images, ds.test_labels)):
        batch = {b"fine_labels": y.tolist(), b"coarse_labels": [0] * len(y), b"data": cifar_rows(x)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    names = [c.encode() for c in ds.classes] + [f"unused{i}".encode() for i in range(10, 100)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"all"] * 20}, f, protocol=2)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main(sys.argv[1])
