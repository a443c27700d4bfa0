"""Accuracy-against-time curves built from run records' histories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ftikd.analysis.curves import best_so_far, main, time_curves, value_at


def record(method: str, seed: int, times: list[float], vals: list[float], test: float) -> dict:
    return {
        "run": f"{method}-s{seed}",
        "config": {"method": method, "calls": 100, "seed": seed, "method_options": {}},
        "metrics": {"test_top1": test},
        "teacher_calls": {},
        "wall_time_s": times[-1],
        "history": [{"time_s": t, "val_acc": v} for t, v in zip(times, vals, strict=True)],
    }


def test_best_so_far_is_a_running_maximum():
    times, best = best_so_far(record("ckd", 1, [1.0, 2.0, 3.0], [50.0, 40.0, 60.0], 55.0))
    assert times.tolist() == [1.0, 2.0, 3.0]
    assert best.tolist() == [50.0, 50.0, 60.0]


def test_value_at_is_a_step_function_holding_the_last_value():
    out = value_at(np.array([1.0, 2.0]), np.array([10.0, 20.0]), np.array([0.5, 1.0, 1.5, 2.0, 9.0]))
    assert np.isnan(out[0])
    assert out[1:].tolist() == [10.0, 10.0, 20.0, 20.0]


def test_curves_average_seeds_and_hold_finished_runs():
    recs = [
        record("ckd", 1, [1.0, 2.0], [40.0, 60.0], 58.0),
        record("ckd", 2, [1.0, 2.0, 3.0, 4.0], [20.0, 30.0, 50.0, 80.0], 78.0),
        record("ckd-inbatch", 1, [0.5, 1.0], [70.0, 75.0], 74.0),
    ]
    curves = {c.label: c for c in time_curves(recs, points=9)}  # grid step 0.5 s for ckd
    ckd = curves["ckd"]
    assert ckd.times[0] == pytest.approx(1.0)  # averaged from when both seeds have a value
    assert ckd.mean_val[-1] == pytest.approx((60.0 + 80.0) / 2)  # seed 1 holds 60 after it ended
    assert ckd.time_to_reach(70.0) == pytest.approx(4.0)
    assert ckd.time_to_reach(99.0) is None
    assert curves["ckd-inbatch"].run_times == [1.0]


def test_cli_prints_table_and_writes_png(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, rec in enumerate([record("ckd", 1, [1.0, 2.0], [40.0, 60.0], 58.0)]):
        (runs / f"r{i}.json").write_text(json.dumps(rec))
    assert main([str(runs), "--out", str(tmp_path / "c.png")]) == 0
    assert "| ckd | 100 | 1 |" in capsys.readouterr().out
    assert (tmp_path / "c.png").stat().st_size > 0
    assert main([str(tmp_path / "missing")]) == 2
    assert "no run records" in capsys.readouterr().err
