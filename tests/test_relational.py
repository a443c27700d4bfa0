"""Relational baselines: RKD, RKD_d, DIST, SP, PKT, CC (METHODS.md M3-M5, M13-M15, §5.3-5.5).

Each loss is checked against an independent numpy computation written from the formulas, for finite
gradients on degenerate batches, and, where it is rotation-invariant, for a gradient that does not
depend on the class count; each method runs one pseudo-epoch on digits through the CLI.
"""

import json
import math

import numpy as np
import pytest
import torch

from ftikd.cli import main
from ftikd.errors import FtikdError
from ftikd.losses.relational import (
    cc_loss,
    dist_loss,
    orthonormal_projection,
    pkt_loss,
    rkd_angle_loss,
    rkd_d_inbatch_loss,
    rkd_d_pair_loss,
    rkd_distance_loss,
    sp_loss,
)
from ftikd.methods import MethodContext, build_method
from ftikd.methods.rkd import ClassChunkSampler
from ftikd.models import build_model


def _data(b: int = 7, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, d, generator=g, dtype=torch.float64) * 2
    return s, s + torch.randn(b, d, generator=g, dtype=torch.float64)


def _smooth_l1(a: np.ndarray, b: np.ndarray) -> float:
    diff = np.abs(a - b)
    return float(np.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean())


def _np_psi(x: np.ndarray) -> np.ndarray:
    b = len(x)
    d = np.array([[np.sqrt(((x[i] - x[j]) ** 2).sum()) for j in range(b)] for i in range(b)])
    return d / d[d > 0].mean()


def _np_cosines(x: np.ndarray) -> np.ndarray:
    b = len(x)
    out = np.zeros((b, b, b))
    for j in range(b):
        for i in range(b):
            for k in range(b):
                u, v = x[i] - x[j], x[k] - x[j]
                nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                if nu > 0 and nv > 0:
                    out[j, i, k] = u @ v / (nu * nv)
    return out


def _np_pearson_mean(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Pearson correlation of matching rows (eps 1e-8 on the norm product)."""
    vals = []
    for u, v in zip(a, b, strict=True):
        u, v = u - u.mean(), v - v.mean()
        vals.append((u * v).sum() / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-8))
    return float(np.mean(vals))


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_sp(s: np.ndarray, t: np.ndarray) -> float:
    def norm_gram(x):
        g = x @ x.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    return float(((norm_gram(t) - norm_gram(s)) ** 2).sum() / len(s) ** 2)


def _np_pkt(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    def probs(x):
        u = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
        k = (u @ u.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = probs(s), probs(t)
    return float((pt * np.log((pt + eps) / (ps + eps))).mean())


def _np_cc(es: np.ndarray, et: np.ndarray) -> float:
    delta = np.abs(es - et)
    return float(np.mean([(delta[i] * delta[i + 1]).sum() for i in range(len(es) - 1)]))


def test_rkd_distance_matches_loops():
    s, t = _data()
    expected = _smooth_l1(_np_psi(s.numpy()), _np_psi(t.numpy()))
    assert rkd_distance_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_matches_loops():
    s, t = _data(b=6)
    expected = _smooth_l1(_np_cosines(s.numpy()), _np_cosines(t.numpy()))
    assert rkd_angle_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_duplicates_excluded_from_the_mean_distance():
    s, t = _data(b=5)
    s[3] = s[1]
    expected = _smooth_l1(_np_psi(s.numpy()), _np_psi(t.numpy()))
    assert rkd_distance_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    expected = _smooth_l1(_np_cosines(s.numpy()), _np_cosines(t.numpy()))
    assert rkd_angle_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_invariances():
    """§5.3: D is 0 under a positive scale, A under scale and translation."""
    s, _ = _data(b=8)
    assert rkd_distance_loss(3.0 * s, s).item() < 1e-6
    assert rkd_angle_loss(0.5 * s + torch.randn(1, s.shape[1], dtype=s.dtype), s).item() < 1e-6
    assert rkd_distance_loss(s + 1.0, s).item() < 1e-6


def test_dist_matches_numpy():
    s, t = _data(b=6, d=4)
    tau = 4.0
    ps, pt = _np_softmax(s.numpy() / tau), _np_softmax(t.numpy() / tau)
    inter = 1 - _np_pearson_mean(ps, pt)
    intra = 1 - _np_pearson_mean(ps.T, pt.T)
    expected = tau**2 * (inter + 2.0 * intra)
    assert dist_loss(s, t, tau, beta=1.0, gamma=2.0).item() == pytest.approx(expected, rel=1e-5)
    assert dist_loss(t, t).item() == pytest.approx(0.0, abs=1e-3)  # eps in the correlation: not exactly 0


def test_sp_pkt_cc_match_numpy():
    s, t = _data(b=6)
    assert sp_loss(s, t).item() == pytest.approx(_np_sp(s.numpy(), t.numpy()), rel=1e-5)
    assert pkt_loss(s, t).item() == pytest.approx(_np_pkt(s.numpy(), t.numpy()), rel=1e-4)
    assert cc_loss(s, t).item() == pytest.approx(_np_cc(s.numpy(), t.numpy()), rel=1e-5)
    assert sp_loss(t, t).item() < 1e-10 and abs(pkt_loss(t, t).item()) < 1e-6


def test_rkd_d_matches_pair_loops_and_ckd_at_d_equal_c():
    s, t = _data(b=6, d=5)
    pairs = [(0, 1), (2, 3), (4, 5)]
    expected = np.mean([((s[i] - s[j]) - (t[i] - t[j])).numpy() ** 2 for i, j in pairs])
    assert rkd_d_pair_loss(s.reshape(3, 2, 5), t.reshape(3, 2, 5)).item() == pytest.approx(expected, rel=1e-5)
    ordered = [(i, j) for i in range(6) for j in range(6) if i != j]
    expected = np.mean([((s[i] - s[j]) - (t[i] - t[j])).numpy() ** 2 for i, j in ordered])
    assert rkd_d_inbatch_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    # §5.4: with d = C the orthonormal projection is a rotation: CKD's teacher-difference MSE exactly
    p = orthonormal_projection(5, 5, torch.Generator().manual_seed(0)).double()
    rotated = rkd_d_pair_loss((s @ p.T).reshape(3, 2, 5), (t @ p.T).reshape(3, 2, 5))
    plain = np.mean([((s[i] - s[j]) - (t[i] - t[j])).numpy() ** 2 for i, j in pairs])
    assert rotated.item() == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("in_dim,out_dim", [(100, 10), (10, 10), (10, 100)])
def test_orthonormal_projection(in_dim, out_dim):
    p = orthonormal_projection(in_dim, out_dim, torch.Generator().manual_seed(1))
    assert p.shape == (out_dim, in_dim)
    small = p @ p.T if out_dim <= in_dim else p.T @ p
    assert torch.allclose(small, torch.eye(min(in_dim, out_dim)), atol=1e-5)


LOSSES = {
    "rkd_distance": rkd_distance_loss,
    "rkd_angle": rkd_angle_loss,
    "dist": dist_loss,
    "sp": sp_loss,
    "pkt": pkt_loss,
    "cc": cc_loss,
    "rkd_d_inbatch": rkd_d_inbatch_loss,
}


def _edge_batches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    s, t = _data(b=6, d=5)
    dup_s, dup_t = s.clone(), t.clone()
    dup_s[2], dup_t[4] = dup_s[0], dup_t[1]
    return {
        "identical_rows": (s[:1].repeat(6, 1), t[:1].repeat(6, 1)),
        "two_duplicates": (dup_s, dup_t),
        "zero_vectors": (torch.zeros(4, 5, dtype=s.dtype), torch.zeros(4, 5, dtype=s.dtype)),
        "batch_of_two": (s[:2], t[:2]),
        "batch_of_one": (s[:1], t[:1]),
        # a batch of one class: the teacher puts every row on the same class (constant columns)
        "one_class": (s, torch.zeros_like(t).index_fill_(1, torch.tensor([2]), 5.0)),
    }


@pytest.mark.parametrize("case", list(_edge_batches()))
@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_loss_and_gradient_on_edge_cases(name, case):
    s, t = _edge_batches()[case]
    s = s.clone().float().requires_grad_()
    loss = LOSSES[name](s, t.float())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def _rotate_into(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    p = orthonormal_projection(num_classes, x.shape[1], torch.Generator().manual_seed(7)).double()
    return x @ p


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "sp", "pkt", "rkd_d_100"])
def test_gradient_does_not_depend_on_class_count_at_fixed_geometry(name):
    """The same vectors rotated into C = 10 or 100 dims get the same per-sample gradient norm."""

    def rkd_d_100(s, t):
        p = orthonormal_projection(s.shape[1], 100, torch.Generator().manual_seed(3)).to(s.dtype)
        return rkd_d_inbatch_loss(s @ p.T, t @ p.T)

    fn = rkd_d_100 if name == "rkd_d_100" else LOSSES[name]
    s, t = _data(b=16, d=6)
    norms = []
    for num_classes in (10, 100):
        x = _rotate_into(s, num_classes).requires_grad_()
        fn(x, _rotate_into(t, num_classes)).backward()
        norms.append(x.grad.norm(dim=1))
    assert torch.allclose(norms[0], norms[1], rtol=1e-4, atol=1e-12)


def test_class_chunk_sampler_takes_at_most_m_per_class():
    labels = torch.arange(300) % 20
    sampler = ClassChunkSampler(labels, 64, 5, torch.Generator().manual_seed(0))
    for _ in range(20):
        batch = sampler.next_batch()
        assert batch.numel() == 64 and batch.unique().numel() == 64
        counts = torch.bincount(labels[batch], minlength=20)
        assert counts.max() <= 5 and (counts > 0).sum() == 13  # 12 full classes and 4 of a 13th
    few = ClassChunkSampler(torch.arange(40) % 4, 64, 5, torch.Generator().manual_seed(0))
    assert few.next_batch().numel() == 20  # fewer classes than batch / m: a short batch, as the reference


def test_class_chunk_sampler_small_classes_and_state_round_trip():
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 2, 2, 2, 3])
    gen = torch.Generator().manual_seed(3)
    sampler = ClassChunkSampler(labels, 8, 5, gen)
    before = torch.get_rng_state()
    first = [sampler.next_batch() for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), before)  # draws only from its own generator
    for batch in first:  # classes of 2, 1, 6 and 1 samples: at most 2, 1, 5 and 1 of each, 8 in all
        assert batch.numel() == 8 and batch.unique().numel() == 8
        assert (torch.bincount(labels[batch], minlength=4) <= torch.tensor([2, 1, 5, 1])).all()
    saved_state, saved_gen = sampler.state_dict(), gen.get_state()
    expected = [sampler.next_batch() for _ in range(5)]
    gen2 = torch.Generator().manual_seed(99)
    resumed = ClassChunkSampler(labels, 8, 5, gen2)
    resumed.load_state_dict(saved_state)
    gen2.set_state(saved_gen)
    assert all(
        torch.equal(a, b) for a, b in zip(expected, [resumed.next_batch() for _ in range(5)], strict=True)
    )


@pytest.mark.parametrize(
    "name,options",
    [
        ("rkd", {"mode": "diagonal"}),
        ("rkd", {"sampler": "npairs"}),
        ("rkd", {"on": ""}),
        ("rkd-d", {"pairs": "triplets"}),
        ("rkd-d", {"projection": "trained"}),
        ("rkd-d", {"d": 0}),
        ("dist", {"tau": 0}),
        ("cc", {"embed_dim": 0}),
        ("sp", {"w_ce": -1}),
    ],
)
def test_bad_options_are_user_errors(name, options):
    with pytest.raises(FtikdError):
        build_method(name, **options)


def test_on_feature_requests_that_teacher_feature():
    for name in ("rkd", "rkd-d", "dist", "sp", "pkt", "cc"):
        assert build_method(name, on="logits").teacher_features == ()
        assert build_method(name, on="embedding").teacher_features == ("embedding",)
    # PKT's weight belongs to the embedding (M14), so it is the one relational method read there by default
    defaults = {
        name: build_method(name).teacher_features for name in ("rkd", "rkd-d", "dist", "sp", "pkt", "cc")
    }
    assert defaults == {"rkd": (), "rkd-d": (), "dist": (), "sp": (), "pkt": ("embedding",), "cc": ()}
    assert (
        build_method("rkd-d").config.w_kd == 0.0 and build_method("rkd-d", pairs="inbatch").config.w_kd == 1.0
    )


def test_rkd_d_projection_is_a_fixed_buffer_or_a_learned_head():
    student = build_model("resnet8", in_channels=1, num_classes=10)
    ctx = MethodContext(
        num_train=50, num_classes=10, batch_size=8, student=student, device=torch.device("cpu")
    )
    fixed = build_method("rkd-d", d=4)
    fixed.setup(ctx)
    assert list(fixed.modules().parameters()) == [] and fixed.extra["theta"].matrix.shape == (4, 10)
    learned = build_method("rkd-d", d=4, projection="learned")
    learned.setup(ctx)
    assert torch.allclose(learned.extra["head"].linear.weight, learned.extra["theta"].matrix)
    assert sum(p.numel() for p in learned.modules().parameters()) == 4 * 10 + 4


def _distill(tmp_path, teacher, method, *options, flags=()):
    opts = [arg for opt in options for arg in ("--opt", opt)]
    out = tmp_path / "runs"
    code = main(
        ["distill", "--dataset", "digits", "--teacher", str(teacher), "--method", method, *opts, *flags]
        + ["--calls", "80", "--max-epochs", "1", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    (record_path,) = out.glob("*.json")
    return json.loads(record_path.read_text())


@pytest.mark.parametrize(
    "method,options,terms",
    [
        ("rkd", (), {"ce", "kd", "rkd_distance", "rkd_angle"}),
        ("rkd", ("mode=angle", "sampler=shuffled"), {"ce", "kd", "rkd_angle"}),
        ("rkd-d", (), {"ce", "rkd_d"}),
        ("rkd-d", ("pairs=inbatch", "projection=learned", "d=50"), {"ce", "kd", "rkd_d"}),
        ("dist", (), {"ce", "kd", "dist"}),
        ("sp", (), {"ce", "sp"}),
        ("pkt", (), {"ce", "pkt"}),
        ("cc", (), {"ce", "kd", "cc"}),
    ],
)
def test_one_epoch_on_digits_through_the_cli(tmp_path, digits_teacher, method, options, terms):
    record = _distill(tmp_path, digits_teacher, method, *options)
    (epoch,) = record["history"]
    assert terms <= set(epoch) and all(math.isfinite(epoch[name]) for name in terms)
    assert record["teacher_calls"]["outputs_used"] == 80


@pytest.mark.parametrize("method", ["rkd", "sp", "cc", "rkd-d"])
def test_on_embedding_reads_the_cached_teacher_feature(tmp_path, digits_teacher, method):
    extra = ("projection=learned",) if method == "rkd-d" else ()
    record = _distill(tmp_path, digits_teacher, method, "on=embedding", *extra)
    assert record["method"]["on"] == "embedding"
    assert math.isfinite(record["history"][0]["ce"])


def test_rkd_trains_on_class_sampler_batches(tmp_path, digits_teacher, monkeypatch):
    sizes = []
    original = ClassChunkSampler.next_batch

    def spy(self):
        batch = original(self)
        sizes.append(batch.numel())
        return batch

    monkeypatch.setattr(ClassChunkSampler, "next_batch", spy)
    _distill(tmp_path, digits_teacher, "rkd", flags=("--batch-size", "16"))
    assert len(sizes) == 5 and set(sizes) == {16}  # ceil(80 / 16) steps of 16 rows, <= 5 per class


def test_rkd_without_train_labels_says_what_to_do():
    with pytest.raises(FtikdError, match="sampler=shuffled"):
        build_method("rkd").sampler(10, 4, torch.Generator())


def test_bf16_autocast_run(tmp_path, digits_teacher):
    record = _distill(tmp_path, digits_teacher, "rkd", "sampler=shuffled", flags=("--precision", "bf16"))
    assert all(math.isfinite(record["history"][0][name]) for name in ("rkd_distance", "rkd_angle"))
