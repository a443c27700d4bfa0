"""LR chosen at one budget and carried to the others (``choose_lr_at``); sweeps claim only their grid."""

import statistics

import pytest

from ftikd.analysis.report import accuracy_rows, select_lr
from ftikd.cli import main
from ftikd.errors import FtikdError
from ftikd.experiments.db import JobRow, ResultsDB
from ftikd.experiments.lr_choice import chosen_lrs, runnable_jobs
from ftikd.experiments.sweep import expand, run_sweep, sweep_from_dict


def job(label: str, n: int, seed: int, lr: float) -> JobRow:
    return JobRow(f"{label}-{n}-{seed}-{lr}", label, label, {}, "t->s", "d", n, seed, lr, {})


def db_row(j: JobRow, status: str, val: float) -> dict:
    return {"key": j.key, "status": status, "lr": j.lr, "val_acc": val}


GRID = [job(m, n, s, lr) for m in ("a", "b") for n in (100, 400) for s in (1, 2, 3) for lr in (0.1, 0.05)]


def test_choice_needs_every_seed_at_every_lr_and_picks_the_best_mean():
    # a: lr 0.05 has the lower best seed but the higher mean (60 > 50); b: one run still failed
    val = {(1, 0.1): 90, (2, 0.1): 30, (3, 0.1): 30, (1, 0.05): 60, (2, 0.05): 60, (3, 0.05): 60}
    rows = [db_row(j, "done", val[(j.seed, j.lr)]) for j in GRID if j.n == 100]
    rows = [{**r, "status": "failed"} if r["key"] == "b-100-2-0.1" else r for r in rows]
    assert chosen_lrs(GRID, rows, at=100) == {("a", "t->s"): 0.05}
    now, waiting = runnable_jobs(GRID, rows, at=100)
    at_400 = [j for j in now if j.n == 400]
    assert {(j.label, j.lr) for j in at_400} == {("a", 0.05)} and len(at_400) == 3
    assert len([j for j in now if j.n == 100]) == 12
    assert waiting == 3  # b's three seeds at n = 400, each run at one LR once chosen


def test_without_choose_lr_at_every_run_is_runnable():
    assert runnable_jobs(GRID, [], at=None) == (GRID, 0)
    now, waiting = runnable_jobs(GRID, [], at=100)
    assert {j.n for j in now} == {100} and waiting == 6


def test_cells_run_at_one_lr_say_so_in_the_table():
    def row(n, seed, lr, val, test):
        return {
            **{"status": "done", "label": "kd", "method": "kd", "pair": "t->s", "dataset": "d"},
            **{"n": n, "seed": seed, "lr": lr, "val_acc": val, "test_top1": test},
            **{"calls_used": n, "wall_s": 1.0},
        }

    rows = [row(100, s, lr, 50 + s + 10 * lr, 60 + s) for s in (1, 2) for lr in (0.1, 0.05)]
    rows += [row(400, s, 0.1, 70, 70 + s) for s in (1, 2)]
    table = accuracy_rows(select_lr(rows))
    assert table[1][1].endswith("(lr 0.1, 2 seeds)") and table[1][2].endswith("(lr 0.1 only, 2 seeds)")


def staged(tmp_path, teacher, **extra):
    raw = {
        "name": "staged",
        "dataset": "digits",
        "pairs": [{"teacher": "resnet8", "student": "resnet8", "teacher_path": str(teacher)}],
        "methods": ["ce"],
        "budgets": [60, 80],
        "seeds": [1, 2],
        "lrs": [0.05, 0.2],
        "choose_lr_at": 60,
        "train": {"max_epochs": 2, "patience": 5, "phases": 1},
        "out": str(tmp_path / "sweep"),
        **extra,
    }
    return sweep_from_dict(raw)


def test_staged_sweep_runs_the_larger_budget_at_the_lr_chosen_at_the_smaller(tmp_path, digits_teacher):
    cfg = staged(tmp_path, digits_teacher)
    counts = run_sweep(cfg, progress=False)
    assert counts == {"pending": 0, "running": 0, "done": 6, "failed": 0, "waiting": 0}
    with ResultsDB(cfg.db_path) as db:
        rows = db.rows("staged")
    small = [r for r in rows if r["n"] == 60]
    large = [r for r in rows if r["n"] == 80]
    assert len(small) == 4 and len(large) == 2
    mean_val = {lr: statistics.fmean(r["val_acc"] for r in small if r["lr"] == lr) for lr in (0.05, 0.2)}
    chosen = 0.05 if mean_val[0.05] >= mean_val[0.2] else 0.2
    assert {r["lr"] for r in large} == {chosen} and {r["seed"] for r in large} == {1, 2}
    # the carried runs have the keys the full grid gives them: a later full search reuses them
    full = {j.key for j in expand(staged(tmp_path, digits_teacher, choose_lr_at=None))}
    assert {r["key"] for r in rows} <= full


def test_a_sweep_claims_only_its_latest_grid(tmp_path, digits_teacher):
    cfg = staged(tmp_path, digits_teacher, methods=["ce", "kd"], budgets=[60], lrs=[0.05], choose_lr_at=None)
    with ResultsDB(cfg.db_path) as db:
        db.add_jobs(cfg.name, expand(cfg))  # an earlier invocation registered ce and kd
    counts = run_sweep(staged(tmp_path, digits_teacher, budgets=[60], lrs=[0.05], choose_lr_at=None))
    assert counts["done"] == 2 and counts["pending"] == 0
    with ResultsDB(cfg.db_path) as db:
        assert {r["method"] for r in db.rows(status="done")} == {"ce"}
        assert {r["method"] for r in db.rows(status="pending")} == {"kd"}  # kept, just not in the sweep
        assert db.drop_unlisted("staged", set()) == 0  # finished runs stay in their sweep
        assert len(db.rows("staged")) == 2


def test_choose_lr_at_must_be_a_budget(tmp_path, digits_teacher, capsys):
    with pytest.raises(FtikdError, match="choose_lr_at \\(500\\) must be one of the budgets"):
        staged(tmp_path, digits_teacher, choose_lr_at=500)
    assert main(["sweep", "cpu-fashion", "--choose-lr-at", "7", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "choose_lr_at (7) must be one of the budgets" in err and "\n" not in err
