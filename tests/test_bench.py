"""``ftikd bench``: round-robin timing, rows for every method, JSON, and the torchdistill side."""

import json
import math
from pathlib import Path

import pytest

from ftikd.cli import main
from ftikd.errors import FtikdError
from ftikd.experiments.bench import BenchConfig, interleaved_times, median_ratio, run_bench

TORCHDISTILL_PYTHON = Path("/tmp/tdv/bin/python")
TINY = ["bench", "--students", "resnet8", "--steps", "1", "--repeats", "2", "--batch-size", "16"]
TINY += ["--cache-samples", "32"]


def test_rounds_run_in_turn_and_ratios_pair_repetitions():
    calls = []

    def fake(kind):
        return lambda: calls.append(kind) or {kind: 1.0}

    times = interleaved_times([fake("bare"), fake("a"), fake("b")], warmup=1, repeats=2)
    assert calls == ["bare", "a", "b"] * 3
    assert times == {"bare": [1.0, 1.0], "a": [1.0, 1.0], "b": [1.0, 1.0]}
    # each repetition is compared with its own bare run: a load spike in both cancels out
    rates = {"bare": [100.0, 10.0, 50.0], "m": [90.0, 9.0, 45.0]}
    assert median_ratio(rates, "m", "bare") == pytest.approx(0.9)


def test_bench_rows_for_every_method_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([*TINY, "--out", str(out)]) == 0
    assert "ftikd step: ckd-inbatch" in capsys.readouterr().out
    result = json.loads(out.read_text())
    kinds = {row["kind"]: row for row in result["rows"]}
    assert set(kinds) == {
        "bare",
        "method:ce",
        "method:kd",
        "method:ckd",
        "method:ckd-inbatch",
        "teacher-bare",
        "caching",
    }
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and math.isfinite(row["images_per_s"])
        assert 0.05 < row["ratio"] < 20, row
    assert kinds["bare"]["ratio"] == 1.0 and kinds["teacher-bare"]["ratio"] == 1.0
    assert result["config"]["students"] == ["resnet8"] and result["torchdistill"] is None


def test_missing_torchdistill_python_is_one_line_user_error(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main([*TINY, "--torchdistill-python", str(tmp_path / "no-python"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("ftikd: error: "), err
    assert "python3 -m venv" in err and "torchdistill" in err
    assert not out.exists()


def test_bench_runs_bf16_channels_last_and_refuses_unknown_precision(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([*TINY, "--precision", "bf16", "--memory-format", "channels_last", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["precision"] == "bf16" and result["config"]["memory_format"] == "channels_last"
    assert all(row["images_per_s"] > 0 for row in result["rows"])
    with pytest.raises(FtikdError, match="unknown precision"):  # refused before any measurement
        run_bench(BenchConfig(students=["resnet8"], precision="fp8"))


@pytest.mark.slow
@pytest.mark.skipif(not TORCHDISTILL_PYTHON.exists(), reason="no torchdistill venv at /tmp/tdv")
def test_torchdistill_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    argv = [*TINY, "--methods", "kd", "--torchdistill-python", str(TORCHDISTILL_PYTHON), "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    kinds = [row["kind"] for row in result["rows"]]
    for kind in ("torchdistill-bare", "torchdistill-kd-teacher", "torchdistill-kd-cached"):
        assert kind in kinds
    versus = [row for row in result["rows"] if row["kind"] == "ftikd/torchdistill"]
    assert len(versus) == 2 and all(0 < row["ratio"] < 100 for row in versus)
    assert result["torchdistill"]["versions"]["torchdistill"]


def test_rows_carry_step_memory_and_teacher_querying_methods_pay_through_a_store(tmp_path):
    out = tmp_path / "bench.json"
    argv = [*TINY, "--methods", "ce", "crd", "bss", "vrm:mode=original", "--out", str(out)]
    assert main(argv) == 0
    rows = {row["kind"]: row for row in json.loads(out.read_text())["rows"]}
    assert {"method:bss", "method:vrm:mode=original"} <= set(rows)
    for kind in ("bare", "method:ce", "method:crd", "method:bss", "method:vrm:mode=original"):
        assert rows[kind]["peak_step_mib"] > 0.1, rows[kind]  # at least the activations of 16 images
    # CRD's step also holds its heads' activations and the memory-bank negatives
    assert rows["method:crd"]["peak_step_mib"] > rows["method:ce"]["peak_step_mib"]
    assert rows["caching"]["peak_step_mib"] is None


def test_unknown_method_or_option_is_refused_before_measuring():
    with pytest.raises(FtikdError, match="unknown method"):
        run_bench(BenchConfig(students=["resnet8"], methods=["ce", "nope"]))
    with pytest.raises(FtikdError, match="has no option"):
        run_bench(BenchConfig(students=["resnet8"], methods=["ckd:kk=3"]))
