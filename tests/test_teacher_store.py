"""Teacher wrapper and TeacherStore: budget enforcement, durability, crash recovery, fast reads."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ftikd.teacher.store_sql as store_mod
from ftikd.errors import BudgetExceededError, FtikdError
from ftikd.models.base import ModelOutput, available_models, register_model
from ftikd.teacher import (
    Teacher,
    TeacherOutput,
    TeacherStore,
    as_teacher,
    save_checkpoint,
    state_fingerprint,
)

C = 10
FP = "test-teacher-v1"


def images_fn(ids: torch.Tensor) -> torch.Tensor:
    """Deterministic (B, 3, 4, 4) 'augmented view' of each sample; pixel [0, 0, 0] holds the id."""
    ids = ids.to(torch.float32)
    x = torch.sin(ids[:, None] * 0.37 + torch.arange(48, dtype=torch.float32)[None] * 0.11).reshape(
        -1, 3, 4, 4
    )
    x[:, 0, 0, 0] = ids
    return x


def ids_of(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].round().long().tolist()


def logit_fn(x: torch.Tensor) -> torch.Tensor:
    """The deterministic teacher: logits = f(image), elementwise so rows don't depend on batch size."""
    flat = x.flatten(1)
    return torch.tanh(flat[:, :C] * 1.7 + flat[:, C : 2 * C]) * 3.0 + flat[:, 2 * C : 3 * C]


class CountingTeacher:
    """Stands for a paid API: counts the images it really saw; optional NaN outputs and delay."""

    def __init__(self, nan_ids: tuple[int, ...] = (), sleep: float = 0.0) -> None:
        self.images = 0
        self.calls = 0
        self.seen: list[int] = []
        self.nan_ids = set(nan_ids)
        self.sleep = sleep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids = ids_of(x)
        self.calls += 1
        self.images += len(ids)
        self.seen.extend(ids)
        if self.sleep:
            time.sleep(self.sleep)
        out = logit_fn(x)
        for i, s in enumerate(ids):
            if s in self.nan_ids:
                out[i, 0] = float("nan")
        return out


def _open(path: Path, **kw) -> TeacherStore:
    return TeacherStore.open(path, fingerprint=kw.pop("fingerprint", FP), dataset="toy", num_classes=C, **kw)


def _expected(ids) -> torch.Tensor:
    return logit_fn(images_fn(torch.as_tensor(ids, dtype=torch.int64)))


# ---------------------------------------------------------------- fill and the budget


def test_fill_pays_once_per_sample(tmp_path: Path) -> None:
    t = CountingTeacher()
    samples = torch.tensor([*range(50), 3, 7, 7, 49])
    with _open(tmp_path / "sub" / "s.sqlite") as s:  # parent directory is created
        assert s.missing(samples, 0).tolist() == list(range(50))
        assert s.fill(samples, 0, images_fn, t, budget=50, batch_size=16) == 50
        assert t.images == 50 and t.calls == 4 and sorted(t.seen) == list(range(50))
        assert s.paid_calls() == 50 and s.count() == 50 and s.count(0) == 50 and s.count(1) == 0
        assert [row[2] for row in s.ledger()] == [16, 16, 16, 2]
        assert s.fill(samples, 0, images_fn, t, budget=50) == 0
        assert s.missing(samples, 0).numel() == 0
    with _open(tmp_path / "sub" / "s.sqlite") as s:  # reopened: still nothing to pay
        assert s.fill(samples, 0, images_fn, t, budget=50) == 0
        assert s.fill(torch.arange(40, 60), 0, images_fn, t, budget=20) == 10
        assert s.fill(torch.arange(5), 1, images_fn, t, budget=5) == 5  # another view is new data
        assert torch.equal(s.logits(torch.arange(60), 0), _expected(range(60)))
    assert t.images == 65


def test_budget_refused_before_any_call(tmp_path: Path) -> None:
    t = CountingTeacher()
    with _open(tmp_path / "s.sqlite") as s:
        with pytest.raises(BudgetExceededError, match="needs 51 teacher outputs but its budget is 50"):
            s.fill(torch.arange(51), 0, images_fn, t, budget=50)
        assert t.images == 0 and s.count() == 0 and s.paid_calls() == 0
        s.fill(torch.arange(51), 0, images_fn, t, budget=51)
        # The budget is the run's n: asking for more distinct samples is refused even if cached.
        with pytest.raises(BudgetExceededError):
            s.fill(torch.arange(51), 0, images_fn, t, budget=50)
        assert t.images == 51


def test_lifetime_max_calls(tmp_path: Path) -> None:
    t = CountingTeacher()
    p = tmp_path / "s.sqlite"
    with _open(p, max_calls=30) as s:
        assert s.fill(torch.arange(20), 0, images_fn, t, budget=100) == 20
        with pytest.raises(BudgetExceededError, match="max_calls=30"):
            s.fill(torch.arange(20, 40), 0, images_fn, t, budget=100)
        assert t.images == 20
        assert s.fill(torch.arange(10, 30), 0, images_fn, t, budget=100) == 10  # exactly reaches the cap
    with _open(p) as s:  # the cap is kept by the store
        assert s.max_calls == 30
        with pytest.raises(BudgetExceededError):
            s.fill(torch.tensor([99]), 0, images_fn, t, budget=100)
    with _open(p, max_calls=40) as s:  # explicitly raised
        assert s.fill(torch.tensor([99]), 0, images_fn, t, budget=100) == 1
    assert t.images == 31


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.integers(0, 30),
    requests=st.lists(
        st.tuples(st.lists(st.integers(0, 39), max_size=40), st.integers(0, 1)), min_size=1, max_size=3
    ),
    batch_size=st.integers(1, 12),
)
def test_budget_property(budget: int, requests: list[tuple[list[int], int]], batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        counting = CountingTeacher()
        teacher = Teacher.from_callable(counting, fingerprint=FP)
        stored: dict[int, set[int]] = {0: set(), 1: set()}
        with _open(Path(d) / "s.sqlite") as s:
            for req, view in requests:
                before, before_seen = counting.images, len(counting.seen)
                wanted = set(req)
                if len(wanted) > budget:
                    with pytest.raises(BudgetExceededError):
                        s.fill(
                            torch.tensor(req, dtype=torch.int64), view, images_fn, teacher, budget, batch_size
                        )
                    assert counting.images == before  # refused with zero calls
                else:
                    paid = s.fill(
                        torch.tensor(req, dtype=torch.int64), view, images_fn, teacher, budget, batch_size
                    )
                    seen = counting.images - before
                    assert seen == paid == len(wanted - stored[view]) <= budget
                    assert sorted(counting.seen[before_seen:]) == sorted(wanted - stored[view])  # never twice
                    stored[view] |= wanted
                for v, ids in stored.items():
                    assert s.count(v) == len(ids)
                    if ids:
                        order = sorted(ids, reverse=True)
                        assert torch.equal(s.logits(torch.tensor(order), v), _expected(order))
            assert s.paid_calls() == counting.images == sum(len(ids) for ids in stored.values())


# ---------------------------------------------------------------- crash safety

_CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
import torch
from test_teacher_store import images_fn, ids_of, logit_fn, FP, C
from ftikd.teacher import TeacherStore

store_path, log_path, n, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def teacher(x):
    with open(log_path, "a") as f:  # log the paid call before returning: the log counts real invocations
        f.write(" ".join(map(str, ids_of(x))) + "\\n")
        f.flush()
        os.fsync(f.fileno())
    time.sleep(0.3)
    return logit_fn(x)

with TeacherStore.open(store_path, fingerprint=FP, dataset="toy", num_classes=C) as s:
    s.fill(torch.arange(n), 0, images_fn, teacher, budget=n, batch_size=bs)
print("finished")
"""


def test_sigkill_loses_at_most_the_batch_in_flight(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    n, bs = 40, 5
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(Path(__file__).parent)))
    store_path, log_path = tmp_path / "s.sqlite", tmp_path / "calls.log"
    proc = subprocess.Popen([sys.executable, str(script), str(store_path), str(log_path), str(n), str(bs)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log_path.exists() and len(log_path.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, "child exited early"
            time.sleep(0.02)
        else:
            pytest.fail("child made no progress")
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    batches = [[int(v) for v in line.split()] for line in log_path.read_text().splitlines()]

    counting = CountingTeacher()
    with _open(store_path) as s:  # the killed store opens fine
        committed = set(s.missing(torch.arange(n), 0).tolist()) ^ set(range(n))
        # Each paid batch is atomic: fully stored or not at all; only the last can be missing.
        for b in batches[:-1]:
            assert set(b) <= committed
        in_flight = [] if set(batches[-1]) <= committed else batches[-1]
        assert not set(in_flight) & committed
        assert committed == {i for b in batches for i in b} - set(in_flight)
        assert s.paid_calls() == len(committed)

        paid = s.fill(torch.arange(n), 0, images_fn, counting, budget=n, batch_size=bs)
        assert paid == counting.images == n - len(committed)
        assert not set(counting.seen) & committed  # nothing committed before the kill was paid again
        assert s.count(0) == n and s.paid_calls() == n
        rows = sqlite3.connect(store_path).execute("SELECT sample FROM outputs WHERE view=0").fetchall()
        assert sorted(r[0] for r in rows) == list(range(n))  # every sample stored exactly once
        assert torch.allclose(s.logits(torch.arange(n), 0), _expected(range(n)))
    total = sum(len(b) for b in batches) + counting.images
    assert total == n + len(in_flight) and len(in_flight) <= bs
    with capsys.disabled():
        print(
            f"\n[sigkill] n={n} batch={bs}: child paid {len(batches)} batches, {len(committed)} samples "
            f"committed, in-flight batch lost={len(in_flight)}; rerun paid {paid}; total invocations={total} "
            f"(waste {total - n})"
        )


def test_concurrent_fillers_never_pay_twice(tmp_path: Path) -> None:
    p = tmp_path / "s.sqlite"
    _open(p).close()
    teachers = [CountingTeacher(sleep=0.02), CountingTeacher(sleep=0.02)]
    requests = [torch.arange(0, 30), torch.arange(15, 45)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with _open(p) as s:
                s.fill(requests[i], 0, images_fn, teachers[i], budget=30, batch_size=5)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    assert not set(teachers[0].seen) & set(teachers[1].seen)
    assert teachers[0].images + teachers[1].images == 45
    with _open(p) as s:
        assert s.count(0) == 45 and s.paid_calls() == 45


def test_concurrent_fillers_respect_max_calls(tmp_path: Path) -> None:
    p = tmp_path / "s.sqlite"
    _open(p, max_calls=20).close()
    teachers = [CountingTeacher(sleep=0.02), CountingTeacher(sleep=0.02)]
    requests = [torch.arange(0, 15), torch.arange(100, 115)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with _open(p) as s:
                s.fill(requests[i], 0, images_fn, teachers[i], budget=15, batch_size=5)
        except BudgetExceededError as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors
    with _open(p) as s:
        assert s.paid_calls() == teachers[0].images + teachers[1].images <= 20


# ---------------------------------------------------------------- refusing bad stores and outputs


def test_store_bound_to_teacher_and_dataset(tmp_path: Path) -> None:
    p = tmp_path / "s.sqlite"
    with _open(p) as s:
        s.fill(torch.arange(3), 0, images_fn, CountingTeacher(), budget=3)
    with pytest.raises(
        FtikdError, match=f"written by teacher {FP} but this teacher is other-v2; use a different"
    ):
        _open(p, fingerprint="other-v2")
    with pytest.raises(FtikdError, match="dataset 'toy', not 'cifar100'"):
        TeacherStore.open(p, FP, "cifar100", C)
    with pytest.raises(FtikdError, match="classes"):
        TeacherStore.open(p, FP, "toy", C + 1)
    with pytest.raises(FtikdError, match="keeps features"):
        _open(p, feature_names=("stage1",))
    with _open(p) as s:  # a teacher object with another fingerprint is refused by fill
        other = Teacher.from_callable(CountingTeacher(), fingerprint="other-v2")
        with pytest.raises(FtikdError, match="other-v2"):
            s.fill(torch.arange(5), 0, images_fn, other, budget=5)
        assert s.count() == 3


def test_corrupt_store_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(np.random.default_rng(0).bytes(8192))
    with pytest.raises(FtikdError, match="not a valid ftikd teacher store"):
        _open(junk)
    assert junk.stat().st_size == 8192  # not overwritten

    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE stuff (a)")
    con.commit()
    con.close()
    with pytest.raises(FtikdError, match="missing tables"):
        _open(foreign)

    old = tmp_path / "old.sqlite"
    _open(old).close()
    con = sqlite3.connect(old)
    con.execute("UPDATE meta SET value='0' WHERE key='format_version'")
    con.commit()
    con.close()
    with pytest.raises(FtikdError, match="format version 0"):
        _open(old)


def test_failed_creation_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "s.sqlite"
    monkeypatch.setattr(store_mod, "_SCHEMA", (*store_mod._SCHEMA[:3], "CREATE TABLE ledger (broken"))
    with pytest.raises(FtikdError):
        _open(p)
    assert not p.exists()
    monkeypatch.undo()
    with _open(p) as s:
        assert s.count() == 0


def test_nan_output_refused_and_nothing_stored(tmp_path: Path) -> None:
    bad = CountingTeacher(nan_ids=(13,))
    with _open(tmp_path / "s.sqlite") as s:
        with pytest.raises(FtikdError, match=r"non-finite logits.*13.*nothing was stored") as e:
            s.fill(torch.arange(20), 0, images_fn, bad, budget=20, batch_size=8)
        assert "\n" not in str(e.value)
        assert bad.images == 16  # first batch committed, second refused, third never requested
        assert s.count(0) == 8 and s.missing(torch.arange(20), 0).tolist() == list(range(8, 20))
        assert s.paid_calls() == 16  # the refused calls were paid: they are in the ledger
        assert "refused" in s.ledger()[-1][3]
        good = CountingTeacher()
        assert s.fill(torch.arange(20), 0, images_fn, good, budget=20, batch_size=8) == 12
        assert torch.equal(s.logits(torch.arange(20), 0), _expected(range(20)))


def test_wrong_logits_shape_refused(tmp_path: Path) -> None:
    with _open(tmp_path / "s.sqlite") as s:
        with pytest.raises(FtikdError, match=r"expected \(4, 10\)"):
            s.fill(torch.arange(4), 0, images_fn, lambda x: torch.zeros(x.shape[0], C + 1), budget=4)
        with pytest.raises(FtikdError, match="shape"):
            wrapped = Teacher.from_callable(lambda x: torch.zeros(3), fingerprint=FP)
            s.fill(torch.arange(4), 0, images_fn, wrapped, budget=4)
        assert s.count() == 0


# ---------------------------------------------------------------- reading


def test_logits_order_preserved(tmp_path: Path) -> None:
    with _open(tmp_path / "s.sqlite") as s:
        s.fill(torch.arange(100), 0, images_fn, CountingTeacher(), budget=100, batch_size=32)
        req = torch.randperm(100, generator=torch.Generator().manual_seed(0))
        req = torch.cat([req, req[:7]])  # duplicates are fine
        got = s.logits(req, 0)
        assert got.dtype == torch.float32 and got.shape == (107, C)
        assert torch.equal(got, _expected(req))
        assert s.logits(torch.tensor([], dtype=torch.int64), 0).shape == (0, C)
        with pytest.raises(FtikdError, match="no teacher logits for 1 requested samples"):
            s.logits(torch.tensor([5, 100]), 0)
        with pytest.raises(FtikdError):
            s.logits(torch.tensor([5]), 1)


def test_load_50k_logits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    n, classes = 50_000, 100

    def cheap_images(ids: torch.Tensor) -> torch.Tensor:
        return ids.to(torch.float32).reshape(-1, 1, 1, 1)

    def cheap_teacher(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1) * 1e-3 + torch.arange(classes, dtype=torch.float32)

    with TeacherStore.open(tmp_path / "big.sqlite", FP, "toy", classes) as s:
        t0 = time.perf_counter()
        s.fill(torch.arange(n), 0, cheap_images, cheap_teacher, budget=n, batch_size=10_000)
        t_fill = time.perf_counter() - t0
        req = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        got = s.logits(req, 0)
        t_load = time.perf_counter() - t0
    assert got.shape == (n, classes)
    assert torch.equal(got, cheap_teacher(cheap_images(req)))
    with capsys.disabled():
        print(f"\n[store] fill 50k x 100: {t_fill:.2f}s; load 50k x 100 logits (shuffled): {t_load:.3f}s")


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = C) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor, with_features: bool = False) -> ModelOutput:
        s1 = torch.relu(self.conv(x))
        emb = s1.mean(dim=(2, 3))
        return ModelOutput(self.fc(emb), {"stage1": s1, "embedding": emb} if with_features else {})


ARCH = "_test_tiny_store"
if ARCH not in available_models():
    register_model(ARCH)(TinyNet)


def test_features_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    names = ("stage1", "embedding")
    teacher = Teacher.from_module(net)  # no features requested: fill asks for the store's features
    with TeacherStore.open(tmp_path / "f.sqlite", teacher.fingerprint, "toy", C, feature_names=names) as s:
        s.fill(torch.arange(12), 2, images_fn, teacher, budget=12, batch_size=5)
        assert s.feature_shapes() == {"stage1": (4, 4, 4), "embedding": (4,)}
        req = torch.tensor([11, 0, 5, 5])
        ref = net(images_fn(req), with_features=True)
        assert torch.allclose(s.logits(req, 2), ref.logits)
        assert torch.allclose(s.features(req, 2, "stage1"), ref.features["stage1"])
        assert torch.allclose(s.features(req, 2, "embedding"), ref.features["embedding"])
        with pytest.raises(FtikdError, match="keeps features"):
            s.features(req, 2, "stage2")
    with TeacherStore.open(tmp_path / "f.sqlite", teacher.fingerprint, "toy", C) as s:  # subset is fine
        assert s.feature_names == names


# ---------------------------------------------------------------- the Teacher wrapper


def test_teacher_from_module_and_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = TinyNet()
    net.train()
    x = images_fn(torch.arange(6))
    t = Teacher.from_module(net, feature_names=("embedding",))
    out = t(x)
    assert isinstance(out, TeacherOutput) and out.logits.shape == (6, C) and not out.logits.requires_grad
    assert set(out.features) == {"embedding"}
    assert net.training  # mode restored after the eval-mode call
    assert t.fingerprint == state_fingerprint(net)
    path = tmp_path / "t.safetensors"
    save_checkpoint(net, path, {"arch": ARCH, "in_channels": 3, "num_classes": C, "dataset": "toy"})
    t2 = Teacher.from_checkpoint(path)
    assert t2.fingerprint == t.fingerprint  # same weights, same store
    assert torch.allclose(t2(x).logits, out.logits)
    assert as_teacher(str(path)).fingerprint == t.fingerprint
    assert as_teacher(path, fingerprint=t.fingerprint).fingerprint == t.fingerprint
    assert as_teacher(net).fingerprint == t.fingerprint
    assert as_teacher(t) is t
    assert set(as_teacher(t, feature_names=("stage1",))(x).features) == {"stage1"}
    with pytest.raises(FtikdError, match="did not return feature 'stage9'"):
        Teacher.from_module(net, feature_names=("stage9",))(x)
    with pytest.raises(FtikdError, match="expected"):
        as_teacher(net, fingerprint="something-else")


def test_teacher_plain_module_and_callables() -> None:
    x = images_fn(torch.arange(3))
    seq = nn.Sequential(nn.Flatten(), nn.Linear(48, C))
    t = as_teacher(seq)
    assert t(x).logits.shape == (3, C)
    with pytest.raises(FtikdError, match="fingerprint"):
        Teacher.from_callable(logit_fn, fingerprint=None)
    with pytest.raises(FtikdError, match="fingerprint"):
        as_teacher(logit_fn)
    t_np = as_teacher(lambda b: logit_fn(b).numpy().astype(np.float64), fingerprint="api-2026-01")
    out = t_np(x)
    assert out.logits.dtype == torch.float32 and torch.allclose(out.logits, logit_fn(x))
    t_dict = Teacher.from_callable(
        lambda b: {"logits": logit_fn(b), "embedding": b.flatten(1)},
        "api-2026-01",
        feature_names=("embedding",),
    )
    assert t_dict(x).features["embedding"].shape == (3, 48)
    with pytest.raises(FtikdError, match="batch"):
        Teacher.from_callable(lambda b: logit_fn(b)[:2], "api")(x)
    with pytest.raises(FtikdError, match="'logits'"):
        Teacher.from_callable(lambda b: {"probs": logit_fn(b)}, "api")(x)
    with pytest.raises(TypeError):
        as_teacher(42)


def test_writer_waits_for_lock_then_gives_up_only_without_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "_BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(store_mod, "_STALL_S", 0.4)
    p = tmp_path / "s.sqlite"
    _open(p).close()

    def hold_lock(seconds: float) -> threading.Thread:
        ready = threading.Event()

        def run() -> None:
            con = sqlite3.connect(p, isolation_level=None)
            con.execute("BEGIN IMMEDIATE")
            ready.set()
            time.sleep(seconds)
            con.execute("COMMIT")
            con.close()

        th = threading.Thread(target=run)
        th.start()
        ready.wait(10)
        return th

    t = CountingTeacher()
    with _open(p) as s:
        th = hold_lock(0.25)  # longer than one busy timeout, shorter than the stall limit
        assert s.fill(torch.arange(4), 0, images_fn, t, budget=4) == 4
        th.join()
        th = hold_lock(1.5)  # a holder that makes no progress: give up with a clear error
        with pytest.raises(FtikdError, match="locked by another process"):
            s.fill(torch.arange(8), 0, images_fn, t, budget=8)
        th.join()
        assert t.images == 4 and s.count() == 4
