"""The demo's run list, its worker pool and its --full switch (on digits, a few pseudo-epochs)."""

import json

import pytest

from ftikd.cli import main
from ftikd.engine.trainer import TrainConfig
from ftikd.experiments import demo as demo_module
from ftikd.experiments.demo import DemoConfig, MethodSpec, demo_runs, longest_first, run_demo


def small_demo(tmp_path, teacher, workers: int) -> DemoConfig:
    return DemoConfig(
        dataset="digits",
        methods=[MethodSpec("ce"), MethodSpec("kd"), MethodSpec("ckd")],
        budgets=[80],
        seeds=[1, 2],
        train=TrainConfig(patience=2, phases=1, max_epochs=2),
        workers=workers,
        out=str(tmp_path / "demo"),
        teacher=str(teacher),
    )


def test_runs_listed_in_table_order_and_started_longest_first(tmp_path, digits_teacher):
    cfg = small_demo(tmp_path, digits_teacher, workers=2)
    cfg.budgets = [40, 100]
    runs = demo_runs(cfg, digits_teacher)
    assert [(r.calls, r.seed, r.method) for r in runs[:3]] == [(40, 1, "ce"), (40, 1, "kd"), (40, 1, "ckd")]
    assert len(runs) == 12 and all(r.train.lr == 0.05 for r in runs)
    ordered = longest_first(runs)  # cost n x images per sampler row: ckd-100 200, 100, ckd-40 80, 40
    assert [(r.calls, r.method) for r in ordered[:2]] == [(100, "ckd"), (100, "ckd")]
    assert {(r.calls, r.method) for r in ordered[2:6]} == {(100, "ce"), (100, "kd")}
    assert [(r.calls, r.method) for r in ordered[6:8]] == [(40, "ckd"), (40, "ckd")]
    assert sorted(r.run_name() for r in ordered) == sorted(r.run_name() for r in runs)


def test_pool_of_two_workers_runs_everything_within_budget(tmp_path, digits_teacher):
    cfg = small_demo(tmp_path, digits_teacher, workers=2)
    summary = run_demo(cfg, progress=False)
    runs_dir = tmp_path / "demo" / "runs"
    records = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    records = [r for r in records if "run" in r]
    assert len(records) == 6 and summary["workers"] == 2
    assert [c["method"] for c in summary["cells"]] == ["ce", "kd", "ckd"]
    assert all(len(c["accs"]) == 2 for c in summary["cells"])
    for rec in records:
        assert rec["metrics"]["epochs"] == 2
        assert rec["teacher_calls"]["outputs_used"] <= 80
    calls = [rec["teacher_calls"] for rec in records if rec["config"]["method"] != "ce"]
    assert len({c["store"] for c in calls}) == 1  # kd and ckd of both seeds share one store
    paid = sum(c["paid_this_run"] for c in calls)  # each sample paid once, by whichever run came first
    assert paid == max(c["store_paid_total"] for c in calls) <= 2 * 80
    assert (runs_dir / "summary.md").read_text().startswith("|")


def test_full_switch_runs_the_protocol_defaults_apart(tmp_path, monkeypatch, digits_teacher):
    seen = {}
    monkeypatch.setattr(demo_module, "run_demo", lambda cfg, progress: seen.setdefault("cfg", cfg))
    base = ["demo", "--no-progress", "--teacher", str(digits_teacher), "--out", str(tmp_path)]
    assert main(base + ["--full", "--workers", "1"]) == 0
    cfg = seen.pop("cfg")
    assert cfg.train == TrainConfig() and cfg.runs_dir == "runs-full" and cfg.workers == 1
    assert main(base + ["--patience", "7"]) == 0
    cfg = seen.pop("cfg")
    assert cfg.train.phases == demo_module.DEMO_PHASES and cfg.train.patience == 7
    assert cfg.runs_dir == "runs" and cfg.budgets == [500]


@pytest.mark.parametrize("workers, runs, expected", [(0, 1, 1), (5, 3, 3), (1, 9, 1)])
def test_worker_count(workers, runs, expected):
    assert DemoConfig(workers=workers).worker_count(runs) == expected
