"""Samplers: distinct members, fixed unique group sets, determinism (METHODS.md M2.5)."""

import math

import pytest
import torch

from ftikd.methods.samplers import ShuffledSampler, build_groups, count_group_splits


@pytest.mark.parametrize("num,batch", [(10, 4), (7, 7), (100, 64), (65, 64)])
def test_shuffled_batches_are_distinct_and_cover_each_pass(num, batch):
    sampler = ShuffledSampler(num, batch, torch.Generator().manual_seed(0))
    seen = torch.cat([sampler.next_batch() for _ in range(50)])
    for start in range(0, seen.numel(), batch):
        chunk = seen[start : start + batch]
        assert chunk.unique().numel() == chunk.numel()
    # over many steps every sample is drawn about equally often
    counts = torch.bincount(seen, minlength=num)
    assert counts.max() - counts.min() <= 2


def test_count_group_splits():
    assert count_group_splits(5, 1, 1) == 20
    assert count_group_splits(5, 2, 1) == math.comb(5, 2) * 3
    assert count_group_splits(2, 2, 1) == 0


@pytest.mark.parametrize(
    "num,k,max_groups", [(6, 2, 1000), (6, 3, 1000), (8, 4, 50), (500, 2, 1000), (200, 3, 5000)]
)
def test_groups_unique_distinct_members_and_capped(num, k, max_groups):
    groups = build_groups(num, k, max_groups, torch.Generator().manual_seed(1))
    a = k - k // 2
    total = count_group_splits(num, a, k - a)
    assert groups.shape == (min(total, max_groups), k)
    assert groups.min() >= 0 and groups.max() < num
    s = groups.sort(dim=1).values
    assert (s[:, 1:] != s[:, :-1]).all()
    canon = torch.cat([groups[:, :a].sort(1).values, groups[:, a:].sort(1).values], 1)
    assert torch.unique(canon, dim=0).shape[0] == groups.shape[0]


def test_small_sets_are_enumerated_completely():
    groups = build_groups(4, 2, 1000, torch.Generator().manual_seed(0))
    assert {tuple(g) for g in groups.tolist()} == {(i, j) for i in range(4) for j in range(4) if i != j}


def test_groups_deterministic_by_seed():
    g1 = build_groups(1000, 3, 2000, torch.Generator().manual_seed(3))
    g2 = build_groups(1000, 3, 2000, torch.Generator().manual_seed(3))
    assert torch.equal(g1, g2)


def test_n500_k2_groups_are_a_uniform_subsample_of_all_ordered_pairs():
    # the reference (CKDSample) enumerates all 500 * 499 ordered pairs, since that is under 5x the
    # 100,000 cap, and keeps a uniform sample of 100,000: every sample ~200 times on each side
    groups = build_groups(500, 2, 100_000, torch.Generator().manual_seed(0))
    assert groups.shape == (100_000, 2)
    for side in (0, 1):
        counts = torch.bincount(groups[:, side], minlength=500).float()
        assert counts.mean().item() == pytest.approx(200.0)
        assert counts.min() > 140 and counts.max() < 260
    pairs = {tuple(g) for g in groups.tolist()}
    assert sum((b, a) in pairs for a, b in list(pairs)[:5000]) > 1500  # both orders occur (~40 %)
