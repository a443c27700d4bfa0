"""The FTI-KD schedule: pseudo-epochs, patience in evaluations, phases, best-checkpoint restore."""

import json

import pytest
import torch

from ftikd.engine.trainer import TrainConfig, TrainData, evaluate, fit, steps_per_epoch
from ftikd.methods import build_method
from ftikd.models import build_model


def tiny_data(n=40, n_val=10, classes=3, teacher=True):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n + n_val,), generator=g)
    images = (torch.rand(n + n_val, 1, 8, 8, generator=g) * 60).to(torch.uint8)
    images[torch.arange(n + n_val), 0, labels * 2, :] = 255  # a learnable stripe per class
    return TrainData(
        train_images=images[:n],
        train_labels=labels[:n],
        val_images=images[n:],
        val_labels=labels[n:],
        mean=(0.3,),
        std=(0.3,),
        num_classes=classes,
        hflip=False,
        teacher_logits=torch.nn.functional.one_hot(labels[:n], classes).float() * 5 if teacher else None,
    )


def test_steps_per_epoch():
    assert steps_per_epoch(500, 64) == 8
    assert steps_per_epoch(2000, 64) == 32
    assert steps_per_epoch(64, 64) == 1


@pytest.mark.parametrize("method", ["ce", "kd", "ckd", "ckd-inbatch"])
def test_schedule_phases_lr_and_best_restore(method):
    data = tiny_data()
    torch.manual_seed(0)
    student = build_model("resnet8", in_channels=1, num_classes=3)
    cfg = TrainConfig(batch_size=16, lr=0.05, patience=2, phases=3, max_epochs=200)
    result = fit(student, build_method(method), data, cfg, seed=0)
    ends = [h for h in result.history if h.get("phase_end")]
    assert len(ends) == 3  # training stops at the third phase end
    assert sorted({h["lr"] for h in result.history}, reverse=True) == pytest.approx([0.05, 0.005, 0.0005])
    # a phase ends exactly `patience` evaluations after the last improvement
    for end in ends:
        before = [h for h in result.history if h["epoch"] <= end["epoch"] and h["phase"] == end["phase"]]
        last_gain = max((h["epoch"] for h in before if h["improved"]), default=before[0]["epoch"] - 1)
        start = before[0]["epoch"] - 1
        assert end["epoch"] - max(last_gain, start) == cfg.patience
    # the returned weights are the best-validation ones
    val, _ = evaluate(student, data.val_images, data.val_labels, data.mean, data.std)
    assert val == pytest.approx(result.best_val_acc)
    assert result.steps == result.epochs * steps_per_epoch(40, 16)


def test_phase_ends_keep_the_loss_state_a_method_names(monkeypatch):
    """A11: a phase end restores CRD's heads but not its memory bank; the final restore is complete."""
    import ftikd.engine.trainer as trainer

    calls = []
    real = trainer.load_trainable_state

    def spy(student, extra, state, keep=()):
        calls.append(keep)
        real(student, extra, state, keep)

    monkeypatch.setattr(trainer, "load_trainable_state", spy)
    student = build_model("resnet8", in_channels=1, num_classes=3)
    cfg = TrainConfig(batch_size=16, patience=1, phases=2, max_epochs=20)
    result = fit(student, build_method("crd", num_negatives=8), tiny_data(), cfg, seed=0)
    ends = [h for h in result.history if h.get("phase_end")]
    assert len(ends) == 2 and calls == [("memory.",)] * 2 + [()]


def test_max_epochs_caps_training():
    data = tiny_data()
    student = build_model("resnet8", in_channels=1, num_classes=3)
    result = fit(
        student, build_method("ce"), data, TrainConfig(batch_size=16, patience=100, max_epochs=3), seed=0
    )
    assert result.epochs == 3


def test_same_seed_same_numbers():
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        student = build_model("resnet8", in_channels=1, num_classes=3)
        result = fit(
            student, build_method("ckd", k=3), tiny_data(), TrainConfig(batch_size=8, max_epochs=3), seed=5
        )
        runs.append([(h["val_acc"], h["ckd_teacher"]) for h in result.history])
    assert runs[0] == runs[1]


def test_non_finite_loss_names_the_term():
    from ftikd.errors import FtikdError

    data = tiny_data()
    data.teacher_logits = data.teacher_logits * float("inf")
    student = build_model("resnet8", in_channels=1, num_classes=3)
    with pytest.raises(FtikdError, match=r"loss term\(s\) .*kd.* became non-finite during pseudo-epoch 1"):
        fit(student, build_method("kd"), data, TrainConfig(batch_size=16, max_epochs=2), seed=0)


class Killed(Exception):
    pass


@pytest.mark.parametrize("method,opts", [("kd", {}), ("ckd", {"k": 3, "comparison": "interpolation"})])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, method, opts):
    cfg = TrainConfig(batch_size=8, patience=2, phases=2, max_epochs=9)

    def train(checkpoint=None, resume=False, stop_at=None):
        torch.manual_seed(3)
        student = build_model("resnet8", in_channels=1, num_classes=3)

        def on_epoch(record):
            if record["epoch"] == stop_at:
                raise Killed

        result = fit(student, build_method(method, **opts), tiny_data(), cfg, 3, on_epoch, checkpoint, resume)
        return result, student

    full, full_student = train()
    ckpt = tmp_path / "state.pt"
    with pytest.raises(Killed):
        train(ckpt, stop_at=4)
    resumed, resumed_student = train(ckpt, resume=True)

    def strip(history):
        return [{k: v for k, v in h.items() if k != "time_s"} for h in history]

    assert strip(resumed.history) == strip(full.history)
    assert resumed.best_val_acc == full.best_val_acc and resumed.epochs == full.epochs
    for a, b in zip(full_student.state_dict().values(), resumed_student.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_unreadable_training_checkpoint_is_a_user_error(tmp_path):
    from ftikd.errors import FtikdError

    ckpt = tmp_path / "state.pt"
    ckpt.write_bytes(b"garbage")
    with pytest.raises(FtikdError, match="delete it to restart"):
        fit(
            build_model("resnet8", in_channels=1, num_classes=3),
            build_method("ce"),
            tiny_data(),
            TrainConfig(batch_size=8, max_epochs=1),
            0,
            checkpoint=ckpt,
            resume=True,
        )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    import torch.nn.functional as F

    from ftikd.engine.trainer import load_checkpoint_state
    from ftikd.errors import FtikdError
    from ftikd.methods.base import Method

    class TurnsNaN(Method):
        name = "turns-nan"
        call_cost = 0
        steps = 0

        def loss(self, student, batch):
            self.steps += 1
            ce = F.cross_entropy(student(batch.images).logits, batch.labels)
            return {"ce": ce, "bad": ce * float("nan") if self.steps > 7 else ce * 0}

    ckpt = tmp_path / "state.pt"
    student = build_model("resnet8", in_channels=1, num_classes=3)
    with pytest.raises(
        FtikdError, match=r"loss term\(s\) .*bad became non-finite during pseudo-epoch 3 \(steps 7-9\)"
    ):
        fit(student, TurnsNaN(), tiny_data(), TrainConfig(batch_size=16, max_epochs=5), 0, checkpoint=ckpt)
    saved = load_checkpoint_state(ckpt)
    assert json.loads(saved["loop"])["epoch"] == 2  # the last good pseudo-epoch
    assert all(torch.isfinite(v).all() for v in saved["current"]["student"].values() if v.is_floating_point())


def test_training_checkpoint_carrying_code_is_refused(tmp_path):

    from ftikd.engine.trainer import load_checkpoint_state
    from ftikd.errors import FtikdError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = tmp_path / "state.pt"
    torch.save({"loop": Evil()}, ckpt)
    marker.unlink(missing_ok=True)  # torch.save itself does not run it, but be sure
    with pytest.raises(FtikdError, match="delete it to restart"):
        load_checkpoint_state(ckpt)
    assert not marker.exists()
