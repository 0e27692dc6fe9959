"""Heads (featurelt.heads): every registered head's shapes, and the formulas of METHODS.md sections 1, 2, 5, 6."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from featurelt.heads import HEADS, HeadContext

B, K = 7, 5
IN_DIMS = [6, 10]                 # two cached sources, D_total = 16
DT = 16                           # text width (= D_total, so every head's square case applies)
NEEDS_TEXT = {"adapter", "lfm-projection"}


def ctx(*, in_dims=IN_DIMS, text_dim: int | None = DT, k: int = K) -> HeadContext:
    g = torch.Generator().manual_seed(0)
    text = None if text_dim is None else F.normalize(torch.randn(k, text_dim, generator=g), dim=1)
    return HeadContext(in_dims=list(in_dims), num_classes=k, text_embeddings=text)


def feats(d: int = sum(IN_DIMS)) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(1))


def labels(n: int = B) -> torch.Tensor:
    return torch.arange(n) % K


@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_shapes_and_backward(name):
    torch.manual_seed(0)
    head = HEADS.get(name)(ctx())
    x = feats()
    if head.fitted:  # knn, ncm: made by fit(), no parameters, no gradient
        with pytest.raises(ValueError, match="not fitted"):
            head(x)
        head.fit([(x[:4], labels(4)), (x[4:], labels()[4:])])
        assert head(x).shape == (B, K) and not list(head.parameters())
        with pytest.raises(ValueError, match="expects features"):
            head.fit([(torch.randn(B, 3), labels())])
        return
    with pytest.raises(TypeError, match="not fitted"):
        head.fit([(x, labels())])
    logits = head(x)
    assert logits.shape == (B, K)
    z = head.features(x)
    assert z.ndim == 2 and z.shape[0] == B
    logits2, z2 = head.logits_and_features(x)
    head.eval()
    assert_close(head.logits_and_features(x)[0], head(x))
    logits.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    with pytest.raises(ValueError, match="expects features"):
        head(torch.randn(B, 3))


@pytest.mark.parametrize("name", sorted(NEEDS_TEXT))
def test_text_heads_fail_clearly_without_text(name):
    with pytest.raises(ValueError, match="--text-set"):
        HEADS.get(name)(ctx(text_dim=None))


def test_cosine_text_init_is_zero_shot_classifier():
    c = ctx()
    head = HEADS.get("cosine")(c, init="text", tau=0.1)
    x = feats()
    expected = F.normalize(x, dim=1) @ F.normalize(c.text_embeddings, dim=1).T / 0.1
    assert_close(head(x), expected)
    with pytest.raises(ValueError, match="--text-set"):
        HEADS.get("cosine")(ctx(text_dim=None), init="text")
    with pytest.raises(ValueError, match="as wide as the features"):
        HEADS.get("cosine")(ctx(text_dim=8), init="text")


def test_adapter_residual_formula():
    c = ctx()
    head = HEADS.get("adapter")(c, lam=0.3, tau=0.07)
    x = feats()
    f_star = 0.3 * torch.relu(x @ head.fc.weight.T + head.fc.bias) + 0.7 * x
    assert_close(head.features(x), f_star)
    expected = F.normalize(f_star, dim=1) @ F.normalize(c.text_embeddings, dim=1).T / 0.07
    assert_close(head(x), expected)
    # lam = 0: the adapter is the zero-shot classifier
    zs = HEADS.get("adapter")(c, lam=0.0, tau=0.07)
    assert_close(zs(x), F.normalize(x, dim=1) @ F.normalize(c.text_embeddings, dim=1).T / 0.07)


def test_lfm_projection_identity_init():
    c = ctx()
    head = HEADS.get("lfm-projection")(c, scale=20.0)
    x = feats()
    assert_close(head.projection()[0], torch.eye(DT))
    assert_close(head.features(x), x)
    assert_close(head(x), F.normalize(x, dim=1) @ F.normalize(c.text_embeddings, dim=1).T * 20.0)
    # default: the plain cosine similarity, as the authors' model feeds it to the loss
    assert_close(HEADS.get("lfm-projection")(c)(x), F.normalize(x, dim=1) @ F.normalize(c.text_embeddings, dim=1).T)
    with pytest.raises(ValueError, match="scale must be > 0"):
        HEADS.get("lfm-projection")(c, scale=0.0)


def test_text_heads_standardise_only_their_learned_part():
    c = ctx()
    x = feats()
    g = torch.Generator().manual_seed(5)
    mean, std = torch.randn(DT, generator=g), torch.rand(DT, generator=g) + 0.5
    lfm = HEADS.get("lfm-projection")(c)
    lfm.set_input_statistics(mean, std)
    assert_close(lfm.features(x), x)  # still the identity at the start: W_I = E, c = 0
    with torch.no_grad():
        lfm.proj.weight.copy_(torch.randn(DT, DT, generator=g))
        lfm.proj.bias.copy_(torch.randn(DT, generator=g))
    w_i, off = lfm.projection()  # f_I = x + W (x - mean) / std + b = W_I x + c
    assert_close(lfm.features(x), x @ w_i.T + off)
    assert_close(lfm.features(x), x + ((x - mean) / std) @ lfm.proj.weight.T + lfm.proj.bias)
    ad = HEADS.get("adapter")(c, lam=0.3)
    ad.set_input_statistics(mean, std)
    assert_close(ad.features(x), 0.3 * torch.relu(ad.fc((x - mean) / std)) + 0.7 * x)
    assert "in_mean" in ad.state_dict() and "in_std" in lfm.state_dict()  # saved with the checkpoint
    with pytest.raises(TypeError, match="does not take input statistics"):
        HEADS.get("linear")(c).set_input_statistics(mean, std)


def test_lfm_projection_rectangular_identity():
    wide = HEADS.get("lfm-projection")(ctx(text_dim=10))      # D=16 > Dt=10: first 10 coordinates
    x = feats()
    assert_close(wide.features(x), x[:, :10])
    narrow = HEADS.get("lfm-projection")(ctx(in_dims=[4], text_dim=DT))  # D=4 < Dt=16: zero padding
    x4 = feats(4)
    assert_close(narrow.features(x4), torch.cat([x4, torch.zeros(B, DT - 4)], dim=1))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_fusion_alpha_mix(alpha):
    torch.manual_seed(0)
    head = HEADS.get("fusion")(ctx(), alpha=alpha, width=8, num_heads=2).eval()
    x = feats()
    z_backbone = x[:, :6] @ head.fc_backbone.weight.T + head.fc_backbone.bias
    # fused path by hand: per-source projection -> tokens -> MHA + residual -> LayerNorm -> flatten -> FC
    tokens = torch.stack([head.proj[0](x[:, :6]), head.proj[1](x[:, 6:])], dim=1)
    attended, _ = head.attn(tokens, tokens, tokens)
    z = head.norm(tokens + attended).flatten(1)
    assert_close(head.features(x), z)
    z_fused = z @ head.fc_fused.weight.T + head.fc_fused.bias
    assert_close(head(x), (1 - alpha) * z_fused + alpha * z_backbone)


def test_fusion_any_number_of_sources_and_dropout():
    for dims in ([5], [3, 4, 5, 6]):
        head = HEADS.get("fusion")(ctx(in_dims=dims, text_dim=None), width=8, num_heads=2)
        assert head(feats(sum(dims))).shape == (B, K)
        assert head.features(feats(sum(dims))).shape == (B, 8 * len(dims))
    head = HEADS.get("fusion")(ctx(), width=8, num_heads=2, alpha=0.0)
    assert head.drop.p == 0.5
    x = feats()
    head.train()
    assert not torch.allclose(head(x), head(x))  # dropout active in training
    head.eval()
    assert_close(head(x), head(x))


def test_registry_errors():
    with pytest.raises(KeyError, match="unknown head 'nope'; available: adapter"):
        HEADS.get("nope")
    with pytest.raises(TypeError):
        HEADS.get("linear")(ctx(), tau=1.0)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        HEADS.get("fusion")(ctx(), width=10, num_heads=3)


def test_ncm_is_cosine_to_the_normalised_class_means():
    """METHODS.md section 1: mu_c = unit(sum of unit rows of class c), z_c = cos(f, mu_c) / tau."""
    x, y = feats(), torch.tensor([0, 0, 1, 1, 1, 3, 3])  # class 2 and 4: no rows
    head = HEADS.get("ncm")(ctx(), tau=0.5)
    head.fit([(x[:3], y[:3]), (x[3:], y[3:])])
    u = F.normalize(x, dim=1)
    for c in (0, 1, 3):
        mu = F.normalize(u[y == c].sum(0), dim=0)
        assert_close(head(x)[:, c], u @ mu / 0.5)
    assert torch.isneginf(head(x)[:, [2, 4]]).all()  # a class without train rows is never predicted
    assert head.counts.tolist() == [2, 3, 0, 2, 0]
    again = HEADS.get("ncm")(ctx(), tau=0.5)
    again.load_state_dict(head.state_dict())
    assert_close(again(x), head(x))


def test_knn_weighted_vote_by_hand():
    """Four 2-d train rows; the query's 3 nearest by cosine vote exp(cos / T) for their classes."""
    train_x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 2])
    head = HEADS.get("knn")(HeadContext(in_dims=[2], num_classes=4), k=3, temperature=0.5)
    head.fit([(train_x, train_y)])
    q = torch.tensor([[3.0, 1.0]])  # cosines 3/sqrt10, 1/sqrt10, 4/sqrt20, -3/sqrt10 (the last is not among the 3)
    s10, s20 = 10 ** 0.5, 20 ** 0.5
    votes = torch.tensor([math.exp(3 / s10 / 0.5), math.exp(1 / s10 / 0.5) + math.exp(4 / s20 / 0.5), 0.0, 0.0])
    assert_close(head(q)[0], votes.log().float())
    assert head(q).argmax().item() == 1  # two neighbours of class 1 outvote the nearest one
    k1 = HEADS.get("knn")(HeadContext(in_dims=[2], num_classes=4), k=1)
    k1.fit([(train_x, train_y)])
    assert k1(q).argmax().item() == 0  # k = 1: the most similar row (class 0) decides
    again = HEADS.get("knn")(HeadContext(in_dims=[2], num_classes=4), k=3, temperature=0.5)
    again.load_state_dict(head.state_dict())  # the checkpoint carries the index and its labels
    assert_close(again(q), head(q))
    with pytest.raises(ValueError, match="k must be >= 1"):
        HEADS.get("knn")(HeadContext(in_dims=[2], num_classes=4), k=0)


def test_tau_normalised_logits():
    """Kang et al. (METHODS.md section 1): rows w_k / ||w_k||^tau, bias left out; tau = 0 is W itself."""
    from featurelt.heads.linear import tau_normalised

    w = torch.tensor([[3.0, 4.0], [0.0, 0.5]])
    assert_close(tau_normalised(w, 1.0), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert_close(tau_normalised(w, 0.5), torch.tensor([[3 / 5 ** 0.5, 4 / 5 ** 0.5], [0.0, 0.5 / 0.5 ** 0.5]]))
    assert_close(tau_normalised(w, 0.0), w)
    x = feats()
    for name in ("linear", "mlp"):
        head = HEADS.get(name)(ctx())
        z = head.features(x)
        assert_close(head.tau_normalised_logits(x, 0.7), z @ tau_normalised(head.fc.weight, 0.7).T)
        assert_close(head.tau_normalised_logits(x, 0.0), head(x) - head.fc.bias)  # tau 0: W, no bias
    with pytest.raises(ValueError, match="one linear layer"):
        HEADS.get("cosine")(ctx()).tau_normalised_logits(x, 1.0)
