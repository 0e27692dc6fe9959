"""Losses against hand-computed values and independent numpy re-implementations (METHODS.md 1, 3, 5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from featurelt.losses import LOSSES, LossContext, build_loss, post_hoc_logit_adjust, silencing_matrix

Z = torch.tensor([[2.0, 1.0, 0.0], [0.5, -1.0, 1.5]])
Y = torch.tensor([0, 2])
COUNTS = torch.tensor([100.0, 10.0, 1.0])


def ctx(neighbor_of=None) -> LossContext:
    return LossContext(COUNTS, neighbor_of=neighbor_of, num_target=3)


def np_logsoftmax(z: np.ndarray) -> np.ndarray:
    m = z.max(1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))


def test_ce_hand_computed() -> None:
    # row 0: -log(e^2 / (e^2 + e^1 + e^0)); row 1: -log(e^1.5 / (e^.5 + e^-1 + e^1.5))
    r0 = -(2 - math.log(math.e**2 + math.e + 1))
    r1 = -(1.5 - math.log(math.e**0.5 + math.e**-1 + math.e**1.5))
    assert LOSSES.get("ce")(ctx())(Z, Y).item() == pytest.approx((r0 + r1) / 2, rel=1e-6)


def test_balanced_softmax_hand_computed() -> None:
    n = [100, 10, 1]
    z = Z.numpy()
    r0 = -math.log(n[0] * math.exp(z[0, 0]) / sum(n[j] * math.exp(z[0, j]) for j in range(3)))
    r1 = -math.log(n[2] * math.exp(z[1, 2]) / sum(n[j] * math.exp(z[1, j]) for j in range(3)))
    assert LOSSES.get("balanced-softmax")(ctx())(Z, Y).item() == pytest.approx((r0 + r1) / 2, rel=1e-6)
    # logit-adjust with tau = 1 is the same loss
    assert_close(LOSSES.get("logit-adjust")(ctx(), tau=1.0)(Z, Y), LOSSES.get("balanced-softmax")(ctx())(Z, Y))


def test_logit_adjust_tau_numpy() -> None:
    tau = 0.5
    prior = COUNTS.numpy() / COUNTS.numpy().sum()
    ref = -np_logsoftmax(Z.numpy() + tau * np.log(prior))[[0, 1], [0, 2]].mean()
    assert LOSSES.get("logit-adjust")(ctx(), tau=tau)(Z, Y).item() == pytest.approx(ref, rel=1e-6)


def test_focal_numpy() -> None:
    logp = np_logsoftmax(Z.numpy())[[0, 1], [0, 2]]
    ref = (-(1 - np.exp(logp)) ** 2 * logp).mean()
    assert LOSSES.get("focal")(ctx())(Z, Y).item() == pytest.approx(ref, rel=1e-6)


def test_class_balanced_numpy() -> None:
    beta = 0.9
    w = (1 - beta) / (1 - beta ** COUNTS.numpy())
    w = w / w.sum() * 3
    ref = (w[[0, 2]] * -np_logsoftmax(Z.numpy())[[0, 1], [0, 2]]).mean()
    assert LOSSES.get("class-balanced")(ctx(), beta=beta)(Z, Y).item() == pytest.approx(ref, rel=1e-6)


def test_ldam_numpy_and_drw() -> None:
    m = 1 / COUNTS.numpy() ** 0.25
    m = m * 0.5 / m.max()
    s = 30.0
    z = Z.numpy().copy()
    for b, y in enumerate([0, 2]):
        z[b, y] -= m[y]
    ref = -np_logsoftmax(s * z)[[0, 1], [0, 2]]
    loss = LOSSES.get("ldam")(ctx(), drw_epoch=2, drw_beta=0.9)
    assert loss(Z, Y, epoch=0).item() == pytest.approx(ref.mean(), rel=1e-5)
    w = (1 - 0.9) / (1 - 0.9 ** COUNTS.numpy())
    w = w / w.sum() * 3
    assert loss(Z, Y, epoch=2).item() == pytest.approx((w[[0, 2]] * ref).mean(), rel=1e-5)


def ns_ce_numpy(z: np.ndarray, y: np.ndarray, n: np.ndarray, lam: np.ndarray) -> float:
    out = []
    for b in range(len(y)):
        i = y[b]
        s = sum(lam[i, j] * math.exp(math.log(n[j]) - math.log(n[i]) + z[b, j] - z[b, i]) for j in range(len(n)) if j != i)
        out.append(math.log(1 + s))
    return float(np.mean(out))


def test_ns_ce_equals_balanced_softmax_with_unit_lambda() -> None:
    nb = torch.tensor([-1, -1, 0])  # class 2 is an auxiliary neighbor of class 0
    assert_close(LOSSES.get("ns-ce")(ctx(nb), lambda_s=1.0)(Z, Y), LOSSES.get("balanced-softmax")(ctx())(Z, Y))


def test_ns_ce_silences_neighbors_by_formula() -> None:
    nb = torch.tensor([-1, -1, 0])
    lam = silencing_matrix(nb, 0.1).numpy()
    assert lam[0, 2] == lam[2, 0] == pytest.approx(0.1) and lam[0, 1] == 1 and lam[1, 2] == 1
    ref = ns_ce_numpy(Z.numpy(), Y.numpy(), COUNTS.numpy(), lam)
    got = LOSSES.get("ns-ce")(ctx(nb), lambda_s=0.1)(Z, Y).item()
    assert got == pytest.approx(ref, rel=1e-6)
    assert got < LOSSES.get("balanced-softmax")(ctx())(Z, Y).item()  # silencing lowers the neighbor's push


def test_contrastive_vl_text_to_image_term() -> None:
    y = torch.tensor([0, 2])
    loss = LOSSES.get("contrastive-vl")(ctx(), l2v_weight=1.0)
    v2l = -np_logsoftmax(Z.numpy())[[0, 1], [0, 2]].mean()
    # l2v: column softmax over the 2 images; class 0 -> image 0, class 2 -> image 1
    col = np_logsoftmax(Z.numpy().T)  # [K, B]
    l2v = -(col[0, 0] + col[2, 1]) / 2
    assert loss(Z, y).item() == pytest.approx(v2l + l2v, rel=1e-6)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_soft_onehot_equals_hard_and_backprops(name: str) -> None:
    loss = build_loss(name, ctx(torch.tensor([-1, -1, 0])))
    z = Z.clone().requires_grad_(True)
    hard = loss(z, Y)
    soft = loss(z, torch.nn.functional.one_hot(Y, 3).float())
    assert_close(hard, soft)
    hard.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert loss.per_sample(Z, Y).shape == (2,)
    # mixup target: the loss is linear in the soft label
    mix = torch.tensor([[0.3, 0.0, 0.7], [0.0, 1.0, 0.0]])
    per = loss.per_class(Z)
    w = loss.class_weights()
    expected = (mix * per * (w if w is not None else 1)).sum(1)
    assert_close(loss.per_sample(Z, mix), expected)


def test_unknown_loss_and_option_are_named() -> None:
    with pytest.raises(KeyError, match="unknown loss 'nope'; available: balanced-softmax"):
        LOSSES.get("nope")
    with pytest.raises(TypeError, match="loss 'focal'.*gama"):
        build_loss("focal", ctx(), gama=2)


def test_post_hoc_logit_adjust() -> None:
    out = post_hoc_logit_adjust(Z, COUNTS, tau=1.0)
    prior = COUNTS / COUNTS.sum()
    assert_close(out, Z - torch.log(prior))


def test_zero_count_class_is_refused() -> None:
    with pytest.raises(ValueError, match=r"classes \[1\] have 0 train rows"):
        LossContext(torch.tensor([3.0, 0.0]))
