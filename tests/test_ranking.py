"""Rank agreement between two sweeps (ftikd.analysis.ranking) and ``ftikd report --reference``."""

import csv

import numpy as np
import pytest
from scipy import stats
from test_report import fake_db

from ftikd.analysis.ranking import average_ranks, kendall_tau_b, ranking_rows, spearman_rho
from ftikd.analysis.report import Selected
from ftikd.cli import main


def cell(label: str, n: int, test: list[float]) -> Selected:
    return Selected(label, label, "a->b", "toy", n, 0.05, test, 0.0, n, {0.05: 0.0}, [1.0] * len(test))


def test_average_ranks_give_ties_the_mean_rank():
    assert average_ranks([3.0, 1.0, 2.0]) == [1.0, 3.0, 2.0]
    assert average_ranks([5.0, 7.0, 5.0, 1.0]) == [2.5, 1.0, 2.5, 4.0]


@pytest.mark.parametrize("seed", range(6))
def test_tau_b_and_rho_equal_scipy_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(3, 9))
    # seeds 0-2: distinct values; 3-5: few levels, so that both sequences carry ties
    draw = (lambda: rng.normal(size=size)) if seed < 3 else (lambda: rng.integers(0, 3, size=size) * 1.0)
    x, y = draw().tolist(), draw().tolist()
    tau, rho = kendall_tau_b(x, y), spearman_rho(x, y)
    ref_tau = stats.kendalltau(x, y, variant="b").statistic
    ref_rho = stats.spearmanr(x, y).statistic
    if np.isnan(ref_tau):
        assert np.isnan(tau) and np.isnan(rho)
    else:
        assert tau == pytest.approx(ref_tau, abs=1e-12) and rho == pytest.approx(ref_rho, abs=1e-12)


def test_ranking_rows_same_order_reversed_order_and_a_swap_within_noise():
    here = [cell("ce", 200, [60.0, 62.0]), cell("kd", 200, [70.0, 70.0]), cell("ckd", 200, [66.0, 68.0])]
    same = [cell("ce", 200, [50.0]), cell("kd", 200, [80.0]), cell("ckd", 200, [79.0])]
    summary, detail = ranking_rows(here, same)
    assert summary[1][3:] == ["3", "1.000", "1.000", "kd", "kd", "none"]
    assert [r[3] for r in detail[1:]] == ["kd", "ckd", "ce"]  # sorted by the reference's rank
    assert detail[1][4:] == ["70.00 (1)", "80.00 (1)"]
    swapped = [cell("ce", 200, [50.0]), cell("kd", 200, [78.0]), cell("ckd", 200, [79.0])]
    summary, _ = ranking_rows(here, swapped)
    assert summary[1][4:6] == ["0.333", "0.500"] and summary[1][7] == "ckd"
    # kd - ckd: +3.00 here, -1.00 there; the largest seed std of the two is ckd's 1.41 here
    assert summary[1][8] == "kd/ckd (+3.00 / -1.00; 1.41)"
    reversed_ = [cell("ce", 200, [90.0]), cell("kd", 200, [10.0]), cell("ckd", 200, [50.0])]
    assert ranking_rows(here, reversed_)[0][1][4:6] == ["-1.000", "-1.000"]


def test_ranking_rows_use_only_shared_methods_and_budgets():
    here = [cell("ce", 100, [1.0]), cell("kd", 100, [2.0]), cell("dist", 100, [3.0]), cell("kd", 300, [9.0])]
    ref = [cell("kd", 100, [5.0]), cell("dist", 100, [4.0]), cell("rkd", 100, [9.0]), cell("kd", 300, [1.0])]
    summary, detail = ranking_rows(here, ref)
    assert len(summary) == 2 and summary[1][2:4] == ["100", "2"]  # n=300 holds one shared method
    assert {r[3] for r in detail[1:]} == {"kd", "dist"}
    assert summary[1][8] == "kd/dist (-1.00 / +1.00; 0.00)"


def test_report_with_reference_writes_the_ranking_tables(tmp_path, capsys):
    short = {("ce", 200, 0.05): [(50, 60)], ("kd", 200, 0.05): [(60, 72)], ("ckd", 200, 0.05): [(55, 66)]}
    full = {("ce", 200, 0.05): [(50, 61)], ("kd", 200, 0.05): [(60, 70)], ("ckd", 200, 0.05): [(55, 71)]}
    fake_db(tmp_path / "short.sqlite", "toy", "a->b", short)
    fake_db(tmp_path / "full.sqlite", "toy", "a->b", full)
    args = ["report", str(tmp_path / "short.sqlite"), "--out", str(tmp_path / "rep")]
    assert main([*args, "--reference", str(tmp_path / "full.sqlite")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Ranking beside the reference full.sqlite" in text
    with open(tmp_path / "rep" / "ranking_agreement.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[1][:8] == ["toy", "a->b", "200", "3", "0.333", "0.500", "kd", "ckd"]
    assert rows[1][8] == "kd/ckd (+6.00 / -1.00; 0.00)"
    bad = ["report", str(tmp_path / "short.sqlite"), "--out", str(tmp_path / "x")]
    assert main([*bad, "--reference", str(tmp_path / "missing.sqlite")]) == 2
    assert "no results database at" in capsys.readouterr().err and not (tmp_path / "x").exists()
