"""User errors end in one line naming the fix, exit status 2, no traceback, nothing half-written."""

import json
import subprocess
import sys

import pytest

from ftikd.cli import main
from ftikd.models import build_model
from ftikd.teacher import TeacherStore, save_checkpoint


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ftikd: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def distill_args(tmp_path, teacher, *extra):
    return [
        "distill",
        "--dataset",
        "digits",
        "--teacher",
        str(teacher),
        "--out",
        str(tmp_path / "runs"),
        "--max-epochs",
        "1",
        "--calls",
        "40",
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--method", "nope"], ["unknown method 'nope'", "ckd"]),
        (["--student", "resnet9"], ["unknown model 'resnet9'", "resnet8"]),
        (["--calls", "5000"], ["lower --calls"]),
        (["--calls", "2"], ["n >= 4"]),
        (["--opt", "zzz=1"], ["no option(s) zzz"]),
        (["--opt", "k=1", "--calls", "20"], ["k >= 2"]),
    ],
)
def test_distill_user_errors(tmp_path, capsys, digits_teacher, extra, needles):
    code, err = run_cli(distill_args(tmp_path, digits_teacher, *extra), capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "stores").exists() or not any((tmp_path / "stores").iterdir())


def test_unknown_dataset(tmp_path, capsys, digits_teacher):
    code, err = run_cli(distill_args(tmp_path, digits_teacher, "--dataset", "imagenet-x"), capsys)
    assert_one_line_error(code, err, "unknown dataset", "fashion-mnist")


def test_missing_dataset_files(tmp_path, capsys, digits_teacher):
    args = distill_args(
        tmp_path, digits_teacher, "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "none")
    )
    code, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "dataset-fashion-mnist")


def test_missing_and_corrupt_teacher_checkpoint(tmp_path, capsys):
    code, err = run_cli(distill_args(tmp_path, tmp_path / "missing.safetensors", "--method", "kd"), capsys)
    assert_one_line_error(code, err, "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 100)
    code, err = run_cli(distill_args(tmp_path, bad, "--method", "kd"), capsys)
    assert_one_line_error(code, err, "bad.safetensors")
    assert not (tmp_path / "runs").exists()


def test_store_fingerprint_mismatch(tmp_path, capsys, digits_teacher):
    store = tmp_path / "s.sqlite"
    TeacherStore.open(store, "someone-else", "digits", 10).close()
    code, err = run_cli(
        distill_args(tmp_path, digits_teacher, "--method", "kd", "--store", str(store)), capsys
    )
    assert_one_line_error(code, err, "--store")
    assert not (tmp_path / "runs").exists()


def test_corrupt_store(tmp_path, capsys, digits_teacher):
    store = tmp_path / "s.sqlite"
    store.write_bytes(b"not a database" * 50)
    code, err = run_cli(
        distill_args(tmp_path, digits_teacher, "--method", "kd", "--store", str(store)), capsys
    )
    assert_one_line_error(code, err, "s.sqlite")


def test_corrupt_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text("{not json")
    code, err = run_cli(["distill", "--config", str(cfg)], capsys)
    assert_one_line_error(code, err, "c.json")


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ftikd.cli", "distill", "--dataset", "digits", "--method", "nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert not any(tmp_path.iterdir())


def test_record_without_config_block_is_refused(tmp_path):
    from ftikd.analysis.summary import load_records
    from ftikd.errors import FtikdError

    (tmp_path / "r.json").write_text('{"metrics": {"test_top1": 1.0}, "config": 5}')
    with pytest.raises(FtikdError, match="r.json"):
        load_records(tmp_path)


def test_bench_runs_and_reports_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--students", "resnet8", "--methods", "ce", "ckd", "--steps", "1", "--repeats", "1",
            "--batch-size", "8", "--cache-samples", "32", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    kinds = [r["what"].split(":")[0].split(" (")[0] for r in rows]
    assert kinds == [
        "bare student step",
        "ftikd step",
        "ftikd step",
        "bare teacher inference",
        "teacher caching",
    ]
    assert "16 images/step" in rows[2]["what"]  # group CKD k=2: 8 groups x 2 images
    assert all(r["images_per_s"] > 0 for r in rows)


def test_teacher_for_another_dataset_is_refused(tmp_path, capsys):
    path = tmp_path / "five.safetensors"
    model = build_model("resnet8", in_channels=1, num_classes=5)
    save_checkpoint(model, path, {"arch": "resnet8", "in_channels": 1, "num_classes": 5, "dataset": "other"})
    code, err = run_cli(distill_args(tmp_path, path, "--method", "kd"), capsys)
    assert_one_line_error(code, err, "5 classes", "pass a teacher trained on digits")
    assert not (tmp_path / "runs").exists()
