"""Memory bank (FIFO of M per class) and the prototype losses of METHODS.md section 2."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from featurelt.losses import LossContext
from featurelt.losses.prototype import MemoryBank, ProtoLoss, imbalance_weights


def test_memory_bank_is_fifo_of_size_m() -> None:
    m = 4
    items = torch.arange(m + 3, dtype=torch.float32)[:, None].repeat(1, 2)  # item i = [i, i]
    one_by_one = MemoryBank(num_classes=2, dim=2, size=m)
    for i in range(m + 3):
        one_by_one.update(items[i: i + 1], torch.tensor([1]))
    at_once = MemoryBank(num_classes=2, dim=2, size=m)
    at_once.update(items, torch.ones(m + 3, dtype=torch.long))
    for bank in (one_by_one, at_once):
        assert_close(bank.items(1), items[3:])  # exactly the last M, oldest first
        assert bank.counts().tolist() == [0, m]
        assert bank.items(0).shape == (0, 2)
    # mixed classes in one batch keep the batch order within each class
    mixed = MemoryBank(num_classes=3, dim=1, size=2)
    mixed.update(torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]]), torch.tensor([0, 2, 0, 0, 2]))
    assert mixed.items(0).flatten().tolist() == [3.0, 4.0]
    assert mixed.items(2).flatten().tolist() == [2.0, 5.0]


def test_prototypes_and_stds_match_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(num_classes=3, dim=5, size=6)
    z, y = torch.randn(20, 5, generator=g), torch.randint(0, 2, (20,), generator=g)
    bank.update(z, y)
    for c in range(2):
        last = z[y == c][-6:].numpy()
        assert_close(bank.prototypes()[c].numpy(), last.mean(0), rtol=1e-5, atol=1e-6)
        assert_close(bank.stds()[c].numpy(), last.std(0), rtol=1e-5, atol=1e-6)  # population std
    assert (bank.prototypes()[2] == 0).all()


def test_imbalance_weights() -> None:
    assert_close(imbalance_weights(torch.tensor([100.0, 10.0, 1.0])), torch.tensor([0.01, 0.1, 1.0]))


def filled_loss(**opts) -> ProtoLoss:
    """w = (0.01, 0.1, 1). Bank: class 0 {[0,0], [2,0]} -> c=[1,0], sigma=[1,0]; class 1 empty;
    class 2 {[1,1], [3,3]} -> c=[2,2], sigma=[1,1]."""
    loss = ProtoLoss(LossContext(torch.tensor([100.0, 10.0, 1.0])), dim=2, M=2, **opts)
    loss.bank.update(torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [3.0, 3.0]]), torch.tensor([0, 0, 2, 2]))
    return loss


Z = torch.tensor([[1.0, 2.0], [0.0, 0.0], [2.0, 4.0]])
Y = torch.tensor([0, 1, 2])


def test_proto_terms_hand_computed() -> None:
    loss = filled_loss(beta=1.0, seed=3)
    sign = torch.randint(0, 2, (3, 1), generator=torch.Generator().manual_seed(3)) * 2 - 1
    # tail-std: sample 2 (w = 1 > 0.5) against c + s*sigma = [3,3] (d = 1 + 1) or [1,1] (d = 1 + 9)
    d_std = 2.0 if int(sign[2]) == 1 else 10.0
    parts = loss.components(Z, Y)
    assert parts["head"].item() == pytest.approx((1 - 0.01) * 4 / 3)  # sample 0: ||[1,2]-[1,0]||^2 = 4; class 1 empty
    assert parts["tail-std"].item() == pytest.approx(d_std / 3)
    assert parts["tail-dist"].item() == pytest.approx(-math.log(4 + 1e-6) / 3)  # ||[2,4]-[2,2]||^2 = 4
    total = filled_loss(beta=1e-3, seed=3)(Z, Y)
    assert total.item() == pytest.approx(1e-3 * ((0.99 * 4 + d_std - math.log(4 + 1e-6)) / 3), rel=1e-5)


def test_both_signs_occur_and_generator_is_seeded() -> None:
    loss = filled_loss(beta=1.0, seed=0, terms=("tail-std",))
    seen = {round(loss.components(Z, Y)["tail-std"].item() * 3, 4) for _ in range(40)}
    assert seen == {2.0, 10.0}
    a = [filled_loss(seed=5).components(Z, Y)["tail-std"].item() for _ in range(2)]
    assert a[0] == a[1]


def test_bank_read_before_update_and_empty_classes_contribute_nothing() -> None:
    loss = ProtoLoss(LossContext(torch.tensor([100.0, 10.0, 1.0])), M=3)  # dim from the first batch
    assert loss(Z, Y).item() == 0.0  # all banks empty before this batch
    assert loss.bank.counts().tolist() == [1, 1, 1]
    assert loss(Z, Y).item() == pytest.approx(-1e-4 * math.log(1e-6) / 3)  # d = 0 everywhere: only the eps guard
    off = filled_loss(beta=1.0, terms=("head",))
    parts = off.components(Z, Y)
    assert parts["tail-std"].item() == 0.0 and parts["tail-dist"].item() == 0.0
    with pytest.raises(ValueError, match="unknown prototype term"):
        ProtoLoss(LossContext(torch.tensor([1.0, 2.0])), terms=("tail",))


def test_thresholds_select_classes() -> None:
    loss = filled_loss(beta=1.0, tau_head=0.005, tau_tail_dist=1.5)  # nobody below 0.005, nobody above 1.5
    parts = loss.components(Z, Y)
    assert parts["head"].item() == 0.0 and parts["tail-dist"].item() == 0.0 and parts["tail-std"].item() > 0


def test_gradient_flows_to_features() -> None:
    loss = filled_loss(beta=1.0)
    z = Z.clone().requires_grad_(True)
    loss(z, Y).backward()
    assert torch.isfinite(z.grad).all() and z.grad[0].abs().sum() > 0 and z.grad[1].abs().sum() == 0
