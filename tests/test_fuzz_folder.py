"""Fuzz and property tests of the image-folder reader on malformed trees, names and image files.

Shared harness and the rules every reader must keep: tests/fuzzing.py.
"""

from __future__ import annotations

import io
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fuzzing import (
    attempt,
    fuzz,
    mutated,
    scratch,
)
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from ftikd.data.folder import load_image_folder

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
def test_fuzz_image_folder(fuzz_base: Path, tree: list, split: bool) -> None:
    with scratch(fuzz_base) as d:
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
