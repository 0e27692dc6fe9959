"""Memory bank and prototype losses against hand computation (METHODS.md section 2)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from featurelt.losses import LossContext
from featurelt.losses.prototype import MemoryBank, ProtoLoss, imbalance_weights


def test_memory_bank_is_fifo_of_size_m() -> None:
    bank = MemoryBank(num_classes=2, dim=1, size=4)
    for v in range(7):  # M + 3 pushes into class 1
        bank.update(torch.tensor([[float(v)]]), torch.tensor([1]))
    assert bank.items(1).flatten().tolist() == [3.0, 4.0, 5.0, 6.0]
    assert bank.counts().tolist() == [0, 4]
    assert bank.prototypes()[1].item() == pytest.approx(4.5)
    assert bank.stds()[1].item() == pytest.approx(math.sqrt(1.25))
    assert bank.prototypes()[0].item() == 0.0


def test_imbalance_weights() -> None:
    assert_close(imbalance_weights(torch.tensor([100.0, 10.0, 1.0])), torch.tensor([0.01, 0.1, 1.0]))


def test_proto_terms_hand_computed() -> None:
    ctx = LossContext(torch.tensor([100.0, 1.0]))  # w = [0.01, 1.0]: class 0 head, class 1 tail
    loss = ProtoLoss(ctx, dim=2, M=2, beta=1.0, tau_head=0.5, tau_tail_std=0.5, tau_tail_dist=0.5, seed=0)
    # bank before: class 0 holds (0,0) and (2,0) -> c0 = (1,0), sigma0 = (1,0); class 1 holds (0,1) -> c1 = (0,1), sigma1 = 0
    loss.bank.update(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 1]))
    z = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1])
    parts = loss.components(z, y)
    # head: only sample 0 (w=0.01 < 0.5): (1 - 0.01) * ||(1,1) - (1,0)||^2 = 0.99, / B=2
    assert parts["head"].item() == pytest.approx(0.99 / 2)
    # tail-std: only sample 1 (w=1 > 0.5): sigma1 = 0 so the sign does not matter: 1 * ||(0,3)-(0,1)||^2 = 4
    assert parts["tail-std"].item() == pytest.approx(4 / 2)
    # tail-dist: -1 * log 4 / 2
    assert parts["tail-dist"].item() == pytest.approx(-math.log(4 + 1e-6) / 2, rel=1e-6)
    total = loss(z, y)
    assert total.item() == pytest.approx(0.99 / 2 + 2 - math.log(4 + 1e-6) / 2, rel=1e-6)
    assert loss.bank.counts().tolist() == [2, 2]  # updated after computing


def test_empty_bank_contributes_nothing_and_terms_switch_off() -> None:
    ctx = LossContext(torch.tensor([100.0, 1.0]))
    loss = ProtoLoss(ctx, dim=2, M=4, terms=("head",), beta=1.0)
    z = torch.randn(3, 2, requires_grad=True)
    out = loss(z, torch.tensor([0, 1, 1]))
    assert out.item() == 0.0
    with pytest.raises(ValueError, match="unknown prototype term"):
        ProtoLoss(ctx, dim=2, terms=("tail",))


def test_tail_std_sign_uses_sigma() -> None:
    ctx = LossContext(torch.tensor([1.0]))
    loss = ProtoLoss(ctx, dim=1, M=2, terms=("tail-std",), beta=1.0, seed=3)
    loss.bank.update(torch.tensor([[0.0], [2.0]]), torch.tensor([0, 0]))  # c = 1, sigma = 1
    z = torch.tensor([[1.0]])
    vals = {round(loss.components(z, torch.tensor([0]))["tail-std"].item(), 6) for _ in range(20)}
    assert vals == {1.0}  # ||1 - (1 +- 1)||^2 = 1 either way
    z = torch.tensor([[3.0]])
    vals = {round(loss.components(z, torch.tensor([0]))["tail-std"].item(), 6) for _ in range(40)}
    assert vals == {1.0, 9.0}  # (3-2)^2 or (3-0)^2: both signs are drawn
