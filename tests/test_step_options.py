"""The accelerator options of a training step (bf16 autocast, channels_last, torch.compile), on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ftikd.engine.config import TrainConfig, resolve_autocast, resolve_channels_last
from ftikd.engine.trainer import TrainData, build_training, train_step
from ftikd.errors import FtikdError
from ftikd.experiments.bench import BenchConfig, synthetic_data
from ftikd.methods import build_method
from ftikd.models import build_model


def tiny_data() -> TrainData:
    """64 random 1x12x12 uint8 images with labels and teacher logits (the bench's synthetic data)."""
    data = synthetic_data(BenchConfig(num_train=64, image_size=12), torch.device("cpu"))
    return dataclasses.replace(data, padding=2)  # little zero padding: few exact ReLU ties


def run_steps(steps: int, method_name: str = "kd", **train: object) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(0)
    student = build_model("resnet8", in_channels=1, num_classes=10)
    method = build_method(method_name)
    data = tiny_data()
    parts = build_training(student, method, data, TrainConfig(batch_size=16, **train), seed=0)
    losses = []
    for _ in range(steps):
        terms = train_step(
            parts.model, method, data, parts.sampler, parts.optimizer, parts.aug_generator, parts.options
        )
        losses.append(float(sum(t.detach() for t in terms.values())))
    return student, losses


def test_auto_means_fp32_and_contiguous_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_autocast("auto", cpu) is None
    assert resolve_channels_last("auto", cpu) is False
    assert resolve_autocast("bf16", cpu) is torch.bfloat16
    assert resolve_channels_last("channels_last", cpu) is True


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("precision", "fp16", "unknown precision 'fp16'"), ("memory_format", "nhwc", "unknown memory format")],
)
def test_unknown_settings_are_user_errors(field, value, message):
    with pytest.raises(FtikdError, match=message):
        run_steps(0, **{field: value})


@pytest.mark.parametrize("method_name", ["kd", "ckd", "ckd-inbatch"])
def test_bf16_autocast_trains_fp32_weights_close_to_fp32(method_name):
    """Forward and loss run in bf16 (so the loss differs a little), the weights and update stay fp32."""
    fp32_model, fp32_losses = run_steps(3, method_name)
    bf16_model, bf16_losses = run_steps(3, method_name, precision="bf16")
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())
    assert bf16_losses != fp32_losses  # autocast really ran
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.05)


def test_channels_last_gives_the_same_training():
    """Same forward up to float rounding (other conv kernels), and losses that stay close.

    Gradients are not compared elementwise: a rounding-level change can flip a ReLU whose input is
    exactly at zero (zero-padded crops make such ties common), which moves some gradients by percents.
    """
    dense_model, dense_losses = run_steps(3)
    nhwc_model, nhwc_losses = run_steps(3, memory_format="channels_last")
    conv = next(m for m in nhwc_model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc_losses[0] == pytest.approx(dense_losses[0], rel=1e-5)
    assert nhwc_losses == pytest.approx(dense_losses, rel=1e-3)


@pytest.mark.slow
def test_compiled_student_trains_like_eager():
    """``compile=True`` (inductor, needs a C++ compiler on CPU) keeps state-dict keys and the numbers."""
    eager_model, eager_losses = run_steps(3)
    compiled_model, compiled_losses = run_steps(3, compile=True)
    assert list(compiled_model.state_dict()) == list(eager_model.state_dict())
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3)


def test_bad_step_settings_stop_distill_before_any_teacher_call(
    tmp_path, digits_teacher, capsys, monkeypatch
):
    from ftikd.cli import main
    from ftikd.distributed import dist_context

    common = ["distill", "--dataset", "digits", "--teacher", str(digits_teacher), "--calls", "100"]
    out = tmp_path / "runs"
    config = tmp_path / "bad.json"
    config.write_text('{"train": {"precision": "fp16"}}')
    assert main([*common, "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    assert "unknown precision 'fp16'" in capsys.readouterr().err
    # a global batch that does not split over the torchrun ranks (no process group is needed to refuse)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("ftikd.experiments.run.init_distributed", lambda device: dist_context())
    assert main([*common, "--batch-size", "64", "--out", str(out), "--no-progress"]) == 2
    assert "divisible by 3" in capsys.readouterr().err
    assert not tmp_path.joinpath("stores").exists() and not out.exists()
