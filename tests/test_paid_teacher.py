"""PaidTeacher: teacher calls on new inputs, each key paid once, durably, within the run's budget."""

import shutil

import pytest
import torch
from torch import nn

from ftikd.data import normalize
from ftikd.engine.trainer import TrainConfig, TrainData, fit
from ftikd.errors import BudgetExceededError, FtikdError
from ftikd.methods import build_method
from ftikd.models import build_model
from ftikd.teacher import Teacher, TeacherStore
from ftikd.teacher.oracle import PaidTeacher, synthetic_view


class Counting(Teacher):
    """A module teacher that counts the images its no-grad path is called on."""

    def __init__(self, module: nn.Module):
        base = Teacher.from_module(module)
        super().__init__(base.fn, base.fingerprint, "counting")
        self.seen = 0

    def __call__(self, x):
        self.seen += x.shape[0]
        return super().__call__(x)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()


def images(b, seed=0):
    return torch.randn(b, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_synthetic_views_are_negative_and_per_run():
    views = {synthetic_view(f"run-{i}") for i in range(200)}
    assert len(views) == 200 and all(v < 0 for v in views)
    assert synthetic_view("run-1") == synthetic_view("run-1")


def test_each_key_paid_once_across_reopen(tmp_path, tiny):
    path = tmp_path / "store.sqlite"
    teacher = Counting(tiny)
    x = images(4)
    keys = torch.tensor([7, 3, 100, 0])
    with PaidTeacher.open(path, teacher, "toy", 3, budget=10, run_key="run") as paid:
        first = paid.query(keys, x)
        assert teacher.seen == 4 and paid.paid == 4 and paid.remaining == 6
        torch.testing.assert_close(first, tiny(x), rtol=1e-5, atol=1e-6)
        again = paid.query(keys[[2, 0]], x[[2, 0]])  # stored keys, any order: no call
        assert teacher.seen == 4
        torch.testing.assert_close(again, first[[2, 0]])
    with PaidTeacher.open(path, teacher, "toy", 3, budget=10, run_key="run") as paid:
        assert paid.paid == 4 and paid.paid_at_open == 4 and paid.remaining == 6
        torch.testing.assert_close(paid.query(keys, x), first)
        assert teacher.seen == 4
        mixed = paid.query(torch.tensor([3, 8]), images(2, seed=1))  # one stored, one new
        assert teacher.seen == 5 and paid.paid == 5
        torch.testing.assert_close(mixed[0], first[1])
    with TeacherStore.open(path, teacher.fingerprint, "toy", 3) as store:
        assert store.paid_calls() == 5 and store.count(synthetic_view("run")) == 5
        assert store.count(0) == 0  # nothing under a dataset view


def test_synthetic_keys_never_read_dataset_outputs(tmp_path, tiny):
    path = tmp_path / "store.sqlite"
    teacher = Counting(tiny)
    x = images(3)
    with TeacherStore.open(path, teacher.fingerprint, "toy", 3) as store:
        store.fill(torch.arange(3), 0, lambda ids: x[ids] * 0 + 5.0, teacher, budget=3)
    with PaidTeacher.open(path, teacher, "toy", 3, budget=3, run_key="a") as paid:
        out = paid.query(torch.arange(3), x)  # same ids as the dataset samples: paid, not read
        assert teacher.seen == 6
        torch.testing.assert_close(out, tiny(x), rtol=1e-5, atol=1e-6)
    with PaidTeacher.open(path, teacher, "toy", 3, budget=3, run_key="b") as other:
        assert other.paid == 0  # another run's view starts empty


def test_refuses_past_budget_with_zero_calls(tmp_path, tiny):
    path = tmp_path / "store.sqlite"
    teacher = Counting(tiny)
    with PaidTeacher.open(path, teacher, "toy", 3, budget=5, run_key="run") as paid:
        paid.query(torch.arange(4), images(4))
        with pytest.raises(BudgetExceededError, match="1 of the run's 5"):
            paid.query(torch.arange(3, 6), images(3))  # 2 new keys, 1 left
        x = images(2).requires_grad_(True)
        with pytest.raises(BudgetExceededError):
            paid.query_white_box(torch.tensor([10, 11]), x)
        assert teacher.seen == 4 and paid.paid == 4
        paid.query(torch.tensor([1, 2, 9]), images(3))  # 1 new key fits
        assert paid.remaining == 0
    with TeacherStore.open(path, teacher.fingerprint, "toy", 3) as store:
        assert store.paid_calls() == 5
    with pytest.raises(BudgetExceededError, match="already holds 5"):
        PaidTeacher.open(path, teacher, "toy", 3, budget=4, run_key="run")


def test_white_box_query_has_input_gradients_and_pays_once(tmp_path, tiny):
    teacher = Counting(tiny)
    x = images(3).requires_grad_(True)
    with PaidTeacher.open(tmp_path / "s.sqlite", teacher, "toy", 3, budget=3, run_key="run") as paid:
        assert paid.white_box
        out = paid.query_white_box(torch.tensor([5, 6, 7]), x)
        assert out.dtype == torch.float32 and paid.paid == 3 and teacher.seen == 0  # no second forward
        (g,) = torch.autograd.grad(out[:, 1].sum(), x)
        torch.testing.assert_close(g.reshape(3, 4), tiny[1].weight[1].detach().expand(3, 4))
        again = paid.query_white_box(torch.tensor([5, 6, 7]), x)  # replay: recomputed, free
        assert paid.paid == 3
        torch.testing.assert_close(paid.query(torch.tensor([5, 6, 7]), x.detach()), again.detach())
        with pytest.raises(ValueError, match="distinct"):
            paid.query(torch.tensor([5, 5]), x[:2].detach())


def test_callable_teacher_has_no_white_box(tmp_path, tiny):
    api = Teacher.from_callable(lambda x: tiny(x), fingerprint="api-v1")
    with PaidTeacher.open(tmp_path / "s.sqlite", api, "toy", 3, budget=3, run_key="run") as paid:
        assert not paid.white_box
        assert paid.query(torch.tensor([1]), images(1)).shape == (1, 3)
        with pytest.raises(FtikdError, match="input gradients"):
            paid.query_white_box(torch.tensor([2]), images(1).requires_grad_(True))


# ---------------------------------------------------------------- resume through the engine


def digits_data(digits, teacher_model, n):
    x = digits.train_images[:n]
    mean, std = digits.mean, digits.std
    with torch.no_grad():
        logits = teacher_model(normalize(x, mean, std)).logits
    return TrainData(
        train_images=x,
        train_labels=digits.train_labels[:n],
        val_images=digits.train_images[n : n + 40],
        val_labels=digits.train_labels[n : n + 40],
        mean=mean,
        std=std,
        num_classes=10,
        teacher_logits=logits,
    )


BUDGET = 50  # spent during epoch 2 (epoch 1 pays about 40): replays must attack as the first attempt did


def bss_fit(data, teacher, store, key, epochs, checkpoint=None, resume=False, on_epoch=None, budget=BUDGET):
    """BSS on ``data`` for ``epochs`` pseudo-epochs: (student, calls paid under ``key``, loss terms per
    epoch, boundary samples distilled)."""
    torch.manual_seed(1)
    student = build_model("resnet8", in_channels=1, num_classes=10)
    method = build_method("bss", attack_size=4, num_steps=3)
    cfg = TrainConfig(batch_size=32, max_epochs=epochs, patience=50, lr=0.05)
    with PaidTeacher.open(store, teacher, "digits", 10, budget=budget, run_key=key) as paid:
        result = fit(
            student,
            method,
            data,
            cfg,
            1,
            on_epoch=on_epoch,
            checkpoint=checkpoint,
            resume=resume,
            paid_teacher=paid,
        )
    terms = [[epoch[k] for k in ("ce", "kd", "bss")] for epoch in result.history]
    return student, paid.paid, torch.tensor(terms), method.evaluate_extra()["boundary_samples"]


def same_run(got, ref):
    """The same paid calls, boundary samples, per-epoch losses and final weights as ``ref``."""
    assert got[1] == ref[1] and got[3] == ref[3]
    torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-5)
    for a, b in zip(got[0].state_dict().values(), ref[0].state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def test_resumed_run_pays_what_an_uninterrupted_run_pays(tmp_path, digits, trained_digits_teacher):
    teacher = Teacher.from_checkpoint(trained_digits_teacher(4))
    data = digits_data(digits, teacher.fn.module, 128)
    store = tmp_path / "store.sqlite"
    ref = bss_fit(data, teacher, store, "uninterrupted", 2)
    assert BUDGET - 4 < ref[1] <= BUDGET  # spent: less than one more sample (4 calls) left
    assert (ref[2][:, 2] > 0).all()  # boundary samples in both epochs

    ck, ck1 = tmp_path / "state.pt", tmp_path / "state-epoch1.pt"
    paid1 = bss_fit(data, teacher, store, "stopped", 1, checkpoint=ck)[1]  # stopped after epoch 1 ...
    assert 0 < paid1 < ref[1]  # both epochs pay
    same_run(bss_fit(data, teacher, store, "stopped", 2, checkpoint=ck, resume=True), ref)  # ... resumed

    # a run killed during epoch 2 replays it from the epoch-1 checkpoint: the same keys and attacks
    # (though the store already holds epoch 2's calls), nothing new paid
    def keep_epoch1(record):
        if record["epoch"] == 1:
            shutil.copy(ck, ck1)

    ck.unlink()
    bss_fit(data, teacher, store, "killed", 2, checkpoint=ck, on_epoch=keep_epoch1)
    shutil.copy(ck1, ck)
    with TeacherStore.open(store, teacher.fingerprint, "digits", 10) as s:
        before = s.paid_calls()
    same_run(bss_fit(data, teacher, store, "killed", 2, checkpoint=ck, resume=True), ref)
    with TeacherStore.open(store, teacher.fingerprint, "digits", 10) as s:
        assert s.paid_calls() == before
