"""Teacher-training schedule and config checks."""

import pytest

from ftikd.errors import FtikdError
from ftikd.teacher.train import TeacherTrainConfig, lr_at


def test_cosine_schedule_endpoints():
    cfg = TeacherTrainConfig(epochs=10, lr=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 5) == pytest.approx(0.05)
    assert lr_at(cfg, 10) == pytest.approx(0.0, abs=1e-12)


def test_multistep_schedule_matches_repdistiller_milestones():
    cfg = TeacherTrainConfig(epochs=240, lr=0.05, schedule="multistep")
    assert [lr_at(cfg, e) for e in (0, 149.9, 150, 180, 239)] == pytest.approx(
        [0.05, 0.05, 0.005, 0.0005, 0.00005]
    )


def test_bad_schedule_is_a_user_error():
    with pytest.raises(FtikdError):
        TeacherTrainConfig(schedule="linear")
