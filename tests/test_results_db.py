"""The results database: atomic claims across real processes, reclaiming dead claimers, SIGKILLed sweeps."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from ftikd.experiments.db import JobRow, ResultsDB

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def jobs(count: int) -> list[JobRow]:
    return [
        JobRow(f"k{i:03d}", "kd", "kd", {}, "a->b", "digits", 80, i, 0.05, {"i": i}) for i in range(count)
    ]


def test_add_jobs_is_idempotent_and_counts(tmp_path):
    with ResultsDB(tmp_path / "r.sqlite") as db:
        assert db.add_jobs("s", jobs(5)) == 5
        assert db.add_jobs("s", jobs(7)) == 2  # only the two new keys
        assert db.add_jobs("other", jobs(3)) == 0  # a second sweep shares the rows
        assert db.counts("s") == {"pending": 7, "running": 0, "done": 0, "failed": 0}
        assert db.counts("other")["pending"] == 3 and db.sweeps() == ["other", "s"]
        assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_finish_and_fail_record_the_row(tmp_path):
    with ResultsDB(tmp_path / "r.sqlite") as db:
        db.add_jobs("s", jobs(2))
        first = db.claim("s", "h:1")
        assert first["key"] == "k000" and first["attempts"] == 1
        record = {
            "metrics": {"best_val_acc": 50.0, "test_top1": 40.0},
            "teacher_calls": {"paid_this_run": 80, "outputs_used": 80},
            "wall_time_s": 1.5,
        }
        db.finish("k000", record)
        db.claim("s", "h:1")
        db.fail("k001", "ValueError: boom")
        assert db.claim("s", "h:1") is None  # failed runs wait for retry_failed
        assert db.claim("s", "h:1", retry_failed=True)["key"] == "k001"
        done = db.rows("s", "done")[0]
        assert (done["test_top1"], done["calls_paid"], done["wall_s"]) == (40.0, 80, 1.5)
        assert db.records("s") == [record]


def test_stale_heartbeat_and_dead_pid_are_reclaimed(tmp_path):
    me = f"{socket.gethostname()}:{os.getpid()}"
    with ResultsDB(tmp_path / "r.sqlite") as db:
        db.add_jobs("s", jobs(2))
        db.claim("s", "elsewhere:1")  # another host, fresh heartbeat
        assert db.claim("s", "elsewhere:2")["key"] == "k001"
        assert db.claim("s", me, stale_s=60) is None  # both claimers alive as far as we know
        time.sleep(0.05)
        again = db.claim("s", me, stale_s=0.01)  # stale heartbeat: taken over
        assert again["key"] == "k000" and again["attempts"] == 2
        assert db.heartbeat("k000", me) and not db.heartbeat("k000", "elsewhere:1")
        # a claimer on this host whose pid is gone is dead at once, whatever its heartbeat
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        db.add_jobs("s", [JobRow("z", "kd", "kd", {}, "a->b", "digits", 80, 9, 0.05, {})])
        assert db.claim("s", f"{socket.gethostname()}:{dead.pid}")["key"] == "z"
        row = db.claim("s", me, stale_s=60)
        assert row["key"] == "z" and row["claimed_by"] == me


def test_a_dead_claimers_run_is_taken_before_pending_runs(tmp_path):
    """A half-done run (it may have a checkpoint) is resumed before a new run starts."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with ResultsDB(tmp_path / "r.sqlite") as db:
        db.add_jobs("s", jobs(3))
        db.claim("s", "elsewhere:1")  # k000, alive
        db.claim("s", f"{socket.gethostname()}:{dead.pid}")  # k001, its claimer is gone
        me = f"{socket.gethostname()}:{os.getpid()}"
        assert db.claim("s", me, stale_s=60)["key"] == "k001"  # not k002, the next pending run
        assert db.claim("s", me, stale_s=60)["key"] == "k002"
        assert db.claim("s", me, stale_s=60) is None


CLAIMER = """
import sys
from ftikd.experiments.db import ResultsDB
with ResultsDB(sys.argv[1]) as db:
    while (row := db.claim("s", f"host:{sys.argv[2]}", stale_s=1e9)) is not None:
        db.finish(row["key"], {"metrics": {"best_val_acc": 1.0, "test_top1": 1.0}, "wall_time_s": 0})
        print(row["key"], flush=True)
"""


def test_concurrent_claimers_never_take_one_run_twice(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultsDB(path) as db:
        db.add_jobs("s", jobs(40))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(path), str(i)], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    taken = [p.communicate(timeout=60)[0].split() for p in procs]
    flat = [k for keys in taken for k in keys]
    assert sorted(flat) == [f"k{i:03d}" for i in range(40)]  # every run once, none twice
    with ResultsDB(path) as db:
        assert {r["attempts"] for r in db.rows("s")} == {1}


def sweep_file(tmp_path, teacher, epochs):
    """A 4-run digits sweep whose runs train ``epochs`` pseudo-epochs each."""
    spec = {
        "name": "kill",
        "dataset": "digits",
        "pairs": [{"teacher": "resnet8", "student": "resnet8", "teacher_path": str(teacher)}],
        "methods": ["ce", "kd"],
        "budgets": [80],
        "seeds": [1, 2],
        "lrs": [0.05],
        "train": {"max_epochs": epochs, "patience": 50, "phases": 1},
        "out": str(tmp_path / "sweep"),
    }
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, tmp_path / "sweep" / "results.sqlite"


def start(yaml_path):
    cmd = [sys.executable, "-m", "ftikd", "sweep", str(yaml_path), "--no-progress"]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def procs():
    """Sweep processes started by a test; any still alive at its end are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sigkilled_sweep_resumes_and_repeats_nothing(tmp_path, digits_teacher, procs):
    yaml_path, db_path = sweep_file(tmp_path, digits_teacher, 5)
    proc = start(yaml_path)
    procs.append(proc)

    def one_done_one_checkpointed():
        if not db_path.exists():
            return False
        with ResultsDB(db_path) as db:
            done, running = db.rows("kill", "done"), db.rows("kill", "running")
            states = [list((db_path.parent / "runs" / r["key"]).glob("*.state.pt")) for r in running]
            return bool(done) and any(states)

    assert wait_for(one_done_one_checkpointed, proc), proc.stderr.read() if proc.poll() is not None else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with ResultsDB(db_path) as db:
        before = {r["key"]: r["finished"] for r in db.rows("kill", "done")}
        killed = db.rows("kill", "running")[0]["key"]
    second = start(yaml_path)  # killed again at a random moment (it may be loading, training or saving)
    procs.append(second)
    time.sleep(random.Random(os.getpid()).uniform(0.5, 4.0))
    second.send_signal(signal.SIGKILL)
    second.wait()
    last = start(yaml_path)
    procs.append(last)
    assert last.wait(timeout=120) == 0, last.stderr.read()
    with ResultsDB(db_path) as db:
        rows = {r["key"]: r for r in db.rows("kill")}
    assert all(r["status"] == "done" for r in rows.values()) and len(rows) == 4
    for key, finished in before.items():  # finished runs were not run again
        assert rows[key]["attempts"] == 1 and rows[key]["finished"] == finished
    assert rows[killed]["attempts"] >= 2 and rows[killed]["resumed"] >= 1  # continued from its checkpoint
    assert sum(r["attempts"] for r in rows.values()) <= 4 + 2  # at most the runs in flight were retaken
    history = json.loads(rows[killed]["record"])["history"]
    assert [h["epoch"] for h in history] == list(range(1, 6))  # no epoch lost or repeated
    assert not list((db_path.parent / "runs").glob("*/*.state.pt"))


def test_two_sweeps_on_one_database_share_the_work(tmp_path, digits_teacher, procs):
    yaml_path, db_path = sweep_file(tmp_path, digits_teacher, 2)
    procs.extend([start(yaml_path), start(yaml_path)])
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    with ResultsDB(db_path) as db:
        rows = db.rows("kill")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    assert {r["attempts"] for r in rows} == {1}  # no config ran twice


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads worker states from /proc")
def test_sigterm_to_a_sweep_stops_its_worker_pool(tmp_path, digits_teacher, procs):
    yaml_path, db_path = sweep_file(tmp_path, digits_teacher, 10**4)
    spec = yaml.safe_load(yaml_path.read_text())
    spec["train"]["patience"] = 10**4  # runs that would train for many minutes
    yaml_path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "ftikd", "sweep", str(yaml_path), "--no-progress", "--workers", "2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs.append(proc)

    def both_workers_running():
        if not db_path.exists():
            return False
        with ResultsDB(db_path) as db:
            return len(db.rows("kill", "running")) == 2

    assert wait_for(both_workers_running, proc, timeout=120), proc.stderr.read() if proc.poll() else ""
    with ResultsDB(db_path) as db:
        workers = [int(r["claimed_by"].rsplit(":", 1)[1]) for r in db.rows("kill", "running")]
    assert proc.pid not in workers
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)  # before, they trained on with their parent gone
