"""Fuzz and property tests of the checkpoint reader on malformed safetensors files and metadata.

Shared harness and the rules every reader must keep: tests/fuzzing.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzzing import (
    Blob,
    attempt,
    fuzz,
    json_leaf,
    mutated,
    scratch,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from torch import nn

from ftikd.errors import FtikdError
from ftikd.models.base import ModelOutput, available_models, build_model, register_model
from ftikd.teacher import save_checkpoint, state_fingerprint
from ftikd.teacher.checkpoint import META_KEY, load_checkpoint, read_checkpoint_meta

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
def ckpt(fuzz_base: Path) -> tuple[bytes, dict[str, torch.Tensor], dict[str, Any]]:
    torch.manual_seed(0)
    p = fuzz_base / "good.safetensors"
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
    json_leaf,
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
def test_fuzz_checkpoint(fuzz_base: Path, ckpt: tuple, data: st.DataObject) -> None:
    content = data.draw(checkpoint_bytes(*ckpt))
    with scratch(fuzz_base) as d:
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
