"""Method combinations (``combo``): option syntax, CE/KD counted once, one shared student forward,
losses against numpy, finite gradients, extra modules under part names, sampler agreement, one-line
option errors, and budgeted digits runs through the CLI."""

import json
import re

import numpy as np
import pytest
import torch

from ftikd.cli import main
from ftikd.data import normalize
from ftikd.engine import trainer
from ftikd.engine.trainer import TrainConfig, TrainData
from ftikd.errors import FtikdError
from ftikd.methods import Batch, MethodContext, build_method
from ftikd.methods.combo import SharedForward, parse_parts
from ftikd.models import build_model
from ftikd.options import parse_options
from ftikd.teacher import TeacherStore

SHAPES = {"stage1": (16, 8, 8), "stage2": (32, 4, 4), "stage3": (64, 2, 2), "embedding": (64,)}
C = 10


class Counting(torch.nn.Module):
    """A resnet8 student that counts its forwards."""

    def __init__(self):
        super().__init__()
        self.model = build_model("resnet8", in_channels=1, num_classes=C)
        self.calls = 0

    def forward(self, x, with_features=False):
        self.calls += 1
        return self.model(x, with_features=with_features)


def synthetic(parts, labels=(0, 1, 1, 2, 2, 4), seed=0):
    """A combo set up on a counting resnet8 student, and one plain batch with teacher maps."""
    torch.manual_seed(seed)
    student = Counting()
    method = build_method("combo", parts=parts)
    shapes = {n: SHAPES[n] for n in method.teacher_features}
    b = len(labels)
    ctx = MethodContext(12, C, b, student, torch.device("cpu"), shapes, (1, 8, 8), torch.arange(12) % 3)
    method.setup(ctx)
    batch = Batch(torch.arange(b), torch.randn(b, 1, 8, 8), torch.tensor(labels), C, torch.randn(b, C) * 2,
                  {n: torch.rand(b, *s) for n, s in shapes.items()})  # fmt: skip
    student.calls = 0
    return method, student, batch


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_ce(z, y):
    return float(np.mean([-np_log_softmax(z)[i, y[i]] for i in range(len(y))]))


def np_kd(zs, zt, t=4.0):
    ls, lt = np_log_softmax(zs / t), np_log_softmax(zt / t)
    return float((np.exp(lt) * (lt - ls)).sum(axis=1).mean() * t * t)


def np_at(s, t):
    def q(f):
        e = (f**2).mean(axis=1).reshape(f.shape[0], -1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    return float(((q(s) - q(t)) ** 2).mean())


def student_numpy(student, images):
    with torch.no_grad():
        out = student.model(images, with_features=True)
    return out.logits.numpy().astype(np.float64), {
        n: v.numpy().astype(np.float64) for n, v in out.features.items()
    }


# ---------------------------------------------------------------- syntax


def test_syntax_survives_parse_options_and_reads_typed_values():
    text = "crd+vid,vid.w_vid=1,crd.w_crd=0.8,vid.layers=stage2,stage3,fitnets.use_relu=false"
    with pytest.raises(ValueError, match="names no part"):
        parse_parts(text)  # fitnets is not a part
    opts = parse_options(
        ["parts=crd+vid+fitnets,vid.w_vid=1,crd.w_crd=0.8,vid.layers=stage2,stage3,fitnets.use_relu=false"]
    )
    assert list(opts) == ["parts"]
    parsed = parse_parts(opts["parts"])
    assert list(parsed) == ["crd", "vid", "fitnets"]
    assert parsed == {
        "crd": {"w_crd": 0.8},
        "vid": {"w_vid": 1, "layers": "stage2,stage3"},
        "fitnets": {"use_relu": False},
    }
    assert parse_parts("kd + at") == {"kd": {}, "at": {}}
    assert list(build_method("combo").parts) == ["crd", "vid"]  # buildable without options


# ---------------------------------------------------------------- losses


def test_kd_plus_at_matches_numpy_with_one_forward():
    method, student, batch = synthetic("kd+at")
    terms = method.loss(student, batch)
    assert student.calls == 1  # kd's plain forward and at's feature forward are shared
    z, feats = student_numpy(student, batch.images)
    y, zt = batch.labels.numpy(), batch.teacher_logits.numpy().astype(np.float64)
    tmaps = {n: batch.teacher_features[n].numpy() for n in ("stage1", "stage2", "stage3")}
    expected = {
        "kd.ce": np_ce(z, y),
        "kd.kd": np_kd(z, zt),
        "at.at": 1000 * sum(np_at(feats[n], tmaps[n]) for n in tmaps),
    }
    assert set(terms) == set(expected)  # at's CE is counted in kd (at's w_ce forced to 0)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4), name


def test_at_plus_kd_keeps_ce_in_at_and_kd_in_kd():
    method, student, batch = synthetic("at+kd")
    terms = method.loss(student, batch)
    z, _ = student_numpy(student, batch.images)
    assert terms["at.ce"].item() == pytest.approx(np_ce(z, batch.labels.numpy()), rel=1e-4)
    assert terms["kd.ce"].item() == 0.0 and "at.kd" not in terms
    assert terms["kd.kd"].item() == pytest.approx(
        np_kd(z, batch.teacher_logits.numpy().astype(np.float64)), rel=1e-4
    )


def test_crd_plus_vid_terms_once_and_vid_matches_loops():
    method, student, batch = synthetic("crd+vid,vid.w_vid=0.5,crd.w_crd=0.8")
    terms = method.loss(student, batch)
    assert student.calls == 1
    assert set(terms) == {"crd.ce", "crd.kd", "crd.crd", "vid.vid"}
    assert method.parts["vid"].config.w_ce == 0 and method.parts["vid"].config.w_kd == 0
    z, feats = student_numpy(student, batch.images)
    assert terms["crd.ce"].item() == pytest.approx(np_ce(z, batch.labels.numpy()), rel=1e-4)
    total = 0.0
    for n in ("stage1", "stage2", "stage3"):
        head = method.extra["vid"]["heads"][n]
        with torch.no_grad():
            mu = head(torch.tensor(feats[n], dtype=torch.float32)).numpy()
            var = head.variance().numpy()[None, :, None, None]
        t = batch.teacher_features[n].numpy()
        total += float((0.5 * ((t - mu) ** 2 / var + np.log(var))).mean())
    assert terms["vid.vid"].item() == pytest.approx(0.5 * total, rel=1e-4)


def test_group_parts_share_their_half_forwards():
    method, student, _ = synthetic("ckd+fitnets-ckd")
    torch.manual_seed(1)
    batch = Batch(torch.arange(8).reshape(4, 2), torch.randn(4, 2, 1, 8, 8), torch.randint(C, (4, 2)), C,
                  torch.randn(4, 2, C), {"stage2": torch.randn(4, 2, 32, 4, 4)})  # fmt: skip
    terms = method.loss(student, batch)
    assert student.calls == 2  # one forward per half, shared by both parts
    assert terms["ckd.ckd_teacher"].item() == pytest.approx(terms["fitnets-ckd.ckd_teacher"].item(), rel=1e-6)


def test_shared_forward_memo_hits_only_the_same_tensor():
    student = Counting()
    shared = SharedForward(student, with_features=False)
    x = torch.randn(3, 1, 8, 8)
    first = shared(x)
    assert shared(x.reshape(3, 1, 8, 8)) is first and student.calls == 1  # a view of the same memory
    assert shared(x.clone()) is not first and student.calls == 2  # equal values elsewhere: a new forward
    assert shared(x, with_features=True).features and student.calls == 3  # features asked late
    assert shared(x) is first and student.calls == 3
    x.mul_(2.0)  # an in-place change bumps the version: the cached output no longer applies
    shared(x)
    assert student.calls == 4
    assert shared.training == student.training  # attributes are the student's


@pytest.mark.parametrize("parts", ["crd+vid", "kd+at", "fitnets+vid"])
@pytest.mark.parametrize("case", ["one_class", "batch_of_two", "identical_samples"])
def test_finite_gradients_on_edge_cases(parts, case):
    labels = {"one_class": (3,) * 6, "batch_of_two": (1, 2), "identical_samples": (5,) * 6}[case]
    method, student, batch = synthetic(parts, labels)
    if case == "identical_samples":
        batch.images = batch.images[:1].repeat(6, 1, 1, 1)
        batch.teacher_logits = batch.teacher_logits[:1].repeat(6, 1)
        batch.teacher_features = {
            n: v[:1].repeat(6, *[1] * (v.dim() - 1)) for n, v in batch.teacher_features.items()
        }
    terms = method.loss(student, batch)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())
    params = list(student.parameters()) + list(method.extra.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    assert all(p.grad is not None for p in student.parameters())


# ---------------------------------------------------------------- structure


def test_extra_modules_live_under_part_names():
    method, student, batch = synthetic("crd+vid")
    assert list(method.extra) == ["crd", "vid"]
    assert method.extra["vid"] is method.parts["vid"].extra and "heads" in method.extra["vid"]
    assert {"embed_s", "embed_t", "memory"} <= set(method.extra["crd"])
    keys = method.modules().state_dict().keys()
    assert any(k.startswith("crd.memory.") for k in keys) and any(
        k.startswith("vid.heads.stage1.") for k in keys
    )
    sum(method.loss(student, batch).values()).backward()
    assert method.extra["vid"]["heads"]["stage2"].alpha.grad is not None
    assert method.extra["crd"]["embed_s"].linear.weight.grad is not None


def test_union_of_features_cost_and_coupling():
    combo = build_method("combo", parts="fitnets+vid,vid.layers=stage2,stage3")
    assert combo.teacher_features == ("stage2", "stage3") and combo.call_cost == 1
    assert not combo.couples_batch_rows
    assert build_method("combo", parts="kd+ckd-inbatch").couples_batch_rows
    free = build_method("combo", parts="ce+dml")
    assert free.call_cost == 0 and not free.needs_teacher
    assert build_method("combo", parts="kd+fitnets,fitnets.stage1_epochs=1").leaves_student_parameters_unused
    described = build_method("combo", parts="crd+vid").describe()
    assert described["components"]["vid"]["w_ce"] == 0.0 and described["components"]["crd"]["w_ce"] == 1.0


@pytest.mark.parametrize(
    "parts, message",
    [
        ("crd+nosuch", "part 'nosuch': unknown method 'nosuch'"),
        ("crd+vid,vid.nosuch=1", "part 'vid': method 'vid' has no option"),
        ("crd+vid,at.w_at=1", "names no part"),
        ("crd+vid,vid.w_vid=-1", "part 'vid'"),
        ("ckd+vid", "draw different batches.*vid-ckd"),
        ("fitnets+ckd", "draw different batches.*fitnets-ckd"),
        ("crd+vid,vid.w_kd=2", "KD is counted once, in part 'crd'"),
        ("kd+ce", "CE is counted once, in part 'kd': drop part ce"),
        ("kd", "two or more distinct"),
        ("kd+kd", "two or more distinct"),
        ("kd+combo", "another combo"),
        ("kd+at,w_ce", "must look like part.option=value"),
        ("kd+at,at.p=1,at.p=2", "given twice"),
        ("", "combo needs parts="),
    ],
)
def test_option_errors_are_one_line_user_errors(parts, message):
    with pytest.raises(FtikdError, match="bad option for method 'combo'") as info:
        build_method("combo", parts=parts)
    assert "\n" not in str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


def test_sampler_mismatch_needing_the_run_data_is_refused_at_training_start():
    method, _, _ = synthetic("rkd+kd")  # rkd's class sampler needs setup's labels: no build-time probe
    with pytest.raises(FtikdError, match="'rkd' .* and 'kd' .* draw different batches"):
        method.sampler(12, 6, torch.Generator().manual_seed(0))
    agreeing, _, _ = synthetic("ckd+rkd-d")  # the same fixed pair set: allowed
    generator = torch.Generator().manual_seed(3)
    alone = build_method("ckd").sampler(12, 6, torch.Generator().manual_seed(3))
    assert torch.equal(agreeing.sampler(12, 6, generator).next_batch(), alone.next_batch())


# ---------------------------------------------------------------- digits runs


@pytest.mark.parametrize(
    "parts, features, term",
    [
        ("crd+vid,vid.w_vid=1,crd.w_crd=0.8", ("stage1", "stage2", "stage3"), "vid.vid"),
        ("kd+at", ("stage1", "stage2", "stage3"), "at.at"),
    ],
)
def test_cli_smoke_run_pays_n_calls(tmp_path, trained_digits_teacher, capsys, parts, features, term):
    out = tmp_path / "runs"
    teacher = str(trained_digits_teacher(1))
    args = [
        "distill",
        "--dataset",
        "digits",
        "--teacher",
        teacher,
        "--method",
        "combo",
        "--opt",
        f"parts={parts}",
        "--calls",
        "80",
        "--max-epochs",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0 and "80 paid now" in capsys.readouterr().out
    (record_path,) = out.glob("*.json")
    record = json.loads(record_path.read_text())
    calls = record["teacher_calls"]
    assert calls["paid_this_run"] == 80 and calls["outputs_used"] == 80 and len(record["history"]) == 1
    assert term in record["history"][0] and set(record["method"]["components"]) == set(parse_parts(parts))
    with TeacherStore.open(calls["store"], calls["teacher_fingerprint"], "digits", 10) as store:
        assert store.feature_names == features
        assert store.paid_calls() == 80 and store.count() == 80


# ---------------------------------------------------------------- training: phase-end restore


def digits_train_data(digits, names):
    """64 training and 32 validation digits with a seeded teacher's outputs, as the store would hold."""
    torch.manual_seed(3)
    teacher = build_model("resnet8", in_channels=1, num_classes=C).eval()
    images, labels = digits.train_images[:96], digits.train_labels[:96]
    with torch.no_grad():
        out = teacher(normalize(images[:64], digits.mean, digits.std), with_features=True)
    feats = {n: out.features[n] for n in names}
    return TrainData(images[:64], labels[:64], images[64:], labels[64:], digits.mean, digits.std, C,
                     digits.hflip, digits.crop_padding, out.logits, feats)  # fmt: skip


@pytest.mark.parametrize(
    "name, options",
    [
        ("combo", {"parts": "crd+vid"}),
        ("combo", {"parts": "ckd+fitnets-ckd"}),
        ("fitnets-ckd", {}),
        ("vid-ckd", {}),
    ],
)
def test_extra_modules_are_restored_at_a_phase_end(monkeypatch, digits, name, options):
    method = build_method(name, **options)
    data = digits_train_data(digits, method.teacher_features)
    scripted = iter([50.0, 40.0, 40.0, 40.0, 40.0])  # best at epoch 1, phase ends at epochs 3 and 5

    def evaluate(model, images, *args, **kwargs):  # validation follows the script; other evaluations 0
        return (next(scripted) if images is data.val_images else 0.0), 0.0

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    snapshots = {}

    def snapshot(record):
        snapshots[record["epoch"]] = {k: v.clone() for k, v in method.modules().state_dict().items()}

    torch.manual_seed(1)
    student = build_model("resnet8", in_channels=1, num_classes=C)
    cfg = TrainConfig(batch_size=16, patience=2, phases=2, max_epochs=5)
    result = trainer.fit(student, method, data, cfg, seed=1, on_epoch=snapshot)
    assert [r.get("phase_end", False) for r in result.history] == [False, False, True, False, True]
    weights = [k for k, v in snapshots[1].items() if v.is_floating_point() and "memory" not in k]
    assert any("regressor" in k or "heads" in k for k in weights)
    assert any(not torch.equal(snapshots[2][k], snapshots[1][k]) for k in weights)  # training moved them
    assert all(torch.equal(snapshots[3][k], snapshots[1][k]) for k in weights)  # restored to epoch 1
