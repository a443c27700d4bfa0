"""BSS (METHODS.md M16): the boundary attack, target draws, weight schedules, budget, CLI smoke."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftikd.cli import main
from ftikd.errors import FtikdError
from ftikd.methods import Batch, MethodContext, build_method
from ftikd.methods.bss import BOUND, boundary_attack, bss_weights, draw_targets
from ftikd.models import build_model
from ftikd.teacher import Teacher
from ftikd.teacher.oracle import PaidTeacher


def tiny_teacher(seed=0):
    """A small non-linear classifier of 1x2x2 'images' into 4 classes, large enough weights to cross."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    return net.eval()


def reference_attack(net, x, targets, num_steps, eta):
    """[C-BSS]'s attack written per sample with plain loops: returns adversarial images, logits, forwards."""
    advs, outs, forwards = [], [], 0
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone()
        b = None
        out = None
        moved_all = True
        for it in range(num_steps):
            xi = xi.detach().requires_grad_(True)
            z = net(xi)[0]
            forwards += 1
            if it == 0:
                b = int(z.argmax())
            if int(z.argmax()) != b:
                out, moved_all = z.detach(), False
                break
            obj = z[targets[i]] - z[b]
            (g,) = torch.autograd.grad(obj, xi)
            gap = float(z[b].detach() - z[targets[i]].detach())
            xi = torch.clamp(xi.detach() + eta * (gap + 1e-4) * g / math.sqrt(float((g**2).sum())), -2.5, 2.5)
        if moved_all:
            out = net(xi)[0].detach()
            forwards += 1
        advs.append(xi.detach()[0])
        outs.append(out)
    return torch.stack(advs), torch.stack(outs), forwards


def test_attack_matches_a_per_sample_loop_and_crosses_the_boundary():
    net = tiny_teacher()
    x = torch.randn(12, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z0 = net(x)
    top1 = z0.argmax(1)
    targets = (top1 + 1 + torch.arange(12) % 3) % 4  # any class but top-1
    seen = []

    def forward(xa, rows, it, grad):
        seen.append((it, rows.tolist(), grad))
        return net(xa)

    adv, logits = boundary_attack(forward, x, lambda z, b: targets, num_steps=10, step_size=0.3)
    ref_adv, ref_logits, ref_forwards = reference_attack(net, x, targets, 10, 0.3)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert sum(len(rows) for _, rows, _ in seen) == ref_forwards <= 11 * 12
    assert all(grad for it, _, grad in seen if it < 10) and seen[0][1] == list(range(12))
    crossed = logits.argmax(1) != top1
    assert crossed.sum() >= 6  # the attack does reach the teacher's boundary
    assert adv.abs().max() <= BOUND
    torch.testing.assert_close(logits, net(adv).detach(), rtol=1e-4, atol=1e-5)


def test_attack_with_zero_input_gradient_stays_finite():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = torch.randn(3, 1, 2, 2)
    adv, logits = boundary_attack(lambda xa, r, i, g: net(xa), x, lambda z, b: torch.ones_like(b))
    assert torch.isfinite(adv).all() and torch.isfinite(logits).all()
    torch.testing.assert_close(adv, x)  # nothing to follow: no step


def test_target_draw_matches_an_inverse_cdf_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, generator=g) * 2
    top1 = logits.argmax(1)
    u = torch.rand(50, generator=g)
    got = draw_targets(logits, top1, u)
    probs = F.softmax(logits, 1).numpy().astype(np.float64)
    for i in range(50):
        p = probs[i].copy()
        p[int(top1[i])] = 0.0
        cdf = np.cumsum(p / p.sum())
        want = next(c for c in range(6) if cdf[c] > u[i].item())
        assert got[i].item() == want
    assert (got != top1).all()
    # frequencies follow the restricted probabilities
    row = logits[:1].expand(20000, 6)
    draws = draw_targets(row, top1[:1].expand(20000), torch.rand(20000, generator=g))
    p = F.softmax(logits[0], 0).clone()
    p[top1[0]] = 0
    freq = torch.bincount(draws, minlength=6).float() / 20000
    torch.testing.assert_close(freq, p / p.sum(), atol=0.02, rtol=0)


def test_weight_schedules():
    assert bss_weights(0, 200) == (4.0, 2.0)
    kd, bss = bss_weights(100, 200)
    assert kd == pytest.approx(2.5) and bss == pytest.approx(2 / 3)
    assert bss_weights(150, 200) == (pytest.approx(1.75), 0.0)
    assert bss_weights(250, 200) == (1.0, 0.0)


def test_options_and_sample_split():
    m = build_method("bss")
    assert m.config.temperature == 4.0 and m.config.attack_size == 32 and m.config.num_steps == 10
    assert m.queries_teacher and m.train_samples(80) == 64 and m.train_samples(2000) == 1600
    assert build_method("bss", attack_share=0.0).train_samples(80) == 80
    for bad in ({"attack_share": 1.0}, {"attack_size": 0}, {"schedule_epochs": 0}, {"temperature": -1.0}):
        with pytest.raises(FtikdError, match="bad option"):
            build_method("bss", **bad)


def context(paid, student, n=8, batch=4):
    return MethodContext(
        num_train=n, num_classes=10, batch_size=batch, student=student, device=torch.device("cpu"),
        input_shape=(1, 8, 8), paid_teacher=paid,
    )  # fmt: skip


def test_needs_a_paid_white_box_teacher(tmp_path):
    student = build_model("resnet8", in_channels=1, num_classes=10)
    with pytest.raises(FtikdError, match="ftikd distill"):
        build_method("bss").setup(context(None, student))
    api = Teacher.from_callable(lambda x: torch.zeros(x.shape[0], 10), fingerprint="api")
    with PaidTeacher.open(tmp_path / "s.sqlite", api, "digits", 10, budget=20, run_key="r") as paid:
        with pytest.raises(FtikdError, match="checkpoint"):
            build_method("bss").setup(context(paid, student))


@pytest.mark.parametrize("case", ["identical", "one_class", "pair"])
def test_loss_gradients_finite_and_budget_respected(tmp_path, case):
    torch.manual_seed(0)
    teacher_net = build_model("resnet8", in_channels=1, num_classes=10).eval()
    student = build_model("resnet8", in_channels=1, num_classes=10)
    b = 2 if case == "pair" else 6
    images = torch.randn(b, 1, 8, 8)
    if case == "identical":
        images = images[:1].expand(b, -1, -1, -1).clone()
    with torch.no_grad():
        t_logits = teacher_net(images).logits
    # labels the student and the teacher both get right where possible, so that samples are attacked
    labels = t_logits.argmax(1) if case != "one_class" else torch.full((b,), int(t_logits[0].argmax()))
    batch = Batch(
        index=torch.arange(b), images=images, labels=labels, num_classes=10, teacher_logits=t_logits
    )
    with PaidTeacher.open(
        tmp_path / "s.sqlite", Teacher.from_module(teacher_net), "digits", 10, budget=25, run_key=case
    ) as paid:
        method = build_method("bss", attack_size=4, num_steps=3)
        method.setup(context(paid, student))
        student.train()
        for _ in range(30):  # until the boundary budget is spent
            terms = method.loss(_Agreeing(student, labels), batch)  # base samples exist
            assert set(terms) == {"ce", "kd", "bss"}
            sum(terms.values()).backward()
            grads = [p.grad for p in student.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
            student.zero_grad()
            if "kd_only_from_step" in method.evaluate_extra():
                break
        metrics = method.evaluate_extra()
        assert "kd_only_from_step" in metrics and 25 - 4 < paid.paid <= 25  # less than one more sample left
        assert metrics["boundary_calls_paid"] == paid.paid and metrics["boundary_samples"] >= 25 // 4


class _Agreeing(nn.Module):
    """The student with its logits shifted towards the labels of the clean batch (same gradients)."""

    def __init__(self, student, labels):
        super().__init__()
        self.student, self.labels = student, labels

    def forward(self, x):
        out = self.student(x)
        if x.shape[0] == self.labels.shape[0]:
            out.logits = out.logits + 50.0 * F.one_hot(self.labels, 10)
        return out


def test_cli_smoke_within_budget(tmp_path, trained_digits_teacher):
    teacher = trained_digits_teacher(4)
    out = tmp_path / "runs"
    args = ["distill", "--dataset", "digits", "--teacher", str(teacher), "--method", "bss", "--calls", "80"]
    main([*args, "--max-epochs", "1", "--out", str(out), "--no-progress", "--opt", "attack_share=0.5"])
    (record_path,) = out.glob("*.json")
    rec = json.loads(record_path.read_text())
    calls = rec["teacher_calls"]
    assert rec["protocol"]["n_train"] == 40 and rec["protocol"]["n_val"] == 20
    assert calls["cached"] == 40 and calls["total"] == calls["cached"] + calls["paid_during_training"] <= 80
    assert calls["outputs_used"] == calls["total"] and calls["paid_this_run"] == calls["total"]
    assert calls["store_paid_total"] == calls["total"]  # the ledger read after training, not before
    assert rec["method_metrics"]["boundary_calls_paid"] == calls["paid_during_training"]
    assert all(math.isfinite(rec["history"][0][k]) for k in ("ce", "kd", "bss"))


def test_refused_under_torchrun(tmp_path, monkeypatch, digits_teacher):
    from ftikd.distributed import DistContext
    from ftikd.experiments import run

    monkeypatch.setattr(run, "init_distributed", lambda device: DistContext(0, 2, 0))
    cfg = run.RunConfig(
        teacher=str(digits_teacher), dataset="digits", method="bss", calls=80, out=str(tmp_path)
    )
    with pytest.raises(FtikdError, match="without torchrun"):
        run.run_distillation(cfg, progress=False)
    assert not list(tmp_path.rglob("*.sqlite"))  # refused before any teacher call
