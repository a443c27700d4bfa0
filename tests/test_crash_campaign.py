"""The teacher-output caching crash campaign (scripts/crash_campaign.py): SIGKILL, restart, verify."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ftikd.teacher import TeacherStore

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "crash_campaign.py"


def _load_campaign_module():
    spec = importlib.util.spec_from_file_location("crash_campaign", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("crash_campaign", module)
    spec.loader.exec_module(module)
    return module


cc = _load_campaign_module()


def _check(summary: dict, kills: int) -> None:
    assert summary["failures"] == []
    assert summary["kills_tried"] + summary["kills_missed"] >= kills and summary["kills_tried"] <= kills
    assert summary["resumes_succeeded"] == summary["resumes"] >= summary["kills_tried"]
    assert summary["calls_lost"] == 0 and summary["never_invoked"] == 0
    assert summary["calls_repeated"] == 0  # every repeat is a re-paid in-flight batch
    assert summary["calls_repeated_raw"] == summary["in_flight_samples"]
    assert summary["in_flight_batches_repaid"] == summary["in_flight_batches"] <= summary["kills_tried"]
    assert summary["ledger_mismatches"] == 0 and summary["logits_mismatched"] == 0
    assert summary["duplicate_rows"] == 0 and summary["integrity_ok"]


def _report(capsys: pytest.CaptureFixture, summary: dict) -> None:
    keys = ("kills_tried", "kills_missed", "resumes_succeeded", "calls_lost", "calls_repeated")
    keys += ("calls_repeated_raw", "in_flight_batches", "in_flight_batches_repaid", "rounds", "wall_s")
    with capsys.disabled():
        print("\n[crash-campaign caching] " + ", ".join(f"{k}={summary[k]}" for k in keys))


def test_campaign_caching_5_kills(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = cc.campaign_caching(kills=5, seed=0, workdir=tmp_path)
    _check(summary, 5)
    _report(capsys, summary)


@pytest.mark.slow
def test_campaign_caching_50_kills(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = cc.campaign_caching(kills=50, seed=1, workdir=tmp_path)
    _check(summary, 50)
    _report(capsys, summary)


def test_campaign_registry_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cc.CAMPAIGNS["caching"] is cc.campaign_caching
    out = tmp_path / "summary.json"
    assert cc.main(["--kills", "0", "--seed", "3", "--workdir", str(tmp_path / "w"), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["campaign"] == "caching" and summary["kills_tried"] == 0 and summary["seed"] == 3
    assert json.loads(capsys.readouterr().out) == summary


def test_verification_counts_unexplained_repeats(tmp_path: Path) -> None:
    """The checker itself: a sample paid twice outside any in-flight batch is reported, not hidden."""
    n = 6
    store, log = tmp_path / "s.sqlite", tmp_path / "calls.jsonl"

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(cc.teacher_logits(x[:, 0, 0, 0].round().long().numpy()))

    def images(ids: torch.Tensor) -> torch.Tensor:
        return ids.to(torch.float32).reshape(-1, 1, 1, 1)

    with TeacherStore.open(store, cc.FINGERPRINT, cc.DATASET, cc.CLASSES) as s:
        s.fill(torch.arange(n), 0, images, teacher, budget=n, batch_size=3)
    # logged: batch [0,1,2] twice (once in flight at a kill), [3,4,5] twice with no kill to explain it
    calls = [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    log.write_text("".join(json.dumps({"attempt": 1, "ids": c}) + "\n" for c in calls))
    figures = cc._verify_round(store, log, n, in_flight=[[0, 1, 2]])
    assert figures["calls_lost"] == 0 and figures["calls_repeated_raw"] == 6
    assert figures["calls_repeated"] == 3  # samples 3, 4, 5
    assert figures["in_flight_batches_repaid"] == 1 and figures["integrity_ok"]
    assert figures["ledger_mismatch"] == 1  # 6 committed calls, but 12 - 3 in flight = 9 logged
    assert figures["logits_mismatched"] == 0


def _report_training(capsys: pytest.CaptureFixture, summary: dict) -> None:
    keys = (
        "kills_tried",
        "kills_missed",
        "resumes_succeeded",
        "runs_finished",
        "runs_equal_to_uninterrupted",
    )
    keys += ("calls_lost",)
    keys += ("calls_repeated", "store_paid_calls", "distinct_samples", "wall_s")
    with capsys.disabled():
        print("\n[crash-campaign training] " + ", ".join(f"{k}={summary[k]}" for k in keys))


def _check_training(summary: dict, runs: int) -> None:
    assert summary["failures"] == []
    assert summary["runs_finished"] == summary["runs_equal_to_uninterrupted"] == summary["runs"] >= runs
    assert summary["resumes_succeeded"] == summary["resumes"]
    assert summary["calls_lost"] == 0 and summary["calls_repeated"] == 0
    assert summary["store_paid_calls"] == summary["distinct_samples"]


def test_campaign_training_3_kills(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = cc.campaign_training(kills=3, seed=0, workdir=tmp_path, runs=1)
    _check_training(summary, 1)
    _report_training(capsys, summary)


@pytest.mark.slow
def test_campaign_training_20_kills(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = cc.campaign_training(kills=20, seed=1, workdir=tmp_path, runs=2)
    _check_training(summary, 2)
    _report_training(capsys, summary)
