"""Tests for ftikd.data: IDX and CIFAR readers in their on-disk formats, pickle safety, registry."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftikd.data import (
    ImageDataset,
    available_datasets,
    load_dataset,
    register_dataset,
)
from ftikd.data import datasets as datasets_mod
from ftikd.data.cifar import RestrictedUnpickler, safe_load_pickle
from ftikd.data.folder import channel_stats
from ftikd.data.idx import load_idx_pair, read_idx
from ftikd.errors import FtikdError

# ------------------------------------------------------------------------------------------ writers


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file exactly as MNIST ships it: magic 0x0000 08 ndim, big-endian uint32 dims, payload."""
    assert arr.dtype == np.uint8
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, compress: bool) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_fashion_dir(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        write_idx(root / (stem + ".gz" if gz else stem), arr, compress=gz)
    return arrays


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 5) -> Path:
    """CIFAR-10 python-version layout: protocol-2 pickles of dicts with bytes keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            b"batch_label": b"training batch",
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {
        b"num_cases_per_batch": 10000,
        b"label_names": [
            s.encode()
            for s in [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ]
        ],
        b"num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def write_cifar100(root: Path, n_train: int = 9, n_test: int = 4) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {
            b"filenames": [b"x.png"] * n,
            b"batch_label": name.encode(),
            b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": rng.integers(0, 20, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump(
            {
                b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
            },
            f,
            protocol=2,
        )
    return folder


def load_batch(path: Path) -> dict:
    """Read back one of OUR OWN test pickles (trusted, written above) to compare against."""
    return safe_load_pickle(path)


def make_png(path: Path, size_wh: tuple[int, int], color, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size_wh, color).save(path)


# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_idx_roundtrip_raw_and_gz(tmp_path, compress):
    arr = np.arange(3 * 5 * 4, dtype=np.uint8).reshape(3, 5, 4)
    lab = np.array([1, 2, 3], dtype=np.uint8)
    x, y = load_idx_pair(
        write_idx(tmp_path / "img", arr, compress), write_idx(tmp_path / "lab", lab, compress)
    )
    assert x.shape == (3, 1, 5, 4) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == [1, 2, 3]
    assert np.array_equal(x[:, 0].numpy(), arr)


def test_idx_detects_gzip_by_magic_not_name(tmp_path):
    arr = np.full((2, 3, 3), 7, dtype=np.uint8)
    gz_without_ext = write_idx(tmp_path / "train-images-idx3-ubyte", arr, compress=True)
    raw_with_ext = write_idx(tmp_path / "other-idx3-ubyte.gz", arr, compress=False)
    assert np.array_equal(read_idx(gz_without_ext, 3), arr)
    assert np.array_equal(read_idx(raw_with_ext, 3), arr)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_huge_header_fails_fast(tmp_path, compress):
    # claims 4294967295 x 28 x 28 images (~3.4e12 bytes) but holds 10 bytes
    data = bytes([0, 0, 8, 3]) + struct.pack(">3I", 0xFFFFFFFF, 28, 28) + bytes(10)
    p = tmp_path / "huge"
    p.write_bytes(gzip.compress(data) if compress else data)
    t0 = time.perf_counter()
    with pytest.raises(FtikdError, match="header claims"):
        read_idx(p, 3)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "bad magic"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"abcd", "float32"),
        (b"\x00\x00\x08\x02" + struct.pack(">2I", 1, 2) + b"ab", "2 dimensions"),
        (b"\x00\x00\x08\x01" + b"\x00\x00", "truncated inside its header"),
        (b"\x00\x00", "bad magic"),
    ],
)
def test_idx_bad_headers(tmp_path, data, match):
    p = tmp_path / "bad"
    p.write_bytes(data)
    with pytest.raises(FtikdError, match=match):
        read_idx(p, expected_ndim=1)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("delta", [-5, 3])
def test_idx_truncated_or_padded_payload(tmp_path, compress, delta):
    good = idx_bytes(np.zeros((4, 6, 6), dtype=np.uint8))
    data = good[:delta] if delta < 0 else good + bytes(delta)
    p = tmp_path / "t"
    p.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(FtikdError, match="header claims"):
        read_idx(p, 3)


def test_idx_truncated_gzip_stream(tmp_path):
    p = tmp_path / "t.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), dtype=np.uint8)))[:-20])
    with pytest.raises(FtikdError):
        read_idx(p, 3)


def test_idx_count_mismatch(tmp_path):
    imgs = write_idx(tmp_path / "i", np.zeros((3, 2, 2), np.uint8), False)
    labs = write_idx(tmp_path / "l", np.zeros(4, np.uint8), False)
    with pytest.raises(FtikdError, match="3 images but .* 4 labels"):
        load_idx_pair(imgs, labs)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_data_dir(tmp_path, gz):
    arrays = write_fashion_dir(tmp_path / "fm", gz=gz)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path / "fm")
    assert isinstance(ds, ImageDataset)
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.test_images.shape == (5, 1, 28, 28)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert np.array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert ds.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert ds.num_classes == 10 and ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.mean == (0.2860,) and ds.std == (0.3530,) and ds.hflip is True


def test_fashion_mnist_missing_names_fix(tmp_path):
    with pytest.raises(FtikdError, match="apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.train_labels.shape == (60000,) and int(ds.train_labels.max()) == 9
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10


# -------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_loads(tmp_path):
    folder = write_cifar10(tmp_path)
    for where in (tmp_path, folder):  # parent of cifar-10-batches-py, or the folder itself
        ds = load_dataset("cifar10", data_dir=where)
        assert ds.train_images.shape == (30, 3, 32, 32) and ds.test_images.shape == (5, 3, 32, 32)
        assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
        assert ds.classes[:2] == ["airplane", "automobile"] and ds.num_classes == 10
        assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    b1 = load_batch(folder / "data_batch_1")
    b2 = load_batch(folder / "data_batch_2")
    # row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32
    assert np.array_equal(ds.train_images[0, 1].numpy(), b1[b"data"][0, 1024:2048].reshape(32, 32))
    assert np.array_equal(ds.train_images[6].numpy().reshape(-1), b2[b"data"][0])
    assert ds.train_labels[:6].tolist() == b1[b"labels"]


def test_cifar100_loads_fine_labels(tmp_path):
    folder = write_cifar100(tmp_path)
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.train_images.shape == (9, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert ds.num_classes == 100 and ds.classes[5] == "fine5"
    assert ds.train_labels.tolist() == load_batch(folder / "train")[b"fine_labels"]
    assert ds.mean == (0.5071, 0.4867, 0.4408)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(FtikdError, match=r"refusing to load .*data_batch_1: it contains code") as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "system" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(eval, protocol=2),  # builtins.eval as a global
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.",  # non-latin1 codec
        pickle.dumps(np.array([None], dtype=object), protocol=2),  # object arrays
        pickle.dumps(np.zeros(3, np.uint8), protocol=5),  # protocol-5 path uses _frombuffer
    ],
)
def test_restricted_unpickler_refuses(tmp_path, payload):
    p = tmp_path / "p"
    p.write_bytes(payload)
    with pytest.raises(FtikdError):
        safe_load_pickle(p)


def test_restricted_unpickler_accepts_python2_numpy_names(tmp_path):
    # the real CIFAR files were written by python 2 / numpy 1.x: numpy.core.multiarray._reconstruct
    data = pickle.dumps({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3)}, protocol=2)
    data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in data
    p = tmp_path / "p"
    p.write_bytes(data)
    out = safe_load_pickle(p)
    assert np.array_equal(out[b"data"], np.arange(6).reshape(2, 3))
    assert issubclass(RestrictedUnpickler, pickle._Unpickler)  # pure-Python: sizes checked as read


def test_cifar_errors(tmp_path):
    with pytest.raises(FtikdError, match="cifar-10-python.tar.gz") as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(e.value)
    with pytest.raises(FtikdError, match="cifar-100-python.tar.gz"):
        load_dataset("cifar100", data_dir=tmp_path)
    folder = write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f, protocol=2)
    with pytest.raises(FtikdError, match="labels must lie in"):
        load_dataset("cifar10", data_dir=tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(FtikdError, match=r"uint8 \(N, 3072\)"):
        load_dataset("cifar10", data_dir=tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f, protocol=2)
    with pytest.raises(FtikdError, match="2 images"):
        load_dataset("cifar10", data_dir=tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(X")  # truncated pickle
    with pytest.raises(FtikdError, match="cannot read"):
        load_dataset("cifar10", data_dir=tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(FtikdError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


# ---------------------------------------------------------------------------------- digits/registry


def test_digits():
    ds = load_dataset("digits")
    assert ds.train_images.shape == (1438, 1, 8, 8) and ds.test_images.shape == (359, 1, 8, 8)
    assert ds.train_images.dtype == torch.uint8 and int(ds.train_images.max()) == 255
    assert ds.hflip is False and ds.num_classes == 10 and set(ds.test_labels.tolist()) == set(range(10))
    assert ds.mean == channel_stats(ds.train_images)[0]
    again = load_dataset("digits")
    assert torch.equal(again.test_labels, ds.test_labels)


def test_unknown_dataset_lists_names():
    with pytest.raises(FtikdError, match="unknown dataset 'imagenet'") as e:
        load_dataset("imagenet")
    for name in ("cifar10", "cifar100", "digits", "fashion-mnist", "folder:PATH"):
        assert name in str(e.value)
    with pytest.raises(FtikdError, match="takes no ':' argument"):
        load_dataset("digits:foo")


def test_register_dataset(monkeypatch):
    monkeypatch.setattr(datasets_mod, "_REGISTRY", dict(datasets_mod._REGISTRY))
    tiny = ImageDataset(
        "tiny",
        torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
        torch.zeros(2, dtype=torch.long),
        torch.zeros(1, 1, 4, 4, dtype=torch.uint8),
        torch.zeros(1, dtype=torch.long),
        ["z"],
        (0.5,),
        (0.5,),
    )

    @register_dataset("tiny")
    def _tiny(data_dir, arg):
        return tiny

    assert "tiny" in available_datasets() and load_dataset("tiny") is tiny
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("tiny")(_tiny)
