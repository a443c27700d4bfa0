"""Fixed-teacher Mixup/Mixup3/CutMix and logit MSE: losses against numpy, methods, smoke runs."""

import numpy as np
import pytest
import torch
from counting_teacher import CountingTeacher
from torch import nn

from ftikd.cli import main
from ftikd.engine.trainer import TrainConfig, TrainData, fit
from ftikd.errors import FtikdError
from ftikd.experiments.run import RunConfig, run_distillation
from ftikd.losses.mixing import (
    cutmix_images,
    draw_cutmix_box,
    draw_mixing_weights,
    mix_images,
    mixed_teacher_target,
    mixing_loss,
)
from ftikd.losses.regression import logit_mse_loss
from ftikd.methods import Batch, build_method
from ftikd.models import build_model
from ftikd.models.base import ModelOutput
from ftikd.teacher import Teacher, TeacherStore

rng = np.random.default_rng(0)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def np_softmax(x, t=1.0):
    e = np.exp((x - x.max(-1, keepdims=True)) / t)
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x, t=1.0):
    z = x / t
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


class Recorder(nn.Module):
    """A linear student on flattened images that records every input it is run on."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, classes)
        self.seen = []

    def forward(self, x, with_features=False):
        self.seen.append(x.detach().clone())
        emb = x.flatten(1)
        return ModelOutput(self.fc(emb), {"embedding": emb} if with_features else {})


def group_batch(b, k, c, classes=None, same=False):
    """A (B, k) group batch of 1x4x4 images with random labels and cached teacher logits."""
    images = torch.randn(b, k, 1, 4, 4)
    teacher = torch.randn(b, k, c) * 3
    labels = torch.randint(classes or c, (b, k))
    if same:
        images, teacher = images[:, :1].expand_as(images).clone(), teacher[:, :1].expand_as(teacher).clone()
    return Batch(torch.arange(b * k).reshape(b, k), images, labels, c, teacher)


# ------------------------------------------------------------------------------------------ mixing


def test_mixing_weights_follow_the_paper_and_replay_from_the_rng_state():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    two, three = draw_mixing_weights(2), draw_mixing_weights(3)
    torch.set_rng_state(state)
    assert draw_mixing_weights(2) == two and draw_mixing_weights(3) == three  # resume replays them
    assert sum(two) == pytest.approx(1.0) and sum(three) == pytest.approx(1.0) and min(three) >= 0
    lams = np.array([draw_mixing_weights(2)[0] for _ in range(2000)])
    assert abs(lams.mean() - 0.5) < 0.03 and abs((lams < 0.25).mean() - 0.25) < 0.04  # U(0, 1)


def test_mix_images_and_mixing_loss_match_numpy():
    b, c = 5, 7
    for k, weights in [(2, [0.3, 0.7]), (3, [0.2, 0.5, 0.3])]:
        images = rng.normal(size=(b, k, 2, 3, 3))
        expected = sum(w * images[:, m] for m, w in enumerate(weights))
        np.testing.assert_allclose(mix_images(t64(images), weights).numpy(), expected, rtol=1e-10)
        s, t = rng.normal(size=(b, c)) * 2, rng.normal(size=(b, k, c)) * 2
        y = rng.integers(0, c, size=(b, k))
        log_q = np_log_softmax(s)
        ce = sum(w * -log_q[np.arange(b), y[:, m]].mean() for m, w in enumerate(weights))
        target = sum(w * np_softmax(t[:, m]) for m, w in enumerate(weights))
        soft_ce = -(target * log_q).sum(-1).mean()
        per_part = sum(w * -(np_softmax(t[:, m]) * log_q).sum(-1).mean() for m, w in enumerate(weights))
        assert soft_ce == pytest.approx(per_part, rel=1e-10)  # mixing probabilities == mixing the CEs
        kl = sum(
            w
            * 16
            * (np_softmax(t[:, m], 4) * (np_log_softmax(t[:, m], 4) - np_log_softmax(s, 4))).sum(-1).mean()
            for m, w in enumerate(weights)
        )
        got = mixing_loss(t64(s), torch.tensor(y), t64(t), weights, "ce")
        assert got["ce"].item() == pytest.approx(ce, rel=1e-5)
        assert got["soft"].item() == pytest.approx(soft_ce, rel=1e-5)
        got_kl = mixing_loss(t64(s), torch.tensor(y), t64(t), weights, "kl", 4.0)
        assert got_kl["soft"].item() == pytest.approx(kl, rel=1e-5)
        np.testing.assert_allclose(mixed_teacher_target(t64(t), weights).numpy(), target, rtol=1e-5)


@pytest.mark.parametrize("name,parts", [("mixup", 2), ("mixup3", 3)])
def test_mixup_method_mixes_inputs_and_cached_teacher_parts(name, parts):
    method = build_method(name)
    batch = group_batch(6, parts, 5)
    student = Recorder(16, 5)
    torch.manual_seed(11)
    terms = method.loss(student, batch)
    torch.manual_seed(11)  # the same draw, recomputed here by the spec (A.2.2, A17)
    if parts == 2:
        lam = float(torch.rand(()))
        w = np.array([lam, 1 - lam])
    else:
        u = torch.rand(parts, dtype=torch.float64).numpy()
        w = u / u.sum()
    x = batch.images.numpy()
    mixed = sum(w[m] * x[:, m] for m in range(parts))
    np.testing.assert_allclose(student.seen[0].numpy(), mixed, rtol=1e-5, atol=1e-6)
    logits = student.fc(student.seen[0].flatten(1)).detach().double().numpy()
    target = sum(w[m] * np_softmax(batch.teacher_logits[:, m].double().numpy()) for m in range(parts))
    log_q = np_log_softmax(logits)
    y = batch.labels.numpy()
    assert terms["soft"].item() == pytest.approx(-(target * log_q).sum(-1).mean(), rel=1e-4)
    ce = sum(w[m] * -log_q[np.arange(6), y[:, m]].mean() for m in range(parts))
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-4)
    assert set(terms) == {"ce", "soft"} and len(student.seen) == 1  # one student forward, no KD term


def np_cutmix_box(h, w, seed):
    """The box of METHODS.md M7, recomputed in plain Python from the same RNG draws."""
    torch.manual_seed(seed)
    lam = float(torch.rand(()))
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y0, y1 = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
    x0, x1 = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
    return y0, y1, x0, x1


def test_cutmix_lambda_is_the_fraction_of_pixels_from_the_first_image():
    h, w = 8, 6
    first, second = torch.zeros(2, 3, h, w), torch.ones(2, 3, h, w)
    for seed in range(200):
        torch.manual_seed(seed)
        box, lam = draw_cutmix_box(h, w)
        assert box == np_cutmix_box(h, w, seed)
        mixed = cutmix_images(first, second, box)
        assert (mixed == 0).float().mean().item() == pytest.approx(lam, abs=1e-6)
        assert 0.0 <= lam <= 1.0


@pytest.mark.parametrize("seed", [3, 4])  # boxes of 2 and 4 of the 16 pixels
def test_cutmix_method_weights_teacher_parts_by_area(seed):
    method = build_method("cutmix")
    batch = group_batch(4, 2, 5)
    student = Recorder(16, 5)
    torch.manual_seed(seed)
    terms = method.loss(student, batch)
    y0, y1, x0, x1 = np_cutmix_box(4, 4, seed)  # the spec's box, from the same RNG draws
    lam = 1 - (y1 - y0) * (x1 - x0) / 16  # the share of the first image's pixels
    assert 0 < lam < 1
    expected = batch.images[:, 0].clone()
    expected[..., y0:y1, x0:x1] = batch.images[:, 1, :, y0:y1, x0:x1]
    torch.testing.assert_close(student.seen[0], expected)
    logits = student.fc(student.seen[0].flatten(1)).detach().double().numpy()
    t = batch.teacher_logits.double().numpy()
    target = lam * np_softmax(t[:, 0]) + (1 - lam) * np_softmax(t[:, 1])
    log_q = np_log_softmax(logits)
    assert terms["soft"].item() == pytest.approx(-(target * log_q).sum(-1).mean(), rel=1e-4)
    y = batch.labels.numpy()
    ce = lam * -log_q[np.arange(4), y[:, 0]].mean() + (1 - lam) * -log_q[np.arange(4), y[:, 1]].mean()
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-4)


@pytest.mark.parametrize("name", ["mixup", "mixup3", "cutmix"])
@pytest.mark.parametrize("case", ["identical", "two", "one-class"])
def test_mixing_gradients_finite_on_edge_cases(name, case):
    parts = 3 if name == "mixup3" else 2
    b = 2 if case == "two" else 5
    batch = group_batch(b, parts, 4, classes=1 if case == "one-class" else None, same=case == "identical")
    student = Recorder(16, 4)
    sum(build_method(name).loss(student, batch).values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


# -------------------------------------------------------------------------------------- logit MSE


def test_logit_mse_matches_numpy_and_its_step_size_does_not_depend_on_c():
    for c in (10, 100, 1000):
        s, t = rng.normal(size=(6, c)), rng.normal(size=(6, c))
        sq = (s - t) ** 2
        assert logit_mse_loss(t64(s), t64(t)).item() == pytest.approx(sq.sum(1).mean() / 100, rel=1e-6)
        assert logit_mse_loss(t64(s), t64(t), "mean").item() == pytest.approx(sq.mean(), rel=1e-6)
        z = t64(s).requires_grad_()
        logit_mse_loss(z, t64(t)).backward()
        np.testing.assert_allclose(z.grad.numpy(), 2 * (s - t) / 100 / 6, rtol=1e-4, atol=1e-9)
    s = rng.normal(size=(4, 100))
    assert logit_mse_loss(t64(s), t64(s + 1)).item() == pytest.approx(
        logit_mse_loss(t64(s), t64(s + 1), "mean")
    )


def test_logit_mse_method_terms_and_zero_gradient_at_the_teacher():
    method = build_method("logit-mse", w_ce=0.0)
    student = Recorder(16, 5)
    images = torch.randn(2, 1, 4, 4)
    teacher = student.fc(images.flatten(1)).detach()
    batch = Batch(torch.arange(2), images, torch.zeros(2, dtype=torch.long), 5, teacher)
    terms = method.loss(student, batch)
    sum(terms.values()).backward()
    assert set(terms) == {"ce", "mse"} and terms["mse"].item() == pytest.approx(0.0, abs=1e-10)
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() < 1e-6 for p in student.parameters())


def assert_float32_under_bf16(first_step):
    """``first_step(autocast)`` -> terms: every term float32, finite, and close to the fp32 value."""
    plain, mixed = first_step(False), first_step(True)
    for key, value in mixed.items():
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert value.item() == pytest.approx(plain[key].item(), rel=0.05, abs=1e-3), key


def test_terms_stay_float32_under_bf16_autocast():
    def first_step(autocast):
        torch.manual_seed(7)
        method, student, batch = build_method("mixup"), Recorder(16, 5), group_batch(6, 2, 5)
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=autocast):
            return method.loss(student, batch)

    assert_float32_under_bf16(first_step)


def test_bad_options_are_user_errors():
    for name, opts in [
        ("mixup", {"soft": "mse"}),
        ("mixup", {"parts": 1}),
        ("cutmix", {"max_groups": 0}),
        ("logit-mse", {"reduction": "sum"}),
        ("logit-mse", {"ref_classes": 0}),
    ]:
        with pytest.raises(FtikdError):
            build_method(name, **opts)


# ----------------------------------------------------------------------------------- runs, budget


def resume_matches_uninterrupted(tmp_path, digits, method, opts=None):
    """Train 4 pseudo-epochs straight, and 2 then 2 resumed from the checkpoint: the same history
    (a phase end included) and the same weights."""
    n = 80
    data = TrainData(
        train_images=digits.train_images[:n],
        train_labels=digits.train_labels[:n],
        val_images=digits.train_images[n : n + 20],
        val_labels=digits.train_labels[n : n + 20],
        mean=digits.mean,
        std=digits.std,
        num_classes=10,
        teacher_logits=torch.randn(n, 10, generator=torch.Generator().manual_seed(0)) * 3,
    )

    def run(max_epochs, checkpoint, resume=False):
        torch.manual_seed(0)
        student = build_model("resnet8", in_channels=1, num_classes=10)
        cfg = TrainConfig(max_epochs=max_epochs, patience=1, phases=3)
        result = fit(
            student, build_method(method, **(opts or {})), data, cfg, 1, checkpoint=checkpoint, resume=resume
        )
        return [{k: v for k, v in h.items() if k != "time_s"} for h in result.history], student.state_dict()

    full, weights = run(4, tmp_path / "a.pt")
    run(2, tmp_path / "b.pt")
    resumed, resumed_weights = run(4, tmp_path / "b.pt", resume=True)
    assert resumed == full and any(h.get("phase_end") for h in full)
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)


@pytest.mark.parametrize("method", ["mixup3", "cutmix"])
def test_resumed_training_matches_uninterrupted(tmp_path, digits, method):
    """The mixing draws come back from the checkpoint."""
    resume_matches_uninterrupted(tmp_path, digits, method)


@pytest.mark.parametrize("method", ["mixup", "cutmix"])
def test_mixing_run_pays_exactly_n_teacher_calls(tmp_path, digits, digits_teacher, method):
    counting = CountingTeacher(Teacher.from_checkpoint(digits_teacher))
    cfg = RunConfig(
        teacher=str(digits_teacher),
        dataset="digits",
        method=method,
        calls=80,
        out=str(tmp_path / "runs"),
        train=TrainConfig(max_epochs=2),
    )
    result = run_distillation(cfg, teacher=counting, dataset=digits, progress=False)
    calls = result.record["teacher_calls"]
    assert counting.seen == 80 and calls["paid_this_run"] == 80 and calls["store_paid_total"] == 80
    with TeacherStore.open(calls["store"], counting.fingerprint, "digits", 10) as store:
        assert store.paid_calls() == 80


@pytest.mark.parametrize(
    "method,opts",
    [
        ("mixup", []),
        ("mixup3", []),
        ("cutmix", []),
        ("logit-mse", []),
    ],
)
def test_cli_one_pseudo_epoch(tmp_path, digits_teacher, capsys, method, opts):
    cli_one_pseudo_epoch(tmp_path, digits_teacher, capsys, method, opts)


def cli_one_pseudo_epoch(tmp_path, digits_teacher, capsys, method, opts):
    """``ftikd distill --method METHOD`` for one pseudo-epoch on digits with 80 paid calls."""
    args = ["distill", "--dataset", "digits", "--teacher", str(digits_teacher), "--method", method]
    args += [a for opt in opts for a in ("--opt", opt)]
    args += ["--calls", "80", "--max-epochs", "1", "--out", str(tmp_path / "runs"), "--no-progress"]
    assert main(args) == 0
    assert "80 paid now" in capsys.readouterr().out
