"""Model zoo: published sizes, forward shapes at every supported input size, named features."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from ftikd.errors import FtikdError
from ftikd.models import ModelOutput, available_models, build_model
from ftikd.models.resnet import ResNet
from ftikd.models.vgg import VGG, vgg
from ftikd.models.wrn import WideResNet, wrn

# Published parameter counts (millions) for CIFAR-100 (CRD / RepDistiller tables).
PUBLISHED_MPARAMS = {
    "wrn_40_2": 2.26,
    "wrn_16_2": 0.70,
    "resnet110": 1.73,
    "resnet32": 0.47,
    "vgg13": 9.46,
    "vgg8": 3.96,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "resnet56": 0.86,
    "resnet20": 0.28,
}

EXPECTED_MODELS = {
    *(f"resnet{d}" for d in (8, 14, 20, 26, 32, 44, 56, 110)),
    "resnet8x4",
    "resnet32x4",
    *(f"wrn_{d}_{k}" for d, k in ((16, 1), (16, 2), (40, 1), (40, 2), (10, 2), (28, 2))),
    *(f"vgg{d}" for d in (8, 11, 13, 16, 19)),
}

NUM_STAGES = {ResNet: 3, WideResNet: 3, VGG: 4}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny batches gain nothing from intra-op threads, and on a loaded 2-core machine the thread
    synchronisation of many small ops (resnet110) costs 10x; restored after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_holds_the_whole_zoo() -> None:
    assert set(available_models()) >= EXPECTED_MODELS


def test_unknown_model_is_a_user_error() -> None:
    with pytest.raises(FtikdError, match="nope"):
        build_model("nope")


@pytest.mark.parametrize("name", sorted(PUBLISHED_MPARAMS))
def test_parameter_count_matches_published(name: str) -> None:
    count = _num_params(build_model(name, in_channels=3, num_classes=100)) / 1e6
    assert count == pytest.approx(PUBLISHED_MPARAMS[name], rel=0.02)


@pytest.mark.parametrize("name", sorted(EXPECTED_MODELS))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (1, 8)])
def test_forward_logits_and_empty_features(name: str, channels: int, size: int) -> None:
    model = build_model(name, in_channels=channels, num_classes=7)
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 7)
    assert torch.isfinite(out.logits).all()
    assert out.features == {}


@pytest.mark.parametrize("name", sorted(EXPECTED_MODELS))
def test_named_features(name: str) -> None:
    model = build_model(name, in_channels=3, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    out = model(x, with_features=True)
    feats = out.features
    stages = NUM_STAGES[type(model)]

    assert list(feats) == model.feature_names()
    assert feats["embedding"].shape == (2, model.embedding_dim)
    assert (feats["stem"] >= 0).all()
    prev_size = feats["stem"].shape[-1]
    for i in range(1, stages + 1):
        post, pre = feats[f"stage{i}"], feats[f"stage{i}_pre"]
        assert post.shape == pre.shape and post.dim() == 4 and post.shape[0] == 2
        assert (post >= 0).all() and (pre < 0).any()
        assert torch.equal(post, pre.clamp_min(0))
        assert post.shape[-1] <= prev_size
        prev_size = post.shape[-1]
    last = feats[f"stage{stages}"]
    assert last.shape[1] == model.embedding_dim
    torch.testing.assert_close(feats["embedding"], last.mean(dim=(2, 3)))

    # The feature path computes the same function and runs every BN exactly once.
    torch.testing.assert_close(out.logits, model(x).logits)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.num_batches_tracked.item() == 2


@pytest.mark.parametrize("with_features", [False, True])
@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "wrn_16_1", "wrn_16_2", "vgg8", "vgg13"])
def test_backward_through_both_paths(name: str, with_features: bool) -> None:
    """In-place ReLUs never clobber a tensor autograd or a feature needs: every parameter gets a grad."""
    model = build_model(name, in_channels=1, num_classes=3)
    out = model(torch.randn(2, 1, 8, 8), with_features=with_features)
    loss = out.logits.sum() + sum(f.square().mean() for f in out.features.values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_2", "vgg11"])
def test_tiny_inputs_down_to_one_pixel(name: str) -> None:
    model = build_model(name, in_channels=1, num_classes=4)
    out = model(torch.randn(3, 1, 1, 1), with_features=True)
    assert out.logits.shape == (3, 4)
    assert all(f.shape[-1] == 1 for f in out.features.values() if f.dim() == 4)


def test_vgg_pools_like_repdistiller() -> None:
    """Group resolutions 32/16/8/4/4 at 32x32; the extra pool before group 5 only for large inputs."""
    model = vgg((1, 1, 1, 1, 1), in_channels=3, num_classes=2).eval()
    with torch.no_grad():
        small = model(torch.randn(1, 3, 32, 32), with_features=True).features
        large = model(torch.randn(1, 3, 64, 64), with_features=True).features
        odd = model(torch.randn(1, 3, 28, 28), with_features=True).features
    names = ("stem", "stage1", "stage2", "stage3", "stage4")
    assert [small[k].shape[-1] for k in names] == [32, 16, 8, 4, 4]
    assert [large[k].shape[-1] for k in names] == [64, 32, 16, 8, 4]
    assert [odd[k].shape[-1] for k in names] == [28, 14, 7, 4, 4]


def test_generic_constructors_and_bad_configs() -> None:
    assert _num_params(wrn(16, 2, num_classes=100)) == _num_params(build_model("wrn_16_2"))
    assert wrn(22, 3, in_channels=1, num_classes=10).embedding_dim == 192
    with pytest.raises(ValueError):
        wrn(15, 2)
    with pytest.raises(ValueError):
        ResNet(21)
    with pytest.raises(ValueError):
        vgg((1, 1, 1))


def test_init_follows_repdistiller() -> None:
    model = build_model("vgg8")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    assert torch.all(model.classifier.bias == 0)
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    conv = build_model("resnet20").stages[2][0].conv2  # 64 -> 64, fan_out = 9 * 64
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.1)
