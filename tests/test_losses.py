"""Losses against hand-computed values and an independent numpy re-implementation (METHODS.md 1, 3, 5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from featurelt.losses import LOSSES, LossContext, build_loss, post_hoc_logit_adjust

# the 2 x 3 example used by the hand-computed values
Z = torch.tensor([[2.0, 1.0, 0.0], [0.5, -1.0, 1.5]], dtype=torch.float64)
Y = torch.tensor([0, 2])
COUNTS = torch.tensor([100.0, 10.0, 1.0])


def ctx3() -> LossContext:
    return LossContext(COUNTS, neighbor_of=torch.tensor([-1, -1, -1]), num_target=3)


def ctx_aux() -> LossContext:
    """Classes 0, 1 target; class 2 auxiliary, queried from class 0."""
    return LossContext(torch.tensor([100.0, 10.0, 5.0]), neighbor_of=torch.tensor([-1, -1, 0]), num_target=2)


# (name, options, context, expected mean loss on Z, Y). Every number was computed by hand from the formula:
HAND = [
    # ce: row0 log(1 + e^-1 + e^-2) = 0.4076060, row1 log(1 + e^-1 + e^-2.5) = 0.3715390
    ("ce", {}, ctx3, (0.4076059644443806 + 0.3715390318526828) / 2),
    # balanced softmax: -log(n_y e^{z_y} / sum_j n_j e^{z_j}), n = (100, 10, 1)
    ("balanced-softmax", {}, ctx3, 1.8454559883716177),
    # logit adjustment with tau = 0.5: -log softmax(z + 0.5 log(n / 111))_y
    ("logit-adjust", {"tau": 0.5}, ctx3, 0.8595677171471431),
    # focal gamma 2: -(1 - p_y)^2 log p_y
    ("focal", {}, ctx3, 0.04072913810898556),
    # class-balanced beta 0.9: w = (0.1/(1-0.9^n)) normalised to sum 3 = (0.23933, 0.36744, 2.39323); w_y * ce
    ("class-balanced", {"beta": 0.9}, ctx3, (0.2393292360088335 * 0.4076059644443806
                                             + 2.3932287908953045 * 0.3715390318526828) / 2),
    # ldam s = 2, max_m 0.5: margins n^-1/4 scaled = (0.158114, 0.281171, 0.5); CE on 2 (z - m_y e_y)
    ("ldam", {"s": 2.0, "drw_epoch": -1}, ctx3, 0.2589220776039314),
    # ns-ce, n = (100, 10, 5), lambda_02 = lambda_20 = 0.1: rows 0.0367799 and 0.6418165
    ("ns-ce", {"lambda_s": 0.1}, ctx_aux, (0.0367798718505057 + 0.6418164536774301) / 2),
    # contrastive-vl with l2v_weight 1: ce + mean over classes {0, 2} of -log softmax over images of column k
    ("contrastive-vl", {"l2v_weight": 1.0}, ctx3, 0.3895724981485317 + 0.20141327798275244),
]


def test_hand_table_covers_every_registered_loss() -> None:
    assert sorted({name for name, *_ in HAND}) == LOSSES.names()


@pytest.mark.parametrize("name,opts,make_ctx,expected", HAND, ids=[h[0] for h in HAND])
def test_hand_computed(name, opts, make_ctx, expected) -> None:
    loss = LOSSES.get(name)(make_ctx(), **opts)
    assert loss(Z, Y).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- independent numpy re-implementation

def np_lse(a: np.ndarray) -> np.ndarray:
    m = a.max(1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(1, keepdims=True)))[:, 0]


def np_loss(name: str, z: np.ndarray, y: np.ndarray, n: np.ndarray, nb: np.ndarray, epoch: int) -> float:
    rows = np.arange(len(y))
    logp = z - np_lse(z)[:, None]
    if name == "ce":
        return float(-logp[rows, y].mean())
    if name == "balanced-softmax":
        u = z + np.log(n)
        return float((np_lse(u) - u[rows, y]).mean())
    if name == "logit-adjust":  # tau = 0.7
        u = z + 0.7 * np.log(n / n.sum())
        return float((np_lse(u) - u[rows, y]).mean())
    if name == "focal":
        p = np.exp(logp[rows, y])
        return float((-(1 - p) ** 2 * np.log(p)).mean())
    if name == "class-balanced":
        w = (1 - 0.9999) / (1 - 0.9999 ** n)
        w = w / w.sum() * len(n)
        return float((-w[y] * logp[rows, y]).mean())
    if name == "ldam":  # defaults: max_m 0.5, s 30, DRW from epoch 160 with beta 0.9999
        m = n ** -0.25
        m = m / m.max() * 0.5
        a = 30.0 * z.copy()
        a[rows, y] -= 30.0 * m[y]
        per = np_lse(a) - a[rows, y]
        if epoch >= 160:  # PyTorch's weighted mean, as F.cross_entropy(weight=w) in the LDAM-DRW code
            w = (1 - 0.9999) / (1 - 0.9999 ** n)
            w = (w / w.sum() * len(n))[y]
            return float((w * per).sum() / w.sum())
        return float(per.mean())
    if name == "ns-ce":  # lambda_s 0.1, explicit double loop over the formula
        out = []
        for b in range(len(y)):
            i = y[b]
            s = 0.0
            for j in range(len(n)):
                if j == i:
                    continue
                pair = (nb[j] == i) or (nb[i] == j)
                lam = 0.1 if pair else 1.0
                s += lam * math.exp(math.log(n[j]) - math.log(n[i]) + z[b, j] - z[b, i])
            out.append(math.log1p(s))
        return float(np.mean(out))
    if name == "contrastive-vl":  # l2v_weight 0 by default
        return float(-logp[rows, y].mean())
    raise AssertionError(f"no numpy reference for loss {name!r}: add one")


@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("epoch", [0, 200])
def test_matches_numpy_reference(name: str, epoch: int) -> None:
    g = np.random.default_rng(1)
    n = np.array([500.0, 120.0, 40.0, 7.0, 3.0, 30.0, 12.0])
    nb = np.array([-1, -1, -1, -1, -1, 3, 0])  # 5 target classes, aux 5 -> 3, aux 6 -> 0
    z = g.normal(0, 2, (16, 7))
    y = g.integers(0, 7, 16)
    y[:4] = [3, 5, 0, 6]  # make sure the silenced pairs occur
    opts = {"logit-adjust": {"tau": 0.7}}.get(name, {})
    loss = LOSSES.get(name)(LossContext(torch.tensor(n), torch.tensor(nb), 5), **opts)
    got = loss(torch.tensor(z), torch.tensor(y), epoch=epoch).item()
    assert got == pytest.approx(np_loss(name, z, y, n, nb, epoch), rel=1e-5)


# ---------------------------------------------------------------- properties shared by every loss

@pytest.mark.parametrize("name", LOSSES.names())
def test_soft_targets_and_per_sample(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    ctx = LossContext(torch.tensor([50.0, 20.0, 5.0, 2.0, 8.0]), torch.tensor([-1, -1, -1, -1, 2]), 4)
    loss = LOSSES.get(name)(ctx)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    onehot = torch.nn.functional.one_hot(y, 5).double()
    assert_close(loss(z, onehot), loss(z, y))
    assert_close(loss.per_sample(z, onehot), loss.per_sample(z, y))
    assert loss.per_sample(z, y).shape == (6,)
    assert_close(loss.reduce(loss.per_sample(z, y), y), loss(z, y))
    if name != "ldam":
        assert_close(loss.per_sample(z, y).mean(), loss(z, y))
    assert_close(loss(z, onehot, epoch=500), loss(z, y, epoch=500))  # after ldam's DRW start too
    # a soft target is sum_k y_k * (loss with label k), for every loss except the batch-coupled l2v term
    lam = torch.rand(6, generator=g, dtype=torch.float64)
    y2 = torch.tensor([1, 0, 4, 2, 3, 0])
    soft = lam[:, None] * onehot + (1 - lam[:, None]) * torch.nn.functional.one_hot(y2, 5).double()
    mixed = lam * loss.per_sample(z, y) + (1 - lam) * loss.per_sample(z, y2)
    assert_close(loss.per_sample(z, soft), mixed)
    loss(z, soft).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert "class_counts" in dict(loss.named_buffers())  # moves with .to(device)
    assert loss.to(torch.float64).class_counts.dtype == torch.float64


def test_ns_ce_with_unit_lambda_is_balanced_softmax() -> None:
    g = torch.Generator().manual_seed(3)
    ctx = LossContext(torch.tensor([90.0, 30.0, 4.0, 6.0, 9.0]), torch.tensor([-1, -1, -1, 2, 0]), 3)
    z, y = torch.randn(32, 5, generator=g), torch.randint(0, 5, (32,), generator=g)
    ns = LOSSES.get("ns-ce")(ctx, lambda_s=1.0)
    bs = LOSSES.get("balanced-softmax")(ctx)
    assert_close(ns.per_sample(z, y), bs.per_sample(z, y))
    assert_close(ns(z, y), bs(z, y))


def test_ns_ce_silencing_differs_exactly_by_formula() -> None:
    # loss_ns - loss_bs = log(sum_j lam_ij n_j e^{z_j}) - log(sum_j n_j e^{z_j}) (lam_ii = 1)
    g = torch.Generator().manual_seed(4)
    n = torch.tensor([90.0, 30.0, 4.0, 6.0, 9.0], dtype=torch.float64)
    nb = torch.tensor([-1, -1, -1, 2, 0])
    ctx = LossContext(n, nb, 3)
    z, y = torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (32,), generator=g)
    lam = torch.ones(5, 5, dtype=torch.float64)
    lam[3, 2] = lam[2, 3] = lam[4, 0] = lam[0, 4] = 0.25
    e = n * torch.exp(z)
    expected = torch.log((lam[y] * e).sum(1)) - torch.log(e.sum(1))
    diff = LOSSES.get("ns-ce")(ctx, lambda_s=0.25).per_sample(z, y) - LOSSES.get("balanced-softmax")(ctx).per_sample(z, y)
    assert_close(diff, expected)
    assert (diff[(y == 0) | (y >= 2)] < 0).all()  # only pairs with a silenced partner change
    assert_close(diff[y == 1], torch.zeros_like(diff[y == 1]))


def test_logit_adjust_tau_one_is_balanced_softmax() -> None:
    assert_close(LOSSES.get("logit-adjust")(ctx3())(Z, Y), LOSSES.get("balanced-softmax")(ctx3())(Z, Y))


def test_ldam_deferred_reweighting_switches_at_drw_epoch() -> None:
    loss = LOSSES.get("ldam")(ctx3(), drw_epoch=5, drw_beta=0.9)
    before, after = loss.per_sample(Z, Y, epoch=4), loss.per_sample(Z, Y, epoch=5)
    w = torch.tensor([0.2393292360088335, 0.3674419730958617, 2.3932287908953045], dtype=torch.float64)
    assert_close(after, before * w[Y])
    assert loss.margins.max().item() == pytest.approx(0.5)


def ldam_reference(z: torch.Tensor, y: torch.Tensor, ctx: LossContext, s: float, w: torch.Tensor | None = None):
    """The LDAM-DRW code's form: ``F.cross_entropy(s * (z - m * onehot_y), y, weight=w)``."""
    m = ctx.class_counts.double() ** -0.25
    m = (m / m.max() * 0.5).to(z)
    out = s * (z - m * torch.nn.functional.one_hot(y, ctx.num_classes).to(z))
    return torch.nn.functional.cross_entropy(out, y, weight=None if w is None else w.to(z))


def test_ldam_float32_confident_logit_matches_float64_reference() -> None:
    # softmax(30 z)_y is within 1e-8 of 1 in every row (and within ~1e-7 after the margin): the loss must
    # stay > 0 with a non-zero gradient in float32 and equal the float64 reference form
    ctx = LossContext(torch.tensor([100.0, 10.0, 1.0]))
    loss = LOSSES.get("ldam")(ctx, drw_epoch=-1)
    z64 = torch.tensor([[1.0, 0.3, 0.2], [0.0, 0.9, 0.0], [0.1, 0.0, 1.2]]).double()  # float32 values exactly
    y = torch.tensor([0, 1, 2])
    assert (1 - torch.softmax(30 * z64, 1)[torch.arange(3), y] < 1e-8).all()
    ref = torch.stack([ldam_reference(z64[i:i + 1], y[i:i + 1], ctx, 30.0) for i in range(3)])
    z = z64.float().requires_grad_(True)
    per = loss.per_sample(z, y)
    assert (per > 0).all()
    assert_close(per.double(), ref, rtol=1e-4, atol=0)
    soft = loss.per_sample(z, torch.nn.functional.one_hot(y, 3).float())  # the per-class path
    assert_close(soft.double(), ref, rtol=1e-4, atol=0)
    loss(z, y).backward()
    z64r = z64.clone().requires_grad_(True)
    ldam_reference(z64r, y, ctx, 30.0).backward()
    assert z.grad.abs().sum() > 0
    assert_close(z.grad.double(), z64r.grad, rtol=1e-4, atol=1e-12)


def test_ldam_matches_reference_form_and_drw_weighted_mean() -> None:
    ctx = LossContext(torch.tensor([100.0, 10.0, 1.0]), epochs=30)
    loss = LOSSES.get("ldam")(ctx, drw_beta=0.9)
    assert loss.drw_epoch == 24  # ceil(0.8 * 30): the LDAM-DRW code's 160 of 200
    assert LOSSES.get("ldam")(LossContext(torch.tensor([5.0, 1.0]))).drw_epoch == 160  # run length unknown
    assert LOSSES.get("ldam")(ctx, drw_epoch=3).drw_epoch == 3
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(64, 3, generator=g), torch.randint(0, 3, (64,), generator=g)
    assert_close(loss(z, y, epoch=23), ldam_reference(z, y, ctx, 30.0))
    w = torch.tensor([0.2393292360088335, 0.3674419730958617, 2.3932287908953045])
    assert_close(loss(z, y, epoch=24), ldam_reference(z, y, ctx, 30.0, w))
    # sum_i w_yi l_i / sum_i w_yi, not the plain mean of w_yi l_i
    per = loss.per_sample(z, y, epoch=0)
    assert loss(z, y, epoch=24).item() == pytest.approx(float((w[y] * per).sum() / w[y].sum()), rel=1e-5)
    assert loss(z, y, epoch=24).item() != pytest.approx(float((w[y] * per).mean()), rel=1e-2)


def test_focal_alpha_class_balanced_and_list_by_hand() -> None:
    # per-sample focal (gamma 2) on Z, Y: row 0 p_0 = 0.6652410, -(1 - p)^2 log p = 0.0456778;
    # row 1 p_2 = 0.6896721 -> 0.0357805. Class-balanced alpha (beta 0.9, n = 100, 10, 1) normalised to
    # sum 3: (0.2393292, 0.3674420, 2.3932288); batch loss = plain mean (Cui et al.'s focal: sum / B)
    f0, f2 = 0.04567779896788494, 0.03578047725008614
    cb = LOSSES.get("focal")(ctx3(), alpha="class-balanced", beta=0.9)
    assert cb(Z, Y).item() == pytest.approx((0.23932923600883355 * f0 + 2.3932287908953045 * f2) / 2, rel=1e-6)
    assert_close(cb.per_sample(Z, Y), torch.tensor([0.23932923600883355 * f0, 2.3932287908953045 * f2],
                                                   dtype=torch.float64), rtol=1e-6, atol=0)
    listed = LOSSES.get("focal")(ctx3(), alpha=[0.5, 1.0, 2.0])
    assert listed(Z, Y).item() == pytest.approx((0.5 * f0 + 2.0 * f2) / 2, rel=1e-6)
    assert LOSSES.get("focal")(ctx3(), alpha="0.5,1,2")(Z, Y).item() == pytest.approx(listed(Z, Y).item())
    assert LOSSES.get("focal")(ctx3(), alpha="none")(Z, Y).item() == pytest.approx((f0 + f2) / 2, rel=1e-6)
    for bad in ("0.5,1", "x", [1.0, -1.0, 1.0], "balanced"):
        with pytest.raises(ValueError, match="focal alpha must be"):
            LOSSES.get("focal")(ctx3(), alpha=bad)


def test_contrastive_l2v_uses_batch_images() -> None:
    loss = LOSSES.get("contrastive-vl")(ctx3(), l2v_weight=2.0)
    y = torch.tensor([0, 0])  # both images of class 0: -mean_i log softmax_images(z[:, 0])_i
    l2v = -torch.log_softmax(Z[:, 0], 0).mean()
    assert_close(loss(Z, y), LOSSES.get("ce")(ctx3())(Z, y) + 2.0 * l2v)


def test_post_hoc_logit_adjust_hand_value() -> None:
    out = post_hoc_logit_adjust(Z[:1], COUNTS, tau=1.0)  # z_j - log(n_j / 111)
    assert_close(out, torch.tensor([[2.1043600153242425, 3.4069451083182885, 4.709530201312334]], dtype=torch.float64))
    assert post_hoc_logit_adjust(Z[:, :2], COUNTS).shape == (2, 2)  # masked auxiliary columns


def test_bad_names_options_and_inputs_are_reported() -> None:
    with pytest.raises(KeyError, match="available: balanced-softmax"):
        LOSSES.get("nope")
    with pytest.raises(TypeError, match="bar, foo"):
        LOSSES.get("ce")(ctx3(), foo=1, bar=2)
    with pytest.raises(TypeError, match="loss 'focal'.*gama"):
        build_loss("focal", ctx3(), gama=2)
    with pytest.raises(ValueError, match="classes \\[1\\]"):
        LossContext(torch.tensor([3.0, 0.0]))
    with pytest.raises(ValueError, match="expected logits"):
        LOSSES.get("ce")(ctx3())(torch.zeros(2, 4), Y)
