"""TeacherStore safety: crashes lose at most the batch in flight, concurrent fillers never pay twice,
bad stores and outputs are refused, a held lock is waited for."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from store_fakes import FP, C, CountingTeacher, expected, images_fn, open_store

import ftikd.teacher.store_sql as store_mod
from ftikd.errors import BudgetExceededError, FtikdError
from ftikd.teacher import (
    Teacher,
    TeacherStore,
)

# ---------------------------------------------------------------- crash safety

_CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
import torch
from store_fakes import images_fn, ids_of, logit_fn, FP, C
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
    with open_store(store_path) as s:  # the killed store opens fine
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
        assert torch.allclose(s.logits(torch.arange(n), 0), expected(range(n)))
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
    open_store(p).close()
    teachers = [CountingTeacher(sleep=0.02), CountingTeacher(sleep=0.02)]
    requests = [torch.arange(0, 30), torch.arange(15, 45)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with open_store(p) as s:
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
    with open_store(p) as s:
        assert s.count(0) == 45 and s.paid_calls() == 45


def test_concurrent_fillers_respect_max_calls(tmp_path: Path) -> None:
    p = tmp_path / "s.sqlite"
    open_store(p, max_calls=20).close()
    teachers = [CountingTeacher(sleep=0.02), CountingTeacher(sleep=0.02)]
    requests = [torch.arange(0, 15), torch.arange(100, 115)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with open_store(p) as s:
                s.fill(requests[i], 0, images_fn, teachers[i], budget=15, batch_size=5)
        except BudgetExceededError as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors
    with open_store(p) as s:
        assert s.paid_calls() == teachers[0].images + teachers[1].images <= 20


# ---------------------------------------------------------------- refusing bad stores and outputs


def test_store_bound_to_teacher_and_dataset(tmp_path: Path) -> None:
    p = tmp_path / "s.sqlite"
    with open_store(p) as s:
        s.fill(torch.arange(3), 0, images_fn, CountingTeacher(), budget=3)
    with pytest.raises(
        FtikdError, match=f"written by teacher {FP} but this teacher is other-v2; use a different"
    ):
        open_store(p, fingerprint="other-v2")
    with pytest.raises(FtikdError, match="dataset 'toy', not 'cifar100'"):
        TeacherStore.open(p, FP, "cifar100", C)
    with pytest.raises(FtikdError, match="classes"):
        TeacherStore.open(p, FP, "toy", C + 1)
    with pytest.raises(FtikdError, match="keeps features"):
        open_store(p, feature_names=("stage1",))
    with open_store(p) as s:  # a teacher object with another fingerprint is refused by fill
        other = Teacher.from_callable(CountingTeacher(), fingerprint="other-v2")
        with pytest.raises(FtikdError, match="other-v2"):
            s.fill(torch.arange(5), 0, images_fn, other, budget=5)
        assert s.count() == 3


def test_corrupt_store_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(np.random.default_rng(0).bytes(8192))
    with pytest.raises(FtikdError, match="not a valid ftikd teacher store"):
        open_store(junk)
    assert junk.stat().st_size == 8192  # not overwritten

    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE stuff (a)")
    con.commit()
    con.close()
    with pytest.raises(FtikdError, match="missing tables"):
        open_store(foreign)

    old = tmp_path / "old.sqlite"
    open_store(old).close()
    con = sqlite3.connect(old)
    con.execute("UPDATE meta SET value='0' WHERE key='format_version'")
    con.commit()
    con.close()
    with pytest.raises(FtikdError, match="format version 0"):
        open_store(old)


def test_failed_creation_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "s.sqlite"
    monkeypatch.setattr(store_mod, "_SCHEMA", (*store_mod._SCHEMA[:3], "CREATE TABLE ledger (broken"))
    with pytest.raises(FtikdError):
        open_store(p)
    assert not p.exists()
    monkeypatch.undo()
    with open_store(p) as s:
        assert s.count() == 0


def test_nan_output_refused_and_nothing_stored(tmp_path: Path) -> None:
    bad = CountingTeacher(nan_ids=(13,))
    with open_store(tmp_path / "s.sqlite") as s:
        with pytest.raises(FtikdError, match=r"non-finite logits.*13.*nothing was stored") as e:
            s.fill(torch.arange(20), 0, images_fn, bad, budget=20, batch_size=8)
        assert "\n" not in str(e.value)
        assert bad.images == 16  # first batch committed, second refused, third never requested
        assert s.count(0) == 8 and s.missing(torch.arange(20), 0).tolist() == list(range(8, 20))
        assert s.paid_calls() == 16  # the refused calls were paid: they are in the ledger
        assert "refused" in s.ledger()[-1][3]
        good = CountingTeacher()
        assert s.fill(torch.arange(20), 0, images_fn, good, budget=20, batch_size=8) == 12
        assert torch.equal(s.logits(torch.arange(20), 0), expected(range(20)))


def test_wrong_logits_shape_refused(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.sqlite") as s:
        with pytest.raises(FtikdError, match=r"expected \(4, 10\)"):
            s.fill(torch.arange(4), 0, images_fn, lambda x: torch.zeros(x.shape[0], C + 1), budget=4)
        with pytest.raises(FtikdError, match="shape"):
            wrapped = Teacher.from_callable(lambda x: torch.zeros(3), fingerprint=FP)
            s.fill(torch.arange(4), 0, images_fn, wrapped, budget=4)
        assert s.count() == 0


def test_writer_waits_for_lock_then_gives_up_only_without_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "_BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(store_mod, "_STALL_S", 0.4)
    p = tmp_path / "s.sqlite"
    open_store(p).close()

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
    with open_store(p) as s:
        th = hold_lock(0.25)  # longer than one busy timeout, shorter than the stall limit
        assert s.fill(torch.arange(4), 0, images_fn, t, budget=4) == 4
        th.join()
        th = hold_lock(1.5)  # a holder that makes no progress: give up with a clear error
        with pytest.raises(FtikdError, match="locked by another process"):
            s.fill(torch.arange(8), 0, images_fn, t, budget=8)
        th.join()
        assert t.images == 4 and s.count() == 4
