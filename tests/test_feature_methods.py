"""White-box feature methods FitNets, VID, AT, FSP (METHODS.md M9-M12): losses against numpy,
finite gradients on edge cases, connectors, the two-stage clock, budgeted digits runs and the
restore of connectors/heads at a phase end."""

import json

import numpy as np
import pytest
import torch
from counting_teacher import CountingTeacher
from feature_shapes import SHAPES

from ftikd.cli import main
from ftikd.data import normalize
from ftikd.engine import trainer
from ftikd.engine.trainer import TrainConfig, TrainData
from ftikd.errors import FtikdError
from ftikd.experiments.run import RunConfig, run_distillation
from ftikd.losses.feature import at_loss, attention_map, fsp_loss, fsp_matrix, hint_loss, vid_loss
from ftikd.methods import Batch, MethodContext, build_method
from ftikd.methods.feature_common import ConvRegressor, StepClock, VIDHead
from ftikd.models import build_model
from ftikd.teacher import Teacher, TeacherStore

rng = np.random.default_rng(0)
METHODS = ["fitnets", "vid", "at", "fsp"]


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def np_pool(x, size):
    """Block-mean pooling of (N, C, H, W) to (N, C, size, size) (adaptive pooling with exact blocks)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


# ---------------------------------------------------------------- losses against numpy


def test_hint_loss_is_elementwise_mean():
    a, b = rng.normal(size=(3, 4, 2, 5)), rng.normal(size=(3, 4, 2, 5))
    assert hint_loss(t64(a), t64(b)).item() == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-6)


def test_vid_loss_matches_loops():
    n, c, h, w = 3, 2, 2, 3
    mu, t = rng.normal(size=(n, c, h, w)), rng.normal(size=(n, c, h, w))
    var = np.array([0.7, 3.0])
    total = 0.0
    for i in range(n):
        for j in range(c):
            for y in range(h):
                for x in range(w):
                    total += 0.5 * ((t[i, j, y, x] - mu[i, j, y, x]) ** 2 / var[j] + np.log(var[j]))
    assert vid_loss(t64(mu), t64(t), t64(var)).item() == pytest.approx(total / (n * c * h * w), rel=1e-6)


def np_attention(f, p):
    e = (np.abs(f) ** p).mean(axis=1).reshape(f.shape[0], -1)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_at_loss_matches_numpy_with_pooling(p):
    s = rng.normal(size=(4, 3, 4, 4))  # signed maps: |F|^p matters for odd p
    t = rng.normal(size=(4, 5, 8, 8))  # larger teacher map, other channel count
    np.testing.assert_allclose(attention_map(t64(s), p).numpy(), np_attention(s, p), rtol=1e-6)
    expected = ((np_attention(s, p) - np_attention(np_pool(t, 4), p)) ** 2).mean()
    assert at_loss(t64(s), t64(t), p).item() == pytest.approx(float(expected), rel=1e-6)
    # symmetric case: the student map is the larger one
    expected = ((np_attention(np_pool(t, 4), p) - np_attention(s, p)) ** 2).mean()
    assert at_loss(t64(t), t64(s), p).item() == pytest.approx(float(expected), rel=1e-6)


def np_fsp(a, b):
    if a.shape[-1] > b.shape[-1]:
        a = np_pool(a, b.shape[-1])
    n, c1, h, w = a.shape
    c2 = b.shape[1]
    g = np.zeros((n, c1, c2))
    for i in range(n):
        for j in range(c1):
            for k in range(c2):
                g[i, j, k] = (a[i, j] * b[i, k]).sum() / (h * w)
    return g


def test_fsp_matrix_and_loss_match_loops():
    shapes = [(2, 3, 8, 8), (2, 3, 8, 8), (2, 4, 4, 4)]  # a same-size pair, then a pooled pair
    s = [rng.normal(size=sh) for sh in shapes]
    t = [rng.normal(size=sh) for sh in shapes]
    np.testing.assert_allclose(fsp_matrix(t64(s[1]), t64(s[2])).numpy(), np_fsp(s[1], s[2]), rtol=1e-6)
    weights = [1.0, 3.0]
    expected = sum(
        w * ((np_fsp(s[i], s[i + 1]) - np_fsp(t[i], t[i + 1])) ** 2).mean() for i, w in enumerate(weights)
    )
    got = fsp_loss([t64(x) for x in s], [t64(x) for x in t], weights).item()
    assert got == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError):
        fsp_loss([t64(x) for x in s], [t64(x) for x in t], [1.0])


def test_reference_reductions_do_not_scale_with_map_size():
    """Elementwise means: tiling a map over more channels and positions leaves each loss unchanged."""
    a, b = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    big_a, big_b = a.repeat(1, 4, 1, 1), b.repeat(1, 4, 1, 1)
    assert hint_loss(big_a, big_b).item() == pytest.approx(hint_loss(a, b).item(), rel=1e-5)
    var = torch.full((3,), 2.0)
    assert vid_loss(big_a, big_b, var.repeat(4)).item() == pytest.approx(vid_loss(a, b, var).item(), rel=1e-5)


# ---------------------------------------------------------------- edge cases: finite gradients


def _edge_losses(s, t):
    head = VIDHead(s.shape[1], t.shape[1], t.shape[1])
    return {
        "hint": hint_loss(s, t),
        "vid": vid_loss(head(s), t, head.variance()),
        "at": at_loss(s, t),
        "fsp": fsp_loss([s, s], [t, t], [1.0]),
    }


@pytest.mark.parametrize(
    "case", ["identical_samples", "zero_maps", "batch_of_two", "batch_of_one", "student_equals_teacher"]
)
def test_losses_have_finite_gradients_on_edge_cases(case):
    torch.manual_seed(0)
    t = torch.rand(4, 3, 4, 4)
    s = torch.rand(4, 3, 4, 4)
    if case == "identical_samples":
        s, t = s[:1].repeat(4, 1, 1, 1), t[:1].repeat(4, 1, 1, 1)
    elif case == "zero_maps":  # dead ReLUs: attention maps of zero norm
        s, t = torch.zeros_like(s), torch.zeros_like(t)
    elif case == "batch_of_two":
        s, t = s[:2], t[:2]
    elif case == "batch_of_one":
        s, t = s[:1], t[:1]
    elif case == "student_equals_teacher":
        s = t.clone()
    s.requires_grad_(True)
    for name, value in _edge_losses(s, t).items():
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), (case, name)
        if case == "student_equals_teacher" and name != "vid":
            assert value.item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize(
    "student_shape, teacher_shape, kind",
    [
        ((16, 8, 8), (32, 4, 4), torch.nn.Conv2d),  # Hs = 2 Ht: stride-2 conv
        ((32, 4, 4), (16, 8, 8), torch.nn.ConvTranspose2d),  # 2 Hs = Ht: transposed conv
        ((16, 8, 8), (24, 6, 5), torch.nn.Conv2d),  # Hs >= Ht: (1 + Hs - Ht) x (1 + Ws - Wt) kernel
        ((16, 8, 8), (16, 8, 8), torch.nn.Conv2d),  # equal: 1x1
    ],
)
def test_connector_maps_student_shape_to_teacher_shape(student_shape, teacher_shape, kind):
    reg = ConvRegressor(student_shape, teacher_shape)
    out = reg(torch.randn(3, *student_shape))
    assert isinstance(reg.conv, kind) and out.shape == (3, *teacher_shape) and (out >= 0).all()
    signed = ConvRegressor(student_shape, teacher_shape, use_relu=False)(torch.randn(3, *student_shape))
    assert (signed < 0).any()  # A15: without the ReLU the connector can output signed targets


def test_connector_refuses_an_unreachable_shape():
    with pytest.raises(FtikdError, match="connector"):
        ConvRegressor((16, 4, 4), (16, 12, 12))


def test_vid_head_starts_at_variance_five():
    head = VIDHead(8, 4, 4)
    assert torch.allclose(head.variance(), torch.full((4,), 5.0), atol=1e-4)
    assert all(conv.bias is None for conv in head.regressor if isinstance(conv, torch.nn.Conv2d))


def test_step_clock_counts_stage1_resumes_and_never_rewinds():
    clock = StepClock(3)
    early = {k: v.clone() for k, v in clock.state_dict().items()}
    assert [clock.in_stage1() for _ in range(5)] == [True, True, True, False, False]
    saved = clock.state_dict()
    clock.load_state_dict(early)  # a phase end restoring an older state: the clock stays put
    assert not clock.in_stage1() and int(clock.count) == 3
    fresh = StepClock(4)
    fresh.load_state_dict(saved)  # a resume: the saved count comes back
    assert [fresh.in_stage1() for _ in range(2)] == [True, False]


# ---------------------------------------------------------------- methods on synthetic batches


def synthetic(method_name, labels=(0, 1, 1, 2, 2), **options):
    """A method set up on a resnet8 student for 1x8x8 inputs, and one batch of 5 with teacher maps."""
    torch.manual_seed(0)
    student = build_model("resnet8", in_channels=1, num_classes=10)
    method = build_method(method_name, **options)
    shapes = {n: SHAPES[n] for n in method.teacher_features if n in SHAPES}
    method.setup(MethodContext(10, 10, 5, student, torch.device("cpu"), shapes, (1, 8, 8)))
    batch = Batch(torch.arange(5), torch.randn(5, 1, 8, 8), torch.tensor(labels), 10, torch.randn(5, 10),
                  {n: torch.rand(5, *s) for n, s in shapes.items()})  # fmt: skip
    return method, student, batch


@pytest.mark.parametrize(
    "name, options, keys",
    [
        ("fitnets", {}, {"ce", "kd", "hint"}),
        ("vid", {}, {"ce", "kd", "vid"}),
        ("at", {}, {"ce", "at"}),
        ("at", {"w_kd": 1.0}, {"ce", "kd", "at"}),
        ("fsp", {"stage1_epochs": 0, "w_fsp": 1.0}, {"ce", "fsp"}),
    ],
)
@pytest.mark.parametrize("labels", [(0, 1, 1, 2, 2), (3, 3, 3, 3, 3)])  # mixed, or a batch of one class
def test_method_terms_and_finite_gradients(name, options, keys, labels):
    method, student, batch = synthetic(name, labels, **options)
    terms = method.loss(student, batch)
    assert set(terms) == keys
    sum(terms.values()).backward()
    grads = [p.grad for p in list(student.parameters()) + list(method.extra.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "name, options, stage1_key, after_keys, untouched",
    [
        ("fitnets", {"stage1_epochs": 1}, "hint_stage1", {"ce", "kd", "hint"}, ("fc", "stages.2")),
        ("fitnets", {"w_ce": 0.1, "w_kd": 0.9, "w_hint": 0}, "hint_stage1", {"ce", "kd"}, ("fc", "stages.2")),
        ("fsp", {}, "fsp_stage1", {"ce"}, ("fc",)),
    ],
)
def test_two_stage_switches_after_stage1_steps(name, options, stage1_key, after_keys, untouched):
    options = {"stage1_epochs": 1, **options}  # 1 pseudo-epoch of ceil(10 / 5) = 2 steps
    method, student, batch = synthetic(name, **options)
    for step in range(3):
        student.zero_grad(set_to_none=True)
        method.extra.zero_grad(set_to_none=True)
        terms = method.loss(student, batch)
        sum(terms.values()).backward()
        if step < 2:
            assert set(terms) == {stage1_key}
            # stage 1 trains the layers up to the guided layer only: the rest gets no gradient (A22)
            for pname, p in student.named_parameters():
                assert (p.grad is None) == pname.startswith(untouched), pname
        else:
            assert set(terms) == after_keys
    if "w_hint" in options:  # [S3]'s stage 2: the connector is dropped (no gradient)
        assert all(p.grad is None for p in method.extra["regressor"].parameters())


@pytest.mark.parametrize(
    "name, options",
    [
        ("fitnets", {"w_hint": -1.0}),
        ("fitnets", {"layer": "stage1,stage2"}),
        ("fitnets", {"stage1_epochs": -1}),
        ("fitnets", {"w_ce": 0, "w_kd": 0, "w_hint": 0}),
        ("vid", {"layers": ""}),
        ("vid", {"init_var": 0.0}),
        ("at", {"p": 0.5}),
        ("at", {"layers": "stage1,stage1"}),
        ("fsp", {"layers": "stage1"}),
        ("fsp", {"pair_weights": "1,3"}),
        ("fsp", {"pair_weights": "1,x,1"}),
        ("fsp", {"stage1_epochs": 0}),
    ],
)
def test_bad_options_are_user_errors(name, options):
    with pytest.raises(FtikdError, match="bad option"):
        build_method(name, **options)


def test_options_from_a_config_file_may_be_lists():
    method = build_method("fsp", layers=["stage1", "stage2", "stage3"], pair_weights=[1, 3])
    assert method.teacher_features == ("stage1", "stage2", "stage3") and method.pair_weights == (1.0, 3.0)


def test_setup_refuses_mismatched_or_missing_features():
    method = build_method("fsp")
    wide = build_model("resnet8x4", in_channels=1, num_classes=10)  # 32/64/128/256 channels
    ctx = MethodContext(10, 10, 5, wide, torch.device("cpu"), SHAPES, (1, 8, 8))
    with pytest.raises(FtikdError, match="equal student and teacher channels"):
        method.setup(ctx)
    with pytest.raises(FtikdError, match="not \\(C, H, W\\) maps"):
        synthetic("at", layers="stage3,embedding")
    with pytest.raises(FtikdError, match="no feature"):
        synthetic("vid", layers="stage9")


# ---------------------------------------------------------------- digits runs: budget, store, restore


@pytest.fixture(scope="module")
def teacher_path(trained_digits_teacher):
    return trained_digits_teacher(1)


@pytest.mark.parametrize("name", METHODS)
def test_cli_smoke_run_pays_n_calls_and_stores_only_the_requested_features(
    tmp_path, teacher_path, name, capsys
):
    out = tmp_path / name / "runs"
    args = ["distill", "--dataset", "digits", "--teacher", str(teacher_path), "--method", name,
            "--calls", "80", "--max-epochs", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    code = main(args)
    assert code == 0 and "80 paid now" in capsys.readouterr().out
    (record_path,) = out.glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["teacher_calls"]["paid_this_run"] == 80 and len(record["history"]) == 1
    fingerprint = record["teacher_calls"]["teacher_fingerprint"]
    with TeacherStore.open(record["teacher_calls"]["store"], fingerprint, "digits", 10) as store:
        assert store.feature_names == build_method(name).teacher_features
        assert store.paid_calls() == 80 and store.count() == 80


def test_methods_needing_other_features_share_an_out_folder(tmp_path, teacher_path, capsys):
    """Each feature set gets its own default store; logit-only methods keep sharing theirs."""
    out = tmp_path / "runs"
    stores = set()
    for name in ("kd", "fitnets", "vid", "dist"):
        args = ["distill", "--dataset", "digits", "--teacher", str(teacher_path), "--method", name,
                "--calls", "40", "--max-epochs", "1", "--out", str(out), "--no-progress"]  # fmt: skip
        assert main(args) == 0, capsys.readouterr().err
        (record,) = [json.loads(p.read_text()) for p in out.glob(f"*-{name}-*.json")]
        stores.add(record["teacher_calls"]["store"])
        assert record["teacher_calls"]["paid_this_run"] == (0 if name == "dist" else 40)
    assert len(stores) == 3  # kd and dist share the logits store


@pytest.mark.parametrize("name", METHODS)
def test_teacher_runs_once_per_sample_and_never_again(tmp_path, digits, teacher_path, name):
    method = build_method(name)
    counting = CountingTeacher(Teacher.from_checkpoint(teacher_path, feature_names=method.teacher_features))
    for out in ("a", "b"):  # the second run reads everything back from the same store
        cfg = RunConfig(teacher=str(teacher_path), dataset="digits", method=name, calls=64, seed=1,
                        out=str(tmp_path / out), store=str(tmp_path / "store.sqlite"),
                        train=TrainConfig(max_epochs=2))  # fmt: skip
        result = run_distillation(cfg, teacher=counting, dataset=digits, progress=False)
        assert result.record["teacher_calls"]["paid_this_run"] == (64 if out == "a" else 0)
    assert counting.seen == 64


def digits_train_data(digits, names):
    """64 training and 32 validation digits with outputs of a seeded teacher, as the store would hold."""
    torch.manual_seed(3)
    teacher = build_model("resnet8", in_channels=1, num_classes=10).eval()
    images, labels = digits.train_images[:96], digits.train_labels[:96]
    with torch.no_grad():
        out = teacher(normalize(images[:64], digits.mean, digits.std), with_features=True)
    feats = {n: out.features[n] for n in names}
    return TrainData(images[:64], labels[:64], images[64:], labels[64:], digits.mean, digits.std, 10,
                     digits.hflip, digits.crop_padding, out.logits, feats)  # fmt: skip


@pytest.mark.parametrize("name, options", [("fitnets", {}), ("vid", {}), ("fitnets", {"stage1_epochs": 2})])
def test_extra_modules_are_restored_at_a_phase_end(monkeypatch, digits, name, options):
    method = build_method(name, **options)
    data = digits_train_data(digits, method.teacher_features)
    scripted = iter([50.0, 40.0, 40.0, 40.0, 40.0])  # best at epoch 1, phase ends at epochs 3 and 5
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: (next(scripted), 0.0))
    snapshots = {}

    def snapshot(record):
        snapshots[record["epoch"]] = {k: v.clone() for k, v in method.extra.state_dict().items()}

    torch.manual_seed(1)
    student = build_model("resnet8", in_channels=1, num_classes=10)
    # the script drives validation only: no training-accuracy evaluations in between
    cfg = TrainConfig(batch_size=16, patience=2, phases=2, max_epochs=10, eval_train=False)
    result = trainer.fit(student, method, data, cfg, seed=1, on_epoch=snapshot)
    assert [r.get("phase_end", False) for r in result.history] == [False, False, True, False, True]
    weights = [k for k in snapshots[1] if not k.startswith("clock")]
    assert any("alpha" in k or "conv" in k for k in weights)
    assert any(not torch.equal(snapshots[2][k], snapshots[1][k]) for k in weights)  # training moved them
    # the phase-end restore brought back the best (epoch 1) state
    assert all(torch.equal(snapshots[3][k], snapshots[1][k]) for k in weights)
    if "clock.count" in snapshots[1]:  # the stage-1 clock is not rewound with the weights
        assert int(snapshots[1]["clock.count"]) == 4 and int(snapshots[3]["clock.count"]) == 8
        assert "hint_stage1" in result.history[1] and "hint" in result.history[3]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", ["fitnets", "fsp"])
def test_two_stage_resume_continues_the_schedule_exactly(tmp_path, digits, name):
    """Kill after pseudo-epoch 1 (inside stage 1), resume from the checkpoint: the same history."""
    cfg = TrainConfig(batch_size=16, patience=50, phases=1, max_epochs=4)

    def run(checkpoint=None, resume=False, stop_after=None):
        method = build_method(name, stage1_epochs=2)
        data = digits_train_data(digits, method.teacher_features)
        torch.manual_seed(1)
        student = build_model("resnet8", in_channels=1, num_classes=10)

        def on_epoch(record):
            if record["epoch"] == stop_after:
                raise Interrupt

        return trainer.fit(
            student, method, data, cfg, 1, on_epoch=on_epoch, checkpoint=checkpoint, resume=resume
        )

    reference = run().history
    with pytest.raises(Interrupt):
        run(tmp_path / "state.pt", stop_after=1)
    resumed = run(tmp_path / "state.pt", resume=True).history
    assert [sorted(h) for h in resumed] == [sorted(h) for h in reference]
    stage1 = [any(k.endswith("_stage1") for k in h) for h in resumed]
    assert stage1 == [True, True, False, False]
    for got, want in zip(resumed, reference, strict=True):
        for key, value in want.items():
            if isinstance(value, float) and key != "time_s":
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
