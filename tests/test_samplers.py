"""Samplers: frequencies vs their distributions, LFM math, auxiliary caps, momentum (METHODS.md 3-6)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from featurelt.samplers import (SAMPLERS, SamplerContext, build_sampler, class_sampling_probs, lfm_label_weight,
                                lfm_partner_probs, momentum_strength, momentum_update, neighbor_class_quota)


def make_ctx(*, aux: bool = True, generated: bool = True, batch_size: int = 64, seed: int = 0,
             num_views: int = 3, aux_cap: int = 50) -> SamplerContext:
    """5 target classes (counts 200, 80, 30, 12, 5), optional 3 auxiliary classes (120, 70, 20 rows)
    queried from targets 4, 4, 0, optional 40 generated rows of classes 3 and 4."""
    counts = [200, 80, 30, 12, 5]
    labels = list(np.repeat(np.arange(5), counts))
    source = ["original"] * len(labels)
    neighbor_of = [-1] * 5
    if aux:
        for c, (n, parent) in enumerate([(120, 4), (70, 4), (20, 0)], start=5):
            labels += [c] * n
            source += ["auxiliary"] * n
            neighbor_of.append(parent)
            counts.append(n)
    if generated:
        labels += [3] * 20 + [4] * 20
        source += ["generated"] * 40
    k = len(counts)
    g = np.random.default_rng(7)
    t = g.normal(size=(k, 16))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    return SamplerContext(labels=np.array(labels), class_counts=np.array(counts, dtype=float),
                          source=np.array(source), neighbor_of=np.array(neighbor_of), num_target=5,
                          text_sim=t @ t.T, num_views=num_views, batch_size=batch_size, seed=seed,
                          aux_cap=aux_cap)


def collect(sampler, epochs) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for e in epochs:
        for b in sampler.epoch(e):
            for k in ("index", "partner", "lam_x", "lam_y", "view"):
                v = getattr(b, k)
                if v is not None:
                    out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


# ---------------------------------------------------------------- every registered sampler

@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_batches_determinism_and_aux_cap(name: str) -> None:
    ctx = make_ctx(aux_cap=15)
    s = SAMPLERS.get(name)(ctx)
    batches = list(s.epoch(0))
    n = sum(len(b.index) for b in batches)
    assert len(batches) == math.ceil(n / ctx.batch_size)
    assert all(len(b.index) == ctx.batch_size for b in batches[:-1])
    for b in batches:
        assert b.index.dtype == torch.long and (b.index >= 0).all() and (b.index < ctx.labels.size).all()
        for k in ("partner", "lam_x", "lam_y", "view"):
            v = getattr(b, k)
            assert v is None or v.shape == b.index.shape
        if b.lam_x is not None:
            assert ((b.lam_x >= 0) & (b.lam_x <= 1) & (b.lam_y >= 0) & (b.lam_y <= 1)).all()
        s.feedback(b.index, torch.rand(len(b.index)), b.view)
    again = collect(SAMPLERS.get(name)(ctx), [0])
    first = collect(SAMPLERS.get(name)(ctx), [0])
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])  # deterministic given seed and epoch
    assert not np.array_equal(collect(SAMPLERS.get(name)(ctx), [1])["index"], first["index"])
    for e in range(4):  # aux cap: index and partner appearances together, per epoch
        got = collect(s, [e])
        rows = np.concatenate([got["index"], got.get("partner", np.array([], dtype=np.int64))])
        per_class = np.bincount(ctx.labels[rows], minlength=ctx.num_classes)
        assert (per_class[ctx.num_target:] <= 15).all(), (name, e, per_class)


def test_unknown_sampler_and_options_are_named() -> None:
    with pytest.raises(KeyError, match="available: balancemix, class-balanced"):
        SAMPLERS.get("nope")
    with pytest.raises(TypeError, match="bogus, taus"):
        SAMPLERS.get("lfm")(make_ctx(), taus=1, bogus=2)
    with pytest.raises(TypeError, match="sampler 'sqrt'"):
        build_sampler("sqrt", make_ctx(), alpha=1.0)
    with pytest.raises(ValueError, match="text_sim"):
        SamplerContext(labels=np.array([0, 1]), class_counts=np.array([1.0, 1.0]), source=np.array(["original"] * 2),
                       neighbor_of=np.array([-1, -1]), num_target=2, text_sim=np.zeros((3, 3)), num_views=1,
                       batch_size=2, seed=0)


# ---------------------------------------------------------------- class frequencies

def test_class_sampling_probs_values() -> None:
    assert_close(class_sampling_probs([4, 16, 0, 1], "instance"), np.array([4, 16, 0, 1]) / 21)
    assert_close(class_sampling_probs([4, 16, 0, 1], "class-balanced"), np.array([1, 1, 0, 1]) / 3)
    assert_close(class_sampling_probs([4, 16, 0, 1], "sqrt"), np.array([2, 4, 0, 1]) / 7)
    with pytest.raises(ValueError, match="unknown sampling kind"):
        class_sampling_probs([1, 2], "cubic")  # type: ignore[arg-type]


@pytest.mark.parametrize("name,kind", [("instance", "instance"), ("class-balanced", "class-balanced"), ("sqrt", "sqrt")])
def test_class_frequencies_match_distribution(name: str, kind: str) -> None:
    ctx = make_ctx(aux=False, generated=False, batch_size=512)
    got = collect(SAMPLERS.get(name)(ctx), range(60))["index"]  # 60 x 327 = 19620 draws
    freq = np.bincount(ctx.labels[got], minlength=5) / got.size
    expected = class_sampling_probs(ctx.class_counts, kind)  # type: ignore[arg-type]
    assert np.abs(freq - expected).max() < 0.012, (freq, expected)
    if name == "instance":  # a permutation: every row exactly once per epoch
        one = collect(SAMPLERS.get(name)(ctx), [3])["index"]
        np.testing.assert_array_equal(np.sort(one), np.arange(ctx.labels.size))


def test_momentum_base_sampling_is_class_balanced() -> None:
    ctx = make_ctx(aux=False, generated=False, batch_size=512, num_views=1)
    got = collect(SAMPLERS.get("momentum")(ctx), range(60))
    freq = np.bincount(ctx.labels[got["index"]], minlength=5) / got["index"].size
    assert np.abs(freq - 0.2).max() < 0.012
    assert (got["view"] == 0).all()  # one cached view only


# ---------------------------------------------------------------- LFM (section 6)

def test_lfm_partner_probs_formula() -> None:
    sim = np.array([[1.0, 0.2, 0.1], [0.2, 1.0, 0.5], [0.1, 0.5, 1.0]])
    p = lfm_partner_probs(sim, tau=0.1)
    e01, e02 = math.exp(2.0), math.exp(1.0)  # exp(0.2 / 0.1), exp(0.1 / 0.1); diagonal excluded
    assert_close(p[0], np.array([0.0, e01 / (e01 + e02), e02 / (e01 + e02)]))
    assert_close(p.sum(1), np.ones(3))


def test_lfm_label_weight_is_regularised_minimiser() -> None:
    scipy_opt = pytest.importorskip("scipy.optimize")
    g = np.random.default_rng(0)
    for _ in range(25):
        lam_x, alpha = g.uniform(), g.uniform(0, 2)
        n_i, n_j = g.integers(1, 500, size=2)
        p = n_i / (n_i + n_j)
        f = lambda l: (l - lam_x) ** 2 / 2 + alpha * ((l - 0.5) ** 2 - (l - p) ** 2)  # noqa: E731
        unclamped = scipy_opt.minimize_scalar(f).x
        got = lfm_label_weight(lam_x, float(n_i), float(n_j), alpha).item()
        assert got == pytest.approx(min(max(unclamped, 0.0), 1.0), abs=1e-6)
        bounded = scipy_opt.minimize_scalar(f, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-9}).x
        assert got == pytest.approx(bounded, abs=1e-4)
    # hand value: lam_x 0.7, n_i 300, n_j 100, alpha 1 -> 0.7 - 200/400 = 0.2; clamps at both ends
    assert_close(lfm_label_weight(torch.tensor([0.7, 0.1, 0.9]), torch.tensor([300.0, 300.0, 10.0]),
                                  torch.tensor([100.0, 100.0, 300.0]), 1.0),
                 torch.tensor([0.2, 0.0, 1.0], dtype=torch.float64))


def test_lfm_partner_frequencies_and_label_shift() -> None:
    ctx = make_ctx(aux=False, generated=False, batch_size=512)
    tau = 0.5
    s = SAMPLERS.get("lfm")(ctx, tau=tau, alpha=1.0, a=1.0, per_sample=True)
    got = collect(s, range(60))
    yi, yj = ctx.labels[got["index"]], ctx.labels[got["partner"]]
    assert (yi != yj).all()
    expected = lfm_partner_probs(ctx.text_sim, tau)
    for c in range(5):
        sel = yj[yi == c]
        if sel.size < 2000:
            continue
        freq = np.bincount(sel, minlength=5) / sel.size
        tol = 4 * np.sqrt(expected[c] * (1 - expected[c]) / sel.size).max() + 1e-3
        assert np.abs(freq - expected[c]).max() < tol, (c, freq, expected[c])
    n = ctx.class_counts
    assert_close(got["lam_y"], np.clip(got["lam_x"] - (n[yi] - n[yj]) / (n[yi] + n[yj]), 0, 1).astype(np.float32))
    # primary rows drawn instance-wise: class frequencies n_c / N
    assert np.abs(np.bincount(yi, minlength=5) / yi.size - n / n.sum()).max() < 1e-9
    # Beta(1, 1) = uniform: mean 1/2, variance 1/12
    assert got["lam_x"].mean() == pytest.approx(0.5, abs=0.01)
    assert got["lam_x"].var() == pytest.approx(1 / 12, abs=0.005)


def test_lfm_default_beta_is_one_draw_per_batch() -> None:
    # the authors' LocalFeatureMixup: lam_x ~ Beta(0.2, 0.2), drawn once per batch
    ctx = make_ctx(aux=False, generated=False, batch_size=16)
    s = SAMPLERS.get("lfm")(ctx)
    lams = [b.lam_x for e in range(40) for b in s.epoch(e)]
    assert all(np.unique(lam.numpy()).size == 1 for lam in lams)
    first = np.array([lam[0].item() for lam in lams])
    assert first.size > 200
    # Beta(0.2, 0.2): mean 1/2, variance 1 / (4 (2a + 1)) = 1/5.6
    assert first.mean() == pytest.approx(0.5, abs=0.06)
    assert first.var() == pytest.approx(1 / 5.6, abs=0.03)
    per_row = SAMPLERS.get("lfm")(ctx, per_sample=True, a=0.2)
    assert np.unique(next(iter(per_row.epoch(0))).lam_x.numpy()).size == 16


def test_lfm_needs_text_similarity() -> None:
    ctx = make_ctx()
    no_text = SamplerContext(**{**ctx.__dict__, "text_sim": None})
    with pytest.raises(ValueError, match="text_sim is None"):
        SAMPLERS.get("lfm")(no_text)


# ---------------------------------------------------------------- BalanceMix (section 4)

def test_balancemix_pairs_original_with_generated() -> None:
    ctx = make_ctx(batch_size=512)
    got = collect(SAMPLERS.get("balancemix")(ctx), range(60))
    assert (ctx.source[got["index"]] == "original").all()
    assert (ctx.source[got["partner"]] == "generated").all()
    np.testing.assert_array_equal(got["lam_x"], got["lam_y"])
    freq = np.bincount(ctx.labels[got["index"]], minlength=ctx.num_classes) / got["index"].size
    assert np.abs(freq[:5] - 0.2).max() < 0.012 and freq[5:].sum() == 0
    with pytest.raises(ValueError, match="needs generated rows"):
        SAMPLERS.get("balancemix")(make_ctx(generated=False))


# ---------------------------------------------------------------- auxiliary classes (section 3)

def test_neighbor_class_quota_hand_values() -> None:
    assert neighbor_class_quota((1000, 300, 40)) == (1, 4, 25)  # 1 : ceil(1000/300) : ceil(1000/40)
    assert neighbor_class_quota((500, 500, 100)) == (1, 1, 5)
    assert neighbor_class_quota((0, 130, 15)) == (0, 1, 9)  # no head rows: medium is the reference
    assert neighbor_class_quota((100, 0, 30)) == (1, 0, 4)


def test_ratio_rule_limits_exposed_neighbor_classes() -> None:
    # buckets with many=100, few=20: class 0 (200) head, 1-2 medium (110 rows), 3-4 few (17 rows)
    # quota = (1, ceil(200/110)=2, ceil(200/17)=12): target 4 exposes both aux classes 5, 6; target 0 its one
    ctx = make_ctx()
    s = SAMPLERS.get("instance")(ctx, aux_per_head=1)
    assert s.aux_allowed.tolist() == [1, 2, 2, 12, 12]
    got = collect(s, [0])["index"]
    per_class = np.bincount(ctx.labels[got], minlength=ctx.num_classes)
    assert per_class[5:].tolist() == [50, 50, 20]  # aux_cap 50 rows; the 20-row class whole
    s0 = SAMPLERS.get("instance")(ctx, aux_per_head=0)
    assert np.bincount(ctx.labels[collect(s0, [0])["index"]], minlength=8)[5:].sum() == 0


# ---------------------------------------------------------------- momentum (section 5)

def test_momentum_update_and_strength_formulas() -> None:
    prev = np.array([np.nan, 2.0, 1.0, 4.0])
    loss = np.array([3.0, 0.0, np.nan, 2.0])
    lm = momentum_update(prev, loss, 0.75)
    assert_close(lm, np.array([3.0, 1.5, 1.0, 3.5]))  # first sight = L; 0.75*2 + 0.25*0; unseen kept
    # mean 2.25, deviations (0.75, -0.75, -1.25, 1.25), max 1.25 -> 1/2 (d / 1.25 + 1)
    assert_close(momentum_strength(lm), np.array([0.8, 0.2, 0.0, 1.0]))
    # mean 3, deviations (-2, -1, 3), max 3 -> (1/6, 1/3, 1)
    assert_close(momentum_strength(np.array([1.0, 2.0, 6.0])), np.array([1 / 6, 1 / 3, 1.0]))
    assert_close(momentum_strength(np.array([2.0, np.nan, 2.0])), np.array([0.5, 0.0, 0.5]))


def test_momentum_picks_views_by_strength() -> None:
    ctx = make_ctx(aux=False, generated=False, num_views=5, batch_size=128)
    strength = np.tile(np.array([0.0, 0.25, 0.5, 0.75, 1.0]), (ctx.labels.size, 1))
    s = SAMPLERS.get("momentum")(ctx, beta=0.5, view_strength=strength)
    hard = ctx.labels == 4  # rows of class 4 get a high loss, the rest a low one
    for b in s.epoch(0):
        assert (b.view == 0).all()  # no feedback yet: M = 0
        s.feedback(b.index, torch.where(torch.from_numpy(hard[b.index.numpy()]), 5.0, 1.0), b.view)
    m = s.strengths()
    seen = ~np.isnan(s.lm)
    assert np.allclose(m[seen & hard], 1.0) and (m[seen & ~hard] < 0.5).all()
    got = collect(s, [1])
    idx, view = got["index"], got["view"]
    assert view[hard[idx]].mean() > view[~hard[idx]].mean() + 1.0
    # the rule itself: argmin |strength - M * zeta| with zeta drawn from the same generator
    rng = np.random.default_rng(5)
    rows = np.arange(ctx.labels.size)
    picked = s.pick_views(rng, rows, m)
    zeta = np.random.default_rng(5).random(rows.size)
    np.testing.assert_array_equal(picked, np.argmin(np.abs(strength - (m * zeta)[:, None]), axis=1))
