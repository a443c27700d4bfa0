"""White-box CKD (METHODS.md M2.6): fitnets-ckd and vid-ckd against numpy, finite gradients on
degenerate groups, extra modules, option errors, and budgeted digits runs through the CLI."""

import json

import numpy as np
import pytest
import torch

from ftikd.cli import main
from ftikd.errors import FtikdError
from ftikd.methods import Batch, MethodContext, build_method
from ftikd.methods.feature_common import ConvRegressor, VIDHead
from ftikd.models import build_model
from ftikd.teacher import TeacherStore

# per-sample feature shapes of resnet8 on 1x8x8 digits
SHAPES = {"stage1": (16, 8, 8), "stage2": (32, 4, 4), "stage3": (64, 2, 2)}
C = 10


def setup_method(name, groups=4, k=2, seed=0, **options):
    """A method set up on a resnet8 student, and a batch of ``groups`` groups of k with teacher maps."""
    torch.manual_seed(seed)
    student = build_model("resnet8", in_channels=1, num_classes=C)
    method = build_method(name, k=k, **options)
    shapes = {n: SHAPES[n] for n in method.teacher_features}
    method.setup(MethodContext(40, C, groups, student, torch.device("cpu"), shapes, (1, 8, 8)))
    lead = (groups, k)
    batch = Batch(
        torch.arange(groups * k).reshape(lead),
        torch.randn(*lead, 1, 8, 8),
        torch.randint(C, lead),
        C,
        torch.randn(*lead, C) * 3,
        {n: torch.randn(*lead, *s) for n, s in shapes.items()},
    )
    return method, student, batch


def np_centroid_delta(x, a, lam=None):
    """phi(mean of members :a, mean of members a:) with plain loops over groups (numpy)."""
    l1, l2 = (1.0, -1.0) if lam is None else (lam, 1.0 - lam)
    out = []
    for group in x:
        out.append(l1 * sum(group[:a]) / a + l2 * sum(group[a:]) / (len(group) - a))
    return np.stack(out)


def halves(student, images, a):
    """The student's two half forwards (A members, then B members), as the method runs them."""
    g = images.shape[0]
    outs = [student(part.reshape(-1, 1, 8, 8), with_features=True) for part in (images[:, :a], images[:, a:])]
    logits = np.concatenate([o.logits.detach().numpy().reshape(g, -1, C) for o in outs], axis=1)
    feats = {
        n: np.concatenate([o.features[n].detach().numpy().reshape(g, -1, *SHAPES[n]) for o in outs], axis=1)
        for n in SHAPES
    }
    return logits, feats


def np_logit_terms(logits, batch, a, lam=None):
    """CKD's MSE-form terms with reduction=ref: sum over classes / 100, mean over groups."""
    onehot = np.eye(C)[batch.labels.numpy()]
    ds = np_centroid_delta(logits, a, lam)
    dl = np_centroid_delta(onehot, a, lam)
    dt = np_centroid_delta(batch.teacher_logits.numpy(), a, lam)
    return {
        "ckd_label": ((ds - dl) ** 2).sum() / 100 / len(ds),
        "ckd_teacher": ((ds - dt) ** 2).sum() / 100 / len(ds),
    }


@pytest.mark.parametrize("k, comparison", [(2, "difference"), (3, "difference"), (3, "interpolation")])
def test_fitnets_ckd_matches_numpy(k, comparison):
    method, student, batch = setup_method("fitnets-ckd", k=k, comparison=comparison)
    torch.manual_seed(5)
    terms = method.loss(student, batch)
    torch.manual_seed(5)
    lam = float(torch.rand(())) if comparison == "interpolation" else None
    a = k - k // 2
    logits, feats = halves(student, batch.images, a)
    expected = np_logit_terms(logits, batch, a, lam)
    ds = np_centroid_delta(feats["stage2"], a, lam)
    dt = np_centroid_delta(batch.teacher_features["stage2"].numpy(), a, lam)
    regressed = method.extra["regressor"](torch.tensor(ds, dtype=torch.float32)).detach().numpy()
    expected["hint"] = 100 * ((regressed - dt) ** 2).mean()
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(float(value), rel=1e-4), name


def test_vid_ckd_matches_loops():
    method, student, batch = setup_method("vid-ckd", k=2, w_vid=0.5)
    terms = method.loss(student, batch)
    logits, feats = halves(student, batch.images, 1)
    expected = np_logit_terms(logits, batch, 1)
    total = 0.0
    for n in SHAPES:
        head = method.extra["heads"][n]
        mu = head(torch.tensor(np_centroid_delta(feats[n], 1), dtype=torch.float32)).detach().numpy()
        t = np_centroid_delta(batch.teacher_features[n].numpy(), 1)
        var = head.variance().detach().numpy()
        total += (0.5 * ((t - mu) ** 2 / var[None, :, None, None] + np.log(var)[None, :, None, None])).mean()
    expected["vid"] = 0.5 * total
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(float(value), rel=1e-4), name


@pytest.mark.parametrize("name", ["fitnets-ckd", "vid-ckd"])
@pytest.mark.parametrize("case", ["identical_members", "zero_differences", "one_group", "one_class"])
def test_finite_gradients_on_degenerate_groups(name, case):
    method, student, batch = setup_method(name, groups=1 if case == "one_group" else 4)
    if case in ("identical_members", "zero_differences"):
        # every group's two members are the same image with the same teacher outputs: all deltas 0
        batch.images = batch.images[:, :1].repeat(1, 2, 1, 1, 1)
        batch.labels = batch.labels[:, :1].repeat(1, 2)
        batch.teacher_logits = batch.teacher_logits[:, :1].repeat(1, 2, 1)
        batch.teacher_features = {
            n: v[:, :1].repeat(1, 2, 1, 1, 1) for n, v in batch.teacher_features.items()
        }
    if case == "zero_differences":
        batch.teacher_features = {n: torch.zeros_like(v) for n, v in batch.teacher_features.items()}
    if case == "one_class":
        batch.labels = torch.full_like(batch.labels, 3)
    terms = method.loss(student, batch)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    params = list(student.parameters()) + list(method.extra.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    if case == "identical_members":
        assert terms["ckd_teacher"].item() == pytest.approx(0.0, abs=1e-10)


def test_extra_modules_and_relu_option():
    fit, _, _ = setup_method("fitnets-ckd")
    assert isinstance(fit.extra["regressor"], ConvRegressor) and fit.extra["regressor"].use_relu
    assert fit.teacher_features == ("stage2",) and fit.call_cost == 1
    signed, _, _ = setup_method("fitnets-ckd", use_relu=False)
    out = signed.extra["regressor"](torch.randn(6, 32, 4, 4))
    assert (out < 0).any()  # signed differences can be reached (A15)
    vid, _, _ = setup_method("vid-ckd", mid_channels=8)
    assert set(vid.extra["heads"]) == set(SHAPES)
    assert all(isinstance(h, VIDHead) for h in vid.extra["heads"].values())
    assert vid.extra["heads"]["stage3"].regressor[0].out_channels == 8
    other, _, _ = setup_method("fitnets-ckd", layer="stage3", student_layer="stage2")
    assert other.teacher_features == ("stage3",) and other.student_layers == ("stage2",)


def test_sampler_is_ckds_group_sampler():
    method = build_method("vid-ckd", k=3, max_groups=50)
    sampler = method.sampler(20, 8, torch.Generator().manual_seed(0))
    batch = sampler.next_batch()
    assert batch.shape == (8, 3) and all(len(set(row.tolist())) == 3 for row in batch)


@pytest.mark.parametrize(
    "name, options",
    [
        ("fitnets-ckd", {"w_hint": -1.0}),
        ("fitnets-ckd", {"layer": "stage1,stage2"}),
        ("fitnets-ckd", {"k": 1}),
        ("fitnets-ckd", {"reduction": "sum"}),
        ("vid-ckd", {"layers": ""}),
        ("vid-ckd", {"init_var": 0.0}),
        ("vid-ckd", {"form": "l1"}),
    ],
)
def test_bad_options_are_one_line_user_errors(name, options):
    with pytest.raises(FtikdError, match="bad option") as info:
        build_method(name, **options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["fitnets-ckd", "vid-ckd"])
def test_no_per_sample_ce_or_kd_options(name):
    for option in ("w_ce", "w_kd"):  # CKD has no per-sample CE or KD (w_kd = 0, M2.6, A37)
        with pytest.raises(FtikdError, match="no option"):
            build_method(name, **{option: 1.0})


@pytest.mark.parametrize("name", ["fitnets-ckd", "vid-ckd"])
def test_cli_smoke_run_pays_n_calls(tmp_path, trained_digits_teacher, name, capsys):
    out = tmp_path / "runs"
    args = ["distill", "--dataset", "digits", "--teacher", str(trained_digits_teacher(1)), "--method", name,
            "--calls", "80", "--max-epochs", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0 and "80 paid now" in capsys.readouterr().out
    (record_path,) = out.glob("*.json")
    record = json.loads(record_path.read_text())
    calls = record["teacher_calls"]
    assert calls["paid_this_run"] == 80 and len(record["history"]) == 1
    assert {"ckd_label", "ckd_teacher"} <= set(record["history"][0])
    with TeacherStore.open(calls["store"], calls["teacher_fingerprint"], "digits", 10) as store:
        assert store.feature_names == build_method(name).teacher_features
        assert store.paid_calls() == 80 and store.count() == 80
