"""Relational methods as a whole: each default method's terms equal CE, KD and its weighted relation
recomputed here in numpy (METHODS.md M3-M5, M13-M15, A14), on a linear student, so that a default
weight not multiplied in, a term on the wrong side, or a projection applied to one side only fails.
"""

import numpy as np
import pytest
import torch
from test_mixing import Recorder, np_log_softmax, np_softmax
from test_relational import _np_cc, _np_cosines, _np_pearson_mean, _np_pkt, _np_psi, _np_sp, _smooth_l1

from ftikd.methods import Batch, MethodContext, build_method

B, C, D = 8, 5, 16  # rows, classes, input pixels (1 x 4 x 4)


def np_ce(logits, labels):
    return float(-np_log_softmax(logits)[np.arange(len(labels)), labels].mean())


def np_kd(logits, teacher, t=4.0):
    p_t = np_softmax(teacher, t)
    return float(t**2 * (p_t * (np.log(p_t) - np_log_softmax(logits, t))).sum(-1).mean())


def np_dist(s, t, tau=4.0):
    ps, pt = np_softmax(s, tau), np_softmax(t, tau)
    return tau**2 * ((1 - _np_pearson_mean(ps, pt)) + (1 - _np_pearson_mean(ps.T, pt.T)))


def np_linear(x, head):
    return x @ head.linear.weight.detach().double().numpy().T + head.linear.bias.detach().double().numpy()


def run(name, leading=(B,), **options):
    """The method's terms on one batch, the student's logits it saw, the batch, and the method."""
    torch.manual_seed(0)
    method = build_method(name, **options)
    student = Recorder(D, C)
    method.setup(MethodContext(40, C, B, student, torch.device("cpu"), {"embedding": (D,)}, (1, 4, 4)))
    images = torch.randn(*leading, 1, 4, 4)
    labels = torch.randint(C, leading)
    teacher = torch.randn(*leading, C) * 3
    batch = Batch(torch.arange(images[..., 0, 0, 0].numel()).reshape(leading), images, labels, C, teacher)
    terms = {k: v.item() for k, v in method.loss(student, batch).items()}
    seen = torch.cat([x.flatten(1) for x in student.seen])
    logits = student.fc(seen).detach().double().numpy()
    return terms, logits, batch, method


@pytest.mark.parametrize("name", ["rkd", "dist", "sp", "pkt-logits", "cc"])
def test_default_terms_are_ce_kd_and_the_weighted_relation(name):
    options = {"on": "logits"} if name == "pkt-logits" else {}
    terms, s, batch, method = run(name.split("-")[0], **options)
    t, y = batch.teacher_logits.double().numpy(), batch.labels.numpy()
    expected = {"ce": np_ce(s, y)}
    if name == "rkd":  # A14: CE 1 + KD 1 + (25 * distance + 50 * angle)
        expected["kd"] = np_kd(s, t)
        expected["rkd_distance"] = 25 * _smooth_l1(_np_psi(s), _np_psi(t))
        expected["rkd_angle"] = 50 * _smooth_l1(_np_cosines(s), _np_cosines(t))
    elif name == "dist":  # CE 1 + KD 1 + 2 * DIST(tau = 4, beta = gamma = 1)
        expected["kd"] = np_kd(s, t)
        expected["dist"] = 2 * np_dist(s, t)
    elif name == "sp":  # CE 1 + 3000 * SP
        expected["sp"] = 3000 * _np_sp(s, t)
    elif name == "pkt-logits":  # CE 1 + 30000 * PKT
        expected["pkt"] = 30000 * _np_pkt(s, t)
    else:  # CE 1 + KD 1 + 0.02 * CC of each side through its own head
        expected["kd"] = np_kd(s, t)
        e_s, e_t = np_linear(s, method.extra["embed_s"]), np_linear(t, method.extra["embed_t"])
        expected["cc"] = 0.02 * _np_cc(e_s, e_t)
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def test_rkd_d_projects_both_sides_and_averages_ce_over_pair_members():
    terms, s, batch, method = run("rkd-d", leading=(B, 2), d=3)
    theta = method.extra["theta"].matrix.double().numpy()
    np.testing.assert_allclose(theta @ theta.T, np.eye(3), atol=1e-6)
    s = s.reshape(2, B, C).transpose(1, 0, 2)  # one forward per half: rows [first members, second]
    t, y = batch.teacher_logits.double().numpy(), batch.labels.numpy()
    ds, dt = (s[:, 0] - s[:, 1]) @ theta.T, (t[:, 0] - t[:, 1]) @ theta.T
    assert set(terms) == {"ce", "rkd_d"}
    assert terms["rkd_d"] == pytest.approx(float(((ds - dt) ** 2).mean()), rel=1e-4)
    assert terms["ce"] == pytest.approx(np_ce(s.reshape(-1, C), y.reshape(-1)), rel=1e-4)


@pytest.mark.parametrize("d,reduction", [(100, "ref"), (C, "mean")])
def test_rkd_d_on_pairs_is_ckds_teacher_term_beside_ce(d, reduction):
    """RKD_d on CKD's pairs is CKD's teacher-difference term with CE in place of the label term.

    An isometric theta keeps each difference's length, so the MSE over d dims is |dz|^2 / d: at
    d = 100 CKD's default (sum over classes / 100), at d = C the authors' class mean. The results
    table's reading of RKD_d against CKD (docs/results/cpu-fashion-baselines) rests on this.
    """
    _, _, batch, method = run("rkd-d", leading=(B, 2), d=d)
    student = Recorder(D, C)  # one student for both methods, so only the losses differ
    rkd_d = {k: v.item() for k, v in method.loss(student, batch).items()}
    ckd = {k: v.item() for k, v in build_method("ckd", reduction=reduction).loss(student, batch).items()}
    assert set(rkd_d) == {"ce", "rkd_d"} and set(ckd) == {"ckd_label", "ckd_teacher"}
    assert rkd_d["rkd_d"] == pytest.approx(ckd["ckd_teacher"], rel=1e-5)
