"""Live tracking (TensorBoard, MLflow) of a run's epoch metrics, and the history's training accuracy."""

import json
import sys
import warnings

import pytest
import torch

from ftikd.cli import main
from ftikd.data import normalize
from ftikd.engine.trainer import TrainConfig, TrainData, fit
from ftikd.errors import FtikdError
from ftikd.experiments.tracking import Trackers, check_trackers, compose, epoch_metrics, parse_track
from ftikd.methods import build_method
from ftikd.models import build_model


def distill(teacher, out, *extra):
    return main(
        ["distill", "--dataset", "digits", "--teacher", str(teacher), "--method", "kd", "--calls", "80"]
        + ["--max-epochs", "2", "--out", str(out), "--no-progress", *extra]
    )


def run_record(out):
    (path,) = [p for p in out.glob("*.json") if not p.name.endswith(".pending.json")]
    return json.loads(path.read_text())


def test_parse_track_accepts_both_and_refuses_unknown_names():
    assert parse_track("") == ()
    assert parse_track(" TensorBoard, mlflow,tensorboard ") == ("tensorboard", "mlflow")
    with pytest.raises(FtikdError, match="unknown tracker.*'wandb'"):
        parse_track("tensorboard,wandb")


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_missing_extra_is_one_line_and_costs_no_teacher_call(
    name, tmp_path, digits_teacher, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(FtikdError, match=rf"pip install 'ftikd\[{name}\]'"):
        check_trackers([name])
    out = tmp_path / "runs"
    assert distill(digits_teacher, out, "--track", name) == 2
    err = capsys.readouterr().err
    assert f"pip install 'ftikd[{name}]'" in err and err.count("\n") == 1
    assert not (tmp_path / "stores").exists() and not out.exists()  # no store, so no teacher call


def test_unknown_tracker_on_the_command_line_is_a_user_error(tmp_path, digits_teacher, capsys):
    assert distill(digits_teacher, tmp_path / "runs", "--track", "wandb") == 2
    assert "unknown tracker" in capsys.readouterr().err


def test_epoch_metrics_keep_numbers_and_drop_flags_and_step():
    record = {"epoch": 3, "phase": 0, "lr": 0.05, "val_acc": 50.0, "improved": True, "kd": 0.7}
    assert epoch_metrics(record) == {"phase": 0.0, "lr": 0.05, "val_acc": 50.0, "kd": 0.7}


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_others_go_on():
    seen = []

    class Broken:
        def log_epoch(self, record):
            raise OSError("disk full")

    class Listening:
        def log_epoch(self, record):
            seen.append(record["epoch"])

    trackers = Trackers([Broken(), Listening()])
    callback = compose(None, trackers.log_epoch)
    with pytest.warns(UserWarning, match="Broken stopped logging.*disk full"):
        callback({"epoch": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback({"epoch": 2})
    assert seen == [1, 2] and len(trackers.trackers) == 1
    assert compose(None, None) is None


def test_tensorboard_run_writes_the_epoch_metrics(tmp_path, digits_teacher):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'ftikd[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "runs"
    assert distill(digits_teacher, out, "--track", "tensorboard") == 0
    record = run_record(out)
    events = EventAccumulator(str(out / "tensorboard" / record["run"]))
    events.Reload()
    for key in ("val_acc", "train_acc", "kd", "lr"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([h[key] for h in record["history"]], rel=1e-5)
    (final,) = events.Scalars("final/test_top1")
    assert final.step == 2 and final.value == pytest.approx(record["metrics"]["test_top1"], rel=1e-5)


def test_mlflow_run_records_params_and_epoch_metrics(tmp_path, digits_teacher, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'ftikd[mlflow]')")
    pytest.importorskip(
        "sqlalchemy", reason="mlflow's SQLite store needs sqlalchemy (pip install 'ftikd[mlflow]')"
    )
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    assert distill(digits_teacher, out, "--track", "mlflow") == 0
    record = run_record(out)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ftikd").experiment_id])
    assert run.info.run_name == record["run"] and run.info.status == "FINISHED"
    assert run.data.params["method"] == "kd" and run.data.params["calls"] == "80"
    assert run.data.params["train.max_epochs"] == "2"
    for key in ("val_acc", "train_acc", "kd"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2]
        assert [m.value for m in history] == pytest.approx([h[key] for h in record["history"]], rel=1e-6)
    assert run.data.metrics["final/test_top1"] == pytest.approx(record["metrics"]["test_top1"])
    assert not (tmp_path / "mlruns").exists()  # nothing written outside --out


def test_train_acc_is_top1_on_unaugmented_training_images(digits):
    n = 96
    data = TrainData(
        train_images=digits.train_images[:n],
        train_labels=digits.train_labels[:n],
        val_images=digits.train_images[n : n + 24],
        val_labels=digits.train_labels[n : n + 24],
        mean=digits.mean,
        std=digits.std,
        num_classes=digits.num_classes,
        hflip=digits.hflip,
        padding=digits.crop_padding,
    )
    cfg = TrainConfig(batch_size=32, max_epochs=1)
    torch.manual_seed(0)
    student = build_model("resnet8", in_channels=1, num_classes=10)
    (record,) = fit(student, build_method("ce"), data, cfg, seed=0).history
    # the only pseudo-epoch is the best one, so the weights left loaded are those it measured
    student.eval()
    with torch.no_grad():
        seen = data.val_images.shape[0]  # a validation-sized part of the training subset
        pred = student(normalize(data.train_images[:seen], data.mean, data.std)).logits.argmax(dim=1)
    correct = sum(int(p) == int(y) for p, y in zip(pred, data.train_labels[:seen], strict=True))
    assert record["train_acc"] == pytest.approx(100.0 * correct / seen)
    off = fit(
        student, build_method("ce"), data, TrainConfig(batch_size=32, max_epochs=1, eval_train=False), 0
    )
    assert "train_acc" not in off.history[0]
