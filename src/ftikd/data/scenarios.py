"""Robustness scenarios of the KD survey ([S3], METHODS.md §3.3): label noise and class imbalance.

Pure functions of (labels, rate or exponent, seed), so a scenario is fixed by the run's seed and
can be recorded in the run record and repeated exactly.

* Label noise (A24, Hendrycks' ``uniform_mix_C``): each training label is, with probability sigma,
  replaced by a class drawn uniformly from all K classes (possibly itself), so the effective flip
  rate is sigma (K - 1) / K. Only the training subset is corrupted; validation and test stay clean.
* Class imbalance (A23, reading A): class counts n_k = round(a / (b + k^-gamma)), k = 1..K, with
  (a, b) solved so the smallest class has ``min_count`` and the largest ``max_count`` (the survey's
  250 and 5000, scaled to the dataset by :func:`scaled_imbalance_counts`). Which class gets which
  count is a seeded permutation; the images of each class are drawn without replacement.
"""

from __future__ import annotations

import torch

SURVEY_MAX, SURVEY_MIN = 5000, 250
# Salts mixed into the seed so the two scenarios of one run draw from unrelated random streams.
_NOISE_SALT, _IMBALANCE_SALT = 0x5EED0001, 0x5EED0002


def uniform_label_noise(labels: torch.Tensor, sigma: float, num_classes: int, seed: int) -> torch.Tensor:
    """A copy of ``labels`` where each entry is, with probability ``sigma``, a uniform class in [0, K)."""
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"label-noise rate sigma must lie in [0, 1], got {sigma}")
    gen = torch.Generator().manual_seed(seed ^ _NOISE_SALT)
    flip = torch.rand(labels.shape, generator=gen) < sigma
    drawn = torch.randint(0, num_classes, labels.shape, generator=gen)
    return torch.where(flip.to(labels.device), drawn.to(labels.device, labels.dtype), labels)


def imbalance_counts(
    gamma: float, num_classes: int, max_count: int = SURVEY_MAX, min_count: int = SURVEY_MIN
) -> list[int]:
    """Per-rank class sizes n_k = round(a / (b + k^-gamma)), k = 1..K, smallest first (§3.3 table)."""
    if gamma <= 0:
        raise ValueError(f"imbalance exponent gamma must be positive, got {gamma}")
    if not 0 < min_count <= max_count or num_classes < 2:
        raise ValueError("need 0 < min_count <= max_count and at least 2 classes")
    top = num_classes**-gamma
    b = (max_count * top - min_count) / (min_count - max_count) if max_count != min_count else 0.0
    a = min_count * (b + 1.0)
    return [round(a / (b + k**-gamma)) for k in range(1, num_classes + 1)]


def scaled_imbalance_counts(class_sizes: list[int], gamma: float) -> list[int]:
    """Survey counts scaled to a dataset: largest = the smallest available class, 250/5000 of it the least."""
    largest = min(class_sizes)
    return imbalance_counts(
        gamma, len(class_sizes), largest, max(1, round(largest * SURVEY_MIN / SURVEY_MAX))
    )


def imbalanced_indices(labels: torch.Tensor, gamma: float, seed: int) -> tuple[torch.Tensor, dict[int, int]]:
    """Indices of a power-law class-imbalanced subset of ``labels`` and the count given to each class.

    Counts come from :func:`scaled_imbalance_counts`; a seeded permutation assigns them to classes
    and each class's images are drawn without replacement. Returns sorted indices.
    """
    labels = labels.cpu()
    num_classes = int(labels.max()) + 1
    sizes = torch.bincount(labels, minlength=num_classes)
    counts = scaled_imbalance_counts(sizes.tolist(), gamma)
    gen = torch.Generator().manual_seed(seed ^ _IMBALANCE_SALT)
    order = torch.randperm(num_classes, generator=gen).tolist()  # order[rank] = class with that rank
    # one shuffled key per sample; within each class the smallest keys are kept
    keys = torch.rand(labels.shape[0], generator=gen)
    per_class = {cls: counts[rank] for rank, cls in enumerate(order)}
    quota = torch.tensor([per_class[c] for c in range(num_classes)])
    ranked = torch.argsort(labels.double() * 2 + keys.double())  # grouped by class, random inside
    position = torch.arange(labels.shape[0]) - torch.searchsorted(labels[ranked].contiguous(), labels[ranked])
    keep = ranked[position < quota[labels[ranked]]]
    return torch.sort(keep).values, per_class
