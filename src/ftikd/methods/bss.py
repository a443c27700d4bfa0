"""BSS: KD plus boundary-supporting samples made by attacking the teacher (METHODS.md M16, A25).

Per step: CE + rho_kd(e) * soft CE(z_hat / T, softmax(z / T)) (no T^2) on the cached teacher logits,
plus rho_bss(e) * the same soft CE on adversarial samples pushed towards the teacher's decision
boundary by a targeted L2 attack on the teacher (Heo et al., AAAI 2019). Under FTI-KD the KD term
and the choice of base samples (teacher correct) use the cached logits of the teacher's fixed view,
where [C-BSS] forwards the teacher on each step's augmented batch; the attack itself starts from
the step's augmented images, and its first (paid) forward gives the top-1 and the target draw.

Budget (docs/budget-queries.md). A teacher call is one teacher forward on one image (METHODS.md
§0.4), and the attack's forwards are teacher forwards on new images, so every one is charged: each
attack iteration costs one call per sample still moving (its input gradient comes with the call:
white-box access, which only a local teacher gives) and a sample that is still moving after the
last iteration costs one more call for its final output. A boundary sample thus costs 2 to
``num_steps`` + 1 calls; a sample that crosses the boundary reuses the output of the forward that
saw it cross. The run's n is split: ``attack_share`` * n calls (rounded down) pay for boundary
samples, the rest are cached training samples. Each step attacks at most as many samples as the
remaining budget covers at the worst case (``num_steps`` + 1 calls each; "remaining" counted from
the calls charged to this run's earlier steps, checkpointed, so a resumed run replays its attacks
exactly), so the budget is never exceeded; once it is spent, BSS continues as KD with the same
schedule (the method metrics record the boundary samples, their calls and the step from which
training was KD only).

Schedule. rho_kd = max(3 (1 - e/E), 0) + 1 and rho_bss = max(2 (1 - 4e / 3E), 0) need a total epoch
count E, which FTI-KD's early-stopping schedule does not have: E is the option ``schedule_epochs``
(default 200, [S3]'s epochs), counted in pseudo-epochs of ceil(n_train / batch) steps; past E the
weights stay at rho_kd = 1, rho_bss = 0. No attack is made (nor paid) while rho_bss = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.errors import FtikdError
from ftikd.losses.mixing import soft_cross_entropy
from ftikd.methods.base import Batch, Method, MethodConfig, MethodContext, register_method
from ftikd.methods.feature_common import check_positive

BOUND = 2.5  # clamp of adversarial images in normalised-pixel space ([C-BSS]); no epsilon ball (A25)
STEP_FLOOR = 1e-4  # added to the logit gap in the step size ([C-BSS])

# forward(x_rows, rows, iteration, with_grad) -> teacher logits of x_rows; rows index the attacked set
AttackForward = Callable[[torch.Tensor, torch.Tensor, int, bool], torch.Tensor]


@dataclass
class BSSConfig(MethodConfig):
    temperature: float = 4.0  # [S3] (official 3)
    attack_size: int = 32  # most samples attacked per step; [S3] (official 64)
    num_steps: int = 10  # attack iterations
    step_size: float = 0.3  # eta
    attack_share: float = 0.2  # fraction of n spent on boundary samples
    schedule_epochs: int = 200  # E of the rho schedules, in pseudo-epochs

    def __post_init__(self) -> None:
        check_positive(temperature=self.temperature, step_size=self.step_size)
        for name in ("attack_size", "num_steps", "schedule_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.attack_share < 1:
            raise ValueError(f"attack_share must be in [0, 1), got {self.attack_share}")


def bss_weights(epoch: int, total_epochs: int) -> tuple[float, float]:
    """(rho_kd, rho_bss) at ``epoch`` of ``total_epochs`` (M16 step 6): 4 -> 1, and 2 -> 0 at 3E/4."""
    r = epoch / total_epochs
    return max(3.0 * (1.0 - r), 0.0) + 1.0, max(2.0 * (1.0 - 4.0 * r / 3.0), 0.0)


def draw_targets(logits: torch.Tensor, top1: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Attack target per row: a class other than ``top1`` drawn with probability proportional to the
    teacher's softmax (M16 step 3), by inverse CDF of ``uniforms`` in [0, 1)."""
    masked = logits.float().masked_fill(F.one_hot(top1, logits.shape[1]).bool(), float("-inf"))
    cdf = F.softmax(masked, dim=1).cumsum(dim=1)
    picks = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1), right=True)
    return picks.squeeze(1).clamp_max(logits.shape[1] - 1)


def boundary_attack(
    forward: AttackForward,
    x: torch.Tensor,
    targets: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    num_steps: int = 10,
    step_size: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted L2 attack on the teacher (M16 step 4); returns adversarial images and their logits.

    ``b`` is the teacher's top-1 at the first forward and ``k = targets(logits, b)``. Each iteration
    moves every sample whose top-1 is still ``b`` by x += eta (z_b - z_k + 1e-4) g / ||g||_2 with
    g = grad_x (z_k - z_b), clamped to [-2.5, 2.5]; a sample stops for good once its top-1 leaves
    ``b`` (its logits are those of that forward), and a sample still moving after ``num_steps``
    updates gets one more forward. ``forward`` only sees the rows still moving.
    """
    x = x.detach().clone()
    final = x.new_empty(0)
    active = torch.arange(x.shape[0], device=x.device)
    top1 = goal = torch.zeros(0, dtype=torch.long, device=x.device)
    for it in range(num_steps):
        xa = x[active].requires_grad_(True)
        z = forward(xa, active, it, True)
        if it == 0:
            final = z.new_zeros(z.shape)
            top1 = z.detach().argmax(dim=1)
            goal = targets(z.detach(), top1)
        b, k = top1[active], goal[active]
        moving = z.detach().argmax(dim=1) == b
        final[active[~moving]] = z.detach()[~moving].float()
        if not bool(moving.any()):
            return x, final
        z_b, z_k = z.gather(1, b[:, None]).squeeze(1), z.gather(1, k[:, None]).squeeze(1)
        (g,) = torch.autograd.grad((z_k - z_b).sum(), xa)
        norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = step_size * ((z_b - z_k).detach() + STEP_FLOOR)
        step = (scale / norm).view(-1, *([1] * (g.dim() - 1))) * g
        active = active[moving]
        x[active] = (xa.detach()[moving] + step[moving]).clamp(-BOUND, BOUND)
    if active.numel():
        with torch.no_grad():
            final[active] = forward(x[active], active, num_steps, False).float()
    return x, final


class _Counters(nn.Module):
    """Steps taken, boundary samples distilled, 1 + the step from which the budget was spent, and the
    calls the attacks of this run's steps were charged.

    A buffer in ``extra``, so it is checkpointed and resumed with the run: the step count makes the
    keys and the schedule replay exactly, and the charged calls (not the store's count, which holds
    the calls of replayed steps too) decide how many samples a replayed step attacks, as the first
    attempt did. Like ``StepClock``, loading never moves it back, so restoring the best weights at
    a phase end does not rewind the clock (and reuse paid keys).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(4, dtype=torch.long))
        self.values = [0, 0, 0, 0]

    def set(self, index: int, value: int) -> None:
        self.values[index] = value
        self.counts.copy_(torch.tensor(self.values))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        before = list(self.values)
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.values = [max(a, int(b)) for a, b in zip(before, self.counts.tolist(), strict=True)]
        self.counts.copy_(torch.tensor(self.values))


STEPS, SAMPLES, SPENT, CHARGED = 0, 1, 2, 3


@register_method
class BSS(Method):
    name = "bss"
    calls_note = "1 per cached sample + paid attack forwards; n in all, never more"
    family = "boundary"
    reads = "logits; teacher outputs on attack images (paid queries)"
    summary = (
        "BSS: CE + scheduled soft-CE KD (T=4) + KD on teacher-boundary adversarial samples; each "
        "attack forward is a paid call (<= 11 per sample) from attack_share (0.2) of n"
    )
    reference = (
        "Heo et al., AAAI 2019, Knowledge Distillation with Adversarial Samples Supporting Decision Boundary"
    )
    queries_teacher = True
    Config = BSSConfig

    def train_samples(self, calls: int) -> int:
        """n - floor(attack_share * n) cached training samples (>= 1); the rest buys boundary samples."""
        return max(1, calls - int(self.config.attack_share * calls))

    def setup(self, ctx: MethodContext) -> None:
        paid = ctx.paid_teacher
        if paid is None:
            raise FtikdError("bss queries the teacher during training; run it with ftikd distill")
        if paid.budget > 0 and not paid.white_box:
            raise FtikdError(
                "bss attacks the teacher with input gradients; pass a teacher checkpoint, not a callable"
            )
        self.paid = paid
        self.steps_per_epoch = math.ceil(ctx.num_train / ctx.batch_size)
        self.extra["counters"] = _Counters()

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, counters = self.config, self.extra["counters"]
        step = counters.values[STEPS]
        counters.set(STEPS, step + 1)
        rho_kd, rho_bss = bss_weights(step // self.steps_per_epoch, cfg.schedule_epochs)
        t = cfg.temperature
        logits = student(batch.images).logits
        terms = {
            "ce": F.cross_entropy(logits, batch.labels),
            "kd": rho_kd * soft_cross_entropy(logits / t, F.softmax(batch.teacher_logits.float() / t, dim=1)),
            "bss": logits.new_zeros((), dtype=torch.float32),
        }
        if rho_bss > 0:
            adv = self._boundary_samples(step, batch, logits.detach())
            if adv is not None:
                adv_logits = student(adv[0]).logits
                terms["bss"] = rho_bss * soft_cross_entropy(adv_logits / t, F.softmax(adv[1] / t, dim=1))
        return terms

    def _boundary_samples(
        self, step: int, batch: Batch, student_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Adversarial images and paid teacher logits for this step's base samples (M16 steps 2-4),
        or None when there are none or the budget cannot pay for one more sample at the worst case."""
        cfg, counters = self.config, self.extra["counters"]
        per_sample = cfg.num_steps + 1
        affordable = (self.paid.budget - counters.values[CHARGED]) // per_sample
        if affordable <= 0:
            if counters.values[SPENT] == 0:
                counters.set(SPENT, step + 1)
            return None
        labels, teacher = batch.labels, batch.teacher_logits.float()
        correct = (student_logits.argmax(dim=1) == labels) & (teacher.argmax(dim=1) == labels)
        gap = (F.softmax(teacher, dim=1) - F.softmax(student_logits.float(), dim=1)) ** 2
        score = (gap * (1.0 - batch.onehot())).sum(dim=1).masked_fill(~correct, float("-inf"))
        base_key = step * cfg.attack_size
        k = self._payable(base_key, min(int(correct.sum()), cfg.attack_size, affordable))
        if k == 0:
            return None
        rows = score.topk(k).indices
        charged = [0]

        def forward(x: torch.Tensor, index: torch.Tensor, it: int, grad: bool) -> torch.Tensor:
            keys = (base_key + index.cpu()) * per_sample + it
            charged[0] += keys.numel()
            return self.paid.query_white_box(keys, x) if grad else self.paid.query(keys, x)

        uniforms = torch.rand(k)  # CPU generator: saved in the checkpoint, so a resumed run redraws the same

        with torch.autocast(batch.images.device.type, enabled=False):
            adv, adv_logits = boundary_attack(
                forward,
                batch.images[rows].float(),
                lambda z, top1: draw_targets(z, top1, uniforms),
                cfg.num_steps,
                cfg.step_size,
            )
        counters.set(SAMPLES, counters.values[SAMPLES] + k)
        counters.set(CHARGED, counters.values[CHARGED] + charged[0])
        return adv.detach(), adv_logits

    def _payable(self, base_key: int, k: int) -> int:
        """The most of the first ``k`` samples whose worst-case new keys the store's remaining budget
        covers: ``k``, unless an earlier attempt of the run paid keys that this one will not use (a
        replay on a non-deterministic device)."""
        if k == 0:
            return 0
        per_sample = self.config.num_steps + 1
        keys = (base_key + torch.arange(k)[:, None]) * per_sample + torch.arange(per_sample)
        new = self.paid.unpaid(keys.reshape(-1)).reshape(k, per_sample).sum(dim=1).cumsum(dim=0)
        return int((new <= self.paid.remaining).sum())

    def evaluate_extra(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Boundary samples distilled, calls paid for them, and the step from which BSS was KD only."""
        counters = self.extra["counters"].values
        out = {
            "boundary_samples": float(counters[SAMPLES]),
            "boundary_calls_paid": float(self.paid.paid),
            "boundary_budget": float(self.paid.budget),
        }
        if counters[SPENT]:
            out["kd_only_from_step"] = float(counters[SPENT] - 1)
        return out
