"""KD and CKD losses on logits (METHODS.md M1, M2).

Formulas and reductions follow ``METHODS.md`` (section numbers cited per function). Softmaxes and
KL terms are computed in float32 so mixed-precision callers stay stable.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Comparison = Literal["difference", "addition", "interpolation"]
CKDForm = Literal["mse", "kl"]
CKDReduction = Literal["ref", "mean"]
CKD_REDUCTIONS = ("ref", "mean")
REF_CLASSES = 100


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Hinton KD term (METHODS.md §0.5): T^2 * batchmean KL(softmax(z/T) || softmax(z_hat/T)).

    The teacher distribution is the first KL argument; ``teacher_logits`` may be any real target
    vector (CKD's KL form passes label differences here).
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    return kl.mean() * (t * t)


def comparison_weights(comparison: Comparison, lam: float | None = None) -> tuple[float, float]:
    """Coefficients (l1, l2) of phi(u, v) = l1*u + l2*v (CKD eq. 8, METHODS.md M2.1 and A5).

    ``difference`` is (1, -1); ``addition`` is the authors' code's (0.5, 0.5); ``interpolation``
    is (lam, 1 - lam) with lam drawn by the caller (once per batch, as in the code).
    """
    if comparison == "difference":
        return 1.0, -1.0
    if comparison == "addition":
        return 0.5, 0.5
    if comparison == "interpolation":
        if lam is None:
            raise ValueError("interpolation comparison needs lam")
        return float(lam), 1.0 - float(lam)
    raise ValueError(f"unknown comparison {comparison!r}")


def group_split_sizes(k: int) -> tuple[int, int]:
    """Sizes (a, b) of the two halves of a k-group: a = ceil(k/2), b = floor(k/2) (M2.1)."""
    if k < 2:
        raise ValueError("a CKD group needs k >= 2")
    return k - k // 2, k // 2


def compare_groups(values: torch.Tensor, comparison: Comparison, lam: float | None = None) -> torch.Tensor:
    """phi(centroid(A), centroid(B)) for groups stacked as (G, k, C); A is the first ceil(k/2)."""
    a, _ = group_split_sizes(values.shape[1])
    l1, l2 = comparison_weights(comparison, lam)
    return l1 * values[:, :a].mean(dim=1) + l2 * values[:, a:].mean(dim=1)


def class_count_scale(
    num_classes: int, reduction: CKDReduction = "ref", ref_classes: int = REF_CLASSES
) -> float:
    """Factor turning a class-mean squared error into one whose step size does not depend on C.

    A mean over the C classes (the authors' ``nn.MSELoss``) gives each logit a gradient that scales
    as 1/C (issue 9). ``ref`` multiplies by C / ``ref_classes``, i.e. a sum over classes divided
    by a fixed reference count: equal to the authors' objective at C = ``ref_classes`` (100,
    CIFAR-100, where the protocol's LR grid was chosen) and the same per-logit step at any C.
    ``mean`` keeps the class mean (factor 1).
    """
    if reduction == "mean":
        return 1.0
    if reduction == "ref":
        if ref_classes < 1:
            raise ValueError("ref_classes must be positive")
        return num_classes / ref_classes
    raise ValueError(f"unknown CKD reduction {reduction!r}; choose one of {', '.join(CKD_REDUCTIONS)}")


def ckd_terms(
    student_delta: torch.Tensor,
    teacher_delta: torch.Tensor,
    label_delta: torch.Tensor,
    form: CKDForm = "mse",
    temperature: float = 4.0,
    reduction: CKDReduction = "ref",
    ref_classes: int = REF_CLASSES,
) -> dict[str, torch.Tensor]:
    """The two CKD terms on already-compared vectors (METHODS.md M2.2 / M2.3).

    ``mse``: squared error of raw logit differences against label and teacher differences, a
    class mean times :func:`class_count_scale` (``reduction="mean"``: the authors' ``nn.MSELoss``;
    the default ``ref``: sum over classes / ``ref_classes``).
    ``kl``: the authors' ICLR code: T^2 batchmean KL with the label/teacher side first, whatever
    ``reduction``: it is already a sum over classes, and its dominant teacher term measured a 2-3x
    larger per-logit step at C = 10 than at C = 100 where the MSE's is 10x (docs/ckd-fidelity.md),
    so a C / 100 factor would over-correct it.
    Returns ``{"ckd_label": ..., "ckd_teacher": ...}`` (weights applied by the caller).
    """
    scale = class_count_scale(student_delta.shape[-1], reduction, ref_classes)
    if form == "mse":
        return {
            "ckd_label": scale * F.mse_loss(student_delta.float(), label_delta.float()),
            "ckd_teacher": scale * F.mse_loss(student_delta.float(), teacher_delta.float()),
        }
    if form == "kl":
        return {
            "ckd_label": kd_loss(student_delta, label_delta, temperature),
            "ckd_teacher": kd_loss(student_delta, teacher_delta, temperature),
        }
    raise ValueError(f"unknown CKD form {form!r}")


def ckd_group_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    label_onehot: torch.Tensor,
    comparison: Comparison = "difference",
    form: CKDForm = "mse",
    temperature: float = 4.0,
    lam: float | None = None,
    reduction: CKDReduction = "ref",
    ref_classes: int = REF_CLASSES,
) -> dict[str, torch.Tensor]:
    """Group CKD (METHODS.md M2.1-M2.3) on per-member tensors shaped (G, k, C).

    Each group's first ceil(k/2) members form A, the rest B; the centroid of each half is taken in
    logit (and label) space, then compared with phi. No per-sample cross-entropy is involved.
    ``reduction``: see :func:`ckd_terms` (``mean`` is the authors' objective).
    """
    return ckd_terms(
        compare_groups(student_logits, comparison, lam),
        compare_groups(teacher_logits, comparison, lam),
        compare_groups(label_onehot, comparison, lam),
        form,
        temperature,
        reduction,
        ref_classes,
    )


def logit_offset_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    reduction: CKDReduction = "ref",
    ref_classes: int = REF_CLASSES,
) -> torch.Tensor:
    """MSE between the batch-mean student and teacher logit vectors (ftikd extension, not in CKD).

    Difference-only CKD objectives are blind to a logit offset shared by all samples (METHODS.md
    M2.7, A37), which shifts argmax predictions. This term constrains exactly that direction, from
    the cached teacher outputs, without a per-sample target. Leading dims are flattened. A class
    mean has CKD's 1/C step-size trap, so ``reduction`` rescales it as in :func:`ckd_terms`.
    """
    c = student_logits.shape[-1]
    s_mean = student_logits.reshape(-1, c).float().mean(dim=0)
    t_mean = teacher_logits.reshape(-1, c).float().mean(dim=0)
    return class_scaled_mse(s_mean, t_mean, reduction, ref_classes)


def class_scaled_mse(
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: CKDReduction = "ref",
    ref_classes: int = REF_CLASSES,
) -> torch.Tensor:
    """Elementwise-mean squared error in float32, rescaled by :func:`class_count_scale` so that
    ``ref`` takes the same per-logit step at any class count (the last dim is the classes)."""
    mse = F.mse_loss(student.float(), teacher.float())
    return class_count_scale(student.shape[-1], reduction, ref_classes) * mse


def _pairwise_mse_mean(residual: torch.Tensor) -> torch.Tensor:
    """Mean over unordered pairs i<j and classes of ((r_i - r_j))^2, in O(B*C).

    Uses sum_{i<j} |r_i - r_j|^2 = B * sum_i |r_i|^2 - |sum_i r_i|^2, so no B x B x C tensor.
    """
    b, c = residual.shape
    r = residual.float()
    total = b * r.pow(2).sum() - r.sum(dim=0).pow(2).sum()
    return total / (b * (b - 1) / 2 * c)


def ckd_inbatch_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    label_onehot: torch.Tensor,
    form: CKDForm = "mse",
    temperature: float = 4.0,
    reduction: CKDReduction = "ref",
    ref_classes: int = REF_CLASSES,
) -> dict[str, torch.Tensor]:
    """In-batch CKD (ftikd's own variant, not from the CKD paper): every pair of a batch is compared.

    For B distinct samples, the difference comparison is applied to all pairs, giving B(B-1)/2
    comparisons from B student forwards. The MSE form equals the mean of the group form's k=2
    MSE over all unordered pairs (each pair's two orders give the same value) and is computed in
    O(B*C). The KL form is not symmetric, so it averages over all ordered pairs i != j.
    ``reduction`` scales the MSE form as in :func:`ckd_terms` (``mean``: the elementwise mean).
    """
    b = student_logits.shape[0]
    if b < 2:
        raise ValueError("in-batch CKD needs at least 2 samples per batch")
    if form == "mse":
        scale = class_count_scale(student_logits.shape[-1], reduction, ref_classes)
        return {
            "ckd_label": scale * _pairwise_mse_mean(student_logits - label_onehot),
            "ckd_teacher": scale * _pairwise_mse_mean(student_logits - teacher_logits),
        }
    if form == "kl":
        i, j = torch.triu_indices(b, b, offset=1, device=student_logits.device)
        i, j = torch.cat([i, j]), torch.cat([j, i])
        return ckd_terms(
            student_logits[i] - student_logits[j],
            teacher_logits[i] - teacher_logits[j],
            label_onehot[i] - label_onehot[j],
            form="kl",
            temperature=temperature,
            reduction=reduction,
            ref_classes=ref_classes,
        )
    raise ValueError(f"unknown CKD form {form!r}")
