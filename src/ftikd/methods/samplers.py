"""Index samplers: what each training step draws from the cached training subset.

Samplers return index tensors into the run's training subset (positions 0..n-1). They draw from
their own ``torch.Generator``, so a seed fixes the whole stream independently of global RNG state.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class IndexSampler(Protocol):
    """Produces the index tensor of each step: (B,) for single samples or (B, k) for groups."""

    def next_batch(self) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class ShuffledSampler:
    """Endless reshuffled passes over n samples; every batch holds distinct samples.

    Each pass is a fresh permutation. A batch that straddles two passes takes the leftovers of the
    old pass and the first unused samples of the new one that are not among them, so batches never
    repeat a sample (in-batch comparisons need distinct members) and every sample still appears
    once per pass.
    """

    def __init__(self, num: int, batch_size: int, generator: torch.Generator) -> None:
        if num < 1:
            raise ValueError("sampler needs at least one sample")
        self.num, self.batch_size, self.generator = num, min(batch_size, num), generator
        self._queue = torch.randperm(num, generator=generator)

    def next_batch(self) -> torch.Tensor:
        b = self.batch_size
        if self._queue.numel() >= b:
            batch, self._queue = self._queue[:b], self._queue[b:]
            return batch
        leftover = self._queue
        fresh = torch.randperm(self.num, generator=self.generator)
        usable = ~torch.isin(fresh, leftover)
        take_pos = torch.nonzero(usable).flatten()[: b - leftover.numel()]
        keep = torch.ones_like(usable)
        keep[take_pos] = False
        self._queue = fresh[keep]
        return torch.cat([leftover, fresh[take_pos]])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rest of the current pass; the generator's state is saved by its owner."""
        return {"queue": self._queue.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._queue = state["queue"].clone()


class FixedSetSampler:
    """Reshuffled passes over a fixed set of index rows (e.g. CKD groups), ``batch_size`` rows a step."""

    def __init__(self, rows: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.rows, self.generator = rows, generator
        self._order = ShuffledSampler(rows.shape[0], batch_size, generator)

    def next_batch(self) -> torch.Tensor:
        return self.rows[self._order.next_batch()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The row order's state; the rows themselves are rebuilt from the seed."""
        return self._order.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._order.load_state_dict(state)


def count_group_splits(num: int, a: int, b: int) -> int:
    """Number of ordered (A, B) splits: C(num, a) * C(num - a, b) (METHODS.md M2.5)."""
    if num < a + b:
        return 0
    return math.comb(num, a) * math.comb(num - a, b)


def _canonical(groups: torch.Tensor, a: int) -> torch.Tensor:
    """Sort members within A and within B so equal groups have equal rows; (A, B) != (B, A)."""
    return torch.cat([groups[:, :a].sort(dim=1).values, groups[:, a:].sort(dim=1).values], dim=1)


def _enumerate_groups(num: int, a: int, b: int) -> torch.Tensor:
    """Every ordered split of ``a`` + ``b`` distinct members out of ``num`` (small num only)."""
    ar = torch.arange(num)
    side_a = torch.combinations(ar, a) if a > 1 else ar[:, None]
    side_b = torch.combinations(ar, b) if b > 1 else ar[:, None]
    ia, ib = torch.meshgrid(torch.arange(len(side_a)), torch.arange(len(side_b)), indexing="ij")
    groups = torch.cat([side_a[ia.flatten()], side_b[ib.flatten()]], dim=1)
    return groups[_all_distinct(groups)]


def _all_distinct(groups: torch.Tensor) -> torch.Tensor:
    """Row mask: True where all members of the row are different."""
    s = groups.sort(dim=1).values
    return (s[:, 1:] != s[:, :-1]).all(dim=1)


def _draw_unique_groups(num: int, a: int, b: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``count`` unique random groups with distinct members, by batched rejection."""
    k = a + b
    found = torch.empty(0, k, dtype=torch.long)
    while found.shape[0] < count:
        need = count - found.shape[0]
        cand = torch.randint(num, (int(need * 1.2) + 64, k), generator=generator)
        cand = _canonical(cand[_all_distinct(cand)], a)
        merged = torch.cat([found, cand])
        _, inverse = torch.unique(merged, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), merged.shape[0], dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(merged.shape[0]), reduce="amin")
        found = merged[first.sort().values]
    return found[:count]


def build_groups(num: int, k: int, max_groups: int, generator: torch.Generator) -> torch.Tensor:
    """The fixed set of CKD groups (METHODS.md M2.5), shape (G, k), A members first.

    If the number of possible ordered splits is at least 5x ``max_groups``, unique groups are
    drawn at random; otherwise every split is enumerated and, if too many, ``max_groups`` of them
    are subsampled. The set is built once per run.
    """
    a, b = k - k // 2, k // 2
    total = count_group_splits(num, a, b)
    if total == 0:
        raise ValueError(f"cannot form groups of {k} from {num} samples")
    if total >= 5 * max_groups:
        return _draw_unique_groups(num, a, b, max_groups, generator)
    groups = _enumerate_groups(num, a, b)
    if groups.shape[0] > max_groups:
        groups = groups[torch.randperm(groups.shape[0], generator=generator)[:max_groups]]
    return groups
