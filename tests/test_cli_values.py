"""Bad command-line and config values end in one line, exit status 2, and nothing written.

Every command that trains, pays or writes checks its numbers (range, NaN, inf), its device and its
output paths before doing anything; these tests try each class of bad value on each command, and
fuzz the numeric flags of ``distill`` and the config-file keys that mirror them.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftikd.checks import check_device, check_output_dir, check_output_file
from ftikd.cli import main
from ftikd.errors import FtikdError

UNWRITABLE = "/proc/ftikd-cannot-be-here"  # mkdir fails here even for root
NO_CUDA = not torch.cuda.is_available()


def one_line_error(capsys, args, *needles) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("ftikd: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def nothing_written(root: Path) -> None:
    assert not root.exists() or not any(root.iterdir()), sorted(root.rglob("*"))


def distill(tmp_path, teacher, *extra) -> list[str]:
    out = tmp_path / "out" / "runs"
    return [
        "distill",
        "--dataset",
        "digits",
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        "--calls",
        "40",
    ] + [
        "--max-epochs",
        "1",
        "--no-progress",
        *extra,
    ]


BAD_DISTILL = [
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "1e9"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--batch-size", str(2**40)], "--batch-size"),
    (["--patience", "0"], "--patience"),
    (["--phases", "0"], "--phases"),
    (["--max-epochs", "0"], "--max-epochs"),
    (["--max-epochs", "-1"], "--max-epochs"),
    (["--calls", "0"], "--calls"),
    (["--calls", "-5"], "--calls"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**70)], "--seed"),
    (["--view", "-1"], "--view"),
    (["--device", "cuda:7" if not NO_CUDA else "cuda"], "cuda"),
    (["--device", "warp-drive"], "unknown device"),
]


@pytest.mark.parametrize("extra,needle", BAD_DISTILL, ids=[" ".join(a) for a, _ in BAD_DISTILL])
def test_distill_refuses_bad_values_before_any_work(tmp_path, capsys, digits_teacher, extra, needle):
    one_line_error(capsys, distill(tmp_path, digits_teacher, *extra), needle)
    nothing_written(tmp_path / "out")


def test_distill_refuses_unwritable_outputs(tmp_path, capsys, digits_teacher):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = distill(tmp_path, digits_teacher)
    out_at = args.index("--out") + 1
    for bad, needle in [(UNWRITABLE, "cannot write"), (str(blocker / "runs"), "is a file")]:
        args[out_at] = bad
        one_line_error(capsys, args, needle, "--out")
    args = distill(tmp_path, digits_teacher, "--store", str(tmp_path))  # a folder, not a store file
    one_line_error(capsys, args, "--store", "is a folder")
    args = distill(tmp_path, digits_teacher, "--store", f"{UNWRITABLE}/s.sqlite")
    one_line_error(capsys, args, "--store", "cannot write")
    nothing_written(tmp_path / "out")
    assert blocker.read_text() == "x"


def test_config_file_keys_are_range_checked(tmp_path, capsys, digits_teacher):
    for bad, needle in [
        ({"train": {"lr": -0.1}}, "config key train.lr"),
        ({"train": {"phases": 0}}, "config key train.phases"),
        ({"train": {"momentum": 1.5}}, "config key train.momentum"),
        ({"train": {"lr_decay": 0}}, "config key train.lr_decay"),
        ({"train": {"eval_batch_size": 0}}, "config key train.eval_batch_size"),
        ({"calls": 0}, "--calls"),
    ]:
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps({"dataset": "digits", "teacher": str(digits_teacher), **bad}))
        one_line_error(capsys, ["distill", "--config", str(path), "--out", str(tmp_path / "out")], needle)
    nothing_written(tmp_path / "out")


# numbers outside every flag's range, or not finite: each must be refused, whatever its size
_BAD_NUMBERS = {
    "--lr": st.one_of(
        st.floats(max_value=0.0), st.floats(min_value=10.0, exclude_min=True), st.just(math.nan)
    ),
    "--batch-size": st.one_of(st.integers(max_value=0), st.integers(min_value=2**20 + 1)),
    "--patience": st.integers(max_value=0),
    "--phases": st.one_of(st.integers(max_value=0), st.integers(min_value=101)),
    "--max-epochs": st.integers(max_value=0),
    "--calls": st.integers(max_value=0),
    "--seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63)),
}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_distill_numeric_flags(tmp_path_factory, digits_teacher, data):
    flag = data.draw(st.sampled_from(sorted(_BAD_NUMBERS)))
    value = data.draw(_BAD_NUMBERS[flag])
    tmp = tmp_path_factory.mktemp("fuzz")
    text = repr(value) if isinstance(value, float) else str(value)
    code = main(distill(tmp, digits_teacher, f"{flag}={text}"))  # '=': argparse takes '-1e+20' for a flag
    assert code == 2
    nothing_written(tmp / "out")


def test_train_teacher_refuses_bad_values(tmp_path, capsys):
    out = tmp_path / "t" / "teacher.safetensors"
    base = ["train-teacher", "--dataset", "digits", "--arch", "resnet8", "--no-progress", "--out", str(out)]
    for extra, needle in [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seed", "-2"], "--seed"),
        (["--milestones", "-1"], "--milestones"),
        (["--device", "cuda:9" if not NO_CUDA else "cuda"], "cuda"),
    ]:
        one_line_error(capsys, base + extra, needle)
    one_line_error(capsys, base[:-1] + [f"{UNWRITABLE}/t.safetensors"], "cannot write")
    one_line_error(capsys, base[:-1] + [str(tmp_path)], "is a folder")
    nothing_written(tmp_path / "t")


def test_cache_refuses_bad_values(tmp_path, capsys, digits_teacher):
    base = ["cache", "--dataset", "digits", "--teacher", str(digits_teacher), "--no-progress"]
    base += ["--out", str(tmp_path / "out" / "runs")]
    for extra, needle in [
        (["--batch-size", "0"], "--batch-size"),
        (["--samples", "0"], "--samples"),
        (["--max-calls", "-1"], "--max-calls"),
        (["--view", "-4"], "--view"),
        (["--seed", "-1"], "--seed"),
        (["--device", "cuda:9" if not NO_CUDA else "cuda"], "cuda"),
        (["--store", f"{UNWRITABLE}/s.sqlite"], "cannot write"),
    ]:
        one_line_error(capsys, base + extra, needle)
    nothing_written(tmp_path / "out")


def test_demo_refuses_bad_values(tmp_path, capsys):
    base = ["demo", "--no-progress", "--out", str(tmp_path / "demo")]
    for extra, needle in [
        (["--budgets", "0"], "--budgets"),
        (["--seeds", "-1"], "--seeds"),
        (["--teacher-epochs", "0"], "--teacher-epochs"),
        (["--lr", "-1"], "--lr"),
        (["--phases", "0"], "--phases"),
        (["--workers", "-1"], "--workers"),
        (["--methods", "kd:lr=-1"], "--lr"),
        (["--device", "cuda:9" if not NO_CUDA else "cuda"], "cuda"),
    ]:
        one_line_error(capsys, base + extra, needle)
    one_line_error(capsys, ["demo", "--no-progress", "--out", UNWRITABLE], "cannot write")
    nothing_written(tmp_path / "demo")


def test_bench_refuses_bad_values_before_measuring(tmp_path, capsys):
    out = tmp_path / "b" / "bench.json"
    base = ["bench", "--students", "resnet8", "--methods", "ce", "--out", str(out)]
    for extra, needle in [
        (["--threads", "0"], "--threads"),
        (["--steps", "0"], "--steps"),
        (["--repeats", "0"], "--repeats"),
        (["--batch-size", "1"], "--batch-size"),
        (["--cache-samples", "0"], "--cache-samples"),
        (["--device", "cuda:9" if not NO_CUDA else "cuda"], "cuda"),
    ]:
        one_line_error(capsys, base + extra, needle)
    one_line_error(capsys, base[:-1] + [f"{UNWRITABLE}/b.json"], "cannot write")
    nothing_written(tmp_path / "b")


def test_output_checks_create_nothing(tmp_path):
    deep = tmp_path / "x" / "y" / "z"
    check_output_dir(deep)
    check_output_file(deep / "f.json")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FtikdError, match="cannot write"):
        check_output_dir(UNWRITABLE)


def test_check_device():
    assert check_device("cpu") == torch.device("cpu")
    if NO_CUDA:
        with pytest.raises(FtikdError, match="no CUDA GPU"):
            check_device("cuda")
    with pytest.raises(FtikdError, match="unknown device"):
        check_device("gpu-please")
