"""CRD: the contrast sampler, the NCE loss against reference loops, the memory bank, smoke runs."""

import numpy as np
import pytest
import torch
from test_mixing import (
    DEVICE,
    Recorder,
    assert_float32_under_bf16,
    cli_one_pseudo_epoch,
    resume_matches_uninterrupted,
    t64,
)

from ftikd.engine.trainer import load_trainable_state, trainable_state
from ftikd.errors import FtikdError
from ftikd.losses.contrastive import contrast_scores, crd_nce_loss, nce_log_normalizer
from ftikd.methods import Batch, MethodContext, build_method
from ftikd.methods.crd import draw_contrast

rng = np.random.default_rng(1)


def test_contrast_sets_respect_classes_and_replacement_rules():
    table = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    index = torch.tensor([0, 4, 7, 8])
    labels = table[index]
    other_class = table[None, :] != labels[:, None]
    g = torch.Generator().manual_seed(0)
    for k in (4, 50):  # 4 fits every pool (>= 7 rows, distinct draws); 50 does not (with replacement)
        pos, counts = draw_contrast(index, labels, table, 3, k, "index", g)
        assert torch.equal(pos, index) and counts.shape == (4, 12) and counts.dtype == torch.float32
        assert torch.equal(counts.sum(dim=1), torch.full((4,), float(k)))
        assert (counts[~other_class] == 0).all() and (counts == counts.round()).all()
        if k == 4:
            assert set(counts.unique().tolist()) <= {0.0, 1.0}
    pos, _ = draw_contrast(index, labels, table, 3, 6, "label", g)
    assert torch.equal(table[pos], labels)
    # draws with replacement are uniform over the pool, whichever class block the anchor's is:
    # first (rows 4..11), middle (rows 0..3 and 7..11) or last (rows 0..6)
    for anchor, pool in [(0, range(4, 12)), (4, [*range(4), *range(7, 12)]), (7, range(7))]:
        k = 1000 * len(pool)
        _, counts = draw_contrast(index[:1] * 0 + anchor, table[anchor : anchor + 1], table, 3, k, "index", g)
        expected = torch.zeros(12)
        expected[list(pool)] = 1000
        assert (counts[0] - expected).abs().max() < 150, counts
    # rows whose label is not known yet are never negatives; one known class falls back to all rows
    partial = torch.where(torch.arange(12) % 3 == 0, -1, table)
    _, counts = draw_contrast(index[:2], labels[:2], partial, 3, 100, "index", g)
    usable = (partial[None, :] >= 0) & (partial[None, :] != labels[:2, None])
    assert (counts[~usable] == 0).all() and torch.equal(counts.sum(dim=1), torch.full((2,), 100.0))
    _, lone = draw_contrast(index[:1], labels[:1], torch.zeros(12, dtype=torch.long), 3, 1200, "index", g)
    assert lone.sum() == 1200 and (lone > 0).all()  # every row, itself included


def np_crd_side(anchors, memory, idx, tau, z=None):
    """The reference NCE of one side with explicit loops (METHODS.md M8), and its Z."""
    b, k1 = idx.shape
    n, k = memory.shape[0], k1 - 1
    o = np.array([[np.exp(memory[idx[i, j]] @ anchors[i] / tau) for j in range(k1)] for i in range(b)])
    z = o.mean() * n if z is None else z
    o = o / z
    pn, eps = 1.0 / n, 1e-7
    total = 0.0
    for i in range(b):
        total += np.log(o[i, 0] / (o[i, 0] + k * pn + eps))
        total += sum(np.log(k * pn / (o[i, j] + k * pn + eps)) for j in range(1, k1))
    return -total / b, z


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def contrast_of(idx, n):
    """The (positive, counts) contrast set of explicit (B, K + 1) indices, by plain counting."""
    counts = np.zeros((idx.shape[0], n))
    for i, row in enumerate(idx):
        for j in row[1:]:
            counts[i, j] += 1
    return torch.tensor(idx[:, 0]), torch.tensor(counts, dtype=torch.float32)


def test_crd_nce_matches_reference_loops():
    n, d, b, k, tau = 9, 6, 4, 12, 0.07
    memory, anchors = unit(rng.normal(size=(n, d))), unit(rng.normal(size=(b, d)))
    idx = rng.integers(0, n, size=(b, k + 1))
    idx[0, 3] = idx[0, 0]  # the positive drawn among the negatives too: it counts in both roles
    expected, z = np_crd_side(anchors, memory, idx, tau)
    scores = contrast_scores(t64(anchors), t64(memory), tau)
    np.testing.assert_allclose(scores.numpy(), anchors @ memory.T / tau, rtol=1e-5)
    positive, counts = contrast_of(idx, n)
    log_z = nce_log_normalizer(scores, positive, counts)
    assert log_z.item() == pytest.approx(np.log(z), rel=1e-5)
    assert crd_nce_loss(scores, positive, counts, log_z).item() == pytest.approx(expected, rel=1e-5)
    # a later batch is scored with the first batch's Z
    idx2 = rng.integers(0, n, size=(b, k + 1))
    later, _ = np_crd_side(anchors, memory, idx2, tau, z)
    assert crd_nce_loss(scores, *contrast_of(idx2, n), log_z).item() == pytest.approx(later, rel=1e-5)


def crd_setup(n=20, c=4, b=4, pass_labels=True, **options):
    method = build_method("crd", **options)
    student = Recorder(16, c).to(DEVICE)
    labels = (torch.arange(n) % c).to(DEVICE)
    ctx = MethodContext(n, c, b, student, DEVICE, {"embedding": (16,)}, (1, 4, 4))
    if pass_labels:
        ctx.train_labels = labels  # what the engine is asked to pass; absent, the table is learnt
    method.setup(ctx)
    method.modules().to(DEVICE)
    feats = torch.randn(n, 16, device=DEVICE)
    logits = torch.randn(n, c, device=DEVICE) * 2

    def batch(index, same=False):
        index = torch.as_tensor(index, device=DEVICE)
        images = torch.randn(len(index), 1, 4, 4, device=DEVICE)
        t_logits, t_feats = logits[index], feats[index]
        if same:
            images, t_logits, t_feats = (v[:1].expand_as(v).clone() for v in (images, t_logits, t_feats))
        return Batch(index, images, labels[index], c, t_logits, {"embedding": t_feats})

    return method, student, batch


def test_crd_memory_has_n_rows_on_device_and_updates_only_the_batch_rows():
    method, student, batch = crd_setup(num_negatives=30)
    memory = method.extra["memory"]
    assert memory.student.shape == (20, 128) and memory.teacher.shape == (20, 128)
    assert memory.student.device.type == DEVICE.type and memory.labels.device.type == DEVICE.type
    assert {"memory.student", "memory.teacher", "memory.log_z"} <= set(method.modules().state_dict())
    before_s, before_t = memory.student.clone(), memory.teacher.clone()
    first = torch.tensor([3, 7, 11, 12])
    first_batch = batch(first)
    method.loss(student, first_batch)
    # each bank's new rows, computed here: its own side's logits through its own head, L2-normalised
    s_logits = student.fc(student.seen[0].flatten(1)).detach().double().cpu().numpy()
    t_logits = first_batch.teacher_logits.double().cpu().numpy()
    v_s, v_t = (
        unit(
            x @ head.linear.weight.detach().double().cpu().numpy().T
            + head.linear.bias.detach().double().cpu().numpy()
        )
        for x, head in ((s_logits, method.extra["embed_s"]), (t_logits, method.extra["embed_t"]))
    )
    log_z = memory.log_z.clone()
    assert torch.isfinite(log_z).all()
    method.loss(student, batch([0, 5, 9]))  # applies the first step's update, defers its own
    for bank, before, v in ((memory.student, before_s, v_s), (memory.teacher, before_t, v_t)):
        changed = (bank != before).any(dim=1).nonzero().flatten().cpu()
        assert torch.equal(changed, first)
        old = before[first].double().cpu().numpy()
        np.testing.assert_allclose(
            bank[first].double().cpu().numpy(), unit(0.5 * old + 0.5 * v), rtol=1e-5, atol=1e-6
        )
        assert torch.allclose(bank[first].norm(dim=1), torch.ones(4, device=DEVICE), atol=1e-5)
    assert torch.equal(memory.log_z, log_z)  # Z is fixed by the first batch
    # a phase end (A11) restores the heads from the best snapshot but keeps the bank as it is now
    snapshot = trainable_state(student, method.modules())
    method.loss(student, batch([1, 2]))
    method.loss(student, batch([4, 6]))
    with torch.no_grad():
        method.extra["embed_s"].linear.weight.add_(1.0)  # as if an optimizer step had moved the head
    bank_now = memory.student.clone()
    assert not torch.equal(bank_now, snapshot["extra"]["memory.student"].to(DEVICE))
    load_trainable_state(student, method.modules(), snapshot, keep=method.phase_end_keeps)
    assert torch.equal(memory.student, bank_now)
    head = snapshot["extra"]["embed_s.linear.weight"].to(DEVICE)
    assert torch.equal(method.extra["embed_s"].linear.weight, head)


def test_crd_learns_labels_from_batches_when_the_context_has_none():
    method, student, batch = crd_setup(pass_labels=False, num_negatives=40)
    table = method.extra["memory"].labels
    assert (table == -1).all()
    method.loss(student, batch([0, 5, 10, 15]))
    expected = torch.full((20,), -1, device=DEVICE)
    expected[[0, 5, 10, 15]] = torch.tensor([0, 1, 2, 3], device=DEVICE)
    assert torch.equal(table, expected)


@pytest.mark.parametrize("on,positive", [("logits", "index"), ("embedding", "label")])
@pytest.mark.parametrize("case", ["identical", "two", "one-class", "one-class-subset"])
def test_crd_gradients_finite_on_edge_cases(on, positive, case):
    method, student, batch = crd_setup(c=1 if case == "one-class-subset" else 4, on=on, positive=positive)
    rows = {"two": [2, 9], "one-class": [0, 4, 8, 12]}.get(case, [1, 4, 6, 13])
    for _ in range(2):  # the second step reads the updated memory and the frozen Z
        student.zero_grad()
        method.modules().zero_grad()
        terms = method.loss(student, batch(rows, same=case == "identical"))
        sum(terms.values()).backward()
    assert set(terms) == {"ce", "kd", "crd"} and all(torch.isfinite(v) for v in terms.values())
    params = list(student.parameters()) + list(method.modules().parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_terms_stay_float32_under_bf16_autocast():
    def first_step(autocast):
        torch.manual_seed(7)  # the same fresh method, student and batch each time (Z unset)
        method, student, make = crd_setup(n=20, c=4, b=4, num_negatives=30)
        batch = make([1, 4, 6, 13])
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=autocast):
            return method.loss(student, batch)

    assert_float32_under_bf16(first_step)


def test_bad_options_are_user_errors():
    for opts in [{"positive": "class"}, {"momentum": 1.0}, {"on": ""}]:
        with pytest.raises(FtikdError):
            build_method("crd", **opts)
    assert build_method("crd", on="embedding").teacher_features == ("embedding",)


def test_resumed_training_matches_uninterrupted(tmp_path, digits):
    """CRD's memory, Z and pending update all come back from the checkpoint."""
    resume_matches_uninterrupted(tmp_path, digits, "crd", {"num_negatives": 500})


@pytest.mark.parametrize("opts", [[], ["on=embedding"]])
def test_cli_one_pseudo_epoch(tmp_path, digits_teacher, capsys, opts):
    cli_one_pseudo_epoch(tmp_path, digits_teacher, capsys, "crd", opts)
