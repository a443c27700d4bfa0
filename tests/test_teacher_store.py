"""TeacherStore fills and budgets, fast reads, and the Teacher wrapper."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_fakes import FP, C, CountingTeacher, expected, images_fn, logit_fn, open_store
from torch import nn

from ftikd.errors import BudgetExceededError, FtikdError
from ftikd.models.base import ModelOutput, available_models, register_model
from ftikd.teacher import (
    Teacher,
    TeacherOutput,
    TeacherStore,
    as_teacher,
    save_checkpoint,
    state_fingerprint,
)

# ---------------------------------------------------------------- fill and the budget


def test_fill_pays_once_per_sample(tmp_path: Path) -> None:
    t = CountingTeacher()
    samples = torch.tensor([*range(50), 3, 7, 7, 49])
    with open_store(tmp_path / "sub" / "s.sqlite") as s:  # parent directory is created
        assert s.missing(samples, 0).tolist() == list(range(50))
        assert s.fill(samples, 0, images_fn, t, budget=50, batch_size=16) == 50
        assert t.images == 50 and t.calls == 4 and sorted(t.seen) == list(range(50))
        assert s.paid_calls() == 50 and s.count() == 50 and s.count(0) == 50 and s.count(1) == 0
        assert [row[2] for row in s.ledger()] == [16, 16, 16, 2]
        assert s.fill(samples, 0, images_fn, t, budget=50) == 0
        assert s.missing(samples, 0).numel() == 0
    with open_store(tmp_path / "sub" / "s.sqlite") as s:  # reopened: still nothing to pay
        assert s.fill(samples, 0, images_fn, t, budget=50) == 0
        assert s.fill(torch.arange(40, 60), 0, images_fn, t, budget=20) == 10
        assert s.fill(torch.arange(5), 1, images_fn, t, budget=5) == 5  # another view is new data
        assert torch.equal(s.logits(torch.arange(60), 0), expected(range(60)))
    assert t.images == 65


def test_budget_refused_before_any_call(tmp_path: Path) -> None:
    t = CountingTeacher()
    with open_store(tmp_path / "s.sqlite") as s:
        with pytest.raises(BudgetExceededError, match="needs 51 teacher outputs but its budget is 50"):
            s.fill(torch.arange(51), 0, images_fn, t, budget=50)
        assert t.images == 0 and s.count() == 0 and s.paid_calls() == 0
        s.fill(torch.arange(51), 0, images_fn, t, budget=51)
        # The budget is the run's n: asking for more distinct samples is refused even if cached.
        with pytest.raises(BudgetExceededError):
            s.fill(torch.arange(51), 0, images_fn, t, budget=50)
        assert t.images == 51


def test_lifetime_max_calls(tmp_path: Path) -> None:
    t = CountingTeacher()
    p = tmp_path / "s.sqlite"
    with open_store(p, max_calls=30) as s:
        assert s.fill(torch.arange(20), 0, images_fn, t, budget=100) == 20
        with pytest.raises(BudgetExceededError, match="max_calls=30"):
            s.fill(torch.arange(20, 40), 0, images_fn, t, budget=100)
        assert t.images == 20
        assert s.fill(torch.arange(10, 30), 0, images_fn, t, budget=100) == 10  # exactly reaches the cap
    with open_store(p) as s:  # the cap is kept by the store
        assert s.max_calls == 30
        with pytest.raises(BudgetExceededError):
            s.fill(torch.tensor([99]), 0, images_fn, t, budget=100)
    with open_store(p, max_calls=40) as s:  # explicitly raised
        assert s.fill(torch.tensor([99]), 0, images_fn, t, budget=100) == 1
    assert t.images == 31


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.integers(0, 30),
    requests=st.lists(
        st.tuples(st.lists(st.integers(0, 39), max_size=40), st.integers(0, 1)), min_size=1, max_size=3
    ),
    batch_size=st.integers(1, 12),
)
def test_budget_property(budget: int, requests: list[tuple[list[int], int]], batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        counting = CountingTeacher()
        teacher = Teacher.from_callable(counting, fingerprint=FP)
        stored: dict[int, set[int]] = {0: set(), 1: set()}
        with open_store(Path(d) / "s.sqlite") as s:
            for req, view in requests:
                before, before_seen = counting.images, len(counting.seen)
                wanted = set(req)
                if len(wanted) > budget:
                    with pytest.raises(BudgetExceededError):
                        s.fill(
                            torch.tensor(req, dtype=torch.int64), view, images_fn, teacher, budget, batch_size
                        )
                    assert counting.images == before  # refused with zero calls
                else:
                    paid = s.fill(
                        torch.tensor(req, dtype=torch.int64), view, images_fn, teacher, budget, batch_size
                    )
                    seen = counting.images - before
                    assert seen == paid == len(wanted - stored[view]) <= budget
                    assert sorted(counting.seen[before_seen:]) == sorted(wanted - stored[view])  # never twice
                    stored[view] |= wanted
                for v, ids in stored.items():
                    assert s.count(v) == len(ids)
                    if ids:
                        order = sorted(ids, reverse=True)
                        assert torch.equal(s.logits(torch.tensor(order), v), expected(order))
            assert s.paid_calls() == counting.images == sum(len(ids) for ids in stored.values())


# ---------------------------------------------------------------- reading


def test_logits_order_preserved(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.sqlite") as s:
        s.fill(torch.arange(100), 0, images_fn, CountingTeacher(), budget=100, batch_size=32)
        req = torch.randperm(100, generator=torch.Generator().manual_seed(0))
        req = torch.cat([req, req[:7]])  # duplicates are fine
        got = s.logits(req, 0)
        assert got.dtype == torch.float32 and got.shape == (107, C)
        assert torch.equal(got, expected(req))
        assert s.logits(torch.tensor([], dtype=torch.int64), 0).shape == (0, C)
        with pytest.raises(FtikdError, match="no teacher logits for 1 requested samples"):
            s.logits(torch.tensor([5, 100]), 0)
        with pytest.raises(FtikdError):
            s.logits(torch.tensor([5]), 1)


def test_load_50k_logits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    n, classes = 50_000, 100

    def cheap_images(ids: torch.Tensor) -> torch.Tensor:
        return ids.to(torch.float32).reshape(-1, 1, 1, 1)

    def cheap_teacher(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1) * 1e-3 + torch.arange(classes, dtype=torch.float32)

    with TeacherStore.open(tmp_path / "big.sqlite", FP, "toy", classes) as s:
        t0 = time.perf_counter()
        s.fill(torch.arange(n), 0, cheap_images, cheap_teacher, budget=n, batch_size=10_000)
        t_fill = time.perf_counter() - t0
        req = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        got = s.logits(req, 0)
        t_load = time.perf_counter() - t0
    assert got.shape == (n, classes)
    assert torch.equal(got, cheap_teacher(cheap_images(req)))
    with capsys.disabled():
        print(f"\n[store] fill 50k x 100: {t_fill:.2f}s; load 50k x 100 logits (shuffled): {t_load:.3f}s")


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = C) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor, with_features: bool = False) -> ModelOutput:
        s1 = torch.relu(self.conv(x))
        emb = s1.mean(dim=(2, 3))
        return ModelOutput(self.fc(emb), {"stage1": s1, "embedding": emb} if with_features else {})


ARCH = "_test_tiny_store"
if ARCH not in available_models():
    register_model(ARCH)(TinyNet)


def test_features_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    names = ("stage1", "embedding")
    teacher = Teacher.from_module(net)  # no features requested: fill asks for the store's features
    with TeacherStore.open(tmp_path / "f.sqlite", teacher.fingerprint, "toy", C, feature_names=names) as s:
        s.fill(torch.arange(12), 2, images_fn, teacher, budget=12, batch_size=5)
        assert s.feature_shapes() == {"stage1": (4, 4, 4), "embedding": (4,)}
        req = torch.tensor([11, 0, 5, 5])
        ref = net(images_fn(req), with_features=True)
        assert torch.allclose(s.logits(req, 2), ref.logits)
        assert torch.allclose(s.features(req, 2, "stage1"), ref.features["stage1"])
        assert torch.allclose(s.features(req, 2, "embedding"), ref.features["embedding"])
        with pytest.raises(FtikdError, match="keeps features"):
            s.features(req, 2, "stage2")
    with TeacherStore.open(tmp_path / "f.sqlite", teacher.fingerprint, "toy", C) as s:  # subset is fine
        assert s.feature_names == names


# ---------------------------------------------------------------- the Teacher wrapper


def test_teacher_from_module_and_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = TinyNet()
    net.train()
    x = images_fn(torch.arange(6))
    t = Teacher.from_module(net, feature_names=("embedding",))
    out = t(x)
    assert isinstance(out, TeacherOutput) and out.logits.shape == (6, C) and not out.logits.requires_grad
    assert set(out.features) == {"embedding"}
    assert net.training  # mode restored after the eval-mode call
    assert t.fingerprint == state_fingerprint(net)
    path = tmp_path / "t.safetensors"
    save_checkpoint(net, path, {"arch": ARCH, "in_channels": 3, "num_classes": C, "dataset": "toy"})
    t2 = Teacher.from_checkpoint(path)
    assert t2.fingerprint == t.fingerprint  # same weights, same store
    assert torch.allclose(t2(x).logits, out.logits)
    assert as_teacher(str(path)).fingerprint == t.fingerprint
    assert as_teacher(path, fingerprint=t.fingerprint).fingerprint == t.fingerprint
    assert as_teacher(net).fingerprint == t.fingerprint
    assert as_teacher(t) is t
    assert set(as_teacher(t, feature_names=("stage1",))(x).features) == {"stage1"}
    with pytest.raises(FtikdError, match="did not return feature 'stage9'"):
        Teacher.from_module(net, feature_names=("stage9",))(x)
    with pytest.raises(FtikdError, match="expected"):
        as_teacher(net, fingerprint="something-else")


def test_teacher_plain_module_and_callables() -> None:
    x = images_fn(torch.arange(3))
    seq = nn.Sequential(nn.Flatten(), nn.Linear(48, C))
    t = as_teacher(seq)
    assert t(x).logits.shape == (3, C)
    with pytest.raises(FtikdError, match="fingerprint"):
        Teacher.from_callable(logit_fn, fingerprint=None)
    with pytest.raises(FtikdError, match="fingerprint"):
        as_teacher(logit_fn)
    t_np = as_teacher(lambda b: logit_fn(b).numpy().astype(np.float64), fingerprint="api-2026-01")
    out = t_np(x)
    assert out.logits.dtype == torch.float32 and torch.allclose(out.logits, logit_fn(x))
    t_dict = Teacher.from_callable(
        lambda b: {"logits": logit_fn(b), "embedding": b.flatten(1)},
        "api-2026-01",
        feature_names=("embedding",),
    )
    assert t_dict(x).features["embedding"].shape == (3, 48)
    with pytest.raises(FtikdError, match="batch"):
        Teacher.from_callable(lambda b: logit_fn(b)[:2], "api")(x)
    with pytest.raises(FtikdError, match="'logits'"):
        Teacher.from_callable(lambda b: {"probs": logit_fn(b)}, "api")(x)
    with pytest.raises(TypeError):
        as_teacher(42)
