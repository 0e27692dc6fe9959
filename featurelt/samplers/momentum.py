"""ECVL momentum-loss sampler: class-balanced rows, views picked by the momentum strength (METHODS.md section 5)."""
from __future__ import annotations

import numpy as np
import torch

from featurelt.samplers import SAMPLERS, SamplerContext
from featurelt.samplers.base import Plan
from featurelt.samplers.basic import ClassWiseSampler


def momentum_update(prev: np.ndarray, loss: np.ndarray, beta: float) -> np.ndarray:
    """``Lm_t = beta Lm_{t-1} + (1 - beta) L_t``; ``Lm_0 = L_0`` where ``prev`` is NaN (never seen). [N] -> [N].

    Rows with ``loss`` NaN (not seen this epoch) keep ``prev`` (ECVL eq. 8, METHODS.md section 5).
    """
    prev, loss = np.asarray(prev, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    out = np.where(np.isnan(prev), loss, beta * prev + (1.0 - beta) * loss)
    return np.where(np.isnan(loss), prev, out)


def fold_epoch_losses(lm: np.ndarray, loss_sum: np.ndarray, count: np.ndarray, beta: float) -> np.ndarray:
    """``Lm`` after an epoch: each row's mean loss fed back (``loss_sum / count``) through :func:`momentum_update`.

    Rows with ``count == 0`` were not seen and keep their ``Lm``; ``loss_sum`` / ``count`` are left to the caller
    to reset. [N] x 3 -> [N].
    """
    if not np.any(count):
        return lm
    loss = np.where(count > 0, loss_sum / np.maximum(count, 1), np.nan)
    return momentum_update(lm, loss, beta)


def momentum_strength(lm: np.ndarray) -> np.ndarray:
    """``M_i = 1/2 ((Lm_i - mean) / max_i(Lm_i - mean) + 1)`` (ECVL eq. 9, METHODS.md section 5). [N] -> [N].

    mean / max over the rows seen so far (non-NaN). Clipped to [0, 1] (the formula falls below 0 when
    the lowest loss is further from the mean than the highest); all-equal losses give 0.5; rows never
    seen (NaN) give 0 (plain view).
    """
    lm = np.asarray(lm, dtype=np.float64)
    seen = ~np.isnan(lm)
    out = np.zeros_like(lm)
    if not seen.any():
        return out
    dev = lm[seen] - lm[seen].mean()
    top = dev.max()
    out[seen] = 0.5 if top <= 0 else np.clip(0.5 * (dev / top + 1.0), 0.0, 1.0)
    return out


@SAMPLERS.register("momentum")
class MomentumSampler(ClassWiseSampler):
    """ECVL stage 2: class-balanced rows (1/K per class), each with the cached view whose strength is
    closest to ``M_i * zeta``, ``zeta ~ U(0, 1)`` per draw (METHODS.md section 5).

    ``feedback`` collects the per-sample losses of an epoch; at the start of the next epoch the mean loss
    of each row seen folds into ``Lm`` with :func:`momentum_update` and ``M`` = :func:`momentum_strength`.
    Options: beta in [0, 1) momentum smoothing (default 0.9; the paper gives no value);
    view_strength: [N, V] augmentation strength of each cached view (view 0 = 0; NaN = view missing;
    default None = ``v / (V - 1)`` for every row, V = ctx.num_views).
    """

    kind = "class-balanced"

    def __init__(self, ctx: SamplerContext, *, beta: float = 0.9, view_strength: np.ndarray | None = None,
                 aux_ratio: bool = True, aux_per_head: int = 1, many: int = 100, few: int = 20) -> None:
        super().__init__(ctx, aux_ratio=aux_ratio, aux_per_head=aux_per_head, many=many, few=few)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"momentum beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        n, v = ctx.labels.size, ctx.num_views
        if view_strength is None:
            vs = np.broadcast_to(np.linspace(0.0, 1.0, v) if v > 1 else np.zeros(1), (n, v)).copy()
        else:
            vs = np.asarray(view_strength, dtype=np.float64)
            if vs.shape != (n, v):
                raise ValueError(f"view_strength must be [N, num_views] = [{n}, {v}], got shape={vs.shape}")
        self.view_strength = vs
        self.lm = np.full(n, np.nan)
        self._sum = np.zeros(n)
        self._cnt = np.zeros(n)

    def strengths(self) -> np.ndarray:
        """Current M [N] (after folding the losses fed back so far)."""
        self._fold()
        return momentum_strength(self.lm)

    def _fold(self) -> None:
        if self._cnt.any():
            self.lm = fold_epoch_losses(self.lm, self._sum, self._cnt, self.beta)
            self._sum[:] = 0.0
            self._cnt[:] = 0.0

    def pick_views(self, rng: np.random.Generator, index: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Per row of ``index`` [n]: argmin_v |strength[i, v] - M_i * zeta| (NaN views skipped). -> [n]."""
        target = m[index] * rng.random(index.size)
        dist = np.abs(self.view_strength[index] - target[:, None])
        return np.argmin(np.where(np.isnan(dist), np.inf, dist), axis=1)

    def plan(self, rng: np.random.Generator, pool: np.ndarray, epoch: int) -> Plan:
        m = self.strengths()
        index = self.draw(rng, pool)
        return {"index": index, "view": self.pick_views(rng, index, m)}

    def feedback(self, index: torch.Tensor, per_sample_loss: torch.Tensor, view: torch.Tensor | None = None) -> None:
        """Accumulate per-sample losses (index [B], loss [B]) into this epoch's per-row mean."""
        idx = torch.as_tensor(index).detach().cpu().numpy().astype(np.int64)
        loss = torch.as_tensor(per_sample_loss).detach().float().cpu().numpy().astype(np.float64)
        if idx.shape != loss.shape:
            raise ValueError(f"feedback: index {idx.shape} and per_sample_loss {loss.shape} differ")
        np.add.at(self._sum, idx, loss)
        np.add.at(self._cnt, idx, 1.0)
