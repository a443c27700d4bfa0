"""Online methods DML and ONE (METHODS.md M17, M18): losses against numpy, finite gradients on edge
cases, peers and branches, the never-rewound ramp clock, phase-end restore, resume, digits CLI runs."""

import json
import math

import numpy as np
import pytest
import torch

from ftikd.cli import main
from ftikd.engine import trainer
from ftikd.engine.trainer import TrainConfig, TrainData, build_training
from ftikd.errors import FtikdError
from ftikd.losses.online import ensemble_kl_loss, gated_ensemble, mutual_kl_loss, sigmoid_rampup
from ftikd.methods import Batch, MethodContext, build_method
from ftikd.methods.dml import independent_copy
from ftikd.models import build_model

rng = np.random.default_rng(0)


def np_softmax(z, t):
    e = np.exp(z / t - (z / t).max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- losses against numpy


@pytest.mark.parametrize("k", [2, 3])
def test_mutual_kl_matches_numpy_loops(k):
    z = rng.normal(size=(k, 5, 4)) * 3
    t = 4.0
    want = []
    for member in range(k):
        total = 0.0
        for peer in range(k):
            if peer == member:
                continue
            p, q = np_softmax(z[peer], t), np_softmax(z[member], t)
            total += sum(float(np.sum(p[b] * (np.log(p[b]) - np.log(q[b])))) for b in range(5)) / 5
        want.append(total * t * t / (k - 1))
    got = mutual_kl_loss(torch.tensor(z), t)
    assert got.shape == (k,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_mutual_kl_detaches_the_peer():
    z = torch.randn(2, 4, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(mutual_kl_loss(z)[0], z)
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0


def test_gated_ensemble_and_ensemble_kl_match_numpy():
    m, b, c, t = 3, 4, 5, 3.0
    z = rng.normal(size=(m, b, c)) * 2
    g = np_softmax(rng.normal(size=(b, m)), 1.0)
    ens = np.zeros((b, c))
    for i in range(b):
        for j in range(m):
            ens[i] += g[i, j] * z[j, i]
    got_ens = gated_ensemble(torch.tensor(z), torch.tensor(g))
    np.testing.assert_allclose(got_ens.numpy(), ens, rtol=1e-10)
    target = np_softmax(ens, t) + 1e-7
    want = 0.0
    for j in range(m):
        q = np_softmax(z[j], t)
        want += sum(float(np.sum(target[i] * (np.log(target[i]) - np.log(q[i])))) for i in range(b)) / b
    got = ensemble_kl_loss(torch.tensor(z), torch.tensor(ens), t)
    assert got.item() == pytest.approx(want * t * t, rel=1e-5)


def test_ensemble_kl_trains_branches_only():
    z = torch.randn(3, 4, 5, requires_grad=True)
    ens = z.mean(dim=0)
    (grad,) = torch.autograd.grad(ensemble_kl_loss(z, ens), z)
    manual = torch.autograd.grad(ensemble_kl_loss(z, ens.detach()), z)[0]
    torch.testing.assert_close(grad, manual)  # no gradient through the target


@pytest.mark.parametrize("epoch", [0, 1, 40, 79, 80, 200])
def test_sigmoid_rampup_matches_the_formula(epoch):
    want = math.exp(-5 * (1 - min(epoch, 80) / 80) ** 2)
    assert sigmoid_rampup(epoch, 80).item() == pytest.approx(want, rel=1e-6)
    assert sigmoid_rampup(torch.tensor(epoch), 0).item() == 1.0


@pytest.mark.parametrize(
    "case", ["identical_samples", "identical_members", "batch_of_two", "one_hot_extreme"]
)
def test_losses_have_finite_gradients_on_edge_cases(case):
    torch.manual_seed(0)
    z = torch.randn(3, 4, 5)
    if case == "identical_samples":
        z = z[:, :1].repeat(1, 4, 1)
    elif case == "identical_members":
        z = z[:1].repeat(3, 1, 1)
    elif case == "batch_of_two":
        z = z[:, :2]
    elif case == "one_hot_extreme":
        z = torch.nn.functional.one_hot(torch.arange(4) % 5, 5).float()[None].repeat(3, 1, 1) * 80
    z.requires_grad_(True)
    gate = torch.softmax(torch.randn(z.shape[1], 3), dim=1)
    for name, value in {
        "mutual": mutual_kl_loss(z).sum(),
        "ensemble": ensemble_kl_loss(z, gated_ensemble(z, gate)),
    }.items():
        (grad,) = torch.autograd.grad(value, z)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), (case, name)
        if case == "identical_members" and name == "mutual":
            assert value.item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- methods on a synthetic batch


def set_up(name, arch="resnet8", n=32, batch_size=8, **options):
    torch.manual_seed(0)
    student = build_model(arch, in_channels=1, num_classes=4)
    method = build_method(name, **options)
    method.setup(MethodContext(n, 4, batch_size, student, torch.device("cpu"), input_shape=(1, 8, 8)))
    return method, student


def make_batch(labels):
    labels = torch.tensor(labels)
    images = torch.randn(len(labels), 1, 8, 8)
    return Batch(torch.arange(len(labels)), images, labels, num_classes=4)


BATCHES = {"mixed": (0, 1, 2, 3, 3), "one_class": (2, 2, 2, 2), "batch_of_two": (0, 1)}


@pytest.mark.parametrize("name, keys", [("dml", {"ce", "kl", "peer_ce", "peer_kl"}),
                                        ("one", {"ce_branches", "ce_ensemble", "kl"})])  # fmt: skip
@pytest.mark.parametrize("labels", list(BATCHES.values()), ids=list(BATCHES))
def test_method_terms_and_finite_gradients(name, keys, labels):
    method, student = set_up(name)
    batch = make_batch(labels)
    if labels == BATCHES["one_class"]:
        batch.images = batch.images[:1].repeat(len(labels), 1, 1, 1)  # identical samples too
    terms = method.loss(student, batch)
    assert set(terms) == keys
    sum(terms.values()).backward()
    params = list(student.parameters()) + list(method.extra.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert method.call_cost == 0 and not method.needs_teacher


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1"])
def test_dml_peer_is_an_independent_copy_in_train_mode(arch):
    method, student = set_up("dml", arch)
    (peer,) = method.peers
    ours, theirs = student.state_dict(), peer.state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    convs = [k for k in ours if ours[k].dim() == 4]
    assert all(not torch.equal(ours[k], theirs[k]) for k in convs)
    # same distribution as the student's He-normal fan-out init
    for k in convs:
        assert theirs[k].std().item() == pytest.approx(ours[k].std().item(), rel=0.5)
    assert peer.training
    # the loss terms of the peer use the peer's own forward on the same images
    batch = make_batch(BATCHES["mixed"])
    terms = method.loss(student, batch)
    peer_ce = torch.nn.functional.cross_entropy(peer(batch.images).logits, batch.labels)
    assert terms["peer_ce"].item() == pytest.approx(peer_ce.item(), rel=1e-5)


def test_independent_copy_draws_from_its_seed_only():
    torch.manual_seed(0)
    model = build_model("resnet8", in_channels=1, num_classes=4).to(memory_format=torch.channels_last)
    state = torch.get_rng_state()
    a, b, c = independent_copy(model, 7), independent_copy(model, 7), independent_copy(model, 8)
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = (m.stages[0][0].conv1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert wa.is_contiguous(memory_format=torch.channels_last)


def test_evaluate_extra_uses_eval_mode_and_keeps_train_mode():
    method, student = set_up("dml")
    (peer,) = method.peers
    modes = []
    peer.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    images = (torch.rand(20, 1, 8, 8) * 255).to(torch.uint8)
    labels = torch.randint(0, 4, (20,))
    metrics = method.evaluate_extra(images, labels, (0.5,), (0.25,), batch_size=8)
    assert set(metrics) == {"peer1_test_top1", "peer1_test_top5"} and 0 <= metrics["peer1_test_top1"] <= 100
    assert modes == [False] * 3 and peer.training


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "shufflev1"])
def test_one_branch_zero_is_the_student_and_the_gate_mixes(arch):
    method, student = set_up("one", arch)
    assert len(method.extra["branches"]) == 2
    student.eval()
    method.extra.eval()
    images = torch.randn(3, 1, 8, 8)
    logits, ensemble = method.forward_all(student, images)
    assert logits.shape == (3, 3, 4)
    torch.testing.assert_close(logits[0], student(images).logits)
    assert not torch.allclose(logits[1], logits[0]) and not torch.allclose(logits[2], logits[1])
    metrics = method.evaluate_extra((torch.rand(6, 1, 8, 8) * 255).to(torch.uint8), torch.arange(6) % 4,
                                    (0.5,), (0.25,))  # fmt: skip
    assert set(metrics) >= {"branch1_test_top1", "branch2_test_top1", "ensemble_test_top1"}


def test_one_ramp_counts_pseudo_epochs():
    method, student = set_up("one", n=32, batch_size=8, rampup_epochs=2)  # 4 steps per pseudo-epoch
    weights = [float(method.ramp_weight()) for _ in range(10)]
    want = [math.exp(-5)] * 4 + [math.exp(-5 / 4)] * 4 + [1.0, 1.0]
    assert weights == pytest.approx(want, rel=1e-6)
    assert int(method.extra["clock"].count) == 8


@pytest.mark.parametrize(
    "name, options",
    [("dml", {"cohort": 1}), ("dml", {"temperature": 0}), ("dml", {"w_kl": -1}), ("one", {"branches": 1}),
     ("one", {"rampup_epochs": -2}), ("one", {"temperature": float("nan")}), ("one", {"branches": 2.5})],
)  # fmt: skip
def test_bad_options_are_user_errors(name, options):
    with pytest.raises(FtikdError, match="bad option"):
        build_method(name, **options)


def test_one_refuses_a_student_without_block_groups():
    with pytest.raises(FtikdError, match="ONE branches"):
        set_up("one", "vgg8")


# ---------------------------------------------------------------- engine: restore, resume, digits runs


def digits_data(digits):
    """64 training and 32 validation digits, no teacher outputs (online methods need none)."""
    images, labels = digits.train_images[:96], digits.train_labels[:96]
    return TrainData(images[:64], labels[:64], images[64:], labels[64:], digits.mean, digits.std, 10,
                     digits.hflip, digits.crop_padding)  # fmt: skip


def test_peer_bn_trains_in_train_mode(digits):
    torch.manual_seed(1)
    method = build_method("dml")
    student = build_model("resnet8", in_channels=1, num_classes=10)
    parts = build_training(student, method, digits_data(digits), TrainConfig(batch_size=16), seed=1)
    (peer,) = method.peers
    assert peer.training and parts.extra is method.extra
    assert any(p is q for p in parts.optimizer.param_groups[0]["params"] for q in peer.parameters())


@pytest.mark.parametrize("name", ["dml", "one"])
def test_extra_modules_are_restored_at_a_phase_end(monkeypatch, digits, name):
    method = build_method(name)
    scripted = iter([50.0, 40.0, 40.0, 40.0, 40.0])  # best at epoch 1, phase ends at epochs 3 and 5
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: (next(scripted), 0.0))
    snapshots = {}

    def snapshot(record):
        snapshots[record["epoch"]] = {k: v.clone() for k, v in method.extra.state_dict().items()}

    torch.manual_seed(1)
    student = build_model("resnet8", in_channels=1, num_classes=10)
    cfg = TrainConfig(batch_size=16, patience=2, phases=2, max_epochs=10, eval_train=False)  # script = val
    result = trainer.fit(student, method, digits_data(digits), cfg, seed=1, on_epoch=snapshot)
    assert [r.get("phase_end", False) for r in result.history] == [False, False, True, False, True]
    weights = [k for k in snapshots[1] if not k.startswith("clock") and snapshots[1][k].is_floating_point()]
    assert any(not torch.equal(snapshots[2][k], snapshots[1][k]) for k in weights)  # training moved them
    assert all(torch.equal(snapshots[3][k], snapshots[1][k]) for k in weights)  # restored to the best
    if name == "one":  # the ramp clock is not rewound with the weights: 4 steps per pseudo-epoch
        assert int(snapshots[1]["clock.count"]) == 4 and int(snapshots[3]["clock.count"]) == 12


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name", ["dml", "one"])
def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, digits, name):
    """Kill a 2-epoch run after pseudo-epoch 1, resume from its checkpoint: the same history and weights."""
    cfg = TrainConfig(batch_size=16, patience=50, phases=1, max_epochs=2)

    def run(checkpoint=None, resume=False, stop_after=None):
        method = build_method(name, **({"rampup_epochs": 3} if name == "one" else {}))
        torch.manual_seed(1)
        student = build_model("resnet8", in_channels=1, num_classes=10)

        def on_epoch(record):
            if record["epoch"] == stop_after:
                raise Interrupt

        result = trainer.fit(student, method, digits_data(digits), cfg, 1, on_epoch, checkpoint, resume)
        return result.history, method.extra.state_dict()

    reference, ref_extra = run()
    with pytest.raises(Interrupt):
        run(tmp_path / "state.pt", stop_after=1)
    resumed, extra = run(tmp_path / "state.pt", resume=True)
    assert [sorted(h) for h in resumed] == [sorted(h) for h in reference]
    for got, want in zip(resumed, reference, strict=True):
        for key, value in want.items():
            if isinstance(value, float) and key != "time_s":
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for key, value in ref_extra.items():
        torch.testing.assert_close(extra[key], value, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def teacher_path(trained_digits_teacher):
    return trained_digits_teacher(1)


@pytest.mark.parametrize("name", ["dml", "one"])
def test_cli_smoke_run_pays_no_call_and_creates_no_store(tmp_path, teacher_path, name, capsys):
    out = tmp_path / name / "runs"
    args = ["distill", "--dataset", "digits", "--teacher", str(teacher_path), "--method", name,
            "--calls", "80", "--max-epochs", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "0 paid now, 0 used of budget 80" in capsys.readouterr().out
    (record_path,) = out.glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["teacher_calls"] == {"budget": 80, "outputs_used": 0, "paid_this_run": 0}
    assert len(record["history"]) == 1 and record["method"]["name"] == name
    extra = record["method_metrics"]
    assert ("peer1_test_top1" in extra) if name == "dml" else ("ensemble_test_top1" in extra), extra
    assert not (tmp_path / name / "stores").exists()
    assert not list(tmp_path.rglob("*.sqlite"))
