"""PaidTeacher: teacher calls on new inputs during training (BSS, VRM), paid through the run's store.

Methods that need the teacher on inputs made during training (adversarial samples, fresh views)
spend the part of the run's budget n that they did not use for cached training samples
(``Method.train_samples``). Every such call goes through a :class:`PaidTeacher`, which pays it
durably in the run's :class:`~ftikd.teacher.store.TeacherStore`, never twice, and never past the
budget (docs/budget-queries.md).

Keying. An output is stored under ``(key, view)``. ``key`` is the caller's int64 id of the query,
deterministic per query (e.g. step, row and attack iteration), so a resumed run that replays steps
asks for the same keys and finds them paid. ``view`` is :func:`synthetic_view` of the run's identity:
a negative integer, while dataset samples are cached under views >= 0 (``RunConfig.view``), so a
synthetic output can never be read as a dataset sample's; and two runs that share a store (other
seed, method or options) get different views (a 62-bit hash), so neither reads the other's
synthetic outputs.

Connection. One open store per run: :meth:`PaidTeacher.open` opens it and :meth:`close` closes
it. Opening costs about 0.6 ms, a paying query about 5 ms (the fsync of its commit) and a query
of already-paid keys about 0.3 ms (measured on the development machine), so opening per query
would add 10-100 % to every query for no gain.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn

from ftikd.errors import BudgetExceededError, FtikdError
from ftikd.teacher.store import TeacherStore
from ftikd.teacher.teacher import Teacher, TeacherOutput, _ModuleFn

_VIEW_SPACE = 2**62


def synthetic_view(run_key: str) -> int:
    """The store view reserved for one run's synthetic inputs: -1 - (blake2b(run_key) mod 2**62).

    Always negative, so it never meets a dataset view (>= 0); ``run_key`` names the run (its
    config), so different runs sharing a store get different views.
    """
    digest = hashlib.blake2b(run_key.encode(), digest_size=8).digest()
    return -1 - int.from_bytes(digest, "big") % _VIEW_SPACE


class PaidTeacher:
    """The teacher on new inputs, each distinct ``key`` paid once through ``store`` under ``view``.

    ``budget`` is this run's allowance for such calls (n minus the cached training samples). Calls
    already stored under ``view`` (by an interrupted run being resumed) count against it, so the
    run's total stays within n however often it is resumed.
    """

    def __init__(self, store: TeacherStore, teacher: Teacher, budget: int, view: int) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        if view >= 0:
            raise ValueError(f"synthetic inputs use negative views (dataset views are >= 0), got {view}")
        self.store = store
        self.teacher = teacher
        self.budget = int(budget)
        self.view = int(view)
        self._paid = store.count(self.view)
        self.paid_at_open = self._paid  # paid by earlier attempts of this run (resumed)
        if self._paid > self.budget:
            raise BudgetExceededError(
                f"store {store.path} already holds {self._paid} synthetic outputs of this run but its "
                f"budget for them is {self.budget}; use a different --store path"
            )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        teacher: Teacher,
        dataset: str,
        num_classes: int,
        budget: int,
        run_key: str,
        feature_names: Iterable[str] = (),
    ) -> PaidTeacher:
        """Open the run's store at ``path`` (bound to ``teacher`` and ``dataset``) for this run's queries."""
        store = TeacherStore.open(path, teacher.fingerprint, dataset, num_classes, feature_names)
        try:
            return cls(store, teacher, budget, synthetic_view(run_key))
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        """Close the store connection (every paid output is already committed)."""
        self.store.close()

    def __enter__(self) -> PaidTeacher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def paid(self) -> int:
        """Calls paid under this run's view so far, including those of earlier attempts of the run."""
        return self._paid

    @property
    def remaining(self) -> int:
        """Calls left in this run's budget for new inputs."""
        return self.budget - self._paid

    @property
    def white_box(self) -> bool:
        """Whether input gradients are available (a local module teacher, not a remote callable)."""
        return isinstance(self.teacher.fn, _ModuleFn)

    def unpaid(self, keys: torch.Tensor) -> torch.Tensor:
        """Bool mask over ``keys`` (1-D int64): True where the key has not been paid yet."""
        keys = keys.detach().to("cpu", torch.int64)
        return torch.isin(keys, self.store.missing(keys, self.view))

    def query(self, keys: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, C) float32 on ``images``' device for normalised ``images`` (B, C, H, W).

        Keys not yet stored are paid (in eval mode, without gradients) and committed before the
        logits are returned; stored keys cost nothing and return their stored logits. Refuses, with
        zero calls paid, when the new keys exceed :attr:`remaining`.
        """
        keys = self._checked_keys(keys, images)
        new = self._new_keys(keys)
        if new.numel():
            self._pay(new, keys, images, self.teacher)
        return self.store.logits(keys, self.view, device=images.device)

    def query_white_box(self, keys: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Like :meth:`query`, but the logits (fp32, teacher in eval mode) carry the autograd graph back
        to ``images``, for attacks on the teacher (BSS, METHODS.md M16).

        A call is one forward of the teacher on one image; its input gradient comes with it (white-box
        access, which a remote API does not give). Keys already stored are recomputed locally at no
        charge (a resumed run replaying its steps); new keys are paid and their outputs stored.
        """
        if not self.white_box:
            raise FtikdError(
                f"teacher {self.teacher.name!r} is a callable without input gradients; white-box queries "
                f"need a local teacher module (a checkpoint)"
            )
        keys = self._checked_keys(keys, images)
        new = self._new_keys(keys)
        module: nn.Module = self.teacher.fn.module
        was_training = module.training
        module.eval()
        try:
            with torch.autocast(images.device.type, enabled=False):
                out = self._forward(module, images.float())
        finally:
            module.train(was_training)
        out = TeacherOutput(out.logits.float().to(images.device), out.features)
        if new.numel():
            recorded = TeacherOutput(out.logits.detach(), {k: v.detach() for k, v in out.features.items()})
            self._pay(new, keys, images, _Recorded(recorded))
        return out.logits

    def _forward(self, module: nn.Module, x: torch.Tensor) -> TeacherOutput:
        """One differentiable teacher forward on the module's device, with the features the store keeps."""
        names = self.store.feature_names
        param = next(iter(module.parameters()), None)
        if param is not None:
            x = x.to(param.device)
        raw = module(x, with_features=True) if names and self.teacher.fn.pass_flag else module(x)
        logits = raw.logits if hasattr(raw, "logits") else raw
        feats = {n: raw.features[n] for n in names} if names else {}
        return TeacherOutput(logits, feats)

    def _checked_keys(self, keys: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Keys as a CPU int64 tensor, one distinct key per image row."""
        if not isinstance(keys, torch.Tensor) or keys.dim() != 1 or keys.is_floating_point():
            raise ValueError("keys must be a 1-D integer tensor")
        if images.dim() != 4 or images.shape[0] != keys.numel():
            raise ValueError(
                f"images must be (B, C, H, W) with B = {keys.numel()} keys, got {tuple(images.shape)}"
            )
        keys = keys.detach().to("cpu", torch.int64)
        if torch.unique(keys).numel() != keys.numel():
            raise ValueError("keys of one query must be distinct")
        return keys

    def _new_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """The keys not stored yet; refuses (zero calls) when they exceed the remaining budget."""
        new = self.store.missing(keys, self.view)
        if new.numel() > self.remaining:
            raise BudgetExceededError(
                f"this query needs {new.numel()} new teacher calls but only {self.remaining} of the run's "
                f"{self.budget} calls for new inputs are left"
            )
        return new

    def _pay(self, new: torch.Tensor, keys: torch.Tensor, images: torch.Tensor, teacher: Any) -> None:
        """Pay for the rows of ``images`` whose keys are ``new`` through the store (durable, batched)."""
        order = torch.argsort(keys)
        sorted_keys = keys[order]

        def images_for(ids: torch.Tensor) -> torch.Tensor:
            rows = order[torch.searchsorted(sorted_keys, ids)]
            if isinstance(teacher, _Recorded):
                teacher.rows = rows
            return images[rows.to(images.device)].detach()

        # Teacher outputs are fp32 whatever autocast the training step runs under.
        with torch.autocast(images.device.type, enabled=False):
            self._paid += self.store.fill(new, self.view, images_for, teacher, budget=int(new.numel()))


class _Recorded:
    """A "teacher" returning outputs already computed for a query's rows (selected by ``rows``).

    Lets :meth:`PaidTeacher.query_white_box` record, through the store's usual checked and durable
    path, the forward it made with gradients, instead of calling the teacher a second time.
    """

    name = "white-box teacher"

    def __init__(self, out: TeacherOutput) -> None:
        self.out = out
        self.rows = torch.zeros(0, dtype=torch.int64)

    def __call__(self, x: torch.Tensor) -> TeacherOutput:
        rows = self.rows.to(self.out.logits.device)
        return TeacherOutput(self.out.logits[rows], {k: v[rows] for k, v in self.out.features.items()})
