"""Each loss against an independent numpy computation on small tensors (METHODS.md §5)."""

import itertools

import numpy as np
import pytest
import torch

from ftikd.losses import ckd_group_loss, ckd_inbatch_loss, compare_groups, kd_loss, logit_offset_loss

rng = np.random.default_rng(0)


def np_softmax(x, t=1.0):
    e = np.exp((x - x.max(-1, keepdims=True)) / t)
    return e / e.sum(-1, keepdims=True)


def np_kd(student, teacher, t):
    p, q = np_softmax(teacher, t), np_softmax(student, t)
    return float((p * (np.log(p) - np.log(q))).sum(-1).mean() * t * t)


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def test_kd_matches_numpy_and_is_batchmean_times_t2():
    s, t = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    assert kd_loss(t64(s), t64(t), 4.0).item() == pytest.approx(np_kd(s, t, 4.0), rel=1e-5)
    # duplicating the batch must not change a batchmean loss
    assert kd_loss(t64(np.tile(s, (3, 1))), t64(np.tile(t, (3, 1))), 4.0).item() == pytest.approx(
        np_kd(s, t, 4.0), rel=1e-5
    )
    assert kd_loss(t64(s), t64(s), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_hand_value():
    # two classes, T=1: teacher p=(0.5,0.5), student logits (log 3, 0) -> q=(0.75,0.25)
    s = torch.tensor([[np.log(3.0), 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    expected = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-5)


def np_group_deltas(x, k, l1, l2):
    a = k - k // 2
    return l1 * x[:, :a].mean(1) + l2 * x[:, a:].mean(1)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("form", ["mse", "kl"])
@pytest.mark.parametrize("reduction", ["mean", "ref"])
def test_ckd_group_loss_matches_numpy(k, form, reduction):
    g, c = 6, 5
    s, t = rng.normal(size=(g, k, c)), rng.normal(size=(g, k, c))
    labels = rng.integers(0, c, size=(g, k))
    y = np.eye(c)[labels]
    ds, dt, dy = (np_group_deltas(v, k, 1.0, -1.0) for v in (s, t, y))
    if form == "mse" and reduction == "mean":  # the authors' nn.MSELoss: mean over groups and classes
        exp_label, exp_teacher = ((ds - dy) ** 2).mean(), ((ds - dt) ** 2).mean()
    elif form == "mse":  # sum over classes / 100, mean over groups
        exp_label, exp_teacher = ((ds - dy) ** 2).sum(1).mean() / 100, ((ds - dt) ** 2).sum(1).mean() / 100
    else:  # the KL form is the authors' batchmean class sum under either reduction
        exp_label, exp_teacher = np_kd(ds, dy, 4.0), np_kd(ds, dt, 4.0)
    got = ckd_group_loss(t64(s), t64(t), t64(y), "difference", form, 4.0, reduction=reduction)
    assert got["ckd_label"].item() == pytest.approx(exp_label, rel=1e-5)
    assert got["ckd_teacher"].item() == pytest.approx(exp_teacher, rel=1e-5)


def test_ckd_comparisons_and_label_delta_values():
    y = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2]]), 4).double()
    dy = compare_groups(y, "difference")
    assert torch.allclose(dy, torch.tensor([[0.5, 0.5, -1.0, 0.0]], dtype=torch.float64))
    assert dy.sum().item() == pytest.approx(0.0)
    assert torch.allclose(
        compare_groups(y, "addition"), torch.tensor([[0.25, 0.25, 0.5, 0.0]], dtype=torch.float64)
    )
    interp = compare_groups(y, "interpolation", lam=0.3)
    assert torch.allclose(interp, torch.tensor([[0.15, 0.15, 0.7, 0.0]], dtype=torch.float64))


def test_ckd_invariant_to_shared_offset_and_swap_for_mse():
    s, t = torch.randn(8, 2, 10, dtype=torch.float64), torch.randn(8, 2, 10, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (8, 2)), 10).double()
    base = ckd_group_loss(s, t, y)
    shifted = ckd_group_loss(s + torch.randn(10, dtype=torch.float64), t, y)
    swapped = ckd_group_loss(s.flip(1), t.flip(1), y.flip(1))
    for key in base:
        assert shifted[key].item() == pytest.approx(base[key].item(), rel=1e-9)
        assert swapped[key].item() == pytest.approx(base[key].item(), rel=1e-9)


@pytest.mark.parametrize("form", ["mse", "kl"])
def test_inbatch_equals_mean_over_explicit_pairs(form):
    b, c = 7, 4
    s, t = rng.normal(size=(b, c)), rng.normal(size=(b, c))
    y = np.eye(c)[rng.integers(0, c, size=b)]
    pairs = (
        list(itertools.permutations(range(b), 2))
        if form == "kl"
        else list(itertools.combinations(range(b), 2))
    )
    label_vals, teacher_vals = [], []
    for i, j in pairs:
        ds, dt, dy = s[i] - s[j], t[i] - t[j], y[i] - y[j]
        if form == "mse":
            label_vals.append(((ds - dy) ** 2).mean())
            teacher_vals.append(((ds - dt) ** 2).mean())
        else:
            label_vals.append(np_kd(ds[None], dy[None], 4.0))
            teacher_vals.append(np_kd(ds[None], dt[None], 4.0))
    got = ckd_inbatch_loss(t64(s), t64(t), t64(y), form, 4.0, reduction="mean")
    assert got["ckd_label"].item() == pytest.approx(np.mean(label_vals), rel=1e-6)
    assert got["ckd_teacher"].item() == pytest.approx(np.mean(teacher_vals), rel=1e-6)


def test_inbatch_mse_gradient_matches_explicit_pairs():
    s = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 3, dtype=torch.float64)
    y = torch.zeros(5, 3, dtype=torch.float64)
    ckd_inbatch_loss(s, t, y, reduction="mean")["ckd_teacher"].backward()
    fast = s.grad.clone()
    s.grad = None
    i, j = torch.triu_indices(5, 5, 1)
    (((s[i] - s[j]) - (t[i] - t[j])) ** 2).mean().backward()
    assert torch.allclose(fast, s.grad)


def test_offset_term_is_the_missing_direction_of_inbatch_ckd():
    # sum_i |e_i|^2 = sum_i |e_i - e_bar|^2 + B |e_bar|^2: per-sample logit MSE = centred part + offset
    b, c = 9, 6
    s, t = torch.randn(b, c, dtype=torch.float64), torch.randn(b, c, dtype=torch.float64)
    zeros = torch.zeros(b, c, dtype=torch.float64)
    pair = ckd_inbatch_loss(s, t, zeros, reduction="mean")["ckd_teacher"].item()
    offset = logit_offset_loss(s, t, reduction="mean").item()
    per_sample = ((s - t) ** 2).mean().item()
    centred = ((s - t) - (s - t).mean(0)).pow(2).mean().item()
    assert centred == pytest.approx(pair * (b - 1) / (2 * b), rel=1e-6)
    assert per_sample == pytest.approx(centred + offset, rel=1e-6)
    # the offset term sees a shared shift that CKD cannot
    shift = torch.randn(c, dtype=torch.float64)
    assert ckd_inbatch_loss(s + shift, t, zeros, reduction="mean")["ckd_teacher"].item() == pytest.approx(
        pair
    )
    assert logit_offset_loss(s + shift, t, reduction="mean").item() != pytest.approx(offset)


# ---------------------------------------------------------------- class-count scaling (issue 9)


def embed_classes(x: torch.Tensor, c: int) -> torch.Tensor:
    """Pad the class dim of ``x`` with zeros up to ``c`` classes (dead classes: zero residual)."""
    return torch.nn.functional.pad(x, (0, c - x.shape[-1]))


def group_logit_grad(s10, t10, y10, c, form, reduction, scale=1.0):
    """Gradient of the summed CKD terms on the first 10 logits, with the heads widened to ``c``."""
    s = embed_classes(s10 * scale, c).requires_grad_(True)
    terms = ckd_group_loss(
        s, embed_classes(t10 * scale, c), embed_classes(y10, c), form=form, reduction=reduction
    )
    sum(terms.values()).backward()
    return s.grad[..., :10]


def small_group_batch(g=8):
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(g, 2, 10, generator=gen, dtype=torch.float64)
    t = torch.randn(g, 2, 10, generator=gen, dtype=torch.float64)
    s, t = (
        s - s.mean(-1, keepdim=True),
        t - t.mean(-1, keepdim=True),
    )  # zero class mean: dead classes stay neutral
    y = torch.zeros(g, 2, 10, dtype=torch.float64)  # label term off, so centring is exact for KL too
    return s, t, y


def test_default_mse_gradient_per_logit_independent_of_class_count():
    s, t, _ = small_group_batch()
    y = torch.nn.functional.one_hot(
        torch.randint(0, 10, (8, 2), generator=torch.Generator().manual_seed(2)), 10
    )
    y = y.double()
    g10, g100, g1000 = (group_logit_grad(s, t, y, c, "mse", "ref") for c in (10, 100, 1000))
    assert torch.allclose(g10, g100, rtol=1e-5, atol=1e-9) and torch.allclose(
        g10, g1000, rtol=1e-5, atol=1e-9
    )
    # independent check of the per-logit gradient: d/ds of sum_c (ds - dt)^2 / (G * 100), A minus B
    ds, dt, dy = s[:, 0] - s[:, 1], t[:, 0] - t[:, 1], y[:, 0] - y[:, 1]
    expected_a = 2 * ((ds - dt) + (ds - dy)) / (8 * 100)
    assert torch.allclose(g10[:, 0], expected_a, rtol=1e-5, atol=1e-9)
    # the authors' class mean steps 10x further per logit on a 10-class head than on a 100-class one
    m10, m100 = (group_logit_grad(s, t, y, c, "mse", "mean") for c in (10, 100))
    assert torch.allclose(m10, 10 * m100, rtol=1e-5, atol=1e-9)


def test_kl_form_keeps_the_authors_class_sum_and_its_teacher_term_is_nearly_class_free():
    # T^2 batchmean KL is a sum over classes: its default is the authors' at any C. On near-uniform
    # softmaxes (small differences, like the label term) it still steps ~C_ref/C further at C = 10;
    # on teacher-sized differences (std ~4 per logit, measured) far less than the MSE's 10x
    s, t, y = small_group_batch()
    for c in (10, 100):
        padded = [embed_classes(v, c) for v in (s, t, y)]
        ref, mean = ckd_group_loss(*padded, form="kl"), ckd_group_loss(*padded, form="kl", reduction="mean")
        assert all(ref[k].item() == pytest.approx(mean[k].item(), rel=1e-6) for k in ref)
    small = [group_logit_grad(s, t, y, c, "kl", "ref", scale=0.05).norm() for c in (10, 100)]
    assert 9.0 < (small[0] / small[1]).item() < 11.0
    large = [group_logit_grad(s, t, y, c, "kl", "ref", scale=4.0).norm() for c in (10, 100)]
    assert 1.0 < (large[0] / large[1]).item() < 6.0


@pytest.mark.parametrize("form", ["mse", "kl"])
def test_ref_reduction_equals_authors_mean_at_100_classes(form):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(16, 3, 100, generator=g) * 3, torch.randn(16, 3, 100, generator=g) * 3
    y = torch.nn.functional.one_hot(torch.randint(0, 100, (16, 3), generator=g), 100).float()
    ref, mean = ckd_group_loss(s, t, y, form=form), ckd_group_loss(s, t, y, form=form, reduction="mean")
    flat = (s[:, 0], t[:, 0], y[:, 0])
    ref_in, mean_in = ckd_inbatch_loss(*flat, form=form), ckd_inbatch_loss(*flat, form=form, reduction="mean")
    for key in ref:
        assert ref[key].item() == pytest.approx(mean[key].item(), rel=1e-6)
        assert ref_in[key].item() == pytest.approx(mean_in[key].item(), rel=1e-6)
    assert logit_offset_loss(s, t).item() == pytest.approx(logit_offset_loss(s, t, reduction="mean").item())


def test_inbatch_default_gradient_per_logit_independent_of_class_count():
    s, t, _ = small_group_batch()
    s, t = s[:, 0], t[:, 0]
    y = torch.nn.functional.one_hot(torch.arange(8) % 10, 10).double()
    grads = []
    for c in (10, 100):
        x = embed_classes(s, c).requires_grad_(True)
        sum(ckd_inbatch_loss(x, embed_classes(t, c), embed_classes(y, c)).values()).backward()
        grads.append(x.grad[:, :10])
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-9)


def test_unknown_reduction_is_refused():
    s = torch.randn(4, 2, 5)
    with pytest.raises(ValueError, match="reduction"):
        ckd_group_loss(s, s, s, reduction="sum")
