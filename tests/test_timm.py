"""timm students (optional extra): hook-tapped named features, local weights only, a CLI smoke run.

The timm tests skip unless the extra is installed (``scripts/test-timm.sh`` builds ``.venv-timm``
and runs this file there); the tests without the ``timm`` fixture run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import save_file

from ftikd.errors import FtikdError
from ftikd.models import ModelOutput, build_model
from ftikd.models.timm_adapter import default_taps

SKIP_REASON = "timm is an optional extra: pip install 'ftikd[timm]', or run scripts/test-timm.sh"
RESNET18_TAPS = {
    "stem": "act1",
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "stage4": "layer4",
}


@pytest.fixture(scope="module")
def timm() -> ModuleType:
    return pytest.importorskip("timm", reason=SKIP_REASON)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_missing_extra_is_a_clear_user_error() -> None:
    with pytest.raises(FtikdError, match=r"ftikd\[timm\]"):
        build_model("timm:resnet18", in_channels=1, num_classes=10)


def test_default_taps_from_feature_info() -> None:
    resnet = [
        {"module": m, "reduction": r}
        for m, r in [("act1", 2), *((f"layer{i}", 2 ** (i + 1)) for i in range(1, 5))]
    ]
    assert default_taps(resnet) == RESNET18_TAPS
    convnext = [{"module": f"stages.{i}", "reduction": 4 * 2**i} for i in range(4)]
    assert default_taps(convnext) == {f"stage{i + 1}": f"stages.{i}" for i in range(4)}
    assert default_taps([]) == {}


def test_empty_spec_is_a_user_error() -> None:
    with pytest.raises(FtikdError, match="timm:NAME"):
        build_model("timm:", in_channels=1, num_classes=10)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_resnet18_features_by_hooks(timm: ModuleType, channels: int, size: int) -> None:
    model = build_model("timm:resnet18", in_channels=channels, num_classes=7)
    x = torch.randn(2, channels, size, size)
    out = model(x, with_features=True)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 7)
    assert list(out.features) == model.feature_names() == [*RESNET18_TAPS, "embedding"]
    assert model.embedding_dim == 512 and out.features["embedding"].shape == (2, 512)
    # independent of the hooks: timm's own forward_features is stage4, its global pool the embedding
    with torch.no_grad():
        model.eval()
        plain = model(x)
        feats = model(x, with_features=True).features
        torch.testing.assert_close(feats["stage4"], model.model.forward_features(x))
        torch.testing.assert_close(feats["embedding"], feats["stage4"].mean(dim=(2, 3)))
        torch.testing.assert_close(plain.logits, model.model(x))
    assert plain.features == {}
    sizes = [feats[n].shape[-1] for n in RESNET18_TAPS]
    assert sizes == sorted(sizes, reverse=True)


def test_custom_taps_gradients_and_hooks_removed(timm: ModuleType) -> None:
    from ftikd.models.timm_adapter import TimmStudent

    model = TimmStudent("resnet18", in_channels=1, num_classes=3, features={"mid": "layer3.0.conv1"})
    out = model(torch.randn(2, 1, 28, 28), with_features=True)
    assert list(out.features) == ["mid", "embedding"] and out.features["mid"].shape[1] == 256
    (out.logits.logsumexp(1).mean() + sum(f.square().mean() for f in out.features.values())).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with pytest.raises(FtikdError, match="no module 'layer9'"):
        TimmStudent("resnet18", num_classes=3, features={"x": "layer9"})
    with pytest.raises(FtikdError, match="cannot build"):
        build_model("timm:no_such_net_xyz")


def test_vit_student_with_kwargs(timm: ModuleType) -> None:
    from ftikd.models.timm_adapter import TimmStudent

    vit = TimmStudent(
        "vit_tiny_patch16_224", in_channels=1, num_classes=4, img_size=32, patch_size=8, depth=2
    )
    out = vit(torch.randn(2, 1, 32, 32), with_features=True)
    assert vit.feature_names() == ["stage1", "stage2", "embedding"]
    assert out.features["stage2"].shape == (2, 17, 192) and out.features["embedding"].shape == (2, 192)


def test_never_downloads(timm: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a hub download was attempted")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert build_model("timm:resnet18", in_channels=1, num_classes=2) is not None


def _weights_file(tmp_path: Path, in_channels: int, num_classes: int, suffix: str) -> tuple[Path, dict]:
    source = build_model("timm:resnet18", in_channels=in_channels, num_classes=num_classes).model
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path, state


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_load_exactly(timm: ModuleType, tmp_path: Path, suffix: str) -> None:
    path, state = _weights_file(tmp_path, 1, 10, suffix)
    model = build_model(f"timm:resnet18@{path}", in_channels=1, num_classes=10)
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_local_weights_adapt_channels_and_classes(timm: ModuleType, tmp_path: Path) -> None:
    """3-channel 10-class weights into a 1-channel 5-class student: stem summed, classifier fresh."""
    path, state = _weights_file(tmp_path, 3, 10, ".safetensors")
    model = build_model(f"timm:resnet18@{path}", in_channels=1, num_classes=5).model
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert model.fc.weight.shape == (5, 512)
    torch.testing.assert_close(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    other = tmp_path / "other.safetensors"
    save_file(
        {k: v.contiguous() for k, v in build_model("timm:resnet34").model.state_dict().items()}, str(other)
    )
    with pytest.raises(FtikdError, match="do not fit"):
        build_model(f"timm:resnet18@{other}")
    with pytest.raises(FtikdError, match="not found"):
        build_model(f"timm:resnet18@{tmp_path / 'missing.pt'}")


def test_distill_smoke_with_timm_student(timm: ModuleType, tmp_path: Path, digits_teacher: Path) -> None:
    """One pseudo-epoch of KD through the CLI with ``--student timm:resnet18`` on 8x8 digits."""
    from ftikd.cli import main

    out = tmp_path / "runs"
    args = ["distill", "--dataset", "digits", "--teacher", str(digits_teacher), "--student", "timm:resnet18"]
    args += ["--method", "kd", "--calls", "80", "--max-epochs", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    (record_path,) = out.glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["teacher_calls"]["paid_this_run"] <= 80
    assert 0.0 <= record["metrics"]["test_top1"] <= 100.0
