"""Paying for teacher outputs: the half of :class:`~ftikd.teacher.store.TeacherStore` that calls the teacher.

``fill`` pays for one batch of missing ``(sample, view)`` pairs at a time and commits its logits,
features and ledger row in one transaction before calling the teacher again, re-checking what is
missing and the lifetime cap under the write lock (module docstring of :mod:`ftikd.teacher.store`).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ftikd.errors import BudgetExceededError, FtikdError
from ftikd.teacher import store_sql as sql
from ftikd.teacher.teacher import Teacher, TeacherOutputError, coerce_output


class StorePaying:
    """Mixin of :class:`~ftikd.teacher.store.TeacherStore`: ``fill``, the budget and cap checks, inserts."""

    def fill(
        self,
        samples: Any,
        view: int,
        images_fn: Callable[[torch.Tensor], torch.Tensor],
        teacher: Callable[[torch.Tensor], Any],
        budget: int,
        batch_size: int = 256,
        progress: bool = False,
    ) -> int:
        """Make sure every sample in ``samples`` has a stored output for ``view``; return calls paid now.

        ``budget`` is the number of teacher calls this request may use in total (the run's n): a
        request for more distinct samples than that is refused before any call, as is one that would
        take the store past its lifetime ``max_calls``. Missing samples are paid for in batches of
        ``batch_size``: ``x = images_fn(batch_ids)`` builds the (augmented, normalised) teacher input,
        ``teacher(x)`` is called once, and the batch is committed before the next call.
        """
        if budget < 0:
            raise ValueError("budget must be >= 0")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        view = int(view)
        ids = sql._as_index(samples)
        needed = int(np.unique(ids).size)
        if needed > budget:
            raise BudgetExceededError(
                f"this run needs {needed} teacher outputs but its budget is {budget}; "
                f"raise the budget or request fewer samples"
            )
        t_fp = getattr(teacher, "fingerprint", None)
        if t_fp is not None and str(t_fp) != self.fingerprint:
            raise FtikdError(
                f"store {self.path} was written by teacher {sql._shown(self.fingerprint)} but this "
                f"teacher is {sql._shown(str(t_fp))}; use a different --store path"
            )
        if isinstance(teacher, Teacher) and not set(self.feature_names) <= set(teacher.feature_names):
            teacher = teacher.with_features(
                tuple(dict.fromkeys((*teacher.feature_names, *self.feature_names)))
            )
        with self._db():
            todo = self._missing_np(ids, view)
        if todo.size == 0:
            return 0
        self._check_cap(self.paid_calls(), int(todo.size))

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=int(todo.size), desc="teacher calls", unit="img")
        paid = 0
        try:
            for start in range(0, todo.size, batch_size):
                with self._db():
                    n = self._pay_batch(todo[start : start + batch_size], view, images_fn, teacher)
                paid += n
                if bar is not None:
                    bar.update(n)
        finally:
            if bar is not None:
                bar.close()
        return paid

    def check_cap(self, more: int) -> None:
        """Refuse (BudgetExceededError, zero calls) a plan to pay ``more`` calls past ``max_calls``.

        For callers that pay elsewhere first, e.g. into shard stores merged here later.
        """
        self._check_cap(self.paid_calls(), int(more))

    def _check_cap(self, paid_so_far: int, more: int) -> None:
        if self.max_calls is not None and paid_so_far + more > self.max_calls:
            raise BudgetExceededError(
                f"store {self.path} has paid {paid_so_far} of its lifetime max_calls={self.max_calls} "
                f"teacher calls and this request needs {more} more; raise max_calls or request fewer samples"
            )

    def _pay_batch(
        self,
        batch: np.ndarray,
        view: int,
        images_fn: Callable[[torch.Tensor], torch.Tensor],
        teacher: Callable[[torch.Tensor], Any],
    ) -> int:
        """Pay for and commit one batch under the write lock; return the calls paid."""
        conn = self._conn
        sql._begin_write(conn, self.path, self.paid_calls)
        try:
            # Re-read under the lock: another process may have stored some of these meanwhile,
            # or changed the cap / paid calls.
            cap = conn.execute("SELECT value FROM meta WHERE key='max_calls'").fetchone()
            self.max_calls = int(cap[0]) if cap else None
            batch = self._missing_np(batch, view)
            if batch.size == 0:
                conn.execute("COMMIT")
                return 0
            self._check_cap(self.paid_calls(), int(batch.size))
            b = int(batch.size)
            x = images_fn(torch.from_numpy(batch.copy()))
            try:
                out = coerce_output(teacher(x), getattr(teacher, "name", "teacher"))
                problem = self._validate(out, b, batch)
            except TeacherOutputError as e:
                problem = str(e)
            if problem is not None:
                # The calls were made (and possibly charged): record them, store no outputs.
                conn.execute(
                    "INSERT INTO ledger(time, calls, note) VALUES (?, ?, ?)",
                    (time.time(), b, f"view={view} refused: {problem}"),
                )
                conn.execute("COMMIT")
                raise FtikdError(
                    f"teacher output refused for samples {self._describe(batch)} (view {view}): {problem}; "
                    f"nothing was stored for that batch (its {b} calls are recorded in the ledger)"
                )
            self._insert(batch, view, out)
            conn.execute(
                "INSERT INTO ledger(time, calls, note) VALUES (?, ?, ?)",
                (time.time(), b, f"view={view} samples={b}"),
            )
            conn.execute("COMMIT")
            return b
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # keep the original error
                    conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _describe(batch: np.ndarray) -> str:
        head = ", ".join(str(int(s)) for s in batch[:8])
        return f"[{head}{', ...' if batch.size > 8 else ''}] ({batch.size} samples)"

    def _validate(self, out: Any, b: int, batch: np.ndarray) -> str | None:
        """A one-line reason the batch's teacher output is unusable, or None."""
        logits = out.logits
        if tuple(logits.shape) != (b, self.num_classes):
            return f"logits have shape {tuple(logits.shape)}, expected ({b}, {self.num_classes})"
        bad = ~torch.isfinite(logits).all(dim=1)
        if bad.any():
            return f"non-finite logits (NaN/inf) for samples {self._describe(batch[bad.cpu().numpy()])}"
        shapes = self._stored_feature_shapes()
        for name in self.feature_names:
            f = out.features.get(name)
            if f is None:
                return f"teacher did not return feature {name!r} that this store keeps"
            if f.dim() < 1 or f.shape[0] != b:
                return f"feature {name!r} has shape {tuple(f.shape)} for a batch of {b}"
            if name in shapes and tuple(f.shape[1:]) != shapes[name]:
                return f"feature {name!r} has per-sample shape {tuple(f.shape[1:])}, store has {shapes[name]}"
            bad = ~torch.isfinite(f.reshape(b, -1)).all(dim=1)
            if bad.any():
                return f"non-finite feature {name!r} for samples {self._describe(batch[bad.cpu().numpy()])}"
        return None

    def _stored_feature_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.feature_shapes()

    def _insert(self, batch: np.ndarray, view: int, out: Any) -> None:
        """Insert one validated batch (inside the caller's transaction)."""
        conn = self._conn
        logits = out.logits.detach().to("cpu", torch.float32).contiguous().numpy()
        conn.executemany(
            "INSERT INTO outputs(sample, view, logits) VALUES (?, ?, ?)",
            ((int(s), view, logits[i].tobytes()) for i, s in enumerate(batch)),
        )
        if not self.feature_names:
            return
        shapes = self._stored_feature_shapes()
        for name in self.feature_names:
            f = out.features[name].detach().to("cpu", torch.float32).contiguous().numpy()
            if name not in shapes:
                shapes[name] = tuple(int(d) for d in f.shape[1:])
            flat = f.reshape(f.shape[0], -1)
            conn.executemany(
                "INSERT INTO features(sample, view, name, data) VALUES (?, ?, ?, ?)",
                ((int(s), view, name, flat[i].tobytes()) for i, s in enumerate(batch)),
            )
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('feature_shapes', ?)",
            (json.dumps({k: list(v) for k, v in shapes.items()}),),
        )
