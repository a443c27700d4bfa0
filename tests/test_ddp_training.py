"""Data-parallel student training (gloo, 2 CPU processes) against the same training in one process."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ftikd.distributed import DistContext
from ftikd.engine.parallel import GlobalBatchNorm, rank_rows, use_global_batchnorm
from ftikd.engine.trainer import TrainConfig, TrainData, build_training, make_batch, train_step
from ftikd.errors import FtikdError
from ftikd.experiments.bench import BenchConfig, synthetic_data
from ftikd.methods import build_method
from ftikd.models import build_model

STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_data() -> TrainData:
    """96 random 1x12x12 uint8 images with labels and teacher logits (the bench's synthetic data)."""
    data = synthetic_data(BenchConfig(num_train=96, image_size=12), torch.device("cpu"))
    return dataclasses.replace(data, padding=2)  # little zero padding: few exact ReLU ties


def train_a_few_steps(method_name: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """STEPS optimizer steps of resnet8 with ``method_name``; returns the weights and the losses."""
    torch.manual_seed(0)
    student = build_model("resnet8", in_channels=1, num_classes=10)
    method = build_method(method_name)
    data = small_data()
    parts = build_training(student, method, data, TrainConfig(batch_size=16, lr=0.05), seed=3)
    losses = []
    for _ in range(STEPS):
        terms = train_step(
            parts.model, method, data, parts.sampler, parts.optimizer, parts.aug_generator, parts.options
        )
        losses.append(float(sum(t.detach() for t in terms.values())))
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, losses


def _rank_main(rank: int, port: int, method_name: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        state, losses = train_a_few_steps(method_name)
        torch.save({"state": state, "losses": losses}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method_name", ["kd", "ckd"])
def test_two_processes_match_one_process(tmp_path, method_name):
    """Same weights after a few steps whether one process takes the batch or two take half each."""
    single_state, single_losses = train_a_few_steps(method_name)
    mp.start_processes(
        _rank_main, args=(free_port(), method_name, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in single_state.items():
        # the two ranks hold identical replicas, equal to the single process within float tolerance
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        if value.is_floating_point():
            torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(ranks[0]["state"][key], value), key
    # each rank's loss is the mean over its half; their average is the single process's loss
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    assert mean_losses == pytest.approx(single_losses, rel=1e-4)


def test_global_batchnorm_is_plain_batchnorm_in_one_process():
    bn = nn.BatchNorm2d(3)
    x = torch.randn(5, 3, 4, 4)
    expected = bn(x)
    model = use_global_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))
    assert isinstance(model[0], GlobalBatchNorm)
    torch.testing.assert_close(model[0](x), expected)


def test_rank_rows_split_the_batch_evenly_or_refuse():
    rows = [rank_rows(64, DistContext(r, 4, r)) for r in range(4)]
    assert [(s.start, s.stop) for s in rows] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert rank_rows(64, DistContext(0, 1, 0)) is None
    with pytest.raises(FtikdError, match="divisible by 3"):
        rank_rows(64, DistContext(0, 3, 0))


def test_rank_rows_of_a_group_batch_keep_whole_groups():
    """A rank's rows of a (B, k) group batch are exactly the single process's images for those rows."""
    data = small_data()
    index = torch.arange(24).reshape(8, 3)
    whole = make_batch(data, index, torch.Generator().manual_seed(5))
    half = make_batch(data, index, torch.Generator().manual_seed(5), rows=slice(4, 8))
    assert torch.equal(half.images, whole.images[4:8])
    assert torch.equal(half.labels, whole.labels[4:8])
    assert torch.equal(half.teacher_logits, whole.teacher_logits[4:8])


def test_torchrun_distill_writes_one_record_close_to_single_process(tmp_path, digits_teacher):
    """``torchrun --nproc_per_node 2 -m ftikd distill`` against ``ftikd distill``: one record from rank
    0, teacher paid once, the first pseudo-epoch's losses close."""
    common = [
        "distill", "--dataset", "digits", "--teacher", str(digits_teacher), "--method", "kd",
        "--calls", "300", "--batch-size", "32", "--max-epochs", "2", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "ftikd.cli", *common, "--out", str(tmp_path / "one" / "runs")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = subprocess.run(
        [*torchrun, "-m", "ftikd.cli", *common, "--out", str(tmp_path / "two" / "runs")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert multi.returncode == 0, multi.stderr[-3000:]
    records = list((tmp_path / "two" / "runs").glob("*.json"))
    assert len(records) == 1
    two = json.loads(records[0].read_text())
    one = json.loads(next((tmp_path / "one" / "runs").glob("*.json")).read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["teacher_calls"]["store_paid_total"] == 300
    # the step-level test above checks equality tightly; over a pseudo-epoch of SGD float rounding
    # differences grow, so the epoch-mean losses are compared at a looser tolerance
    first_one, first_two = one["history"][0], two["history"][0]
    assert first_two["ce"] == pytest.approx(first_one["ce"], rel=1e-3)
    assert first_two["kd"] == pytest.approx(first_one["kd"], rel=1e-3)
    assert abs(first_two["val_acc"] - first_one["val_acc"]) <= 2.0
    assert not list((tmp_path / "two" / "runs").glob("*.pending.json"))
