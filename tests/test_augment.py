"""Tests for ftikd.data: batched crop and flip, per-sample views, normalisation and the FTI split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ftikd.data import (
    FTISplit,
    Normalizer,
    crop_flip_with_params,
    fti_split,
    normalize,
    random_crop_flip,
    view_crop_flip,
    view_params,
)
from ftikd.errors import FtikdError

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
