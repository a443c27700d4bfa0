"""DML: Deep Mutual Learning, a cohort of students trained together without a teacher (METHODS.md M18).

The engine's student is cohort member 0; the other K - 1 members live in ``extra["peers"]``, so
they are optimised with it, checkpointed and restored with it at every phase end. Every member sees
the same batch; each learns from the labels and from the detached softened predictions of the
others (survey setting [S3]: K = 2, T = 4 with the T^2 factor, A27). All members are updated from
one forward and one backward, which equals [C-DML]'s per-network optimizers for plain SGD.

Peers are copies of the student's architecture with independent weights: ``copy.deepcopy`` of the
student, re-initialised from a seed drawn from the torch RNG (see :func:`independent_copy`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.losses.online import mutual_kl_loss
from ftikd.methods.base import Batch, Method, MethodConfig, MethodContext, register_method
from ftikd.methods.feature_common import check_nonnegative, check_positive
from ftikd.models.resnet import init_weights


def independent_copy(module: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``module`` with freshly drawn weights, as if built anew (DML peers, ONE branches).

    Every submodule with ``reset_parameters`` is reset (BatchNorm running statistics included), then
    the zoo's rule (He-normal fan-out convs, BN weight 1 / bias 0) is applied; Linear layers keep
    PyTorch's default. This is every zoo family's init except the classifier of WRN (zero bias) and
    VGG / MobileNetV2 (N(0, 0.01)). Drawn on the CPU from ``seed`` in a forked RNG, so the result
    is the same on every device and the caller's RNG advances by nothing; the parameters' device
    and memory format are kept.
    """
    fresh = copy.deepcopy(module)
    device = next(fresh.parameters()).device
    fresh.cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in fresh.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
        init_weights(fresh)
    return fresh.to(device)


def draw_seed() -> int:
    """A seed for an independent initialisation, drawn from (and advancing) the global torch RNG."""
    return int(torch.randint(0, 2**62, (), dtype=torch.long))


def evaluate_modules(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 1000,
) -> dict[str, float]:
    """``{name}_test_top1`` / ``_top5`` of each model, by the engine's :func:`evaluate` (eval mode)."""
    from ftikd.engine.trainer import evaluate  # the engine imports the methods package

    metrics = {}
    for name, model in models.items():
        top1, top5 = evaluate(model, images, labels, mean, std, batch_size)
        metrics[f"{name}_test_top1"], metrics[f"{name}_test_top5"] = top1, top5
    return metrics


@dataclass
class DMLConfig(MethodConfig):
    cohort: int = 2
    temperature: float = 4.0
    w_ce: float = 1.0
    w_kl: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.cohort, bool) or not isinstance(self.cohort, int) or not 2 <= self.cohort <= 16:
            raise ValueError(f"cohort must be a whole number of students from 2 to 16, got {self.cohort!r}")
        check_positive(temperature=self.temperature)
        check_nonnegative(w_ce=self.w_ce, w_kl=self.w_kl)


@register_method
class DML(Method):
    name = "dml"
    family = "online"
    reads = "logits of every cohort member"
    extras = "one peer student"
    summary = "Deep Mutual Learning: a cohort of 2 students, CE + T^2 mutual KL (T=4), no teacher"
    reference = "Zhang et al., 2018, Deep Mutual Learning"
    call_cost = 0
    Config = DMLConfig

    def setup(self, ctx: MethodContext) -> None:
        """Build the K - 1 peers, each the student's architecture with its own independent init."""
        self.extra["peers"] = nn.ModuleList(
            independent_copy(ctx.student, draw_seed()) for _ in range(self.config.cohort - 1)
        )

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Member 0's CE and mutual KL (``ce``, ``kl``), and the peers' summed (``peer_ce``, ``peer_kl``)."""
        cfg = self.config
        logits = torch.stack([student(batch.images).logits] + [p(batch.images).logits for p in self.peers])
        k, b, c = logits.shape
        ce = F.cross_entropy(logits.float().reshape(k * b, c), batch.labels.repeat(k), reduction="none")
        ce = ce.reshape(k, b).mean(dim=1)
        kl = mutual_kl_loss(logits, cfg.temperature)
        return {
            "ce": cfg.w_ce * ce[0],
            "kl": cfg.w_kl * kl[0],
            "peer_ce": cfg.w_ce * ce[1:].sum(),
            "peer_kl": cfg.w_kl * kl[1:].sum(),
        }

    @property
    def peers(self) -> nn.ModuleList:
        """Cohort members 1..K-1 (member 0 is the engine's student)."""
        return self.extra["peers"]

    def evaluate_extra(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        batch_size: int = 1000,
    ) -> dict[str, float]:
        """Test top-1/5 of each peer (``peer1_test_top1``, ...), for the run record's method metrics.

        The peers are evaluated with the weights restored at member 0's best validation point.
        [S3] reports the better cohort member per seed: compare with the record's ``test_top1``.
        """
        return evaluate_modules(
            {f"peer{i}": peer for i, peer in enumerate(self.peers, start=1)},
            images,
            labels,
            mean,
            std,
            batch_size,
        )
