"""Label noise and class imbalance as the KD survey defines them (METHODS.md §3.3, A23, A24)."""

import pytest
import torch

from ftikd.data.scenarios import (
    imbalance_counts,
    imbalanced_indices,
    scaled_imbalance_counts,
    uniform_label_noise,
)

# METHODS.md §3.3 table (reading A), computed there from the survey's 5000-max / 250-min.
SURVEY_TABLE = {
    0.2: [250, 375, 508, 664, 858, 1113, 1470, 2014, 2955, 5000],
    0.6: [250, 440, 645, 882, 1166, 1522, 1983, 2614, 3531, 5000],
    1.0: [250, 529, 844, 1200, 1607, 2077, 2625, 3273, 4050, 5000],
    2.0: [250, 892, 1700, 2491, 3173, 3728, 4168, 4513, 4785, 5000],
}


@pytest.mark.parametrize("gamma", sorted(SURVEY_TABLE))
def test_imbalance_counts_match_the_survey_table(gamma):
    counts = imbalance_counts(gamma, 10)
    assert all(abs(a - b) <= 1 for a, b in zip(counts, SURVEY_TABLE[gamma], strict=True)), counts


def test_imbalance_counts_independent_solution():
    # solve a/(b+1) = 250 and a/(b+10^-g) = 5000 by plain arithmetic, then evaluate one middle class
    g = 0.6
    b = (5000 * 10**-g - 250) / (250 - 5000)
    a = 250 * (1 + b)
    assert imbalance_counts(g, 10)[4] == round(a / (b + 5**-g))
    with pytest.raises(ValueError):
        imbalance_counts(0.0, 10)


def test_scaled_counts_follow_the_dataset():
    counts = scaled_imbalance_counts([6000] * 10, 1.0)
    assert counts[-1] == 6000 and counts[0] == 300 and counts == sorted(counts)


def test_imbalanced_indices_draw_the_counts_without_replacement():
    labels = torch.arange(10).repeat_interleave(600)[
        torch.randperm(6000, generator=torch.Generator().manual_seed(0))
    ]
    idx, per_class = imbalanced_indices(labels, 2.0, seed=3)
    assert idx.unique().numel() == idx.numel()
    got = torch.bincount(labels[idx], minlength=10).tolist()
    assert got == [per_class[c] for c in range(10)]
    assert sorted(per_class.values()) == scaled_imbalance_counts([600] * 10, 2.0)
    again, again_counts = imbalanced_indices(labels, 2.0, seed=3)
    assert torch.equal(again, idx) and again_counts == per_class
    other, other_counts = imbalanced_indices(labels, 2.0, seed=4)
    assert other_counts != per_class or not torch.equal(other, idx)


def test_label_noise_rate_and_uniformity():
    labels = torch.zeros(20000, dtype=torch.long)
    noisy = uniform_label_noise(labels, 0.4, 10, seed=1)
    changed = (noisy != labels).float().mean().item()
    assert abs(changed - 0.4 * 9 / 10) < 0.02  # the new class may equal the old one (A24)
    counts = torch.bincount(noisy[noisy != 0], minlength=10)[1:].float()
    assert (counts / counts.sum() - 1 / 9).abs().max() < 0.02
    assert torch.equal(noisy, uniform_label_noise(labels, 0.4, 10, seed=1))
    assert torch.equal(uniform_label_noise(labels, 0.0, 10, seed=1), labels)
    assert noisy.dtype == labels.dtype
    with pytest.raises(ValueError):
        uniform_label_noise(labels, 1.5, 10, seed=1)
