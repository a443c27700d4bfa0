"""CRD: contrastive representation distillation with a momentum memory bank (METHODS.md M8).

The CKD paper's FTI baseline runs CRD on the logits (A19, the default ``on="logits"``) with
CE 1 + KD 1 + CRD 0.8 (A14); ``on="embedding"`` is the original setting on the pooled penultimate
features (its teacher side is cached in the store too, so the budget stays 1x, FTI-compatible).

Memory. The bank holds one row per sample of the *training subset* (n = ``MethodContext.num_train``,
not the full dataset), for each side, as buffers of a module in ``self.extra``: it lives on the
training device, is updated in place under no_grad, and is checkpointed with the student (a resumed
run continues exactly) but not restored at a phase end (A11 below). Measured with
:meth:`CRDMemory.nbytes` at the default d = 128 and 64 rows a step: n = 500: 582,057 bytes
(512,000 for the two n x d float32 banks); n = 50,000: 51,666,057 bytes (51,200,000 for the banks).
Each step also holds the B x n score matrix of each side (see :mod:`ftikd.losses.contrastive`) and,
when K <= n, B x n sampling keys.

Negatives. K = 16384 per anchor (the reference's) from the anchor's other-class rows of the subset.
The subset caps the number of *distinct* negatives, not K: when K exceeds the pool (always in FTI,
where n <= 4800) negatives are drawn with replacement, as the reference does, so the NCE noise term
keeps the reference's K P_n = K / n; ``num_negatives`` sets a smaller K if wanted.

Labels. Other-class pools need the labels of all n rows: taken from ``MethodContext.train_labels``
when the context passes them; otherwise the table is filled from each batch, and rows not seen yet
(only during the first pseudo-epoch, which visits every sample once) are never drawn as negatives.

Update timing. A step's forward reads the bank and its backward still needs it, so a step's memory
update is kept pending (in buffers) and written at the start of the next step, before that step's
scores: exactly the memory the reference's next step sees, without copying the bank.

A11. When the best checkpoint is reloaded at an LR-phase end, the reference restores the embedding
heads with the student but not the memory or Z: the bank keeps the rows written by the abandoned
weights and refreshes them at momentum 0.5 as training goes on. ftikd does the same
(``phase_end_keeps``), as METHODS.md A11 chooses.

Under ``torchrun`` each rank updates its bank from its own rows of the batch only (not synchronised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.losses.contrastive import contrast_scores, crd_nce_loss, momentum_rows, nce_log_normalizer
from ftikd.losses.logit import kd_loss
from ftikd.methods.base import Batch, Method, MethodConfig, MethodContext, register_method
from ftikd.methods.representation import (
    ProjectionHead,
    check_representation,
    student_representation,
    student_width,
    teacher_feature_names,
    teacher_representation,
    teacher_width,
)


@dataclass
class CRDConfig(MethodConfig):
    """CRD options (defaults: METHODS.md M8 and the FTI setting of §3.1).

    ``positive``: ``index`` (the sample itself, the reference's "exact" mode) or ``label`` (a random
    sample of the anchor's class, the "relax" mode). ``num_negatives`` K per anchor.
    """

    on: str = "logits"
    feat_dim: int = 128
    num_negatives: int = 16384
    temperature: float = 0.07
    momentum: float = 0.5
    positive: str = "index"
    w_ce: float = 1.0
    w_kd: float = 1.0
    w_crd: float = 0.8
    kd_temperature: float = 4.0

    def __post_init__(self) -> None:
        check_representation(self.on)
        if self.positive not in ("index", "label"):
            raise ValueError("positive must be 'index' (the sample itself) or 'label' (a same-class sample)")
        if self.feat_dim < 1 or self.num_negatives < 1:
            raise ValueError("feat_dim and num_negatives must be positive")
        if self.temperature <= 0 or self.kd_temperature <= 0:
            raise ValueError("temperatures must be positive")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("momentum must lie in [0, 1)")


def draw_contrast(
    index: torch.Tensor,
    labels: torch.Tensor,
    table: torch.Tensor,
    num_classes: int,
    num_negatives: int,
    positive: str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CRD's contrast sets (M8 sampler): each anchor's positive row (B,) and negative counts (B, n).

    Negatives come from the anchor's other-class pool (rows of ``table`` with another, known label;
    -1 marks a row whose label is not known yet): without replacement when K fits in the pool, with
    replacement when it does not, as the reference does (in FTI, n < K, so always with replacement).
    An anchor whose pool is empty (one known class) draws from all rows. ``counts[i, j]`` is how
    often row j was drawn for anchor i (the rows sum to K); the loss only needs these counts, so the
    K draws are binned on the fly instead of kept as B x K indices. The positive is the anchor itself
    (``index``) or a random row of its class (``label``). Everything is drawn on the device.
    """
    n, b, k, dev = table.numel(), index.numel(), num_negatives, table.device
    order = torch.argsort(table, stable=True)  # unknown rows first, then one block per class
    counts = torch.bincount(table + 1, minlength=num_classes + 1)
    starts = counts.cumsum(0) - counts
    own, lo = counts[labels + 1], starts[labels + 1]
    pool = n - counts[0] - own
    has_pool = pool > 0
    size = torch.where(has_pool, pool, n)[:, None]
    rows = torch.arange(b, device=dev)[:, None]
    u = torch.rand(b, k, generator=generator, device=dev).mul_(size).long()
    u = torch.minimum(u, size - 1).add_(rows * n)  # uniform pool position, offset by the anchor's row
    at_pool = torch.bincount(u.reshape(-1), minlength=b * n).reshape(b, n)
    # pool position p -> position in ``order``: skip the unknown block, then the anchor's class block
    positions = torch.arange(n, device=dev)[None, :]
    p = positions + torch.where(has_pool, counts[0], 0)[:, None]
    p = p + torch.where(has_pool, own, 0)[:, None] * (p >= lo[:, None])
    in_order = torch.zeros(b, n, dtype=at_pool.dtype, device=dev)
    valid = positions < size
    in_order.scatter_add_(1, torch.where(valid, p, 0), torch.where(valid, at_pool, 0))
    drawn = torch.zeros_like(in_order).scatter_(1, order.expand(b, n), in_order)  # order position -> row
    if k <= n:
        keys = torch.rand(b, n, generator=generator, device=dev)
        excluded = (table[None, :] == labels[:, None]) | (table[None, :] < 0)
        distinct = keys.masked_fill(excluded, 2.0).topk(k, dim=1, largest=False).indices
        once = torch.zeros_like(drawn).scatter_(1, distinct, 1)
        drawn = torch.where((pool >= k)[:, None], once, drawn)
    if positive == "index":
        pos = index.reshape(-1)
    else:
        r = torch.rand(b, generator=generator, device=dev)
        pos = order[lo + torch.minimum((r * own).long(), own - 1)].reshape(-1)
    return pos, drawn.float()


class CRDMemory(nn.Module):
    """Momentum memory banks M_s, M_t (n x d each), constants log Z_s, log Z_t, labels, pending update.

    Rows start uniform in [-a, a], a = 1 / sqrt(d / 3), as in the reference; Z is NaN until the first
    batch fixes it (M8 step 3). All state is buffers, so it follows the module to the device and into
    checkpoints. ``rows`` is the most batch rows a step holds (the pending update's size).
    """

    def __init__(
        self, num: int, dim: int, num_classes: int, rows: int, labels: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        a = 1.0 / (dim / 3.0) ** 0.5
        self.num_classes = num_classes
        self.register_buffer("student", torch.rand(num, dim) * (2 * a) - a)
        self.register_buffer("teacher", torch.rand(num, dim) * (2 * a) - a)
        self.register_buffer("log_z", torch.full((2,), float("nan")))
        known = torch.full((num,), -1, dtype=torch.long) if labels is None else labels.long().cpu()
        self.register_buffer("labels", known.clone())
        self.register_buffer("pending_index", torch.zeros(rows, dtype=torch.long))
        self.register_buffer("pending_student", torch.zeros(rows, dim))
        self.register_buffer("pending_teacher", torch.zeros(rows, dim))
        self.register_buffer("pending_on", torch.zeros((), dtype=torch.bool))
        self._z_known = False
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_z_known", False))

    def nbytes(self) -> int:
        """Bytes held by all buffers (the banks dominate: 2 n d float32)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def record_labels(self, index: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the batch's labels into the table (idempotent when the context passed all labels)."""
        self.labels.index_copy_(0, index.reshape(-1), labels.reshape(-1))

    @torch.no_grad()
    def apply_pending(self, momentum: float) -> None:
        """Write the previous step's momentum update at its rows only; a no-op before the first step."""
        idx = self.pending_index
        for bank, values in ((self.student, self.pending_student), (self.teacher, self.pending_teacher)):
            rows = bank.index_select(0, idx)
            bank.index_copy_(
                0, idx, torch.where(self.pending_on, momentum_rows(rows, values, momentum), rows)
            )

    @torch.no_grad()
    def defer_update(self, index: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor) -> None:
        """Keep this step's embeddings for :meth:`apply_pending` (short batches repeat their last row)."""
        b, cap = index.numel(), self.pending_index.numel()
        if b > cap:
            raise ValueError(f"CRD memory holds updates of {cap} rows, got a batch of {b}")
        take = torch.arange(cap, device=index.device).clamp(max=b - 1)
        self.pending_index.copy_(index.reshape(-1)[take])
        self.pending_student.copy_(v_student[take])
        self.pending_teacher.copy_(v_teacher[take])
        self.pending_on.fill_(True)

    def nce(
        self,
        v_student: torch.Tensor,
        v_teacher: torch.Tensor,
        positive: torch.Tensor,
        counts: torch.Tensor,
        temperature: float,
    ) -> torch.Tensor:
        """Both NCE directions (M8 steps 1-4): student anchors vs M_t, teacher anchors vs M_s."""
        s_anchor = contrast_scores(v_student, self.teacher, temperature)
        t_anchor = contrast_scores(v_teacher, self.student, temperature)
        log_z = self._fixed_log_z(s_anchor, t_anchor, positive, counts)
        return crd_nce_loss(s_anchor, positive, counts, log_z[0]) + crd_nce_loss(
            t_anchor, positive, counts, log_z[1]
        )

    def _fixed_log_z(
        self, s_anchor: torch.Tensor, t_anchor: torch.Tensor, positive: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """log Z of both sides, fixed by the first batch (M8 step 3) and read from the buffer after.

        Whether it is fixed yet is checked on the device once per process (and again after a state
        dict is loaded), not at every step, so a step does not wait for the device.
        """
        if not self._z_known:
            if bool(torch.isnan(self.log_z).any()):
                with torch.no_grad():
                    self.log_z.copy_(
                        torch.stack([nce_log_normalizer(s, positive, counts) for s in (s_anchor, t_anchor)])
                    )
            self._z_known = True
        return self.log_z


@register_method
class CRD(Method):
    name = "crd"
    family = "contrastive"
    reads = "logits"
    extras = "student and teacher embedding heads; memory bank of n rows per side"
    summary = "CRD: NCE between student/teacher embeddings with a momentum memory bank (FTI: on logits)"
    reference = "Tian et al., 2019, Contrastive Representation Distillation; FTI setting: CKD (Xu et al.)"
    phase_end_keeps = ("memory.",)
    Config = CRDConfig

    def __init__(self, config: CRDConfig | None = None) -> None:
        super().__init__(config)
        self.teacher_features = teacher_feature_names(self.config.on)
        self._generator: torch.Generator | None = None

    def setup(self, ctx: MethodContext) -> None:
        """Embedding heads (Linear -> d, L2-normalised; both trainable) and the memory bank of n rows."""
        cfg = self.config
        self.extra["embed_s"] = ProjectionHead(student_width(ctx, cfg.on), cfg.feat_dim, normalize=True)
        self.extra["embed_t"] = ProjectionHead(teacher_width(ctx, cfg.on), cfg.feat_dim, normalize=True)
        rows = min(ctx.batch_size, ctx.num_train)
        labels = ctx.train_labels
        self.extra["memory"] = CRDMemory(ctx.num_train, cfg.feat_dim, ctx.num_classes, rows, labels)

    def _draw_generator(self, device: torch.device) -> torch.Generator:
        """A device generator re-seeded each step from the global CPU RNG (which resumes exactly)."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        return self._generator.manual_seed(int(torch.randint(1 << 62, ())))

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, memory = self.config, self.extra["memory"]
        memory.apply_pending(cfg.momentum)
        memory.record_labels(batch.index, batch.labels)
        out, s_rep = student_representation(student, batch.images, cfg.on)
        v_s = self.extra["embed_s"](s_rep)
        v_t = self.extra["embed_t"](teacher_representation(batch, cfg.on))
        positive, counts = draw_contrast(
            batch.index,
            batch.labels,
            memory.labels,
            memory.num_classes,
            cfg.num_negatives,
            cfg.positive,
            self._draw_generator(batch.labels.device),
        )
        crd = memory.nce(v_s, v_t, positive, counts, cfg.temperature)
        memory.defer_update(batch.index, v_s, v_t)
        return {
            "ce": cfg.w_ce * F.cross_entropy(out.logits, batch.labels),
            "kd": cfg.w_kd * kd_loss(out.logits, batch.teacher_logits, cfg.kd_temperature),
            "crd": cfg.w_crd * crd,
        }
