"""Batched, on-device augmentation: zero-pad + random crop + horizontal flip, and normalisation.

Everything works on whole (B, C, H, W) batches with index arithmetic (one ``gather``), never a Python
loop over samples, so it runs wherever the batch lives. :func:`view_params` derives a sample's crop/flip
from (sample index, view number) with an integer hash, so the one augmented view a teacher is queried
on can be reproduced exactly, whatever batch or order the sample later appears in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")


def apply_crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor | None, padding: int
) -> torch.Tensor:
    """:func:`crop_flip_with_params` without its checks, for training loops.

    Offsets must be valid and on x's device; skipping the range check avoids a device sync per batch.
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    ar = torch.arange(w, device=x.device)
    cols_in = torch.where(flip[:, None], (w - 1) - ar, ar) if flip is not None else ar.expand(b, w)
    cols = dx[:, None] + cols_in  # (B, W): output column j reads padded column cols[:, j]
    idx = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, idx).view(b, c, h, w)


def crop_flip_with_params(
    x: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor | None,
    padding: int,
) -> torch.Tensor:
    """Zero-pad ``x`` by ``padding``, crop an HxW window at per-sample offsets, then optionally flip.

    Sample ``i`` of the result equals ``pad(x[i])[:, dy[i]:dy[i]+H, dx[i]:dx[i]+W]``, mirrored left-right
    when ``flip[i]``. ``dy``/``dx`` are integer (B,) tensors in ``[0, 2*padding]``; ``flip`` is a bool
    (B,) tensor or None. Works for any dtype; padding uses 0 in the input's own units.
    """
    _check_batch(x)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b = x.shape[0]
    dy = torch.as_tensor(dy, device=x.device).long().reshape(-1)
    dx = torch.as_tensor(dx, device=x.device).long().reshape(-1)
    if dy.numel() != b or dx.numel() != b:
        raise ValueError(f"need {b} offsets, got dy {dy.numel()} and dx {dx.numel()}")
    if b and bool(((dy < 0) | (dy > 2 * padding) | (dx < 0) | (dx > 2 * padding)).any()):
        raise ValueError(f"crop offsets must lie in [0, {2 * padding}] for padding {padding}")
    if flip is not None:
        flip = torch.as_tensor(flip, device=x.device).to(torch.bool).reshape(-1)
        if flip.numel() != b:
            raise ValueError(f"need {b} flip flags, got {flip.numel()}")
    return apply_crop_flip(x, dy, dx, flip, padding)


def draw_crop_flip(
    b: int, padding: int, flip: bool, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random crop offsets ``dy``, ``dx`` in [0, 2*padding] and flips (prob 0.5) for ``b`` samples.

    Drawn from ``generator`` (or the global RNG) on its device and returned on ``device``; kept apart
    from applying them so that data-parallel ranks can draw one global batch's parameters identically
    and augment only their own rows.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    rng_device = generator.device if generator is not None else device
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=rng_device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=rng_device)
    flips = torch.rand(b, generator=generator, device=rng_device) < 0.5 if flip else None
    return dy.to(device), dx.to(device), flips.to(device) if flips is not None else None


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard CIFAR-style augmentation of a whole batch: pad, random HxW crop, flip with prob 0.5.

    Offsets and flips are drawn independently per sample from ``generator`` (or the global RNG).
    """
    _check_batch(x)
    dy, dx, flips = draw_crop_flip(x.shape[0], padding, flip, generator, x.device)
    return apply_crop_flip(x, dy, dx, flips, padding)


# ------------------------------------------------------------------------------- deterministic views


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) without ever overflowing int64."""
    lo, hi = c & 0xFFFF, (c >> 16) & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _fmix32_int(h: int) -> int:
    """Python-int twin of :func:`_fmix32` (for scalar seeds)."""
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def hash_index(indices: torch.Tensor, view: int) -> torch.Tensor:
    """Well-mixed 32-bit hash (as int64 in [0, 2**32)) of each (sample index, view) pair."""
    idx = torch.as_tensor(indices).long()
    if idx.numel() and bool((idx < 0).any()):
        raise ValueError("sample indices must be non-negative")
    seed = _fmix32_int(int(view) * 0x9E3779B9 + 0x7F4A7C15)
    seed2 = _fmix32_int(seed ^ 0x5BD1E995)
    h = _fmix32((idx & _M32) ^ seed)
    return _fmix32((h + ((idx >> 32) & _M32) + seed2) & _M32)


def view_params(
    indices: torch.Tensor,
    view: int,
    size_hw: Sequence[int],
    padding: int,
    flip: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic (dy, dx, flip) for each sample index under augmentation view ``view``.

    A pure function of (index, view, padding, flip): the same sample gets the same crop in any batch and
    order; different views give (pseudo-)independent crops. ``size_hw`` is the image size the offsets
    will be applied to (checked for sanity; offsets lie in ``[0, 2*padding]`` whatever the size).
    Returns int64 ``dy``, ``dx`` and a bool ``flip`` tensor (all False when ``flip`` is False), on the
    device of ``indices``.
    """
    h, w = (int(s) for s in size_hw)
    if h < 1 or w < 1 or padding < 0:
        raise ValueError(f"bad geometry: size {tuple(size_hw)}, padding {padding}")
    base = hash_index(indices, view)
    m = 2 * padding + 1
    dy = base % m
    dx = _fmix32(base ^ 0x68E31DA4) % m
    if flip:
        flips = (_fmix32(base ^ 0xB5297A4D) & 1).to(torch.bool)
    else:
        flips = torch.zeros_like(base, dtype=torch.bool)
    return dy, dx, flips


def view_crop_flip(
    x: torch.Tensor, indices: torch.Tensor, view: int, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Augment batch ``x`` of samples ``indices`` with their deterministic view ``view``."""
    _check_batch(x)
    dy, dx, flips = view_params(indices.to(x.device), view, x.shape[-2:], padding, flip)
    return apply_crop_flip(x, dy, dx, flips if flip else None, padding)


# ----------------------------------------------------------------------------------------- normalise


def _stat_tensor(v: Sequence[float] | torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1, 1, 1)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel as float32, for uint8 (or 0..255-valued) (…, C, H, W) input."""
    m = _stat_tensor(mean, x.device)
    s = _stat_tensor(std, x.device)
    return (x.to(torch.float32) / 255.0 - m) / s


class Normalizer:
    """Holds per-channel mean/std as device tensors; ``normalizer(x)`` equals :func:`normalize`."""

    def __init__(
        self,
        mean: Sequence[float] | torch.Tensor,
        std: Sequence[float] | torch.Tensor,
        device: torch.device | str | None = None,
    ) -> None:
        self.mean = _stat_tensor(mean, device)
        self.std = _stat_tensor(std, device)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"mean has {self.mean.numel()} channels but std has {self.std.numel()}")

    def to(self, device: torch.device | str) -> Normalizer:
        """Move the statistics to ``device`` (returns self)."""
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(device=self.mean.device, dtype=torch.float32, copy=True)
        return y.div_(255.0).sub_(self.mean).div_(self.std)
