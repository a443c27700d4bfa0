"""Fuzz and property tests over every reader of user files.

Each reader gets malformed inputs (random bytes, truncations, bit flips, wrong structures, hostile
headers) and must either return well-formed data or raise :class:`FtikdError` with a one-line
message: never another exception type, never a hang (SIGALRM), never a large allocation (tracemalloc
sees Python and numpy allocations). The number of inputs tried per reader is printed at the end of
the module (``[fuzz] malformed inputs tried``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import inspect
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import sqlite3
import struct
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from safetensors.torch import save as st_save
from torch import nn

from ftikd.data.cifar import read_cifar_dir, safe_load_pickle
from ftikd.data.folder import load_image_folder
from ftikd.data.idx import load_idx_pair, read_idx
from ftikd.errors import FtikdError
from ftikd.experiments.config_check import check_run_config
from ftikd.experiments.run import RunConfig
from ftikd.models.base import ModelOutput, available_models, build_model, register_model
from ftikd.teacher import TeacherStore, save_checkpoint, state_fingerprint
from ftikd.teacher.checkpoint import META_KEY, load_checkpoint, read_checkpoint_meta

T = TypeVar("T")

TRIED: Counter[str] = Counter()
MEM_LIMIT = 64 << 20  # peak Python + numpy allocation allowed while reading one small malformed file
HANG_S = 20.0


# FTIKD_FUZZ_SCALE=20 multiplies every example count, for a long bug hunt outside the default run.
SCALE = float(os.environ.get("FTIKD_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """Hypothesis settings for one reader: ``examples`` inputs, no per-example deadline."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Hang(Exception):
    """A reader ran for longer than HANG_S on a tiny input."""


def _alarm(signum: int, frame: Any) -> None:
    raise Hang(f"reader still running after {HANG_S}s")


def attempt(reader: str, fn: Callable[[], T], one_line: bool = True) -> T | None:
    """One reader call on a (possibly) malformed input: its result, or None if it raised FtikdError.

    Any other exception propagates and fails the test; so does a run over HANG_S seconds or a peak
    traced allocation over MEM_LIMIT. FtikdError messages must be one line (unless ``one_line`` is
    False).
    """
    TRIED[reader] += 1
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    tracemalloc.start()
    try:
        return fn()
    except FtikdError as e:
        assert not one_line or "\n" not in str(e), f"multi-line FtikdError: {e!r}"
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        assert peak < MEM_LIMIT, f"{reader} allocated {peak / 2**20:.0f} MiB on a tiny input"


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    line = "[fuzz] malformed inputs tried: " + ", ".join(f"{k}={v}" for k, v in sorted(TRIED.items()))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + line)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def scratch(base: Path) -> Iterator[Path]:
    """A fresh directory per hypothesis example (function-scoped tmp_path is shared by examples)."""
    d = Path(tempfile.mkdtemp(dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------ generic byte mutations

HUGE_U32 = st.sampled_from([0, 1, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1])


@st.composite
def mutated(draw: st.DrawFn, data: bytes, header: int = 16) -> bytes:
    """``data`` after 1-4 random edits: truncation, bit flip, byte overwrite, insertion, junk tail.

    Offsets favour the first ``header`` bytes, where formats keep their magic numbers and sizes.
    """
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "set", "insert", "append", "delete"]))
        if not buf:
            op = "append"
        limit = min(len(buf), header) if draw(st.booleans()) else len(buf)
        at = draw(st.integers(0, max(limit - 1, 0)))
        if op == "truncate":
            del buf[at:]
        elif op == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[at] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[at : at + draw(st.integers(1, 8))]
        else:
            buf += draw(st.binary(min_size=1, max_size=16))
    return bytes(buf)


# ------------------------------------------------------------------------------------------- IDX


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


small_u8 = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))


@st.composite
def idx_header_edit(draw: st.DrawFn, data: bytes) -> bytes:
    """Edit the IDX header itself: magic bytes, dtype code, ndim byte or one dimension."""
    buf = bytearray(data)
    what = draw(st.sampled_from(["magic", "code", "ndim", "dim"]))
    if what == "magic":
        buf[draw(st.integers(0, 1))] = draw(st.integers(1, 255))
    elif what == "code":
        buf[2] = draw(st.sampled_from([0x00, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0xFF]))
    elif what == "ndim":
        buf[3] = draw(st.sampled_from([0, 1, 2, 3, 4, 33, 64, 65, 255]))
    else:
        k = draw(st.integers(0, max(buf[3] - 1, 0)))
        buf[4 + 4 * k : 8 + 4 * k] = struct.pack(">I", draw(HUGE_U32))
    return bytes(buf)


@st.composite
def idx_file(draw: st.DrawFn, arr_strategy: st.SearchStrategy[np.ndarray] = small_u8) -> bytes:
    """An IDX file, valid or damaged, raw or gzipped (damage before or after compression)."""
    kind = draw(st.sampled_from(["valid", "mutate", "header", "random", "gz_random", "gz_inner", "gz_outer"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "gz_random":
        return gzip.compress(draw(st.binary(max_size=200)))
    raw = idx_bytes(draw(arr_strategy))
    if kind == "header":
        raw = draw(idx_header_edit(raw))
    elif kind in ("mutate", "gz_outer"):
        raw = draw(mutated(raw))
    if kind == "gz_inner":
        return draw(mutated(gzip.compress(raw), header=12))
    if kind == "gz_outer" or draw(st.booleans()):
        return gzip.compress(raw)
    return raw


@fuzz(150)
@given(content=idx_file(), expected=st.sampled_from([None, 1, 3]))
def test_fuzz_read_idx(base: Path, content: bytes, expected: int | None) -> None:
    with scratch(base) as d:
        p = d / "f.idx"
        p.write_bytes(content)
        arr = attempt("idx", lambda: read_idx(p, expected_ndim=expected))
    if arr is not None:
        assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8
        assert 1 <= arr.ndim <= 32 and expected in (None, arr.ndim)
        assert arr.nbytes <= 4096


@fuzz(50)
@given(
    images=idx_file(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=0, max_side=4))),
    labels=idx_file(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=1, min_side=0, max_side=4))),
)
def test_fuzz_load_idx_pair(base: Path, images: bytes, labels: bytes) -> None:
    with scratch(base) as d:
        (d / "x").write_bytes(images)
        (d / "y").write_bytes(labels)
        out = attempt("idx_pair", lambda: load_idx_pair(d / "x", d / "y"))
    if out is not None:
        x, y = out
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 1
        assert y.dtype == torch.int64 and tuple(y.shape) == (x.shape[0],)


_IDX_CASES = {
    "empty": b"",
    "three bytes": b"\x00\x00\x08",
    "huge dims, no payload": bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1),
    "huge dims, some payload": bytes([0, 0, 8, 1]) + struct.pack(">I", 2**32 - 1) + b"\x00" * 100,
    "zero dim beside huge dims": bytes([0, 0, 8, 4]) + struct.pack(">4I", 0, 2**32 - 1, 2**32 - 1, 2**32 - 1),
    "70 dims": bytes([0, 0, 8, 70]) + struct.pack(">70I", 0, *([5] * 69)),
    "ndim 0": bytes([0, 0, 8, 0]),
    "header cut": bytes([0, 0, 8, 3]) + b"\x00\x00\x00\x02",
    "float32 data": idx_bytes(np.zeros((2, 2), np.uint8), code=0x0D),
    "unknown code": idx_bytes(np.zeros((2, 2), np.uint8), code=0x42),
    "wrong magic": b"\x01\x00" + idx_bytes(np.zeros(3, np.uint8))[2:],
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", sorted(_IDX_CASES))
def test_idx_explicit_cases_refused(tmp_path: Path, case: str, gz: bool) -> None:
    data = _IDX_CASES[case]
    p = tmp_path / "f"
    p.write_bytes(gzip.compress(data) if gz else data)
    assert attempt("idx", lambda: read_idx(p)) is None
    # the gzip stream cut short is damaged both inside the stream and in the payload
    if gz:
        p.write_bytes(gzip.compress(data)[:-6])
        assert attempt("idx", lambda: read_idx(p)) is None


# ---------------------------------------------------------------------------------------- CIFAR

_C10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        10,
        "labels",
        [*_C10_TRAIN, "test_batch"],
        "batches.meta",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", 100, "fine_labels", ["train", "test"], "meta", "fine_label_names"),
}


def cifar_objects(variant: str, n: int = 2) -> dict[str, Any]:
    """The unpickled content of every file of a tiny valid CIFAR folder."""
    _, classes, label_key, batches, meta_name, names_key = _LAYOUT[variant]
    rng = np.random.default_rng(0)
    files: dict[str, Any] = {}
    for name in batches:
        files[name] = {
            b"batch_label": name.encode(),
            label_key.encode(): rng.integers(0, classes, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * n,
        }
    files[meta_name] = {names_key.encode(): [f"c{i}".encode() for i in range(classes)]}
    return files


def write_cifar(root: Path, variant: str, override: dict[str, bytes] | None = None) -> Path:
    folder = root / _LAYOUT[variant][0]
    folder.mkdir(parents=True)
    for name, obj in cifar_objects(variant).items():
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    for name, data in (override or {}).items():
        (folder / name).write_bytes(data)
    return folder


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6)
)
_arrays = hnp.arrays(
    st.sampled_from([np.uint8, np.int8, np.int16, np.int64, np.uint64, np.float32, np.float64, np.bool_]),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
_keys = st.one_of(
    st.sampled_from(
        [b"data", b"labels", b"fine_labels", b"label_names", b"fine_label_names", "data", "labels"]
    ),
    st.binary(max_size=4),
    st.integers(-5, 5),
)
_py_leaf = st.one_of(_json_leaf, st.binary(max_size=6), _arrays)
py_objects = st.recursive(
    _py_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(_keys, inner, max_size=4)
    ),
    max_leaves=10,
)


class Evil:
    """A pickle payload that runs ``call(*args)`` when unpickled by a plain unpickler."""

    def __init__(self, call: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.call, self.args)


def evil_payloads(marker: Path) -> list[Evil]:
    import builtins
    import subprocess

    touch = f"open({str(marker)!r}, 'w').close()"
    return [
        Evil(os.system, (f"touch {marker}",)),
        Evil(subprocess.call, (["touch", str(marker)],)),
        Evil(builtins.exec, (touch,)),
        Evil(builtins.eval, (touch,)),
        Evil(builtins.open, (str(marker), "w")),
        Evil(Path.touch, (marker,)),
        Evil(shutil.copy, (__file__, str(marker))),
        Evil(Path(marker).touch, ()),
    ]


@st.composite
def perturbed_cifar_object(draw: st.DrawFn, obj: dict[bytes, Any], classes: int) -> Any:
    """A valid batch/meta dict with one structural defect."""
    obj = dict(obj)
    keys = sorted(obj)
    what = draw(st.sampled_from(["drop", "replace", "data", "labels", "names", "top", "billion"]))
    key = draw(st.sampled_from(keys))
    if what == "drop":
        del obj[key]
    elif what == "replace":
        obj[key] = draw(py_objects)
    elif what == "data" and b"data" in obj:
        n = obj[b"data"].shape[0]
        shape = draw(st.sampled_from([(n, 3071), (n, 3, 32, 32), (n,), (n + 1, 3072), (0, 3072), (n, 3072)]))
        dtype = draw(st.sampled_from([np.uint8, np.int8, np.int16, np.float32, np.uint16]))
        obj[b"data"] = np.zeros(shape, dtype)
    elif what == "labels" and b"data" in obj:
        lk = next(k for k in keys if k.endswith(b"labels"))
        n = obj[b"data"].shape[0]
        obj[lk] = draw(
            st.one_of(
                st.lists(st.integers(-2, classes + 2), min_size=n, max_size=n),
                st.lists(st.integers(0, classes - 1), max_size=n + 2),
                st.lists(
                    st.one_of(st.booleans(), st.floats(), st.integers(-(2**70), 2**70)),
                    min_size=n,
                    max_size=n,
                ),
                hnp.arrays(
                    st.sampled_from([np.int64, np.uint8, np.float32, np.int32]),
                    st.sampled_from([(n,), (n, 1), ()]),
                ),
            )
        )
    elif what == "names" and not any(k.endswith(b"labels") for k in keys):
        nk = keys[0]
        obj[nk] = draw(
            st.one_of(
                st.lists(st.binary(max_size=4), min_size=classes, max_size=classes),  # non-UTF-8 names
                st.lists(st.text(max_size=3), max_size=3),
                st.lists(py_objects, min_size=classes, max_size=classes),
            )
        )
    elif what == "billion":
        # a few hundred bytes of pickle that expand to 10**6 references if converted naively
        nested: Any = [0] * 10
        for _ in range(5):
            nested = [nested] * 10
        obj[key] = [nested] * 2 if draw(st.booleans()) else nested
    else:
        return draw(st.one_of(py_objects, st.just([obj]), st.just(tuple(obj.items()))))
    return obj


@st.composite
def cifar_case(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(variant, damaged file name, its new bytes)."""
    variant = draw(st.sampled_from(sorted(_LAYOUT)))
    objects = cifar_objects(variant)
    name = draw(st.sampled_from(sorted(objects)))
    valid = pickle.dumps(objects[name], protocol=2)
    kind = draw(st.sampled_from(["random", "truncate", "mutate", "structure", "perturb"]))
    if kind == "random":
        data = draw(st.binary(max_size=300))
    elif kind == "truncate":
        data = valid[: draw(st.integers(0, len(valid) - 1))]
    elif kind == "mutate":
        data = draw(mutated(valid, header=len(valid)))
    elif kind == "structure":
        data = pickle.dumps(draw(py_objects), protocol=draw(st.integers(2, 5)))
    else:
        obj = draw(perturbed_cifar_object(objects[name], _LAYOUT[variant][1]))
        data = pickle.dumps(obj, protocol=draw(st.integers(2, 4)))
    return variant, name, data


def check_cifar(out: tuple, classes: int) -> None:
    train_x, train_y, test_x, test_y, names = out
    for x, y in ((train_x, train_y), (test_x, test_y)):
        assert x.dtype == torch.uint8 and x.dim() == 4 and tuple(x.shape[1:]) == (3, 32, 32)
        assert y.dtype == torch.int64 and tuple(y.shape) == (x.shape[0],)
        if y.numel():
            assert 0 <= int(y.min()) and int(y.max()) < classes
    assert isinstance(names, list) and len(names) == classes and all(isinstance(n, str) for n in names)


@fuzz(120)
@given(case=cifar_case())
def test_fuzz_read_cifar_dir(base: Path, case: tuple[str, str, bytes]) -> None:
    variant, name, data = case
    with scratch(base) as d:
        folder = write_cifar(d, variant, {name: data})
        out = attempt("cifar", lambda: read_cifar_dir(folder, variant))
    if out is not None:
        check_cifar(out, _LAYOUT[variant][1])


@fuzz(60)
@given(
    variant=st.sampled_from(sorted(_LAYOUT)),
    which=st.integers(0, 7),
    where=st.sampled_from(["top", "value", "label", "nested", "key"]),
    protocol=st.integers(2, 5),
)
def test_fuzz_code_carrying_pickles_refused(
    base: Path, variant: str, which: int, where: str, protocol: int
) -> None:
    with scratch(base) as d:
        marker = d / "pwned"
        evil = evil_payloads(marker)[which]
        objects = cifar_objects(variant)
        name = sorted(objects)[which % len(objects)]
        obj: Any = dict(objects[name])
        if where == "top":
            obj = evil
        elif where == "value":
            obj[b"data"] = evil
        elif where == "label":
            obj[b"extra"] = [0, 1, evil]
        elif where == "nested":
            obj[b"extra"] = {b"a": (1, [evil])}
        else:
            obj = {b"k": obj, 7: evil}
        data = pickle.dumps(obj, protocol=protocol)
        folder = write_cifar(d, variant, {name: data})
        (d / "direct").write_bytes(data)
        assert attempt("cifar", lambda: read_cifar_dir(folder, variant)) is None
        assert attempt("pickle", lambda: safe_load_pickle(d / "direct")) is None
        assert not marker.exists()


@fuzz(120)
@given(data=st.one_of(st.binary(max_size=300), st.builds(pickle.dumps, py_objects, st.integers(0, 5))))
def test_fuzz_safe_load_pickle(base: Path, data: bytes) -> None:
    with scratch(base) as d:
        p = d / "p"
        p.write_bytes(data)
        attempt("pickle", lambda: safe_load_pickle(p))


class _Reduce:
    def __init__(self, *reduced: Any) -> None:
        self.reduced = reduced

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduced


def _allocation_bombs() -> dict[str, Any]:
    """Small pickles that ask for huge arrays or exponentially large conversions."""
    rebuild = np.ndarray((0,)).__reduce__()[0]
    nested: Any = [1] * 10
    for _ in range(8):
        nested = [nested] * 10  # 10**9 elements if expanded, a few hundred bytes pickled
    return {
        "reconstruct huge": {b"data": _Reduce(rebuild, (np.ndarray, (10**10,), b"b")), b"labels": []},
        "reconstruct 2-D": {b"data": _Reduce(rebuild, (np.ndarray, (10**6, 3072), b"B")), b"labels": []},
        "ndarray call": {b"data": _Reduce(np.ndarray, ((10**10,),)), b"labels": []},
        "nested labels": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [nested, nested]},
        "nested labels, right length": {b"data": np.zeros((10, 3072), np.uint8), b"labels": nested},
    }


@pytest.mark.parametrize("case", sorted(_allocation_bombs()))
def test_cifar_allocation_bombs_refused(tmp_path: Path, case: str) -> None:
    data = pickle.dumps(_allocation_bombs()[case], protocol=2)
    assert len(data) < 40_000  # the image bytes; the bomb itself is a few hundred bytes
    folder = write_cifar(tmp_path, "cifar10", {"test_batch": data})
    assert attempt("cifar", lambda: read_cifar_dir(folder, "cifar10")) is None
    nested: Any = ["x"] * 10
    for _ in range(8):
        nested = [nested] * 10
    meta = pickle.dumps({b"label_names": [nested] * 10}, protocol=2)
    folder2 = write_cifar(tmp_path / "m", "cifar10", {"batches.meta": meta})
    assert attempt("cifar", lambda: read_cifar_dir(folder2, "cifar10")) is None


# ----------------------------------------------------------------------------------- image folders

_FORMATS = {
    "png": "PNG",
    "jpg": "JPEG",
    "gif": "GIF",
    "bmp": "BMP",
    "tif": "TIFF",
    "webp": "WEBP",
    "ppm": "PPM",
}


def image_bytes(fmt: str, size: tuple[int, int], mode: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB").convert(mode)
    if fmt in ("jpg", "ppm") and mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=_FORMATS[fmt])
    return buf.getvalue()


@st.composite
def image_file(draw: st.DrawFn) -> tuple[str, bytes]:
    """(extension, content): valid, damaged, empty, random or a text file wearing an image suffix."""
    ext = draw(st.sampled_from(sorted(_FORMATS)))
    kind = draw(
        st.sampled_from(["valid", "valid", "empty", "random", "truncate", "mutate", "text", "not_image_ext"])
    )
    if kind == "empty":
        return ext, b""
    if kind == "random":
        return ext, draw(st.binary(max_size=64))
    if kind == "text":
        return ext, b"not an image\n"
    if kind == "not_image_ext":
        return draw(st.sampled_from(["txt", "json", ""])), draw(st.binary(max_size=16))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    mode = draw(st.sampled_from(["RGB", "L", "P", "RGBA", "1"]))
    data = image_bytes(ext, size, mode, draw(st.integers(0, 9)))
    if kind == "truncate":
        return ext, data[: draw(st.integers(0, len(data) - 1))]
    if kind == "mutate":
        return ext, draw(mutated(data, header=32))
    return ext, data


_NAME_BYTES = st.one_of(
    st.text(
        st.characters(exclude_characters="/\x00\n\r", exclude_categories=("Cs",)), min_size=1, max_size=8
    ).map(lambda s: s.encode("utf-8")),
    st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\x00" not in b and b"\n" not in b),
)


def _fs_name(raw: bytes) -> bytes | None:
    """A usable file-name component (None for '.', '..' and names the filesystem refuses)."""
    return None if raw in (b".", b"..") or len(raw) > 200 else raw


@st.composite
def folder_tree(draw: st.DrawFn) -> list[tuple[bytes, list[tuple[bytes, bytes]]]]:
    """Class folders: [(class name bytes, [(file name bytes, content)])]; names may be non-UTF-8."""
    classes = []
    for ci in range(draw(st.integers(1, 3))):
        cname = draw(st.one_of(st.just(f"class{ci}".encode()), _NAME_BYTES))
        files = []
        for fi in range(draw(st.integers(0, 4))):
            ext, content = draw(image_file())
            stem = draw(st.one_of(st.just(f"img{fi}".encode()), _NAME_BYTES))
            files.append((stem + (b"." + ext.encode() if ext else b""), content))
        classes.append((cname, files))
    return classes


def write_tree(root: Path, tree: list[tuple[bytes, list[tuple[bytes, bytes]]]]) -> None:
    broot = os.fsencode(root)
    for cname, files in tree:
        cname = _fs_name(cname)
        if cname is None:
            continue
        cdir = os.path.join(broot, cname)
        try:
            os.makedirs(cdir, exist_ok=True)
        except OSError:  # the filesystem refuses this name; skip it
            continue
        if not os.path.isdir(cdir):
            continue
        for fname, content in files:
            fname = _fs_name(fname)
            if fname is None:
                continue
            fpath = os.path.join(cdir, fname)
            if os.path.isdir(fpath):
                continue
            try:
                with open(fpath, "wb") as f:
                    f.write(content)
            except OSError:
                continue


def check_dataset(ds: Any) -> None:
    k = ds.num_classes
    assert k >= 1 and all(isinstance(c, str) for c in ds.classes)
    for x, y in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        assert (
            x.dtype == torch.uint8
            and x.dim() == 4
            and x.shape[1] in (1, 3)
            and tuple(x.shape[2:]) == (32, 32)
        )
        assert y.dtype == torch.int64 and tuple(y.shape) == (x.shape[0],)
        if y.numel():
            assert 0 <= int(y.min()) and int(y.max()) < k
    assert ds.train_images.shape[0] >= 1
    assert len(ds.mean) == len(ds.std) == ds.channels
    assert all(math.isfinite(v) for v in (*ds.mean, *ds.std))


@fuzz(40)
@given(tree=folder_tree(), split=st.booleans())
def test_fuzz_image_folder(base: Path, tree: list, split: bool) -> None:
    with scratch(base) as d:
        root = d / "data"
        root.mkdir()
        if split:
            write_tree(root / "train", tree)
            write_tree(root / "test", tree[: max(1, len(tree) - 1)])
        else:
            write_tree(root, tree)
        ds = attempt("folder", lambda: load_image_folder(root))
    if ds is not None:
        check_dataset(ds)


def test_image_folder_explicit_cases(tmp_path: Path) -> None:
    good = image_bytes("png", (12, 9), "RGB", 0)
    broot = os.fsencode(tmp_path)

    def make(name: str, layout: dict[bytes, dict[bytes, bytes]]) -> Path:
        root = os.path.join(broot, name.encode())
        for cls, files in layout.items():
            os.makedirs(os.path.join(root, cls), exist_ok=True)
            for fname, content in files.items():
                with open(os.path.join(root, cls, fname), "wb") as f:
                    f.write(content)
        return Path(os.fsdecode(root))

    # a single class with one image loads (all of it is training data)
    ds = attempt("folder", lambda: load_image_folder(make("single", {b"only": {b"a.png": good}})))
    assert ds is not None and ds.num_classes == 1 and ds.train_images.shape[0] == 1
    # non-UTF-8 class and file names load; the class name keeps its bytes via surrogateescape
    ds = attempt(
        "folder",
        lambda: load_image_folder(make("bytes", {b"\xff\xfe": {b"\xc3(.png": good, b"ok.png": good}})),
    )
    assert ds is not None and os.fsencode(ds.classes[0]) == b"\xff\xfe"
    refused = {
        "empty class": {b"a": {b"x.png": good}, b"b": {}},
        "zero-byte image": {b"a": {b"x.png": good, b"y.png": b""}},
        "corrupt image": {b"a": {b"x.png": good[:40]}},
        "text as png": {b"a": {b"x.png": b"hello"}},
        "only non-images": {b"a": {b"x.txt": b"hello"}},
        "non-UTF-8 bad image": {b"\xff": {b"\xfe.jpg": b"\xff\xd8\xff\x00"}},
        # PNG header claiming 60000 x 60000 pixels: refused as a decompression bomb, not decoded
        "bomb header": {b"a": {b"x.png": _png_header(60000, 60000)}},
    }
    for name, layout in refused.items():
        root = make(name.replace(" ", "_"), layout)
        assert attempt("folder", lambda root=root: load_image_folder(root)) is None, name
    empty = tmp_path / "no_classes"
    empty.mkdir()
    assert attempt("folder", lambda: load_image_folder(empty)) is None


def _png_header(w: int, h: int) -> bytes:
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


# ------------------------------------------------------------------------------------ checkpoints

ARCH = "_test_tiny_fuzz"


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor, with_features: bool = False) -> ModelOutput:
        return ModelOutput(self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3))))


if ARCH not in available_models():
    register_model(ARCH)(TinyNet)

CKPT_META = {"arch": ARCH, "in_channels": 3, "num_classes": 10, "dataset": "toy"}


@pytest.fixture(scope="module")
def ckpt(base: Path) -> tuple[bytes, dict[str, torch.Tensor], dict[str, Any]]:
    torch.manual_seed(0)
    p = base / "good.safetensors"
    meta = save_checkpoint(TinyNet(), p, CKPT_META)
    model, _ = load_checkpoint(p)
    # load_checkpoint builds the recorded architecture on the meta device first; the first meta
    # build of a zoo model imports torch's meta kernels (~60 MiB of Python objects, once per
    # process, which a training step imports anyway). Pay that here, not inside a measured read.
    for arch in available_models():
        if not arch.startswith("_test"):  # the zoo; test models may not build on the meta device
            with torch.device("meta"):
                build_model(arch, in_channels=3, num_classes=10)
    return Blob(p.read_bytes()), {k: v.clone() for k, v in model.state_dict().items()}, meta


def _with_meta(state: dict[str, torch.Tensor], meta_value: str) -> bytes:
    return st_save(state, metadata={"format": "pt", META_KEY: meta_value})


_bad_meta_values = st.one_of(
    _json_leaf,
    st.sampled_from([0, -3, 10**12, 2**63, "3", 3.0, True, [3], {"a": 1}, "", "resnet8", "no_such_arch"]),
)


@st.composite
def checkpoint_bytes(
    draw: st.DrawFn, good: bytes, state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> bytes:
    kind = draw(st.sampled_from(["random", "truncate", "flip", "mutate", "header_len", "meta", "meta_text"]))
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "truncate":
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "flip":
        buf = bytearray(good)
        for at in draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=8)):
            buf[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    if kind == "mutate":
        return draw(mutated(good, header=200))
    if kind == "header_len":
        n = draw(
            st.one_of(
                st.sampled_from([0, 1, 2**63, 2**64 - 1, 2**40, 100_000_001]), st.integers(0, 2**64 - 1)
            )
        )
        return struct.pack("<Q", n) + good[8:]
    if kind == "meta":
        edited = dict(meta)
        key = draw(st.sampled_from(sorted(edited)))
        if draw(st.booleans()):
            del edited[key]
        else:
            edited[key] = draw(_bad_meta_values)
        return _with_meta(state, json.dumps(edited))
    text = draw(st.one_of(st.text(max_size=20), st.just("[" * 100_000), st.just("null"), st.just("[1, 2]")))
    return _with_meta(state, text)


def check_checkpoint(out: tuple[nn.Module, dict[str, Any]]) -> None:
    model, meta = out
    assert isinstance(model, nn.Module) and isinstance(meta, dict)
    assert state_fingerprint(model) == meta["fingerprint"]
    logits = model(torch.zeros(1, meta["in_channels"], 6, 6)).logits
    assert tuple(logits.shape) == (1, meta["num_classes"])


@fuzz(120)
@given(data=st.data())
def test_fuzz_checkpoint(base: Path, ckpt: tuple, data: st.DataObject) -> None:
    content = data.draw(checkpoint_bytes(*ckpt))
    with scratch(base) as d:
        p = d / "t.safetensors"
        p.write_bytes(content)
        meta = attempt("checkpoint_meta", lambda: read_checkpoint_meta(p))
        out = attempt("checkpoint", lambda: load_checkpoint(p))
    if meta is not None:
        assert isinstance(meta, dict) and isinstance(meta["fingerprint"], str)
    if out is not None:
        check_checkpoint(out)


def test_checkpoint_claiming_huge_model_is_refused_without_allocating(tmp_path: Path, ckpt: tuple) -> None:
    _, state, meta = ckpt
    for key, value in (("num_classes", 10**12), ("in_channels", 10**9), ("num_classes", 7)):
        p = tmp_path / f"{key}{value}.safetensors"
        p.write_bytes(_with_meta(state, json.dumps({**meta, key: value})))  # fingerprint still valid
        assert attempt("checkpoint", lambda p=p: load_checkpoint(p)) is None
    with pytest.raises(FtikdError, match="do not fit architecture"):
        load_checkpoint(p)


class NeedsRealTensors(TinyNet):
    """A user model whose constructor reads a tensor value, which the meta device cannot provide."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__(in_channels, num_classes)
        self.scale = float(torch.ones(1).item())


if "_test_needs_real_fuzz" not in available_models():
    register_model("_test_needs_real_fuzz")(NeedsRealTensors)


def test_checkpoint_of_model_not_buildable_on_meta_still_loads(tmp_path: Path, ckpt: tuple) -> None:
    torch.manual_seed(1)
    model = NeedsRealTensors()
    p = tmp_path / "real.safetensors"
    save_checkpoint(model, p, {**CKPT_META, "arch": "_test_needs_real_fuzz"})
    out = attempt("checkpoint", lambda: load_checkpoint(p))
    assert out is not None and state_fingerprint(out[0]) == state_fingerprint(model)
    _, state, meta = ckpt  # huge sizes are still refused for such a model, without building it
    p.write_bytes(
        _with_meta(state, json.dumps({**meta, "arch": "_test_needs_real_fuzz", "num_classes": 10**9}))
    )
    assert attempt("checkpoint", lambda: load_checkpoint(p)) is None


# ------------------------------------------------------------------------------------ teacher store

SC = 5  # classes
SN = 12  # samples
FP = "fuzz-teacher-v1"


def _images(ids: torch.Tensor) -> torch.Tensor:
    x = torch.zeros(ids.numel(), 1, 2, 2)
    x[:, 0, 0, 0] = ids.float()
    return x


def _teacher_out(x: torch.Tensor) -> dict[str, torch.Tensor]:
    ids = x[:, 0, 0, 0]
    logits = ids[:, None] * 0.5 + torch.arange(SC, dtype=torch.float32)
    return {"logits": logits, "emb": torch.stack([ids, -ids, ids * 2], dim=1)}


def _expected_logits() -> torch.Tensor:
    return _teacher_out(_images(torch.arange(SN)))["logits"]


class Blob(bytes):
    """Fixture bytes that hypothesis prints as their length, not their content."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def store_bytes(base: Path) -> bytes:
    p = base / "good.sqlite"
    with TeacherStore.open(p, FP, "toy", SC, feature_names=("emb",)) as s:
        s.fill(torch.arange(SN), 0, _images, _teacher_out, budget=SN, batch_size=5)
    assert not Path(str(p) + "-wal").exists() or Path(str(p) + "-wal").stat().st_size == 0
    return Blob(p.read_bytes())


def read_store(p: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything a run reads from a store: open, missing, counts, logits and features."""
    with TeacherStore.open(p, FP, "toy", SC) as s:
        s.missing(torch.arange(SN), 0)
        s.count(0), s.paid_calls(), s.ledger()
        logits = s.logits(torch.arange(SN), 0)
        feats = s.features(torch.arange(SN), 0, "emb")
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (SN, SC)
    assert feats.dtype == torch.float32 and tuple(feats.shape) == (SN, 3)
    return logits, feats


_TAMPER = [
    "blob_len",
    "blob_swap",
    "blob_type",
    "sample_type",
    "feature_len",
    "meta",
    "meta_delete",
    "drop_table",
    "schema",
    "delete_rows",
]


def tamper(p: Path, kind: str, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bool:
    """Damage a valid store through SQLite; True when the damage must be reported on read."""
    con = sqlite3.connect(p)
    sample = draw(st.integers(0, SN - 1))
    try:
        if kind == "blob_len":
            n = draw(st.integers(0, 60).filter(lambda k: k != 4 * SC))
            con.execute("UPDATE outputs SET logits=? WHERE sample=?", (bytes(n), sample))
            return True
        if kind == "blob_swap":  # one blob 4 bytes short, another 4 bytes long: same total size
            other = (sample + 1 + draw(st.integers(0, SN - 2))) % SN
            con.execute("UPDATE outputs SET logits=substr(logits, 1, ?) WHERE sample=?", (4 * SC - 4, sample))
            con.execute("UPDATE outputs SET logits=logits || zeroblob(4) WHERE sample=?", (other,))
            return True
        if kind == "blob_type":
            value = draw(
                st.one_of(st.text(max_size=30), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False))
            )
            con.execute("UPDATE outputs SET logits=? WHERE sample=?", (value, sample))
            return True
        if kind == "sample_type":
            name = draw(st.text("abcxyz", min_size=1, max_size=5))  # never numeric: stays TEXT
            con.execute("UPDATE outputs SET sample=? WHERE sample=?", (name, sample))
            return True
        if kind == "feature_len":
            n = draw(st.integers(0, 30).filter(lambda k: k != 12))
            con.execute("UPDATE features SET data=? WHERE sample=?", (bytes(n), sample))
            return True
        if kind == "meta":
            key = draw(
                st.sampled_from(
                    [
                        "num_classes",
                        "feature_names",
                        "feature_shapes",
                        "format_version",
                        "max_calls",
                        "fingerprint",
                        "dataset",
                    ]
                )
            )
            value = draw(
                st.one_of(
                    st.text(max_size=12),
                    st.sampled_from(
                        ["[]", "[1]", "5", "{}", '{"emb": [3.5]}', '{"emb": "x"}', "-1", "0", "null"]
                    ),
                )
            )
            con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
            return False
        if kind == "meta_delete":
            con.execute(
                "DELETE FROM meta WHERE key=?",
                (draw(st.sampled_from(["num_classes", "feature_names", "feature_shapes", "fingerprint"])),),
            )
            return True
        if kind == "drop_table":
            con.execute(f"DROP TABLE {draw(st.sampled_from(['meta', 'outputs', 'features', 'ledger']))}")
            return True
        if kind == "schema":
            table = draw(st.sampled_from(["outputs", "features", "ledger", "meta"]))
            con.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
            con.execute(f"CREATE TABLE {table} (a, b)")
            return True
        con.execute("DELETE FROM outputs WHERE sample=?", (sample,))
        return True
    finally:
        con.commit()
        con.close()


@fuzz(100)
@given(data=st.data())
def test_fuzz_store_tampered_through_sqlite(base: Path, store_bytes: bytes, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(_TAMPER))
    with scratch(base) as d:
        p = d / "s.sqlite"
        p.write_bytes(store_bytes)
        must_fail = tamper(p, kind, data.draw)
        out = attempt("store", lambda: read_store(p))
        if kind in ("blob_len", "blob_swap", "blob_type", "feature_len"):  # the error names the store
            with pytest.raises(FtikdError, match=re.escape(str(p))):
                read_store(p)
    if must_fail:
        assert out is None, f"{kind}: damaged store read without error"
    elif out is not None:
        assert torch.equal(out[0], _expected_logits())


@fuzz(80)
@given(data=st.data())
def test_fuzz_store_file_bytes(base: Path, store_bytes: bytes, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["random", "magic_random", "truncate", "flip", "foreign"]))
    with scratch(base) as d:
        p = d / "s.sqlite"
        if kind == "random":
            p.write_bytes(data.draw(st.binary(min_size=1, max_size=4096)))
        elif kind == "magic_random":
            p.write_bytes(b"SQLite format 3\x00" + data.draw(st.binary(max_size=4096)))
        elif kind == "truncate":
            p.write_bytes(store_bytes[: data.draw(st.integers(1, len(store_bytes) - 1))])
        elif kind == "flip":
            buf = bytearray(store_bytes)
            for at in data.draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=6)):
                buf[at] ^= 1 << data.draw(st.integers(0, 7))
            p.write_bytes(bytes(buf))
        else:  # a valid SQLite database that is not a store (some store table names, wrong columns)
            con = sqlite3.connect(p)
            for t in data.draw(
                st.lists(st.sampled_from(["meta", "outputs", "features", "ledger", "x"]), unique=True)
            ):
                con.execute(f"CREATE TABLE {t} (a, b)")
            con.commit()
            con.close()
        out = attempt("store", lambda: read_store(p))
    if out is not None and kind == "truncate":
        # truncation removes bytes but cannot change them: whatever is read must be the true values
        assert torch.equal(out[0], _expected_logits())


def test_store_wrong_blob_length_names_the_store(tmp_path: Path, store_bytes: bytes) -> None:
    p = tmp_path / "s.sqlite"
    p.write_bytes(store_bytes)
    con = sqlite3.connect(p)
    con.execute("UPDATE outputs SET logits=zeroblob(8) WHERE sample=3")
    con.commit()
    con.close()
    TRIED["store"] += 1
    with TeacherStore.open(p, FP, "toy", SC) as s:
        assert torch.equal(s.logits(torch.tensor([0, 1]), 0), _expected_logits()[:2])  # other rows still read
        with pytest.raises(
            FtikdError, match=re.escape(f"store {p} is not a valid") + ".*sample 3 has 8 bytes"
        ):
            s.logits(torch.arange(SN), 0)


# ----------------------------------------------------------------------------- run configs / records

_config_text = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=80).map(str.encode),
    st.sampled_from(
        [
            b"{",
            b"[1, 2]",
            b"null",
            b'"text"',
            b"5",
            b"- a\n- b\n",
            b"a: [\n",
            b"{a: 1",
            b"\xff\xfe{}",
            b"\x00" * 5,
        ]
    ),
    # keys without control characters: from_dict prints unknown keys raw (see the newline-key case below)
    st.dictionaries(
        st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=8), _json_leaf, max_size=4
    ).map(lambda d: json.dumps(d).encode()),
)


@fuzz(120)
@given(content=_config_text, suffix=st.sampled_from([".json", ".yaml", ".yml", ".cfg"]))
def test_fuzz_run_config_syntax(base: Path, content: bytes, suffix: str) -> None:
    """Random bytes, broken JSON/YAML, non-mapping roots, unknown keys and non-UTF-8 text."""
    with scratch(base) as d:
        p = d / f"c{suffix}"
        p.write_bytes(content)
        try:
            # from_dict prints unknown keys raw (a key may hold a newline) until check_run_config is wired
            cfg = attempt("config", lambda: RunConfig.from_file(p), one_line=WIRED)
        except (TypeError, ValueError, AttributeError):
            # a mapping with wrong value types escapes until from_dict calls check_run_config
            if WIRED:
                raise
            assume(False)
    if cfg is not None:
        assert isinstance(cfg, RunConfig)


# Whether RunConfig.from_dict already calls the validator (then nothing may escape at all).
WIRED = "check_run_config" in inspect.getsource(RunConfig.from_dict)
_RC_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(RunConfig().train)}

_WRONG_TYPES = {
    "calls": ["abc", 2.5, True, None, [1], {"a": 1}],
    "seed": ["1", 1.0, False],
    "view": ["0", None],
    "train": [5, "abc", [1, 2], True],
    "method_options": [[], "k=3", 5, {1: 2}],
    "dataset": [5, None, ["cifar10"]],
    "student": [None, 3],
    "method": [1.5, {}],
    "teacher": [5, ["a"]],
    "data_dir": [1],
    "store": [True],
    "out": [None, 0],
}
_WRONG_TRAIN = {"lr": ["0.1", None, float("nan")], "batch_size": [64.0, "64", True], "device": [0, None]}
_WRONG_CASES = [({k: v}, k) for k, vs in _WRONG_TYPES.items() for v in vs] + [
    ({"train": {k: v}}, f"train.{k}") for k, vs in _WRONG_TRAIN.items() for v in vs
]


def _write_config(d: Path, raw: dict[str, Any], yaml_file: bool) -> Path:
    if yaml_file:
        import yaml

        p = d / "c.yaml"
        p.write_text(yaml.safe_dump(raw))
    else:
        p = d / "c.json"
        p.write_text(json.dumps(raw))
    return p


def _has_int_keys(obj: Any) -> bool:
    return isinstance(obj, dict) and any(not isinstance(k, str) or _has_int_keys(v) for k, v in obj.items())


# JSON turns integer keys into strings (a valid config), so those cases are YAML-only.
_FILE_CASES = [
    pytest.param(raw, key, yaml_file, id=f"{'yaml' if yaml_file else 'json'}-{key}={raw!r}")
    for raw, key in _WRONG_CASES
    for yaml_file in (False, True)
    if yaml_file or not _has_int_keys(raw)
]


@pytest.mark.parametrize("raw,key", _WRONG_CASES, ids=[f"{key}={raw!r}" for raw, key in _WRONG_CASES])
def test_check_run_config_names_key_and_type(raw: dict[str, Any], key: str) -> None:
    """The validator itself (no wiring needed): every wrong type is refused naming the key."""
    TRIED["config_check"] += 1
    with pytest.raises(FtikdError, match=re.escape(repr(key)) + " must be"):
        check_run_config(raw, RunConfig, "c.json")
    with pytest.raises(FtikdError, match=re.escape(repr(key))):
        check_run_config({"config": raw, "metrics": {}}, RunConfig, "record.json")  # a run record


_typed_values = st.one_of(
    _json_leaf, st.lists(_json_leaf, max_size=2), st.dictionaries(st.text(max_size=3), _json_leaf, max_size=2)
)


@fuzz(150)
@given(
    raw=st.dictionaries(
        st.one_of(st.sampled_from(sorted(_RC_FIELDS)), st.text(max_size=6)),
        st.one_of(
            _typed_values, st.dictionaries(st.sampled_from(sorted(_TRAIN_FIELDS)), _typed_values, max_size=3)
        ),
        max_size=5,
    )
)
def test_fuzz_check_run_config(raw: dict[str, Any]) -> None:
    """Whatever check_run_config accepts builds a RunConfig whose fields all have their types."""
    cleaned = attempt("config_check", lambda: check_run_config(raw, RunConfig))
    if cleaned is None:
        return
    train = cleaned.pop("train", None) or {}
    cfg = RunConfig(**cleaned, train=type(RunConfig().train)(**train))
    for name, tp in ((f.name, f.type) for f in dataclasses.fields(cfg)):
        value = getattr(cfg, name)
        if name == "train":
            for tf in dataclasses.fields(value):
                v = getattr(value, tf.name)
                if tf.type == "bool":
                    assert type(v) is bool, (tf.name, v)
                    continue
                want = {"int": int, "float": (int, float), "str": str}[tf.type]
                assert isinstance(v, want) and not isinstance(v, bool), (tf.name, v)
        elif tp == "int":
            assert type(value) is int, (name, value)
        elif tp == "str":
            assert isinstance(value, str), (name, value)
        elif tp == "str | None":
            assert value is None or isinstance(value, str), (name, value)
        elif tp == "dict[str, Any]":
            assert isinstance(value, dict) and all(isinstance(k, str) for k in value), (name, value)


@pytest.mark.parametrize("raw,key,yaml_file", _FILE_CASES)
def test_run_config_wrong_types_refused(
    tmp_path: Path, raw: dict[str, Any], key: str, yaml_file: bool
) -> None:
    """After RunConfig.from_dict calls check_run_config, wrong types end in FtikdError naming the key."""
    p = _write_config(tmp_path, raw, yaml_file)
    TRIED["config"] += 1
    with pytest.raises(FtikdError, match=re.escape(repr(key))):
        RunConfig.from_file(p)


@pytest.mark.parametrize(
    "text",
    [
        '{"config": 5}',
        '{"config": [1, 2]}',
        '{"config": "ab"}',
        "1: 2\nseed: 3\n",
        '{"train": [["lr", 1]]}',
        '{"\\n": 1}',  # an unknown key holding a newline must not break the one-line message
    ],
)
def test_run_config_odd_structures_refused(tmp_path: Path, text: str) -> None:
    """A record whose 'config' is not a mapping, YAML integer keys, a list as train block, odd keys."""
    p = tmp_path / ("c.yaml" if ":" in text and not text.startswith("{") else "c.json")
    p.write_text(text)
    TRIED["config"] += 1
    attempt("config", lambda: RunConfig.from_file(p))


# ------------------------------------------------------------------------ teacher outputs: NaN/inf


@fuzz(30)
@given(
    n=st.integers(1, 12),
    batch=st.integers(1, 5),
    bad=st.lists(
        st.tuples(
            st.integers(0, 11), st.integers(0, SC - 1), st.sampled_from([math.nan, math.inf, -math.inf])
        ),
        min_size=1,
        max_size=4,
    ),
    in_features=st.booleans(),
)
def test_fuzz_non_finite_teacher_outputs_refused(
    base: Path, n: int, batch: int, bad: list[tuple[int, int, float]], in_features: bool
) -> None:
    bad = [(s, c, v) for s, c, v in bad if s < n]
    assume(bad)
    first_bad_batch = min(s for s, _, _ in bad) // batch
    calls: list[list[int]] = []

    def teacher(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = _teacher_out(x)
        ids = x[:, 0, 0, 0].long().tolist()
        calls.append(ids)
        target = out["emb"] if in_features else out["logits"]
        for s, c, v in bad:
            if s in ids:
                target[ids.index(s), c % target.shape[1]] = v
        return out

    with scratch(base) as d, TeacherStore.open(d / "s.sqlite", FP, "toy", SC, feature_names=("emb",)) as s:
        TRIED["teacher_output"] += 1
        with pytest.raises(FtikdError, match=r"non-finite .*nothing was stored"):
            s.fill(torch.arange(n), 0, _images, teacher, budget=n, batch_size=batch)
        stored = first_bad_batch * batch
        assert s.count(0) == stored  # every batch before the bad one, nothing from it or after
        assert s.missing(torch.arange(n), 0).tolist() == list(range(stored, n))
        assert s.paid_calls() == sum(len(c) for c in calls)  # the refused batch was paid and is recorded
        assert "refused" in s.ledger()[-1][3]
        if stored:
            assert torch.equal(
                s.logits(torch.arange(stored), 0), _teacher_out(_images(torch.arange(stored)))["logits"]
            )
