"""The sweep's live progress line (counts and ETA), and live tracking passed from a sweep to its runs."""

import io
import socket
import subprocess
import sys

import pytest

from ftikd.cli_sweep import add_sweep_commands, sweep_overrides
from ftikd.errors import FtikdError
from ftikd.experiments.db import ResultsDB
from ftikd.experiments.sweep import expand, prepare, run_sweep, sweep_from_dict
from ftikd.experiments.sweep_progress import (
    SweepProgress,
    SweepState,
    eta_seconds,
    format_duration,
    progress_line,
)


def tiny(tmp_path, teacher, **extra):
    raw = {
        "name": "tiny",
        "dataset": "digits",
        "pairs": [{"teacher": "resnet8", "student": "resnet8", "teacher_path": str(teacher)}],
        "methods": ["ce", "kd"],
        "budgets": [80],
        "seeds": [1, 2],
        "train": {"max_epochs": 1, "patience": 5, "phases": 1},
        "out": str(tmp_path / "sweep"),
        **extra,
    }
    return sweep_from_dict(raw)


def dead_claimer() -> str:
    """A ``host:pid`` claimer of this host whose process has exited (its claim is taken over)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_format_duration():
    assert [format_duration(s) for s in (None, 0, 44.6, 190, 3599, 7500)] == [
        "?",
        "0s",
        "45s",
        "3m10s",
        "59m59s",
        "2h05m",
    ]


def test_eta_schedules_the_mean_run_time_on_the_workers():
    # mean of finished runs 15 s; one run 5 s in (10 s left); 3 pending
    state = SweepState(done=2, running=1, pending=3, run_times_s=(10.0, 20.0), running_for_s=(5.0,))
    # one worker: 10 + 3 * 15; two: the idle one takes runs at 0 and 15, the busy one at 10 -> ends 25, 30
    assert eta_seconds(state, workers=1) == pytest.approx(55.0)
    assert eta_seconds(state, workers=2) == pytest.approx(30.0)
    assert eta_seconds(state, workers=8) == pytest.approx(15.0)
    overdue = SweepState(done=1, running=1, run_times_s=(10.0,), running_for_s=(30.0,))
    assert eta_seconds(overdue, workers=1) == 0.0
    assert eta_seconds(SweepState(running=1, pending=2, running_for_s=(3.0,)), workers=2) is None
    assert eta_seconds(SweepState(done=3, failed=1, run_times_s=(1.0, 2.0, 3.0)), workers=2) == 0.0


def test_progress_line_text():
    state = SweepState(done=4, running=2, failed=1, pending=5, run_times_s=(60.0,) * 4, running_for_s=(0, 0))
    assert progress_line("grid", state, workers=2) == (
        "sweep grid: done 4/12 | running 2 | failed 1 | left 5 | ETA 4m00s"
    )


def test_progress_of_a_tiny_sweep_from_its_database(tmp_path, digits_teacher):
    cfg = tiny(tmp_path, digits_teacher)
    with ResultsDB(cfg.db_path) as db:
        db.add_jobs(cfg.name, expand(cfg))
        log = io.StringIO()
        bar = SweepProgress(cfg.db_path, cfg.name, True, workers=2, stream=log)
        bar.update()
        bar.update()  # unchanged counts: no second line in a log
        db.claim(cfg.name, claimer=dead_claimer())
        bar.update()
    assert log.getvalue().splitlines() == [
        "sweep tiny: done 0/4 | running 0 | failed 0 | left 4 | ETA ?",
        "sweep tiny: done 0/4 | running 1 | failed 0 | left 3 | ETA ?",
    ]
    counts = run_sweep(cfg, progress=False)  # the dead worker's claim is taken over
    assert counts["done"] == 4
    screen = Terminal()
    bar = SweepProgress(cfg.db_path, cfg.name, True, workers=2, stream=screen)
    bar.update()
    bar.close()
    assert screen.getvalue() == "\rsweep tiny: done 4/4 | running 0 | failed 0 | left 0 | ETA 0s\x1b[K\n"
    quiet = io.StringIO()
    SweepProgress(cfg.db_path, cfg.name, False, stream=quiet).close()
    assert quiet.getvalue() == ""


def test_sweep_track_flag_reaches_every_run_but_not_the_keys(tmp_path, digits_teacher):
    import argparse

    parser = argparse.ArgumentParser()
    add_sweep_commands(parser.add_subparsers())
    args = parser.parse_args(["sweep", "tiny", "--track", "tensorboard"])
    assert sweep_overrides(args) == {"track": "tensorboard"}
    plain, tracked = tiny(tmp_path, digits_teacher), tiny(tmp_path, digits_teacher, track="tensorboard")
    jobs = expand(tracked)
    assert [j.key for j in jobs] == [j.key for j in expand(plain)]
    assert {j.config["run"]["track"] for j in jobs} == {"tensorboard"}
    with pytest.raises(FtikdError, match="unknown tracker"):
        prepare(tiny(tmp_path, digits_teacher, track="wandb"))
