"""The Ray executor on a local Ray instance (2 CPUs) started by the test, on a tiny digits grid."""

import json

import pytest

from ftikd.experiments.db import ResultsDB
from ftikd.experiments.sweep import run_sweep, sweep_from_dict

ray = pytest.importorskip(
    "ray", reason="ray is not installed: pip install 'ftikd[ray]' to test the Ray executor"
)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_executor_runs_a_grid_and_the_driver_records_it(tmp_path, digits_teacher, local_ray):
    cfg = sweep_from_dict(
        {
            "name": "ray",
            "dataset": "digits",
            "pairs": [{"teacher": "resnet8", "student": "resnet8", "teacher_path": str(digits_teacher)}],
            "methods": ["ce", "kd", "ckd"],
            "budgets": [80],
            "seeds": [1],
            "lrs": [0.05],
            "train": {"max_epochs": 2, "patience": 5, "phases": 1},
            "out": str(tmp_path / "sweep"),
        }
    )
    assert run_sweep(cfg, executor="ray", progress=False) == {
        "pending": 0,
        "running": 0,
        "done": 3,
        "failed": 0,
        "waiting": 0,
    }
    with ResultsDB(cfg.db_path) as db:
        rows = db.rows("ray")
        assert {r["attempts"] for r in rows} == {1}
        records = [json.loads(r["record"]) for r in rows]
    assert {r["config"]["method"] for r in records} == {"ce", "kd", "ckd"}
    assert all(r["metrics"]["epochs"] == 2 for r in records)
    # one shared store: the 80 outputs were paid once, by whichever teacher-using run came first
    assert sum(r["calls_paid"] for r in rows) == 80
    assert run_sweep(cfg, executor="ray", progress=False)["done"] == 3  # a re-run finds everything done
