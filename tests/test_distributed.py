"""Data-parallel teacher caching: rank sharding, shard-store merging, and real torchrun runs (gloo, CPU)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftikd.cli import main
from ftikd.data import load_dataset
from ftikd.distributed import DistContext, dist_context, shard_indices
from ftikd.errors import BudgetExceededError, FtikdError
from ftikd.experiments.teacher_outputs import teacher_view_images
from ftikd.teacher import Teacher, TeacherStore

C = 4
FP = "merge-teacher-v1"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def images_fn(ids: torch.Tensor) -> torch.Tensor:
    """A (B, 1, 1, 2) 'image' per sample carrying its id."""
    return torch.stack([ids.float(), ids.float() * 0.5], dim=1).reshape(-1, 1, 1, 2)


def teacher(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Deterministic per-sample logits and one feature."""
    v = x[:, 0, 0, :1]
    return {"logits": torch.sin(v * 0.3 + torch.arange(C)), "f": torch.cos(v * 0.7 + torch.arange(3))}


def _open(path: Path, fingerprint: str = FP, dataset: str = "toy", classes: int = C, **kw) -> TeacherStore:
    return TeacherStore.open(path, fingerprint, dataset, classes, feature_names=("f",), **kw)


def _filled(path: Path, ids, **kw) -> Path:
    with _open(path, **kw) as s:
        s.fill(torch.as_tensor(ids), 0, images_fn, teacher, budget=len(ids), batch_size=7)
    return path


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_indices_cover_all_disjoint_balanced(world: int) -> None:
    for n in range(13):
        ids = torch.randperm(n)
        shards = [shard_indices(ids, DistContext(r, world, r)) for r in range(world)]
        assert torch.equal(torch.cat(shards), ids)  # in order, so together they cover ids exactly once
        sizes = [s.numel() for s in shards]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_dist_context_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist_context() == DistContext(0, 1, 0) and dist_context().is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_context() == DistContext(3, 4, 1) and not dist_context().is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(FtikdError, match="inconsistent torchrun environment"):
        dist_context()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(FtikdError, match="RANK='x' is not an integer"):
        dist_context()


# ---------------------------------------------------------------- merging


def test_merge_equals_single_store_and_is_idempotent(tmp_path: Path) -> None:
    ids = torch.randperm(50)
    single = _filled(tmp_path / "single.sqlite", ids)
    shards = [_filled(tmp_path / f"s{r}.sqlite", shard_indices(ids, DistContext(r, 3, r))) for r in range(3)]
    with _open(tmp_path / "main.sqlite") as main_store, _open(single) as ref:
        assert [main_store.merge_from(p) for p in shards] == [17, 17, 16]
        assert torch.equal(main_store.logits(ids, 0), ref.logits(ids, 0))
        assert torch.equal(main_store.features(ids, 0, "f"), ref.features(ids, 0, "f"))
        assert main_store.feature_shapes() == ref.feature_shapes() == {"f": (3,)}
        assert main_store.paid_calls() == ref.paid_calls() == 50
        notes = [row[3] for row in main_store.ledger()]
        assert len(notes) == 9 and all(n.startswith("merged from s") for n in notes)
        for p in shards:  # again: nothing added, nothing counted twice
            assert main_store.merge_from(p) == 0
        assert main_store.paid_calls() == 50 and main_store.count() == 50
        with _open(shards[0]) as s0:  # a shard paid further is merged incrementally
            s0.fill(torch.arange(50, 60), 0, images_fn, teacher, budget=10)
        assert main_store.merge_from(shards[0]) == 10
        assert main_store.paid_calls() == 60 and main_store.count() == 60


def test_merge_keeps_existing_rows(tmp_path: Path) -> None:
    main_path = _filled(tmp_path / "main.sqlite", range(10))
    with _open(main_path) as s:
        before = s.logits(torch.arange(10), 0)
    shard = _filled(tmp_path / "shard.sqlite", range(5, 15))
    con = sqlite3.connect(shard)  # a shard row that disagrees with the stored one: the stored row wins
    con.execute("UPDATE outputs SET logits=? WHERE sample=5", (bytes(4 * C),))
    con.commit()
    con.close()
    with _open(main_path) as s:
        assert s.merge_from(shard) == 5
        assert torch.equal(s.logits(torch.arange(10), 0), before)
        assert s.count() == 15
        assert s.paid_calls() == 20  # the ledger tells what was paid, overlap included


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"fingerprint": "other-teacher"}, "holds teacher other-teacher"),
        ({"dataset": "other"}, "holds dataset other"),
        ({"classes": 5}, "holds number of classes 5"),
    ],
)
def test_merge_refuses_a_foreign_shard(tmp_path: Path, kw: dict, needle: str) -> None:
    main_path = _filled(tmp_path / "main.sqlite", range(4))
    shard = tmp_path / "shard.sqlite"
    with TeacherStore.open(
        shard,
        kw.get("fingerprint", FP),
        kw.get("dataset", "toy"),
        kw.get("classes", C),
        feature_names=("f",),
    ):
        pass
    with _open(main_path) as s:
        with pytest.raises(FtikdError, match=needle) as e:
            s.merge_from(shard)
        assert len(str(e.value).splitlines()) == 1 and "merge it into a store with the same" in str(e.value)
        assert s.count() == 4 and s.paid_calls() == 4


def test_merge_refuses_other_features_copies_and_missing_files(tmp_path: Path) -> None:
    main_path = _filled(tmp_path / "main.sqlite", range(4))
    TeacherStore.open(tmp_path / "nofeat.sqlite", FP, "toy", C).close()
    shutil.copy(main_path, tmp_path / "copy.sqlite")
    with _open(main_path) as s:
        with pytest.raises(FtikdError, match="holds features"):
            s.merge_from(tmp_path / "nofeat.sqlite")
        with pytest.raises(FtikdError, match="is a copy of store"):
            s.merge_from(tmp_path / "copy.sqlite")
        with pytest.raises(FtikdError, match="does not exist"):
            s.merge_from(tmp_path / "absent.sqlite")
        with pytest.raises(FtikdError, match="into itself"):
            s.merge_from(s)
        assert s.paid_calls() == 4


def test_merge_gives_an_id_to_a_store_without_one(tmp_path: Path) -> None:
    shard = _filled(tmp_path / "old.sqlite", range(6))
    con = sqlite3.connect(shard)  # as written before stores had ids
    con.execute("DELETE FROM meta WHERE key='store_id'")
    con.commit()
    con.close()
    with _open(tmp_path / "main.sqlite") as s:
        assert s.merge_from(shard) == 6 and s.merge_from(shard) == 0
        assert s.paid_calls() == 6


_KILLED_MERGE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_distributed import _open

with _open({main!r}) as s:
    conn, start = s._conn, s._conn.total_changes
    # SIGKILL ourselves inside the merge transaction, once the outputs are inserted but not committed.
    conn.set_progress_handler(
        lambda: os.kill(os.getpid(), signal.SIGKILL) if conn.total_changes > start else 0, 100
    )
    s.merge_from({shard!r})
"""


def test_kill_during_merge_leaves_the_store_valid(tmp_path: Path) -> None:
    main_path = _filled(tmp_path / "main.sqlite", range(10))
    shard = _filled(tmp_path / "shard.sqlite", range(10, 400))
    script = _KILLED_MERGE.format(tests=str(Path(__file__).parent), main=str(main_path), shard=str(shard))
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with _open(main_path) as s:
        assert s.count() == 10 and s.paid_calls() == 10  # nothing of the killed merge is visible
        assert s.merge_from(shard) == 390
        assert s.count() == 400 and s.paid_calls() == 400


def test_check_cap(tmp_path: Path) -> None:
    with _open(tmp_path / "s.sqlite", max_calls=10) as s:
        s.fill(torch.arange(8), 0, images_fn, teacher, budget=8)
        s.check_cap(2)
        with pytest.raises(BudgetExceededError, match="max_calls=10"):
            s.check_cap(3)


# ---------------------------------------------------------------- ftikd cache, in process and under torchrun


def _cache_args(teacher_path: Path, store: Path, *extra: str) -> list[str]:
    return ["cache", "--dataset", "digits", "--teacher", str(teacher_path), "--store", str(store), *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _torchrun(args: list[str], **popen) -> subprocess.Popen:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "ftikd", *args, "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _rows(path: Path) -> dict[int, bytes]:
    con = sqlite3.connect(path)
    try:
        return dict(con.execute("SELECT sample, logits FROM outputs WHERE view=0"))
    finally:
        con.close()


def _assert_same_rows(got: dict[int, bytes], ref: dict[int, bytes]) -> None:
    """Every sample's row is that sample's teacher output: none missing, shifted, swapped or mixed.

    Rows computed in batches of another size (or another process) may round differently in the
    last bit, so values agree to 1e-5, while distinct samples' rows are at least 100x further apart
    than that (checked here), so a row stored under the wrong sample cannot pass.
    """
    assert sorted(got) == sorted(ref)
    keys = sorted(ref)
    r = torch.stack([torch.frombuffer(bytearray(ref[k]), dtype=torch.float32) for k in keys])
    g = torch.stack([torch.frombuffer(bytearray(got[k]), dtype=torch.float32) for k in keys])
    assert torch.allclose(g, r, rtol=0, atol=1e-5), (g - r).abs().max()
    gaps = torch.cdist(r, r) + torch.eye(len(keys)) * 1e9
    assert gaps.min() > 1e-3, "two samples share a teacher output: the test could not tell them apart"


def _ledger_total(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("SELECT SUM(calls) FROM ledger").fetchone()[0])
    finally:
        con.close()


@pytest.fixture(scope="module")
def single_process_store(tmp_path_factory: pytest.TempPathFactory, digits_teacher: Path) -> Path:
    """``ftikd cache`` of the whole digits training split in one process (the reference)."""
    store = tmp_path_factory.mktemp("single") / "digits.sqlite"
    cmd = [sys.executable, "-m", "ftikd", *_cache_args(digits_teacher, store), "--no-progress"]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cached 1438 samples with 1 process: 1438 teacher calls paid now" in out.stdout
    return store


def test_torchrun_two_ranks_equal_single_process(
    tmp_path: Path, digits_teacher: Path, single_process_store: Path
) -> None:
    store = tmp_path / "digits.sqlite"
    proc = _torchrun(_cache_args(digits_teacher, store), env=_env())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert out.count("cached 1438 samples with 2 processes: 1438 teacher calls paid now") == 1, out
    ref, got = _rows(single_process_store), _rows(store)
    assert len(got) == 1438
    _assert_same_rows(got, ref)  # each rank pays its shard in other batch compositions
    assert _ledger_total(store) == 1438
    assert _files(tmp_path) == ["digits.sqlite", "digits.sqlite.cache-lock"]  # no shard left behind


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` whose environment carries ``marker``."""
    want = {f"FTIKD_TEST_RUN={marker}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue
        if want <= env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid through /proc")
def test_torchrun_rank_killed_mid_fill_then_rerun(
    tmp_path: Path, digits_teacher: Path, single_process_store: Path, capsys: pytest.CaptureFixture
) -> None:
    store = tmp_path / "digits.sqlite"
    shard1 = tmp_path / "digits.sqlite.rank1-of-2.sqlite"
    marker = str(tmp_path)
    # Batches of 2 commit often, so rank 1 is surely killed with some of its shard paid and some not.
    proc = _torchrun(_cache_args(digits_teacher, store, "--batch-size", "2"), env=_env(FTIKD_TEST_RUN=marker))
    try:
        deadline = time.monotonic() + 90
        while not (shard1.exists() and _count(shard1) >= 40):
            assert proc.poll() is None and time.monotonic() < deadline, "rank 1 made no progress"
            time.sleep(0.01)
        pid = _rank_pid(marker, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    survived = _count(shard1)
    assert 40 <= survived < 719  # killed mid-fill, the committed batches survive in its shard
    survived += _count(tmp_path / "digits.sqlite.rank0-of-2.sqlite")

    proc = _torchrun(_cache_args(digits_teacher, store), env=_env())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"{1438 - survived} teacher calls paid now ({survived} outputs recovered" in out, out
    with capsys.disabled():
        print(f"\n[torchrun kill] {survived} outputs survived in the shards; rerun paid {1438 - survived}")
    _assert_same_rows(_rows(store), _rows(single_process_store))
    assert _ledger_total(store) == 1438  # nothing paid twice: the kill cost only the batch in flight
    assert _files(tmp_path) == ["digits.sqlite", "digits.sqlite.cache-lock"]


def _count(path: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT COUNT(*) FROM outputs").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_cache_merges_leftover_shards_and_respects_max_calls(
    tmp_path: Path, digits_teacher: Path, single_process_store: Path, capsys: pytest.CaptureFixture
) -> None:
    store = tmp_path / "digits.sqlite"
    t = Teacher.from_checkpoint(digits_teacher)
    images = teacher_view_images(load_dataset("digits"), 0, torch.device("cpu"))
    with TeacherStore.open(tmp_path / "digits.sqlite.rank1-of-3.sqlite", t.fingerprint, "digits", 10) as s:
        s.fill(torch.arange(250, 300), 0, images, t, budget=50)  # what a killed 3-rank job left behind
    assert main(_cache_args(digits_teacher, store, "--samples", "300", "--no-progress")) == 0
    assert "250 teacher calls paid now (50 outputs recovered from earlier shards)" in capsys.readouterr().out
    assert sorted(_rows(store)) == list(range(300))
    binding = (t.fingerprint, "digits", 10)
    with TeacherStore.open(store, *binding) as got, TeacherStore.open(single_process_store, *binding) as ref:
        # in-process torch may use other thread counts than the reference run, hence close, not equal
        assert torch.allclose(got.logits(torch.arange(300), 0), ref.logits(torch.arange(300), 0), atol=1e-6)
    assert _ledger_total(store) == 300 and _files(tmp_path) == ["digits.sqlite", "digits.sqlite.cache-lock"]

    assert main(_cache_args(digits_teacher, store, "--samples", "400", "--max-calls", "350")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_calls=350" in err and "needs 100 more" in err, err
    with open(tmp_path / "digits.sqlite.cache-lock") as held:  # another cache job runs on this store
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(_cache_args(digits_teacher, store, "--samples", "400")) == 2
    assert "another ftikd cache job is filling" in capsys.readouterr().err
    assert _ledger_total(store) == 300 and _files(tmp_path) == ["digits.sqlite", "digits.sqlite.cache-lock"]


def test_cache_user_errors(tmp_path: Path, digits_teacher: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "s.sqlite"
    cases = [
        (["cache", "--dataset", "nope", "--teacher", str(digits_teacher)], "unknown dataset 'nope'"),
        (_cache_args(tmp_path / "absent.safetensors", store), "absent.safetensors"),
        (_cache_args(digits_teacher, store, "--samples", "5000"), "pass 1 to 1438"),
        (["cache", "--dataset", "digits"], "pass --teacher PATH"),
    ]
    for args, needle in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("ftikd: error: ") and needle in err, err
    assert list(tmp_path.iterdir()) == []  # nothing half-written
