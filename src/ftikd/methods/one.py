"""ONE: On-the-fly Native Ensemble, a multi-branch student distilled from its gated ensemble (METHODS.md M17).

The student's layers up to the last block group are the shared trunk; its own last group, pooling
and classifier are branch 0, and ``extra["branches"]`` holds m - 1 more copies of them with
independent weights ([C-ONE] ``ONE_ResNet``). The gate (GAP of the trunk output, Linear, BN1d,
ReLU, softmax; ``extra["gate"]``) mixes the branch logits into the ensemble, which is each
branch's detached KL target at T = 3 with the sigmoid ramp over 80 pseudo-epochs ([C-ONE]).
No teacher is called.

The engine validates and tests the student, i.e. branch 0: [S3] reports the single
classification branch and [C-ONE] uses one branch for its "best acc". :meth:`ONE.evaluate_extra`
adds the other branches and the ensemble for the record.

The trunk output is taken by a forward hook on the student's second-to-last block group, held only
during the step's forward, so the step still runs through the engine's (possibly data-parallel)
model. Supported students: those with ``stages`` (CIFAR ResNets, ShuffleNets) or ``groups`` with
``bn_final`` (WRNs, branching at the last group as A26 recommends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.errors import FtikdError
from ftikd.losses.online import ensemble_kl_loss, gated_ensemble, sigmoid_rampup
from ftikd.methods.base import Batch, Method, MethodConfig, MethodContext, register_method
from ftikd.methods.dml import draw_seed, evaluate_modules, independent_copy
from ftikd.methods.feature_common import check_nonnegative, check_positive, stage1_clock
from ftikd.models.base import ModelOutput


class Branch(nn.Module):
    """One ONE branch: the last block group, an optional post-stage (head or final BN-ReLU), GAP, Linear."""

    def __init__(self, stage: nn.Module, post: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        self.stage, self.post, self.fc = stage, post, fc

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        """Branch logits (B, C) from the shared trunk map."""
        h = self.post(self.stage(trunk))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class Gate(nn.Module):
    """ONE's gate: GAP of the trunk map, Linear(C -> m), BatchNorm1d(m), ReLU, softmax (M17)."""

    def __init__(self, channels: int, branches: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        """Per-sample branch weights (B, m), rows on the simplex (softmax in float32)."""
        g = F.relu(self.bn(self.linear(torch.flatten(F.adaptive_avg_pool2d(trunk, 1), 1))))
        return F.softmax(g.float(), dim=1)


def split_student(student: nn.Module) -> tuple[nn.Module, Branch]:
    """The student's branch point (the module whose output the branches share) and its own branch 0.

    Branch 0 shares the student's modules (no copy); refuses an architecture without block groups.
    """
    if hasattr(student, "stages") and hasattr(student, "fc"):
        groups, head = student.stages, getattr(student, "head", None)
        post = head if head is not None else nn.Identity()
    elif hasattr(student, "groups") and hasattr(student, "bn_final"):
        groups, post = student.groups, nn.Sequential(student.bn_final, nn.ReLU())
    else:
        raise FtikdError(
            f"ONE branches the last block group of a CIFAR ResNet, WRN or ShuffleNet student; "
            f"{type(student).__name__} has none"
        )
    if len(groups) < 2:
        raise FtikdError("ONE needs a student with at least two block groups (a trunk and a branch)")
    return groups[-2], Branch(groups[-1], post, student.fc)


class TrunkTap:
    """Holds the trunk output of one forward: a forward hook on the branch point, removed on exit."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.value = module, None

    def __enter__(self) -> TrunkTap:
        """Start keeping the branch point's output."""
        self.handle = self.module.register_forward_hook(self._keep)
        return self

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """Forward hook: remember the output (the graph stays attached for the branches' backward)."""
        self.value = output

    def __exit__(self, *exc: object) -> None:
        """Remove the hook, so evaluation and other callers of the student are untouched."""
        self.handle.remove()


@dataclass
class ONEConfig(MethodConfig):
    branches: int = 3
    temperature: float = 3.0
    rampup_epochs: int = 80
    w_ce: float = 1.0
    w_kl: float = 1.0

    def __post_init__(self) -> None:
        for name in ("branches", "rampup_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if not 2 <= self.branches <= 16:
            raise ValueError(f"branches must be from 2 to 16, got {self.branches}")
        check_positive(temperature=self.temperature)
        check_nonnegative(w_ce=self.w_ce, w_kl=self.w_kl)


@register_method
class ONE(Method):
    name = "one"
    family = "online"
    reads = "logits of every branch"
    extras = "two more branches (last block group and classifier) and the gate"
    summary = (
        "ONE: 3-branch student, gated branch ensemble as online teacher (KL at T=3, ramp-up), no teacher"
    )
    reference = "Lan et al., 2018, Knowledge Distillation by On-the-fly Native Ensemble"
    call_cost = 0
    Config = ONEConfig

    def setup(self, ctx: MethodContext) -> None:
        """Build m - 1 independent branch copies, the gate (sized by a probe forward) and the ramp clock."""
        cfg = self.config
        if ctx.input_shape is None:
            raise FtikdError("ONE needs the input shape to size its gate")
        self._student = ctx.student
        self._point, own = split_student(ctx.student)
        self.extra["branches"] = nn.ModuleList(
            independent_copy(own, draw_seed()) for _ in range(cfg.branches - 1)
        )
        was_training = ctx.student.training
        ctx.student.eval()
        with torch.no_grad(), TrunkTap(self._point) as tap:
            ctx.student(torch.zeros(2, *ctx.input_shape, device=ctx.device))
        ctx.student.train(was_training)
        self.extra["gate"] = Gate(int(tap.value.shape[1]), cfg.branches)
        self.extra["clock"] = stage1_clock(ctx, cfg.rampup_epochs)
        self._epoch_steps = math.ceil(ctx.num_train / ctx.batch_size)

    def forward_all(self, student: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Branch logits (m, B, C), branch 0 being the student's own, and the gated ensemble (B, C)."""
        with TrunkTap(self._point) as tap:
            own = student(images).logits
        trunk = tap.value
        logits = torch.stack([own] + [branch(trunk) for branch in self.extra["branches"]])
        return logits, gated_ensemble(logits, self.extra["gate"](trunk))

    def ramp_weight(self) -> torch.Tensor | float:
        """w(e) of this step, e its 0-based pseudo-epoch, from the clock in ``extra`` (never rewound)."""
        clock = self.extra["clock"]
        if not clock.in_stage1():
            return 1.0
        return sigmoid_rampup((clock.count - 1) // self._epoch_steps, self.config.rampup_epochs)

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Branch CEs (summed), the ensemble's CE and the ramped ensemble-to-branch KL (M17)."""
        cfg = self.config
        logits, ensemble = self.forward_all(student, batch.images)
        m, b, c = logits.shape
        ce = F.cross_entropy(logits.float().reshape(m * b, c), batch.labels.repeat(m), reduction="none")
        return {
            "ce_branches": cfg.w_ce * ce.reshape(m, b).mean(dim=1).sum(),
            "ce_ensemble": cfg.w_ce * F.cross_entropy(ensemble.float(), batch.labels),
            "kl": cfg.w_kl * self.ramp_weight() * ensemble_kl_loss(logits, ensemble, cfg.temperature),
        }

    def evaluate_extra(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        batch_size: int = 1000,
    ) -> dict[str, float]:
        """Test top-1/5 of the other branches (``branch1_test_top1``, ...) and of the gated ensemble."""
        views = {f"branch{i}": _View(self, i) for i in range(1, self.config.branches)}
        return evaluate_modules(
            {**views, "ensemble": _View(self, None)}, images, labels, mean, std, batch_size
        )


class _View(nn.Module):
    """One branch (by index) or the ensemble (None) of a set-up ONE student, as a classifier module."""

    def __init__(self, method: ONE, which: int | None) -> None:
        super().__init__()
        self.student, self.extra, self.which = method._student, method.extra, which
        self.method = [method]  # a list: not a submodule

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """The chosen branch's (or the ensemble's) logits, as the engine's evaluate expects."""
        logits, ensemble = self.method[0].forward_all(self.student, x)
        return ModelOutput(ensemble if self.which is None else logits[self.which])
