"""Reports: calls-to-target interpolation, Table-1 style tables, plots, CSVs and published numbers."""

import csv

import pytest

from ftikd.analysis.report import write_report
from ftikd.analysis.targets import BELOW_GRID, NEVER, calls_to_target, crossing, table_rows
from ftikd.cli import main
from ftikd.experiments.db import JobRow, ResultsDB


def test_crossing_interpolates_linearly_between_grid_points():
    ns, accs = [1600, 2000, 2400], [30.0, 34.0, 42.0]
    # by hand: 38 lies halfway between 34 (n=2000) and 42 (n=2400)
    assert crossing(ns, accs, 38.0) == pytest.approx(2200.0)
    assert crossing(ns, accs, 31.0) == pytest.approx(1600 + 400 * (1 / 4))
    assert crossing(ns, accs, 30.0) == BELOW_GRID and crossing(ns, accs, 50.0) == NEVER
    # a dip does not hide the first crossing
    assert crossing([1, 2, 3], [10.0, 20.0, 15.0], 18.0) == pytest.approx(1.8)


def test_reduction_against_the_best_non_ckd_method():
    # the poster's check (METHODS.md §3.2(c)): CRD 5.20k vs CKD 3.97k at 55 % gives 23.65 %
    curves = {
        "kd": ([4000, 6000], [50.0, 54.0]),
        "crd": ([4000, 6000], [50.0, 55.0 + 5.0 * 0.8]),  # crosses 55 at 4000 + 2000 * 5/9
        "ckd": ([3000, 4000], [54.0, 56.0]),  # crosses 55 at 3500
        "ce": ([3000, 4000], [90.0, 95.0]),  # it would win: the caller leaves teacher-free methods out
    }
    del curves["ce"]
    table = calls_to_target(curves, [55.0])
    n_crd = 4000 + 2000 * 5 / 9
    assert table.calls["kd"] == [NEVER]
    assert table.reduction[0] == pytest.approx(100 * (n_crd - 3500) / n_crd)
    rows = table_rows(table)
    assert rows[0] == ["method", "55%"] and rows[1] == ["kd", "-"] and rows[-1][0] == "Δ (%)"
    assert rows[3] == ["ckd", "3.50"]


def fake_db(path, dataset, pair, accs, teacher=lambda key: "fp0"):
    """A results DB with done runs: accs[(method, n, lr)] = [(val, test) per seed]; ``teacher(key)``
    is the fingerprint each run records."""
    with ResultsDB(path) as db:
        jobs, records = [], {}
        for (method, n, lr), per_seed in accs.items():
            for seed, (val, test) in enumerate(per_seed, start=1):
                key = f"{method}-{n}-{lr}-{seed}"
                jobs.append(JobRow(key, method, method, {}, pair, dataset, n, seed, lr, {}))
                used = 0 if method == "ce" else n
                records[key] = {
                    "metrics": {"best_val_acc": val, "test_top1": test},
                    "wall_time_s": 1.0,
                    "teacher_calls": {
                        "paid_this_run": used,
                        "outputs_used": used,
                        "teacher_fingerprint": teacher(key),
                    },
                }
        db.add_jobs("s", jobs)
        while (row := db.claim("s", "h:1")) is not None:
            db.finish(row["key"], records[row["key"]])


def test_report_tables_plot_csv_and_paper_numbers(tmp_path):
    grid = {}
    for n, base in [(1600, 30.0), (2000, 34.0)]:
        grid[("kd", n, 0.05)] = [(50, base), (52, base + 2)]
        grid[("kd", n, 0.1)] = [(10, 99), (10, 99)]  # never chosen: its validation is worse
        grid[("ckd", n, 0.05)] = [(60, base + 6), (60, base + 8)]
        grid[("ce", n, 0.05)] = [(40, base - 5), (40, base - 5)]
    fake_db(tmp_path / "r.sqlite", "cifar100", "wrn_40_2->wrn_16_2", grid)
    paths = write_report(tmp_path / "r.sqlite", tmp_path / "rep", targets=[35.0, 40.0], paper_tables=None)
    names = {p.name for p in paths}
    stem = "cifar100-wrn_40_2_to_wrn_16_2"
    assert {f"{stem}_accuracy.csv", f"{stem}_accuracy_vs_calls.png", f"{stem}_calls_to_target.csv"} <= names
    text = (tmp_path / "rep" / "report.md").read_text()
    # ckd ran one LR, kd two: the table says so
    assert "**37.00 ± 1.41** (lr 0.05 only, 2 seeds)" in text and "99" not in text.split("Teacher calls")[0]
    with open(tmp_path / "rep" / f"{stem}_calls_to_target.csv") as handle:
        rows = list(csv.reader(handle))
    assert [r[0] for r in rows] == ["method", "kd", "ckd", "Δ (%)"]  # ce pays no calls: left out
    # kd: mean 31 -> 35 reaches 35 at n=2000; ckd: above 35 at 1600 (blank), 37 -> 41 crosses 40 at 1900
    assert rows[1][1] == "2.00" and rows[2][1] == "" and rows[2][2] == "1.90"
    assert (tmp_path / "rep" / f"{stem}_accuracy_vs_calls.png").stat().st_size > 1000
    with open(tmp_path / "rep" / f"{stem}_wall_time.csv") as handle:  # every fake run took 1 s
        assert list(csv.reader(handle))[1] == ["kd", "1 ± 0", "1 ± 0"]
    if f"{stem}_vs_paper.csv" in names:  # the paper tables are found beside the repository
        assert "26.09 ± 2.75" in (tmp_path / "rep" / f"{stem}_vs_paper.csv").read_text()
        assert f"{stem}_calls_to_target_poster.csv" in names


def test_report_cli_and_its_errors(tmp_path, capsys):
    fake_db(tmp_path / "r.sqlite", "digits", "a->b", {("kd", 80, 0.05): [(50, 40)]})
    assert main(["report", str(tmp_path / "r.sqlite"), "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    # which line depends on whether ../shared/paper-tables is beside the checkout; neither is a match
    assert "No published setting matches" in report or "No paper-tables folder found" in report
    assert main(["report", str(tmp_path / "r.sqlite"), "--sweep", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_report_refuses_a_table_whose_runs_read_different_teachers(tmp_path, capsys):
    # a sweep resumed on another machine without its teacher checkpoint retrains the teacher under
    # the same run keys; the report must not set those runs beside the first teacher's
    grid = {("kd", 80, 0.05): [(50, 40), (52, 41)], ("ckd", 80, 0.05): [(55, 45), (56, 46)]}
    fake_db(
        tmp_path / "r.sqlite", "digits", "a->b", grid, teacher=lambda key: "fpB" if "ckd" in key else "fpA"
    )
    argv = ["report", str(tmp_path / "r.sqlite"), "--out", str(tmp_path / "rep")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2 different teachers (fpA, fpB)" in err and "a->b" in err
    assert not (tmp_path / "rep").exists()
    fake_db(tmp_path / "same.sqlite", "digits", "a->b", grid)
    assert main(["report", str(tmp_path / "same.sqlite"), "--out", str(tmp_path / "ok")]) == 0
