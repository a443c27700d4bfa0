"""Mobile students (MobileNetV2, ShuffleNetV1/V2): published sizes, shapes at 28/32 px, named features."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from ftikd.cli import main
from ftikd.models import ModelOutput, available_models, build_model
from ftikd.models.mobilenetv2 import MobileNetV2
from ftikd.models.shufflenet import channel_shuffle, shufflenet_v1, shufflenet_v2

# CRD paper Table 2 (RepDistiller's mobile_half, ShuffleV1, ShuffleV2), CIFAR-100, millions.
PUBLISHED_MPARAMS = {"mobilenetv2_half": 0.81, "shufflev1": 0.95, "shufflev2": 1.36}
MOBILE = ["mobilenetv2_half", "mobilenetv2", "shufflev1", "shufflev2"]

# Spatial size of stem, stage1, stage2, ... for 32x32 and 28x28 inputs.
RESOLUTIONS = {
    "mobilenetv2": {32: [16, 16, 8, 4, 2], 28: [14, 14, 7, 4, 2]},
    "shufflenet": {32: [32, 16, 8, 4], 28: [28, 14, 7, 4]},
}
WIDTHS = {
    "mobilenetv2_half": ([16, 12, 16, 48, 160], 1280),
    "mobilenetv2": ([32, 24, 32, 96, 320], 1280),
    "shufflev1": ([24, 240, 480, 960], 960),
    "shufflev2": ([24, 116, 232, 464], 1024),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _spatial_names(model: nn.Module) -> list[str]:
    return [n for n in model.feature_names() if n != "embedding" and not n.endswith("_pre")]


def test_registered() -> None:
    assert set(MOBILE) <= set(available_models())


@pytest.mark.parametrize("name", sorted(PUBLISHED_MPARAMS))
def test_parameter_count_matches_published(name: str) -> None:
    count = _num_params(build_model(name, in_channels=3, num_classes=100)) / 1e6
    assert count == pytest.approx(PUBLISHED_MPARAMS[name], rel=0.02)


def test_parameter_count_follows_classes_and_channels() -> None:
    """Only the classifier depends on the class count, only the stem conv on the input channels."""
    for name in MOBILE:
        base = _num_params(build_model(name, 3, 100))
        emb = build_model(name, 3, 100).embedding_dim
        assert _num_params(build_model(name, 3, 10)) == base - 90 * (emb + 1)
        assert _num_params(build_model(name, 1, 100)) < base


@pytest.mark.parametrize("name", MOBILE)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 32), (3, 28), (1, 8)])
def test_forward_shapes_both_paths(name: str, channels: int, size: int) -> None:
    model = build_model(name, in_channels=channels, num_classes=7)
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        plain = model(x)
        full = model(x, with_features=True)
    assert isinstance(plain, ModelOutput) and plain.features == {}
    assert plain.logits.shape == full.logits.shape == (2, 7)
    assert torch.isfinite(plain.logits).all()
    assert list(full.features) == model.feature_names()
    assert full.features["embedding"].shape == (2, model.embedding_dim)
    widths, emb = WIDTHS[name]
    assert model.embedding_dim == emb
    assert [full.features[n].shape[1] for n in _spatial_names(model)] == widths
    family = "mobilenetv2" if isinstance(model, MobileNetV2) else "shufflenet"
    sizes = [full.features[n].shape[-1] for n in _spatial_names(model)]
    if size in RESOLUTIONS[family]:
        assert sizes == RESOLUTIONS[family][size]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= 1


@pytest.mark.parametrize("name", MOBILE)
def test_named_features_are_consistent(name: str) -> None:
    model = build_model(name, in_channels=3, num_classes=5)
    x = torch.randn(4, 3, 32, 32)
    out = model(x, with_features=True)
    feats = out.features
    assert (feats["stem"] >= 0).all()
    for n in _spatial_names(model)[1:]:
        if f"{n}_pre" in feats:  # ShuffleNets: the stage output is the ReLU of its pre-activation
            pre = feats[f"{n}_pre"]
            assert (pre < 0).any() and torch.equal(feats[n], pre.clamp_min(0))
        else:  # MobileNetV2: linear bottleneck outputs, no ReLU after them
            assert (feats[n] < 0).any()
    if not isinstance(model, MobileNetV2) and model.head is None:
        torch.testing.assert_close(feats["embedding"], feats["stage3"].mean(dim=(2, 3)))
    torch.testing.assert_close(out.logits, model(x).logits)
    for m in model.modules():  # both paths ran every BN exactly once
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_batches_tracked.item() == 2


@pytest.mark.parametrize("with_features", [False, True])
@pytest.mark.parametrize("name", MOBILE)
def test_gradients_reach_every_parameter_and_are_finite(name: str, with_features: bool) -> None:
    model = build_model(name, in_channels=1, num_classes=3)
    out = model(torch.randn(2, 1, 28, 28), with_features=with_features)
    loss = out.logits.logsumexp(1).mean() + sum(f.square().mean() for f in out.features.values())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_channel_shuffle_interleaves_groups() -> None:
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]


def test_first_shufflev1_unit_is_ungrouped() -> None:
    """Zhang et al.: the first pointwise conv of the network sees only 24 channels and is not grouped."""
    model = build_model("shufflev1")
    convs = [u.reduce[0] for stage in model.stages for u in stage]
    assert convs[0].groups == 1 and all(c.groups == 3 for c in convs[1:])


def test_bad_configs() -> None:
    with pytest.raises(ValueError, match="width"):
        MobileNetV2(0.01)
    with pytest.raises(ValueError, match="expand_ratio"):
        MobileNetV2(0.5, 0)
    with pytest.raises(ValueError, match="4 \\* groups"):
        shufflenet_v1(widths=(240, 480, 970))
    with pytest.raises(ValueError, match="unit count"):
        shufflenet_v2(units=(3, 0, 3))


@pytest.fixture(scope="module")
def teacher_path(trained_digits_teacher):
    return trained_digits_teacher(2)


@pytest.mark.parametrize("student", ["mobilenetv2_half", "shufflev1", "shufflev2"])
def test_distill_smoke_on_digits(tmp_path, teacher_path, student: str) -> None:
    """One pseudo-epoch of KD through the CLI with each new student (8x8 digits: tiny maps still work)."""
    out = tmp_path / "runs"
    args = ["distill", "--dataset", "digits", "--teacher", str(teacher_path), "--student", student]
    args += ["--method", "kd", "--calls", "80", "--max-epochs", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    (record_path,) = out.glob("*.json")
    record = json.loads(record_path.read_text())
    assert student in record_path.name
    assert record["teacher_calls"]["paid_this_run"] <= 80
    assert 0.0 <= record["metrics"]["test_top1"] <= 100.0
