"""``ftikd analyze``: each metric against an independent numpy computation, and one CLI run per analysis."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from ftikd.analysis.correlation import correlation_matrix, mean_correlation_difference, sample_indices
from ftikd.analysis.embedding import TSNEConfig, model_outputs, subsample, tsne_embedding
from ftikd.analysis.svd import class_spectrum, flatness
from ftikd.analysis.transfer import PGDConfig, pgd_attack, transfer_matrix
from ftikd.cli import main
from ftikd.data import load_dataset
from ftikd.engine.trainer import TrainConfig
from ftikd.errors import FtikdError
from ftikd.experiments.run import RunConfig, run_distillation
from ftikd.models import build_model
from ftikd.models.base import ModelOutput
from ftikd.teacher import save_checkpoint
from ftikd.teacher.train import TeacherTrainConfig, train_teacher

# ------------------------------------------------------------------------------------------ correlation


def numpy_correlation(logits: np.ndarray) -> np.ndarray:
    return np.corrcoef(logits, rowvar=False)


def test_correlation_matches_numpy_and_identical_models_give_zero():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    s = t + rng.normal(scale=0.7, size=t.shape)
    r = correlation_matrix(torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(r, numpy_correlation(t), atol=1e-9)
    want = np.abs(numpy_correlation(s) - numpy_correlation(t)).mean()  # all C² entries (A31)
    got = mean_correlation_difference(torch.from_numpy(t).float(), torch.from_numpy(s).float())
    assert got == pytest.approx(want, abs=1e-5) and got > 0.01
    assert mean_correlation_difference(torch.from_numpy(t), torch.from_numpy(t)) == pytest.approx(
        0, abs=1e-12
    )


def test_correlation_constant_column_stays_finite():
    logits = torch.randn(20, 4)
    logits[:, 2] = 3.0
    r = correlation_matrix(logits)
    assert torch.isfinite(r).all() and r[2, :2].abs().max() < 1e-6


def test_sample_indices_fixed_distinct_and_bounded():
    a, b = sample_indices(359, 100, seed=0), sample_indices(359, 100, seed=0)
    assert torch.equal(a, b) and a.unique().numel() == 100 and int(a.max()) < 359
    assert not torch.equal(a, sample_indices(359, 100, seed=1))
    with pytest.raises(FtikdError):
        sample_indices(50, 100)


# -------------------------------------------------------------------------------------------------- svd


def test_class_spectrum_matches_numpy_per_class_average():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 5))
    labels = np.repeat([0, 1, 2], [12, 8, 10])
    spectra = [np.linalg.svd(logits[labels == c], compute_uv=False) for c in range(3)]
    want = np.mean([sp[:5] for sp in spectra], axis=0)
    got = class_spectrum(torch.from_numpy(logits), torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)
    normed = class_spectrum(torch.from_numpy(logits), torch.from_numpy(labels), normalise=True).numpy()
    np.testing.assert_allclose(normed, want / want[0], rtol=1e-9)


def test_svd_of_known_matrix_and_flatness():
    diag = torch.zeros(4, 3)
    diag[0, 0], diag[1, 1], diag[2, 2] = 5.0, 3.0, 1.0  # singular values 5, 3, 1
    spectrum = class_spectrum(diag, torch.zeros(4, dtype=torch.long))
    np.testing.assert_allclose(spectrum.numpy(), [5.0, 3.0, 1.0], atol=1e-12)
    assert flatness(spectrum) == pytest.approx((1 + 0.6 + 0.2) / 3)
    rank_one = torch.ones(6, 4)
    assert flatness(class_spectrum(rank_one, torch.zeros(6, dtype=torch.long))) == pytest.approx(
        0.25, abs=1e-6
    )


# -------------------------------------------------------------------------------------------------- PGD


class Linear(nn.Module):
    """Logits ``W x + b`` of flattened [0, 1] pixels (returns logits, as a PixelModel does)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def linear_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 8, generator=g)
    x = torch.rand(16, 1, 2, 4, generator=g)
    return Linear(w, torch.zeros(3)), x, (x.flatten(1) @ w.T).argmax(dim=1)


def test_pgd_eps_zero_changes_nothing():
    model, x, y = linear_problem()
    adv = pgd_attack(model, x, y, PGDConfig(eps=0.0, step=0.5, steps=5))
    assert torch.equal(adv, x)


def test_pgd_one_step_matches_analytic_gradient_sign():
    model, x, y = linear_problem(1)
    w = model.fc.weight.detach().numpy()
    xs = x.flatten(1).numpy().astype(np.float64)
    logits = xs @ w.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(3)[y.numpy()]) @ w  # d CE / d x of a linear softmax model
    want = np.clip(np.clip(xs + 0.02 * np.sign(grad), xs - 0.05, xs + 0.05), 0, 1)
    adv = pgd_attack(model, x, y, PGDConfig(eps=0.05, step=0.02, steps=1, random_start=False))
    np.testing.assert_allclose(adv.flatten(1).numpy(), want, atol=1e-6)


def test_pgd_stays_in_ball_and_large_eps_fools_a_linear_model():
    model, x, y = linear_problem(2)
    cfg = PGDConfig(eps=0.03, step=0.01, steps=5)
    adv = pgd_attack(model, x, y, cfg, torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.03 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    big = pgd_attack(model, x, y, PGDConfig(eps=1.0, step=0.25, steps=20))
    assert (model(big).argmax(dim=1) == y).float().mean() < 0.2


def test_transfer_matrix_counts_match_a_direct_computation():
    a, x, _ = linear_problem(3)
    b, _, _ = linear_problem(4)
    labels = (x.flatten(1) @ a.fc.weight.T).argmax(dim=1)  # a is always right when clean, b sometimes
    images = (x * 255).round().to(torch.uint8)
    pixels = images.float() / 255
    cfg = PGDConfig(eps=0.2, step=0.05, steps=10, random_start=False)
    res = transfer_matrix([a, b], images, labels, cfg)
    with torch.no_grad():
        clean = [m(pixels).argmax(1).numpy() == labels.numpy() for m in (a, b)]
        for s, source in enumerate((a, b)):
            adv = pgd_attack(source, pixels, labels, cfg)
            for t, target in enumerate((a, b)):
                hit = target(adv).argmax(1).numpy() == labels.numpy()
                both = clean[s] & clean[t]
                assert int(res.counted[s, t]) == both.sum()
                if both.any():
                    assert float(res.success[s, t]) == pytest.approx(100 * (both & ~hit).sum() / both.sum())
                assert float(res.adv_accuracy[s, t]) == pytest.approx(100 * hit.mean())
    assert float(res.clean_accuracy[0]) == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------- embeddings


def test_model_outputs_embedding_is_the_classifier_input():
    torch.manual_seed(0)
    model = build_model("resnet8", in_channels=1, num_classes=10).eval()
    images = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8)
    seen = []
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    linears[-1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    out = model_outputs(model, images, (0.3,), (0.2,), batch_size=3)
    assert out.logits.shape == (7, 10)
    torch.testing.assert_close(out.embedding, torch.cat(seen), rtol=1e-5, atol=1e-6)
    x = (images.float() / 255 - 0.3) / 0.2
    with torch.no_grad():
        ref = model(x)
    assert isinstance(ref, ModelOutput)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_tsne_is_seeded_and_subsample_fixed():
    emb = torch.randn(40, 6)
    cfg = TSNEConfig(samples=40, perplexity=30.0, seed=3)
    a, _ = tsne_embedding(emb, cfg)
    b, kl = tsne_embedding(emb, cfg)
    assert a.shape == (40, 2) and np.allclose(a, b) and np.isfinite(kl)
    assert torch.equal(subsample(100, 30, 1), subsample(100, 30, 1)) and subsample(10, 30, 1).numel() == 10
    with pytest.raises(ValueError):
        TSNEConfig(samples=2)


# -------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A digits teacher and two one-pseudo-epoch students saved by runs (checkpoint + record)."""
    root = tmp_path_factory.mktemp("analyze")
    digits = load_dataset("digits")
    teacher = root / "teacher.safetensors"
    train_teacher(
        TeacherTrainConfig(dataset="digits", arch="resnet8", epochs=4, out=str(teacher)),
        digits,
        progress=False,
    )
    records = []
    for method in ("kd", "ckd"):
        cfg = RunConfig(
            teacher=str(teacher),
            dataset="digits",
            method=method,
            calls=80,
            seed=1,
            out=str(root / "runs"),
            train=TrainConfig(max_epochs=1, patience=1, phases=1),
        )
        records.append(run_distillation(cfg, dataset=digits, progress=False).path)
    return teacher, records


def common(saved, out, students=None) -> list[str]:
    teacher, records = saved
    students = students or [str(records[0]), json.loads(records[1].read_text())["student"]["path"]]
    return [
        "--teacher",
        str(teacher),
        "--students",
        *students,
        "--dataset",
        "digits",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]


@pytest.mark.parametrize(
    ("analysis", "extra", "tables"),
    [
        ("correlation", [], 1),
        ("svd", [], 1),
        ("svd", ["--whole-matrix", "--normalise"], 1),
        ("transfer", ["--samples", "120", "--steps", "5"], 2),
        ("tsne", ["--samples", "80"], 1),
        ("curves", [], 1),
    ],
)
def test_cli_writes_table_csv_and_png(saved, tmp_path, analysis, extra, tables):
    out = tmp_path / "out"
    assert main(["analyze", analysis, *common(saved, out), *extra]) == 0
    md = (out / f"{analysis}.md").read_text()
    assert md.count("| ---|") + md.count("|---|") >= tables and f"{analysis}.png" in md
    assert (out / f"{analysis}.png").stat().st_size > 1000
    rows = (out / f"{analysis}.csv").read_text().strip().splitlines()
    expected = 3 if analysis in ("svd", "transfer", "tsne") else 2  # teacher row where the teacher is a model
    assert len(rows) == 1 + expected
    if analysis == "correlation":
        assert all(0 <= float(r.split(",")[-1]) <= 2 for r in rows[1:])
    if "--normalise" in extra:
        assert all(float(r.split(",")[3]) == pytest.approx(1.0) for r in rows[1:])  # σ1 / σ1


def test_cli_bad_inputs_write_nothing(saved, tmp_path, capsys):
    teacher, records = saved
    other = tmp_path / "fashion.safetensors"
    model = build_model("resnet8", in_channels=1, num_classes=10)
    save_checkpoint(
        model, other, {"arch": "resnet8", "in_channels": 1, "num_classes": 10, "dataset": "fashion-mnist"}
    )
    five = tmp_path / "five.safetensors"
    save_checkpoint(
        build_model("resnet8", in_channels=1, num_classes=5),
        five,
        {"arch": "resnet8", "in_channels": 1, "num_classes": 5, "dataset": "digits"},
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = tmp_path / "out"
    cases = [
        common(saved, out, [str(tmp_path / "missing.json")]),
        common(saved, out, [str(other)]),
        common(saved, out, [str(five)]),
        common(saved, blocker / "sub"),
    ]
    for argv in cases:
        assert main(["analyze", "correlation", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ftikd: error:") and "\n" not in err
        assert not out.exists() and not (blocker / "sub").exists()
