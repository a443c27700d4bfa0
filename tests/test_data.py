"""Tests for ftikd.data: file readers (in their real on-disk formats), registry, augmentation, split."""

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
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ftikd.data import (
    FTISplit,
    ImageDataset,
    Normalizer,
    available_datasets,
    crop_flip_with_params,
    fti_split,
    load_dataset,
    normalize,
    random_crop_flip,
    register_dataset,
    view_crop_flip,
    view_params,
)
from ftikd.data import datasets as datasets_mod
from ftikd.data.cifar import RestrictedUnpickler, safe_load_pickle
from ftikd.data.folder import channel_stats, load_image_folder
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


# ------------------------------------------------------------------------------------------- folder


def make_folder(root: Path, per_class: int = 5, gray: bool = False) -> None:
    colors = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}
    for ci, (cls, rgb) in enumerate(colors.items()):
        for k in range(per_class):
            size = (20 + 7 * k, 15 + 5 * ci)  # varied sizes and aspect ratios
            if gray:
                make_png(root / cls / f"{k}.png", size, 60 * ci + k, mode="L")
            else:
                make_png(root / cls / f"{k}.png", size, rgb)
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image extension


def test_folder_holdout_split(tmp_path):
    make_folder(tmp_path / "imgs")
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.train_images.shape == (12, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert torch.bincount(ds.test_labels).tolist() == [1, 1, 1]
    # each class is a solid colour, so every pixel must be that colour after resize/crop
    for x, y in zip(ds.train_images, ds.train_labels, strict=True):
        expect = torch.zeros(3, dtype=torch.uint8)
        expect[int(y)] = 255
        assert torch.equal(x, expect[:, None, None].expand(3, 32, 32))
    mean, std = channel_stats(ds.train_images)
    assert ds.mean == mean and ds.std == std
    again = load_image_folder(tmp_path / "imgs")
    assert torch.equal(again.test_images, ds.test_images) and torch.equal(again.train_labels, ds.train_labels)


def test_folder_grayscale_and_size(tmp_path):
    make_folder(tmp_path / "g", gray=True)
    ds = load_image_folder(tmp_path / "g", image_size=8)
    assert ds.train_images.shape[1:] == (1, 8, 8)
    assert ds.channels == 1 and ds.image_size == (8, 8)


def test_folder_centre_crop(tmp_path):
    # 60x20 image: left third red, middle green, right third blue -> centre crop keeps only green
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :20, 0] = 255
    img[:, 20:40, 1] = 255
    img[:, 40:, 2] = 255
    (tmp_path / "f" / "a").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "f" / "a" / "x.png")
    ds = load_image_folder(tmp_path / "f", image_size=10)
    x = ds.train_images[0]
    assert x.shape == (3, 10, 10)
    assert (x[1, :, 2:-2] == 255).all() and (x[0, :, 2:-2] == 0).all() and (x[2, :, 2:-2] == 0).all()


def test_folder_train_test_subfolders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls, col in (("a", (255, 255, 255)), ("b", (0, 0, 0))):
            for k in range(n):
                make_png(tmp_path / "d" / split / cls / f"{k}.jpg", (40, 30), col)
    ds = load_dataset("folder", data_dir=tmp_path / "d")
    assert ds.classes == ["a", "b"]
    assert ds.train_images.shape[0] == 6 and ds.test_images.shape[0] == 4
    assert ds.test_labels.tolist() == [0, 0, 1, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(FtikdError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FtikdError, match="no class subfolders"):
        load_image_folder(tmp_path / "empty")
    make_folder(tmp_path / "d1", per_class=2)
    (tmp_path / "d1" / "zebra").mkdir()
    with pytest.raises(FtikdError, match="zebra"):
        load_image_folder(tmp_path / "d1")
    make_folder(tmp_path / "d2", per_class=2)
    (tmp_path / "d2" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(FtikdError, match="broken.png"):
        load_image_folder(tmp_path / "d2")
    with pytest.raises(FtikdError, match="folder:PATH"):
        load_dataset("folder")


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


# ------------------------------------------------------------------------------------- augmentation


def naive_crop_flip(x, dy, dx, flip, padding):
    """Reference: pad, crop each sample at its offset, flip it if asked (a per-sample loop)."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (padding,) * 4)
    out = []
    for i in range(x.shape[0]):
        c = xp[i, :, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        out.append(c.flip(-1) if flip is not None and bool(flip[i]) else c)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize(
    "shape, padding", [((16, 3, 32, 32), 4), ((9, 1, 28, 28), 4), ((7, 2, 10, 13), 2), ((5, 3, 6, 6), 0)]
)
def test_crop_flip_matches_naive_loop(dtype, shape, padding):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, 256, shape, generator=g).to(dtype)
    b = shape[0]
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    out = crop_flip_with_params(x, dy, dx, flip, padding)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, naive_crop_flip(x, dy, dx, flip, padding))
    no_flip = crop_flip_with_params(x, dy, dx, None, padding)
    assert torch.equal(no_flip, naive_crop_flip(x, dy, dx, None, padding))


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 6),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    padding=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_crop_flip_property(b, c, h, w, padding, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    out = crop_flip_with_params(x, dy, dx, flip, padding)
    assert torch.equal(out, naive_crop_flip(x, dy, dx, flip, padding))


def test_crop_flip_rejects_bad_offsets():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="offsets"):
        crop_flip_with_params(x, torch.tensor([0, 9]), torch.tensor([0, 0]), None, 4)
    with pytest.raises(ValueError, match="need 2"):
        crop_flip_with_params(x, torch.tensor([0]), torch.tensor([0, 0]), None, 4)


def test_random_crop_flip_shape_seed_and_flip_rate():
    x = torch.arange(256 * 3 * 8 * 8, dtype=torch.float32).reshape(256, 3, 8, 8)
    out = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all())  # each sample is either untouched or exactly mirrored
    assert 0.4 < flipped.float().mean().item() < 0.6
    again = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)


def test_random_crop_offsets_cover_range():
    # a single bright pixel at the centre of each padded image reveals the crop offset
    b, p = 512, 4
    x = torch.zeros(b, 1, 9, 9, dtype=torch.uint8)
    x[:, :, 4, 4] = 255
    out = random_crop_flip(x, padding=p, flip=False, generator=torch.Generator().manual_seed(1))
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 9, pos % 9
    assert set(rows.tolist()) == set(range(9)) and set(cols.tolist()) == set(range(9))
    assert (out.flatten(1).max(1).values == 255).all()


def test_view_params_deterministic_and_order_independent():
    idx = torch.arange(1000)
    dy, dx, fl = view_params(idx, 0, (32, 32), 4, True)
    assert dy.dtype == torch.int64 and fl.dtype == torch.bool
    assert int(dy.min()) == 0 and int(dy.max()) == 8 and int(dx.min()) == 0 and int(dx.max()) == 8
    assert 0.4 < fl.float().mean().item() < 0.6
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    dy2, dx2, fl2 = view_params(idx[perm][:100], 0, (32, 32), 4, True)
    assert torch.equal(dy2, dy[perm][:100]) and torch.equal(dx2, dx[perm][:100])
    assert torch.equal(fl2, fl[perm][:100])
    dy3, dx3, fl3 = view_params(idx, 1, (32, 32), 4, True)
    differs = (dy3 != dy) | (dx3 != dx) | (fl3 != fl)
    assert differs.float().mean().item() > 0.9
    assert not view_params(idx, 0, (32, 32), 4, False)[2].any()
    # dy and dx are not trivially tied together
    assert (dy == dx).float().mean().item() < 0.25
    # huge indices (beyond 32 bits) are fine and still deterministic
    big = torch.tensor([2**40 + 5, 2**40 + 5, 2**62])
    bdy, bdx, _ = view_params(big, 3, (8, 8), 2, True)
    assert bdy[0] == bdy[1] and bdx[0] == bdx[1] and int(bdy.max()) <= 4


def test_view_crop_flip_is_batch_independent():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (40, 3, 12, 12), generator=g, dtype=torch.uint8)
    idx = torch.arange(40)
    full = view_crop_flip(data, idx, view=7, padding=2)
    sub = torch.tensor([31, 2, 17])
    assert torch.equal(view_crop_flip(data[sub], sub, view=7, padding=2), full[sub])
    dy, dx, fl = view_params(idx, 7, (12, 12), 2, True)
    assert torch.equal(full, naive_crop_flip(data, dy, dx, fl, 2))


def test_normalize_and_normalizer():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    y = normalize(x, mean, std)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.double)[:, None, None]) / torch.tensor(
        std, dtype=torch.double
    )[:, None, None]
    assert y.dtype == torch.float32 and torch.allclose(y.double(), ref, atol=1e-6)
    norm = Normalizer(mean, std)
    assert torch.allclose(norm(x), y, atol=1e-6)
    xf = x.float()
    before = xf.clone()
    norm(xf)
    assert torch.equal(xf, before)  # input untouched
    assert normalize(x[0], mean, std).shape == (3, 5, 5)


# -------------------------------------------------------------------------------------------- split


def test_fti_split_properties():
    s = fti_split(1000, 100, seed=5)
    assert isinstance(s, FTISplit)
    assert s.train_idx.dtype == torch.int64 and s.train_idx.shape == (100,) and s.val_idx.shape == (25,)
    both = torch.cat([s.train_idx, s.val_idx])
    assert both.unique().numel() == 125 and int(both.min()) >= 0 and int(both.max()) < 1000
    torch.manual_seed(123)
    torch.rand(10)
    t = fti_split(1000, 100, seed=5)  # global RNG state does not matter
    assert torch.equal(s.train_idx, t.train_idx) and torch.equal(s.val_idx, t.val_idx)
    u = fti_split(1000, 100, seed=6)
    assert not torch.equal(s.train_idx, u.train_idx)
    with pytest.raises(AttributeError):
        s.train_idx = t.train_idx  # frozen
    exact = fti_split(5, 4, seed=0)  # n + n//4 == total is allowed
    assert sorted(torch.cat([exact.train_idx, exact.val_idx]).tolist()) == [0, 1, 2, 3, 4]
    assert fti_split(100, 7, 0).val_idx.numel() == 1


def test_fti_split_errors():
    with pytest.raises(FtikdError, match="use n >= 4"):
        fti_split(100, 3, seed=0)
    with pytest.raises(FtikdError, match=r"n=100 needs 125 samples but the training split has 120 .*--calls"):
        fti_split(120, 100, seed=0)
