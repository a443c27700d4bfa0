"""Fuzz and property tests of IDX and CIFAR readers (and the restricted pickle loader) on malformed files.

Shared harness and the rules every reader must keep: tests/fuzzing.py.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fuzzing import (
    HUGE_U32,
    attempt,
    fuzz,
    json_leaf,
    mutated,
    scratch,
)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ftikd.data.cifar import read_cifar_dir, safe_load_pickle
from ftikd.data.idx import load_idx_pair, read_idx

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
def test_fuzz_read_idx(fuzz_base: Path, content: bytes, expected: int | None) -> None:
    with scratch(fuzz_base) as d:
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
def test_fuzz_load_idx_pair(fuzz_base: Path, images: bytes, labels: bytes) -> None:
    with scratch(fuzz_base) as d:
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
_py_leaf = st.one_of(json_leaf, st.binary(max_size=6), _arrays)
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
def test_fuzz_read_cifar_dir(fuzz_base: Path, case: tuple[str, str, bytes]) -> None:
    variant, name, data = case
    with scratch(fuzz_base) as d:
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
    fuzz_base: Path, variant: str, which: int, where: str, protocol: int
) -> None:
    with scratch(fuzz_base) as d:
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
def test_fuzz_safe_load_pickle(fuzz_base: Path, data: bytes) -> None:
    with scratch(fuzz_base) as d:
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
