"""A tiny end-to-end distillation on sklearn digits: teacher, budgeted store, every method, records."""

import json
import math

import pytest
import torch
from counting_teacher import CountingTeacher

from ftikd.cli import main
from ftikd.engine.trainer import TrainConfig
from ftikd.experiments.run import RunConfig, run_distillation
from ftikd.methods import available_methods, build_method
from ftikd.teacher import Teacher, TeacherStore, read_checkpoint_meta

N = 160
FAST = TrainConfig(patience=3, phases=2, max_epochs=12, lr=0.05)
# Long enough that learning is certain: no phase ends, so no early restore of a first-epoch state.
# CKD's validation accuracy dips below chance in pseudo-epochs 3-5 at LR 0.05 on 10 classes while
# its logit differences grow to the teacher's scale (the shared offset is unconstrained), then
# climbs to 70-89 % by epoch 30 on seeds 1-3 at 1 and 2 threads; the KL form with k = 3 learns slower
# (32-68 % at epoch 30, 55-82 % at epoch 60). FAST's patience 3 can end the first phase inside that dip,
# so FAST tests bookkeeping only.
LEARN = TrainConfig(patience=60, phases=1, max_epochs=60, lr=0.05)
METHODS = [("ce", {}), ("kd", {}), ("ckd", {}), ("ckd", {"k": 3, "form": "kl"}), ("ckd-inbatch", {})]


@pytest.fixture(scope="module")
def teacher_path(trained_digits_teacher):
    return trained_digits_teacher(12)


def test_teacher_checkpoint_has_metadata_and_learns(teacher_path):
    meta = read_checkpoint_meta(teacher_path)
    assert meta["arch"] == "resnet8" and meta["dataset"] == "digits" and len(meta["fingerprint"]) >= 16
    assert meta["test_acc"] > 60.0


def test_every_method_within_budget_and_store_shared(tmp_path, digits, teacher_path):
    counting = CountingTeacher(Teacher.from_checkpoint(teacher_path))
    results = {}
    for method, opts in METHODS:
        cfg = RunConfig(
            teacher=str(teacher_path),
            dataset="digits",
            method=method,
            method_options=opts,
            calls=N,
            seed=1,
            out=str(tmp_path / "runs"),
            train=FAST,
        )
        results[(method, opts.get("k", 2))] = run_distillation(
            cfg, teacher=counting, dataset=digits, progress=False
        )
    # the teacher saw each of the n samples exactly once, across all runs
    assert counting.seen == N
    paid = [r.record["teacher_calls"]["paid_this_run"] for r in results.values()]
    assert paid == [0, N, 0, 0, 0]
    store_path = results[("kd", 2)].record["teacher_calls"]["store"]
    with TeacherStore.open(store_path, counting.fingerprint, "digits", 10) as store:
        assert store.count() == N and store.paid_calls() == N
    for (method, _), result in results.items():
        rec = json.loads(result.path.read_text())
        assert rec["protocol"]["n_train"] == N and rec["protocol"]["n_val"] == N // 4
        assert rec["history"] and rec["versions"]["torch"] == torch.__version__
        losses = [v for epoch in rec["history"] for k, v in epoch.items() if k in ("ce", "kd", "ckd_teacher")]
        assert losses and all(math.isfinite(v) for v in losses), method


def black_box_methods() -> list[str]:
    """Every registered method that reads only cached logits (no teacher features, no new queries)."""
    return [
        name
        for name in available_methods()
        if not build_method(name).teacher_features and not build_method(name).queries_teacher
    ]


def test_all_black_box_methods_on_one_teacher_and_subset_pay_exactly_n(tmp_path, digits, teacher_path):
    names = black_box_methods()
    assert {"kd", "ckd", "rkd", "dist", "crd", "mixup", "cutmix", "logit-mse"} <= set(names)
    counting = CountingTeacher(Teacher.from_checkpoint(teacher_path))
    one_epoch = TrainConfig(patience=1, phases=1, max_epochs=1)
    stores = set()
    for name in names:
        cfg = RunConfig(
            teacher=str(teacher_path), dataset="digits", method=name, calls=N, seed=1,
            out=str(tmp_path / "runs"), train=one_epoch,
        )  # fmt: skip
        record = run_distillation(cfg, teacher=counting, dataset=digits, progress=False).record
        calls = record["teacher_calls"]
        assert calls["outputs_used"] <= N, name
        stores |= {calls["store"]} if "store" in calls else set()
    assert counting.seen == N  # the first method that reads the teacher paid n; none paid again
    (store_path,) = stores
    with TeacherStore.open(store_path, counting.fingerprint, "digits", 10) as store:
        assert store.count() == N and store.paid_calls() == N


@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}{o.get('k', '')}" for m, o in METHODS])
def test_each_method_learns_on_digits(tmp_path, digits, teacher_path, method, opts):
    cfg = RunConfig(
        teacher=str(teacher_path),
        dataset="digits",
        method=method,
        method_options=opts,
        calls=N,
        seed=1,
        out=str(tmp_path / "runs"),
        train=LEARN,
    )
    rec = run_distillation(cfg, dataset=digits, progress=False).record
    # chance is 10 %; the slowest form measured 55 % here, so 35 % leaves a wide margin
    assert rec["metrics"]["test_top1"] > 35.0, (method, opts, rec["metrics"])


def test_record_repeats_run_exactly(tmp_path, digits, teacher_path):
    cfg = RunConfig(
        teacher=str(teacher_path),
        dataset="digits",
        method="ckd",
        calls=N,
        seed=2,
        out=str(tmp_path / "a"),
        train=TrainConfig(patience=2, phases=1, max_epochs=4),
    )
    first = run_distillation(cfg, dataset=digits, progress=False)
    again = RunConfig.from_file(first.path)
    again.out = str(tmp_path / "b")
    second = run_distillation(again, dataset=digits, progress=False)
    assert second.record["metrics"] == first.record["metrics"]
    assert second.record["teacher_calls"]["paid_this_run"] == 0  # reused from the shared store


def test_cli_distill_and_methods(tmp_path, teacher_path, capsys):
    code = main(
        [
            "distill",
            "--dataset",
            "digits",
            "--teacher",
            str(teacher_path),
            "--method",
            "ckd-inbatch",
            "--calls",
            "80",
            "--max-epochs",
            "2",
            "--out",
            str(tmp_path / "runs"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "test top-1" in out and "80 paid now" in out
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in ("ce", "kd", "ckd", "ckd-inbatch"):
        assert f"\n{name}: " in listing
