"""Seed-paired differences from a baseline method (ftikd.analysis.paired, ``ftikd report --paired-with``)."""

import csv
import math

import numpy as np
import pytest
from test_report import fake_db

from ftikd.analysis.paired import paired_difference, paired_rows
from ftikd.analysis.report import Selected
from ftikd.cli import main


def cell(label: str, n: int, seeds: list[int], test: list[float]) -> Selected:
    return Selected(label, label, "a->b", "toy", n, 0.05, test, 0.0, n, {0.05: 0.0}, [1.0] * len(test), seeds)


def test_paired_difference_uses_only_common_seeds():
    a = cell("a", 80, [1, 2, 3], [70.0, 75.0, 71.0])
    b = cell("b", 80, [1, 3, 4], [68.0, 70.5, 99.0])  # seed 4 has no partner, seed 2 neither
    diffs = np.array([70.0 - 68.0, 71.0 - 70.5])
    mean, se, k = paired_difference(a, b)
    assert k == 2 and mean == pytest.approx(diffs.mean())
    assert se == pytest.approx(diffs.std(ddof=1) / np.sqrt(2))
    assert paired_difference(a, cell("c", 80, [9], [50.0])) is None
    one = paired_difference(a, cell("d", 80, [2], [74.0]))
    assert one[0] == pytest.approx(1.0) and math.isnan(one[1]) and one[2] == 1


def test_paired_se_is_small_when_seeds_move_together():
    # both methods swing 10 points over seeds, but their gap is always 2 +- 0.1
    base = cell("kd", 80, [1, 2, 3], [60.0, 70.0, 80.0])
    other = cell("cc", 80, [1, 2, 3], [62.1, 71.9, 82.0])
    mean, se, _ = paired_difference(other, base)
    assert mean == pytest.approx(2.0) and se < 0.1


def test_paired_rows_leave_out_the_baseline_and_mark_missing_cells():
    cells = [
        cell("ckd", 80, [1, 2], [50.0, 52.0]),
        cell("kd", 80, [1, 2], [51.0, 55.0]),
        cell("ckd", 160, [1], [60.0]),
        cell("kd", 160, [1], [59.5]),
        cell("ce", 80, [1, 2], [40.0, 40.0]),
    ]
    rows = paired_rows(cells, "ckd")
    assert rows[0] == ["method - ckd", "n=80", "n=160"]
    assert rows[1] == ["kd", "+2.00 (SE 1.00, 2 seeds)", "-0.50 (1 seed)"]
    assert rows[2] == ["ce", "-11.00 (SE 1.00, 2 seeds)", "-"]
    assert len(rows) == 3


def test_report_paired_with_adds_a_table_and_refuses_an_unknown_method(tmp_path, capsys):
    grid = {
        ("ckd", 80, 0.05): [(60, 50.0), (61, 52.0), (62, 51.0)],
        ("kd", 80, 0.05): [(58, 51.5), (59, 53.0), (60, 52.5)],
        ("kd", 80, 0.1): [(10, 90.0), (10, 90.0), (10, 90.0)],  # worse validation: not chosen
    }
    fake_db(tmp_path / "r.sqlite", "digits", "a->b", grid)
    argv = ["report", str(tmp_path / "r.sqlite"), "--out", str(tmp_path / "rep"), "--paired-with", "ckd"]
    assert main(argv) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "### Paired differences from ckd" in text
    with open(tmp_path / "rep" / "digits-a_to_b_paired_vs_ckd.csv") as handle:
        rows = list(csv.reader(handle))
    # kd at LR 0.05: differences 1.5, 1.0, 1.5 -> mean 1.333, SE std/sqrt(3) = 0.289/1.732 = 0.167
    assert rows == [["method - ckd", "n=80"], ["kd", "+1.33 (SE 0.17, 3 seeds)"]]
    argv[-1] = "nope"
    argv[3] = str(tmp_path / "x")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no finished runs of 'nope'" in err and "ckd, kd" in err and not (tmp_path / "x").exists()
