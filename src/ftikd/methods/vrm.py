"""VRM: virtual relation matching (Zhang et al. 2025; METHODS.md M19, A28), in two budget modes.

Each step makes a *virtual view* of every image of the batch (RandAugment, n = 2 operations at
torchvision magnitude 9 of 30, on top of the batch's crop + flip), forwards the student once on the
2B images, and minimises CE over both views + alpha * ISV + beta * ICV (``losses/vrm.py``).

Modes (the teacher side of the virtual view):
  ``strict`` (default, FTI-compatible, 1 call per sample): the teacher is never called on a virtual
  view; its cached logits of the real view stand in for both views. The teacher's ISV edges are
  then u(z^t_i - z^t_j), its plain inter-sample edges, and its ICV edges u(Z^t[:, k] - Z^t[:, l]), its
  plain inter-class edges: the target says "a sample's virtual view relates to the other samples
  as its real view does", i.e. the teacher is taken as view-invariant. The diagonal edges (i, i)
  and (k, k) become zero vectors on the teacher side, which no unit student edge can match (their
  error is the constant 1 / D, no gradient), so they are left out of both terms.
  ``original`` ([S4]'s loss): the teacher's logits on the virtual views are queried through the
  run's PaidTeacher, one paid call per virtual image. The budget n is split: ``virtual_share`` of it
  (default 0.5) for virtual-view calls, the rest for cached training samples (``train_samples``).
  Keys are step * n + sample index (distinct within a batch) from a checkpointed step clock, so a
  resumed run replays them for free.
  When the virtual-view budget cannot pay for a whole batch, that step and every later one runs
  as ``strict`` (a query past the budget is refused with nothing paid); the run record's call
  counts are the store's, so they show exactly what was paid.

RandAugment. kornia's own ``RandAugment`` draws one pair of operations for the whole batch and maps
m/30 onto its own one-sided ranges (at m = 9 every image's brightness is shifted by -0.36); to keep
torchvision's per-image semantics, operations and signs are drawn per image here (from a hash of
the query key, so a step's virtual view is reproducible) and applied with kornia's batched ops.
torchvision's magnitude 9 of 30 (31 bins) gives: shear 0.09, translate int(0.136 * size) px, rotate
9 degrees, brightness / colour / contrast / sharpness factor 1 +- 0.27 (random sign), posterize 7
bits, solarize threshold 0.7; autocontrast, equalize and identity have no magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ftikd.data.augment import hash_index
from ftikd.errors import BudgetExceededError, FtikdError
from ftikd.losses.vrm import two_view_cross_entropy, vrm_relation_losses, zscore_logits
from ftikd.methods.base import Batch, Method, MethodConfig, MethodContext, forward_student, register_method
from ftikd.methods.feature_common import StepClock, check_nonnegative

if TYPE_CHECKING:
    from ftikd.teacher.oracle import PaidTeacher

MODES = ("strict", "original")
# torchvision RandAugment's operation table, in its order (magnitudes at index m of 31 bins)
OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
_HASH_SALT = 0x56524D00  # view numbers of the key hash that draws operations and signs
_GRAY = (0.2989, 0.587, 0.114)


def import_kornia() -> Any:
    """kornia, or a one-line user error naming the extra that installs it."""
    try:
        import kornia
    except ImportError:
        raise FtikdError("method 'vrm' needs kornia for RandAugment: pip install 'ftikd[vrm]'") from None
    return kornia


@dataclass
class VRMConfig(MethodConfig):
    """VRM options (defaults: METHODS.md M19 / A28; [S4] Table 5 for alpha, beta and n)."""

    mode: str = "strict"
    alpha: float = 128.0
    beta: float = 32.0
    w_ce: float = 1.0
    percentile: float = 90.0  # m: ISV edges above the m-th joint-entropy percentile are pruned
    ra_ops: int = 2
    ra_magnitude: int = 9  # torchvision scale, 0..30
    virtual_share: float = 0.5  # original mode: fraction of n spent on virtual-view teacher calls
    adaptor: bool = False
    adaptor_hidden: int = 256
    zsnorm: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_nonnegative(alpha=self.alpha, beta=self.beta, w_ce=self.w_ce)
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must lie in (0, 100], got {self.percentile}")
        if not 1 <= self.ra_ops <= len(OPS):
            raise ValueError(f"ra_ops must lie in [1, {len(OPS)}], got {self.ra_ops}")
        if not 0 <= self.ra_magnitude <= 30:
            raise ValueError(
                f"ra_magnitude must lie in [0, 30] (torchvision's scale), got {self.ra_magnitude}"
            )
        if not 0 < self.virtual_share < 1:
            raise ValueError(f"virtual_share must lie strictly between 0 and 1, got {self.virtual_share}")
        if self.adaptor_hidden < 1:
            raise ValueError(f"adaptor_hidden must be >= 1, got {self.adaptor_hidden}")


class QueryClock(StepClock):
    """A step counter that never stops (StepClock with an unbounded stage 1): checkpointed, resumed
    exactly, and never moved backwards by a phase-end restore, so a key is never reused."""

    def __init__(self) -> None:
        super().__init__(2**62)

    def tick(self) -> int:
        """This step's number (0, 1, ...); advances the clock."""
        self.in_stage1()
        return self._value - 1


class RandAugment:
    """torchvision-style RandAugment (per-image operations and signs) on normalised batches.

    Images are mapped back to [0, 1] pixels (8-bit levels) with the dataset's mean and std,
    augmented, and normalised again. Operation i of round r of the image with key k is
    ``hash(k, salt + 2r) mod 14``, its sign ``hash(k, salt + 2r + 1) & 1``.
    """

    def __init__(self, ops: int, magnitude: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.kornia = import_kornia()
        self.ops, self.m = ops, magnitude / 30.0
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=images.device).view(shape)
        std = torch.tensor(self.std, device=images.device).view(shape)
        x = ((images.float() * std + mean).clamp(0, 1) * 255).round() / 255
        for r in range(self.ops):
            op = (hash_index(keys, _HASH_SALT + 2 * r) % len(OPS)).to(images.device)
            sign = ((hash_index(keys, _HASH_SALT + 2 * r + 1) & 1) * 2 - 1).to(images.device, torch.float32)
            x = self._round(x, op, sign)
        return (x - mean) / std

    def _round(self, x: torch.Tensor, op: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """One operation per image: a single warp for the geometric ones, then each photometric one."""
        enhance, m = self.kornia.enhance, self.m
        geometric = (op >= OPS.index("shear_x")) & (op <= OPS.index("rotate"))
        warped = self.kornia.geometry.transform.warp_affine(
            x,
            self._affine(x, op, sign),
            x.shape[-2:],
            mode="nearest",
            padding_mode="zeros",
            align_corners=True,
        )
        x = torch.where(geometric.view(-1, 1, 1, 1), warped, x)
        factor = 1 + 0.9 * m * sign
        f4 = factor.view(-1, 1, 1, 1)
        gray = _grayscale(x)
        lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
        flat = hi <= lo
        stretched = ((x - lo) / torch.where(flat, 1.0, hi - lo)).clamp(0, 1)
        photometric = {
            "brightness": lambda: (x * f4).clamp(0, 1),
            "color": lambda: _blend(x, gray, f4),
            "contrast": lambda: _blend(x, gray.mean(dim=(-3, -2, -1), keepdim=True), f4),
            "sharpness": lambda: enhance.sharpness(x, factor),
            "posterize": lambda: enhance.posterize(x, 8 - int(round(m * 4))),
            "solarize": lambda: torch.where(x >= 1 - m, 1 - x, x),
            "autocontrast": lambda: torch.where(flat, x, stretched),
            "equalize": lambda: enhance.equalize(x),
        }
        out = x
        for name, fn in photometric.items():
            out = torch.where((op == OPS.index(name)).view(-1, 1, 1, 1), fn(), out)
        return out

    def _affine(self, x: torch.Tensor, op: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3) pixel-space maps: shear about the origin, whole-pixel translation, rotation about
        the centre (torchvision's conventions; signs are random, so directions do not matter)."""
        h, w = x.shape[-2:]
        b = x.shape[0]
        shear = 0.3 * self.m * sign
        tx = math.trunc(150 / 331 * w * self.m) * sign
        ty = math.trunc(150 / 331 * h * self.m) * sign
        angle = torch.deg2rad(30 * self.m * sign)
        cos, sin = torch.cos(angle), torch.sin(angle)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        one, zero = torch.ones_like(sign), torch.zeros_like(sign)
        rows = {  # (a, b, c, d, e, f) of [[a, b, c], [d, e, f]]
            "shear_x": (one, shear, zero, zero, one, zero),
            "shear_y": (one, zero, zero, shear, one, zero),
            "translate_x": (one, zero, tx, zero, one, zero),
            "translate_y": (one, zero, zero, zero, one, ty),
            "rotate": (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy),
        }
        mat = torch.stack([one, zero, zero, zero, one, zero], dim=1)
        for name, entries in rows.items():
            mat = torch.where((op == OPS.index(name))[:, None], torch.stack(entries, dim=1), mat)
        return mat.view(b, 2, 3)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (torchvision's weights) of RGB images; other channel counts: the channel mean."""
    if x.shape[1] == 3:
        weights = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: factor * x + (1 - factor) * other, clamped to [0, 1]."""
    return (factor * x + (1 - factor) * other).clamp(0, 1)


@register_method
class VRM(Method):
    name = "vrm"
    calls_note = "1 per sample (strict); mode=original: + paid virtual views, n in all"
    family = "virtual relations"
    reads = "logits of real and RandAugment views"
    summary = (
        "VRM: CE(real+RandAugment view) + 128 ISV + 32 ICV cross-view unit-edge MSE, entropy-pruned; "
        "strict: 1 call/sample, original: paid teacher calls on virtual views"
    )
    reference = "Zhang et al., Knowledge Distillation via Virtual Relation Matching (arXiv 2502.20760)"
    couples_batch_rows = True
    Config = VRMConfig
    config: VRMConfig

    def __init__(self, config: VRMConfig | None = None) -> None:
        super().__init__(config)
        import_kornia()  # refuse a missing extra before any teacher call
        self.queries_teacher = self.config.mode == "original"  # per instance: depends on the mode
        self.augment: RandAugment | None = None
        self.paid_teacher: PaidTeacher | None = None
        self.num_train = 0
        self.steps = {"virtual": 0, "strict": 0}

    def train_samples(self, calls: int) -> int:
        """Calls of the budget spent on cached training samples: all in strict mode, the rest after
        ``virtual_share`` of them (rounded down) in original mode."""
        if self.config.mode == "strict":
            return calls
        return max(1, calls - math.floor(calls * self.config.virtual_share))

    def setup(self, ctx: MethodContext) -> None:
        """The step clock, the augmenter (needs the dataset's normalisation) and the optional adaptor."""
        if ctx.mean is None or ctx.std is None:
            raise FtikdError("vrm needs the dataset's mean and std in MethodContext to build virtual views")
        self.augment = RandAugment(self.config.ra_ops, self.config.ra_magnitude, ctx.mean, ctx.std)
        self.num_train = ctx.num_train
        self.extra["clock"] = QueryClock()
        if self.config.adaptor:
            c, h = ctx.num_classes, self.config.adaptor_hidden
            self.extra["adaptor"] = nn.Sequential(nn.Linear(c, h), nn.ReLU(), nn.Linear(h, c))
        if self.queries_teacher:
            self.paid_teacher = ctx.paid_teacher
            if self.paid_teacher is None:
                raise FtikdError(
                    "vrm mode=original needs the run's paid teacher (MethodContext.paid_teacher)"
                )

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """CE over both views + alpha ISV + beta ICV ([S4] eq. 3) from one student forward on 2B images."""
        cfg = self.config
        step = self.extra["clock"].tick()
        b = batch.images.shape[0]
        keys = step * self.num_train + batch.index.reshape(-1).to("cpu", torch.int64)
        virtual = self.augment(batch.images, keys).to(batch.images.dtype)
        logits = forward_student(student, torch.cat([batch.images, virtual])).logits
        s, sv = logits[:b], logits[b:]
        t = batch.teacher_logits.float()
        tv = self._teacher_virtual(keys, virtual)
        es, esv = s, sv
        if "adaptor" in self.extra:
            es, esv = self.extra["adaptor"](s.float()), self.extra["adaptor"](sv.float())
        et, etv = t, (t if tv is None else tv)
        if cfg.zsnorm:
            es, esv, et, etv = (zscore_logits(z.float()) for z in (es, esv, et, etv))
        rel = vrm_relation_losses(
            es, esv, et, etv, cfg.percentile, cross_diagonals=tv is not None, prune_on=(s, sv)
        )
        return {
            "ce": cfg.w_ce * two_view_cross_entropy(s, sv, batch.labels),
            "isv": cfg.alpha * rel["isv"],
            "icv": cfg.beta * rel["icv"],
        }

    def _teacher_virtual(self, keys: torch.Tensor, virtual: torch.Tensor) -> torch.Tensor | None:
        """The teacher's logits on the virtual views (original mode, paid), or None: strict mode, or
        the virtual-view budget cannot pay this batch (refused with nothing paid)."""
        if not self.queries_teacher:
            return None
        try:
            out = self.paid_teacher.query(keys, virtual.detach().float())
        except BudgetExceededError:
            self.steps["strict"] += 1
            return None
        self.steps["virtual"] += 1
        return out.float()

    def evaluate_extra(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        batch_size: int = 1000,
    ) -> dict[str, float]:
        """Original mode: this process's steps with paid virtual-view targets and strict fallbacks."""
        if not self.queries_teacher:
            return {}
        return {"virtual_steps": float(self.steps["virtual"]), "strict_steps": float(self.steps["strict"])}
