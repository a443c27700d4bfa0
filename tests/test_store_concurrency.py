"""Two OS processes filling one TeacherStore at the same time.

Each process runs a small script (written to tmp_path) whose slow teacher appends every invocation's
sample ids to its own log file (fsynced before returning). Whatever the interleaving, the union of
the logs must hold no sample twice, a shared ``max_calls`` must hold for both processes together, and
the store must end with every requested sample stored once.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftikd.teacher import TeacherStore

C = 4
FP = "concurrency-teacher-v1"

_CHILD = """
import json, os, sys, time
from pathlib import Path

import torch

from ftikd.errors import BudgetExceededError
from ftikd.teacher import TeacherStore

store, log, ready, go, first, last, batch, order = sys.argv[1:9]
first, last, batch = int(first), int(last), int(batch)
ids = torch.arange(first, last)
if order == "desc":
    ids = ids.flip(0)


def images_fn(ids):
    x = torch.zeros(len(ids), 1, 1, 2)
    x[:, 0, 0, 0] = ids.float()
    return x


def teacher(x):
    ids = x[:, 0, 0, 0].round().long().tolist()
    with open(log, "a") as f:  # the paid call is on record before the teacher returns
        f.write(json.dumps({{"t": time.time(), "ids": ids}}) + "\\n")
        f.flush()
        os.fsync(f.fileno())
    time.sleep(0.04)
    return x[:, 0, 0, 0:1] * 0.5 + torch.arange({classes}, dtype=torch.float32)


with TeacherStore.open(store, "{fp}", "toy", {classes}) as s:
    Path(ready).touch()
    deadline = time.monotonic() + 60
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    paid = 0
    try:
        # one fill call per batch, as a lazily filling training loop would: between calls the other
        # process can take the write lock, so the two interleave over the shared samples
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            paid += s.fill(chunk, 0, images_fn, teacher, budget=len(chunk), batch_size=batch)
            time.sleep(0.01)
    except BudgetExceededError as e:
        print("budget-exceeded:", e)
        sys.exit(3)
print("paid", paid)
"""


def _expected(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.float32)[:, None] * 0.5 + torch.arange(C, dtype=torch.float32)


def _run_pair(tmp_path: Path, ranges: list[tuple[int, int]], batch: int) -> list[dict]:
    """Start one process per sample range, release them together, return their outcomes.

    The first process walks its range upwards and the second downwards, so they collide on the
    shared samples from both ends.
    """
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(fp=FP, classes=C))
    store, go = tmp_path / "store.sqlite", tmp_path / "go"
    procs = []
    for i, (first, last) in enumerate(ranges):
        log, ready = tmp_path / f"calls-{i}.log", tmp_path / f"ready-{i}"
        order = "asc" if i == 0 else "desc"
        args = [str(store), str(log), str(ready), str(go), str(first), str(last), str(batch), order]
        proc = subprocess.Popen(
            [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        procs.append((proc, log, ready))
    deadline = time.monotonic() + 60
    while not all(ready.exists() for _, _, ready in procs):  # both have imported torch, opened the store
        assert all(p.poll() is None for p, _, _ in procs), [p.communicate() for p, _, _ in procs]
        assert time.monotonic() < deadline, "children never became ready"
        time.sleep(0.01)
    go.touch()
    outcomes = []
    for proc, log, _ in procs:
        out, err = proc.communicate(timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        outcomes.append({"rc": proc.returncode, "out": out, "err": err, "calls": calls})
    return outcomes


def _stored_rows(store: Path) -> list[tuple[int, int]]:
    con = sqlite3.connect(store)
    try:
        return con.execute("SELECT sample, COUNT(*) FROM outputs WHERE view=0 GROUP BY sample").fetchall()
    finally:
        con.close()


def _switches(outcomes: list[dict]) -> int:
    """How often consecutive teacher invocations (by time) came from different processes."""
    events = sorted((c["t"], i) for i, o in enumerate(outcomes) for c in o["calls"])
    return sum(a[1] != b[1] for a, b in zip(events, events[1:], strict=False))


def test_two_processes_never_pay_twice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ranges = [(0, 40), (20, 60)]  # 20 samples requested by both; the store is created by the race
    outcomes = _run_pair(tmp_path, ranges, batch=5)
    for o in outcomes:
        assert o["rc"] == 0 and "Traceback" not in o["err"], o
    paid = [[s for c in o["calls"] for s in c["ids"]] for o in outcomes]
    union = [s for ids in paid for s in ids]
    assert len(union) == len(set(union)), "a sample was paid twice"
    assert set(union) == set(range(0, 60))
    rows = _stored_rows(tmp_path / "store.sqlite")
    assert sorted(s for s, _ in rows) == list(range(60)) and all(n == 1 for _, n in rows)
    with TeacherStore.open(tmp_path / "store.sqlite", FP, "toy", C) as s:
        assert s.paid_calls() == len(union) == 60
        assert torch.equal(s.logits(torch.arange(60), 0), _expected(list(range(60))))
    with capsys.disabled():
        print(
            f"\n[concurrency] requests {ranges}: process A paid {len(paid[0])}, B paid {len(paid[1])}, "
            f"union {len(set(union))}, duplicates {len(union) - len(set(union))}, "
            f"A/B alternations {_switches(outcomes)}"
        )


def test_two_processes_share_max_calls(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cap = 40
    TeacherStore.open(tmp_path / "store.sqlite", FP, "toy", C, max_calls=cap).close()
    ranges = [(0, 30), (20, 50)]  # 50 distinct samples wanted, only 40 calls allowed in total
    outcomes = _run_pair(tmp_path, ranges, batch=5)
    codes = sorted(o["rc"] for o in outcomes)
    assert codes in ([0, 3], [3, 3]), outcomes  # at least one refused, cleanly
    for o in outcomes:
        assert "Traceback" not in o["err"], o["err"]
        if o["rc"] == 3:
            assert "max_calls=40" in o["out"]
    paid = [[s for c in o["calls"] for s in c["ids"]] for o in outcomes]
    union = [s for ids in paid for s in ids]
    assert len(union) == len(set(union)) <= cap
    rows = _stored_rows(tmp_path / "store.sqlite")
    assert all(n == 1 for _, n in rows) and {s for s, _ in rows} == set(union)
    with TeacherStore.open(tmp_path / "store.sqlite", FP, "toy", C) as s:
        assert s.paid_calls() == len(union) <= cap
        done = [i for i, o in enumerate(outcomes) if o["rc"] == 0]
        for i in done:  # a process that finished has all of its samples stored
            assert not s.missing(torch.arange(*ranges[i]), 0).numel()
    with capsys.disabled():
        print(
            f"\n[concurrency] max_calls={cap}, requests {ranges}: A paid {len(paid[0])} "
            f"(rc {outcomes[0]['rc']}), B paid {len(paid[1])} (rc {outcomes[1]['rc']}), "
            f"store paid {len(union)}, duplicates {len(union) - len(set(union))}, "
            f"A/B alternations {_switches(outcomes)}"
        )
