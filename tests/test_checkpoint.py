"""Checkpoints: safetensors round trip, fingerprints, and refusal of corrupt, tampered or pickle files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ftikd.errors import FtikdError
from ftikd.models.base import ModelOutput, available_models, register_model
from ftikd.teacher import load_checkpoint, read_checkpoint_meta, save_checkpoint, state_fingerprint
from ftikd.teacher.checkpoint import convert_torch_checkpoint

ARCH = "_test_tiny_ckpt"


class TinyNet(nn.Module):
    """Smallest model with the zoo's forward signature (conv, BN buffers, linear head)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor, with_features: bool = False) -> ModelOutput:
        s1 = torch.relu(self.bn(self.conv(x)))
        emb = s1.mean(dim=(2, 3))
        feats = {"stage1": s1, "embedding": emb} if with_features else {}
        return ModelOutput(self.fc(emb), feats)


if ARCH not in available_models():
    register_model(ARCH)(TinyNet)

META = {"arch": ARCH, "in_channels": 3, "num_classes": 10, "dataset": "cifar10", "test_acc": 0.5}


def _model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    m = TinyNet()
    # Non-trivial buffers, so that buffers are shown to round-trip too.
    m.bn.running_mean.uniform_()
    m.bn.num_batches_tracked.fill_(7)
    return m


def _saved(tmp_path: Path, name: str = "t.safetensors") -> tuple[TinyNet, Path, dict]:
    m = _model()
    p = tmp_path / name
    meta = save_checkpoint(m, p, {**META, "note": "hello"})
    return m, p, meta


def test_round_trip(tmp_path: Path) -> None:
    m, p, meta = _saved(tmp_path)
    assert meta["fingerprint"] == state_fingerprint(m)
    assert meta["ftikd_version"]
    loaded, meta2 = load_checkpoint(p)
    assert isinstance(loaded, TinyNet) and not loaded.training
    assert meta2 == meta
    assert meta2["note"] == "hello" and meta2["test_acc"] == 0.5 and meta2["dataset"] == "cifar10"
    sd, sd2 = m.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
    assert state_fingerprint(loaded) == meta["fingerprint"]
    assert read_checkpoint_meta(p) == meta
    # Atomic write leaves no temp file behind.
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]
    # Saving again over the same path replaces it, same fingerprint.
    assert save_checkpoint(loaded, p, META)["fingerprint"] == meta["fingerprint"]


def test_fingerprint_properties() -> None:
    m = _model()
    sd = m.state_dict()
    fp = state_fingerprint(m)
    assert fp == state_fingerprint(dict(reversed(list(sd.items()))))  # order-independent
    assert fp == state_fingerprint({k: v.clone() for k, v in sd.items()})
    assert fp != state_fingerprint(_model(seed=1))
    assert fp != state_fingerprint({**sd, "fc.bias": sd["fc.bias"].double()})  # dtype matters
    assert fp != state_fingerprint({**sd, "fc.bias": sd["fc.bias"].reshape(2, 5)})  # shape matters
    renamed = {("x" + k if k == "fc.bias" else k): v for k, v in sd.items()}
    assert fp != state_fingerprint(renamed)  # names matter


def test_fingerprint_same_in_another_process() -> None:
    code = (
        "import torch; from torch import nn; from ftikd.teacher import state_fingerprint;"
        "torch.manual_seed(3); print(state_fingerprint(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    torch.manual_seed(3)
    assert out == state_fingerprint(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FtikdError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0.99, 0.5, 20 / 1000, 5 / 1000])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    _, p, _ = _saved(tmp_path)
    data = p.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(FtikdError, match="corrupt or truncated"):
        load_checkpoint(cut)
    with pytest.raises(FtikdError, match="corrupt or truncated"):
        read_checkpoint_meta(cut)


def test_random_bytes(tmp_path: Path) -> None:
    p = tmp_path / "junk.safetensors"
    p.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(FtikdError, match="not a valid ftikd checkpoint"):
        load_checkpoint(p)


def test_safetensors_without_ftikd_metadata(tmp_path: Path) -> None:
    p = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(p))
    with pytest.raises(FtikdError, match="no ftikd metadata"):
        load_checkpoint(p)


def test_tampered_weights_fail_fingerprint(tmp_path: Path) -> None:
    _, p, meta = _saved(tmp_path)
    data = bytearray(p.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    assert len(data) > 8 + header_len  # the last byte is weight data, not header
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))
    assert read_checkpoint_meta(p)["fingerprint"] == meta["fingerprint"]  # header intact
    with pytest.raises(FtikdError, match="fingerprint"):
        load_checkpoint(p)


def test_tampered_metadata_fingerprint(tmp_path: Path) -> None:
    m = _model()
    p = tmp_path / "t.safetensors"
    meta = {**META, "fingerprint": "0" * 20, "ftikd_version": "0.1.0"}
    save_file(
        {k: v.contiguous() for k, v in m.state_dict().items()},
        str(p),
        metadata={"ftikd_meta": json.dumps(meta)},
    )
    with pytest.raises(FtikdError, match="fingerprint"):
        load_checkpoint(p)


class _Evil:
    """Unpickling this would create ``marker`` (it stands for arbitrary code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(2), "payload": _Evil(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(FtikdError, match="convert_torch_checkpoint") as e:
        load_checkpoint(evil)
    assert "only safetensors" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FtikdError, match="refused"):
        convert_torch_checkpoint(evil, tmp_path / "out.safetensors", META)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    # Content sniffing: a renamed pickle is refused as well, never unpickled.
    renamed = tmp_path / "evil.safetensors"
    renamed.write_bytes(evil.read_bytes())
    with pytest.raises(FtikdError, match="torch pickle"):
        load_checkpoint(renamed)
    assert not marker.exists()


def test_convert_trusted_state_dict(tmp_path: Path) -> None:
    m = _model()
    src = tmp_path / "trusted.pth"
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, src)
    meta = convert_torch_checkpoint(src, tmp_path / "conv.safetensors", META)
    assert meta["fingerprint"] == state_fingerprint(m)
    loaded, _ = load_checkpoint(tmp_path / "conv.safetensors")
    assert state_fingerprint(loaded) == state_fingerprint(m)
    with pytest.raises(FtikdError, match="do not fit"):
        convert_torch_checkpoint(src, tmp_path / "bad.safetensors", {**META, "num_classes": 7})
