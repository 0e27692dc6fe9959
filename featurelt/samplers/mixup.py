"""Mixup samplers: LFM text-guided local mixup (section 6) and LTGC BalanceMix (section 4)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from featurelt.samplers import SAMPLERS, SamplerContext, class_sampling_probs
from featurelt.samplers.base import Plan, Sampler


def lfm_label_weight(lam_x: Tensor | float, n_i: Tensor | float, n_j: Tensor | float, alpha: float = 1.0) -> Tensor:
    """``lambda_y = clamp(lambda_x - alpha (n_i - n_j) / (n_i + n_j), 0, 1)`` (METHODS.md section 6).

    All inputs broadcast ([B] or scalars); the minimiser of ``(l - lam_x)^2/2 + alpha R(l)``,
    ``R(l) = (l - 1/2)^2 - (l - p)^2``, p = n_i / (n_i + n_j), clamped to [0, 1]. Returns float tensor.
    """
    lam_x, n_i, n_j = (torch.as_tensor(v, dtype=torch.float64) for v in (lam_x, n_i, n_j))
    return (lam_x - alpha * (n_i - n_j) / (n_i + n_j)).clamp(0.0, 1.0)


def lfm_partner_probs(text_sim: np.ndarray | Tensor, tau: float = 0.05) -> np.ndarray:
    """``p(j | i) = softmax_j(t_i . t_j / tau)`` with j = i excluded (METHODS.md section 6). [K, K] -> [K, K].

    text_sim: [K, K] cosine similarities of the class text embeddings; tau > 0. Rows sum to 1 (K >= 2).
    """
    s = np.asarray(text_sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] < 2:
        raise ValueError(f"text_sim must be [K, K] with K >= 2, got shape={s.shape}")
    if tau <= 0:
        raise ValueError(f"lfm tau must be > 0, got {tau}")
    logits = s / tau
    np.fill_diagonal(logits, -np.inf)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


@SAMPLERS.register("lfm")
class LFMSampler(Sampler):
    """LFM local sampling + label shift (METHODS.md section 6).

    Row i: a permutation of the pool (class y_i with prob n_i / N). Partner class ``j != y_i`` from
    ``lfm_partner_probs(ctx.text_sim, tau)`` restricted to classes with pool rows (renormalised), then
    a uniform pool row of j. ``lam_x ~ Beta(a, a)``, ``lam_y = lfm_label_weight(lam_x, n_i, n_j, alpha)``
    with n = ``ctx.class_counts``.
    Options: tau > 0 (default 0.05), alpha >= 0 (default 1; Places-LT 1.25 / 1.5), a > 0 (Beta
    parameter, default 0.2), per_sample (default False: one lam_x per batch of ``ctx.batch_size`` rows;
    True: one per row). The paper only says "a beta distribution"; the defaults are the authors' code
    (``mixups.py``, ``LocalFeatureMixup``: ``Beta(0.2, 0.2)``, one draw per batch).
    """

    def __init__(self, ctx: SamplerContext, *, tau: float = 0.05, alpha: float = 1.0, a: float = 0.2,
                 per_sample: bool = False, aux_ratio: bool = True, aux_per_head: int = 1, many: int = 100,
                 few: int = 20) -> None:
        super().__init__(ctx, aux_ratio=aux_ratio, aux_per_head=aux_per_head, many=many, few=few)
        if ctx.text_sim is None:
            raise ValueError("sampler 'lfm' needs class text embeddings: SamplerContext.text_sim is None")
        if alpha < 0 or a <= 0:
            raise ValueError(f"lfm needs alpha >= 0 and a > 0, got alpha={alpha}, a={a}")
        self.tau, self.alpha, self.a, self.per_sample = float(tau), float(alpha), float(a), bool(per_sample)
        self.partner_probs = lfm_partner_probs(ctx.text_sim, self.tau)

    def plan(self, rng: np.random.Generator, pool: np.ndarray, epoch: int) -> Plan:
        ctx = self.ctx
        index = rng.permutation(np.nonzero(pool)[0])
        yi = ctx.labels[index]
        budget = self.aux_budget() - np.bincount(yi, minlength=ctx.num_classes)
        present = np.bincount(ctx.labels[pool], minlength=ctx.num_classes) > 0
        partner_cls = np.empty_like(yi)
        for c in np.unique(yi):
            at = np.nonzero(yi == c)[0]
            p = self.partner_probs[c] * present
            if p.sum() <= 0:  # no other class has rows: mix within the class
                partner_cls[at] = c
                continue
            partner_cls[at] = rng.choice(p.size, size=at.size, p=p / p.sum())
        # auxiliary caps on partner appearances: redraw the excess from classes with budget left
        while True:
            order = np.argsort(partner_cls, kind="stable")
            cls = partner_cls[order]
            rank = np.arange(cls.size) - np.searchsorted(cls, cls, side="left")
            over = order[rank >= np.maximum(budget[cls], 0)]
            if over.size == 0:
                break
            full = np.bincount(partner_cls, minlength=ctx.num_classes) >= np.maximum(budget, 0)
            for pos in over:
                p = self.partner_probs[yi[pos]] * present * ~full
                partner_cls[pos] = rng.choice(p.size, p=p / p.sum()) if p.sum() > 0 else yi[pos]
        partner = self.rows_of(rng, partner_cls, pool)
        if self.per_sample:
            lam_x = rng.beta(self.a, self.a, size=index.size)
        else:  # one draw per batch (Sampler.epoch cuts the plan into batches of batch_size rows)
            batches = -(-index.size // ctx.batch_size)
            lam_x = np.repeat(rng.beta(self.a, self.a, size=batches), ctx.batch_size)[: index.size]
        n = ctx.class_counts
        lam_y = lfm_label_weight(torch.from_numpy(lam_x), torch.from_numpy(n[yi]), torch.from_numpy(n[partner_cls]),
                                 self.alpha).numpy()
        return {"index": index, "partner": partner, "lam_x": lam_x, "lam_y": lam_y}


@SAMPLERS.register("balancemix")
class BalanceMixSampler(Sampler):
    """LTGC BalanceMix (METHODS.md section 4): x_i class-balanced from the original rows, x_j uniform
    over the generated rows, ``lam ~ Beta(a, a)``, ``lam_x = lam_y = lam``. N_epoch = number of
    original rows. Option a > 0 (default 1.0, the paper's "Beta(0, 1)" read as uniform)."""

    def __init__(self, ctx: SamplerContext, *, a: float = 1.0, aux_ratio: bool = True, aux_per_head: int = 1,
                 many: int = 100, few: int = 20) -> None:
        super().__init__(ctx, aux_ratio=aux_ratio, aux_per_head=aux_per_head, many=many, few=few)
        if a <= 0:
            raise ValueError(f"balancemix needs a > 0, got a={a}")
        self.a = float(a)
        self.generated = np.nonzero(ctx.source == "generated")[0]
        self.original = ctx.source == "original"
        if self.generated.size == 0:
            raise ValueError("sampler 'balancemix' needs generated rows (samples.source = 'generated'); "
                             "there are none: ingest generated images first or pick another sampler")
        if not self.original.any():
            raise ValueError("sampler 'balancemix' needs original rows (samples.source = 'original'); there are none")

    def plan(self, rng: np.random.Generator, pool: np.ndarray, epoch: int) -> Plan:
        orig = pool & self.original
        present = np.bincount(self.ctx.labels[orig], minlength=self.ctx.num_classes)
        classes = rng.choice(present.size, size=int(orig.sum()), p=class_sampling_probs(present, "class-balanced"))
        index = self.rows_of(rng, classes, orig)
        partner = self.generated[rng.integers(0, self.generated.size, size=index.size)]
        lam = rng.beta(self.a, self.a, size=index.size)
        return {"index": index, "partner": partner, "lam_x": lam, "lam_y": lam.copy()}
