"""Base class of every sampler: epoch plan -> batches, auxiliary exposure and caps (METHODS.md section 3)."""
from __future__ import annotations

import abc
from typing import Any, Iterator

import numpy as np
import torch

from featurelt.samplers import Batch, SamplerContext, check_options, neighbor_class_quota

Plan = dict[str, np.ndarray]  # "index" [n] (required), "partner", "lam_x", "lam_y", "view" (optional)


class Sampler(abc.ABC):
    """``Sampler(ctx, **opts)``; ``epoch(e) -> Iterator[Batch]``; ``feedback(index, per_sample_loss, view)``.

    Common keyword-only options (METHODS.md section 3):
      aux_ratio: apply the neighbor-class ratio rule (default True); False exposes every auxiliary class.
      aux_per_head: auxiliary classes exposed per head target class per epoch (default 1); medium and
        tail targets get ``aux_per_head * ceil(N_h/N_m)`` and ``aux_per_head * ceil(N_h/N_t)``.
      many, few: bucket thresholds on the train count (many: n > many, few: n < few; default 100 / 20,
        METHODS.md section 0).
    """

    def __new__(cls, ctx: Any = None, *args: Any, **opts: Any) -> "Sampler":
        check_options(cls, opts)
        return super().__new__(cls)

    def __init__(self, ctx: SamplerContext, *, aux_ratio: bool = True, aux_per_head: int = 1,
                 many: int = 100, few: int = 20) -> None:
        if not isinstance(ctx, SamplerContext):
            raise TypeError(f"{type(self).__name__} needs a SamplerContext, got {type(ctx).__name__}")
        if aux_per_head < 0:
            raise ValueError(f"aux_per_head must be >= 0, got {aux_per_head}")
        self.ctx = ctx
        self.aux_ratio, self.aux_per_head = bool(aux_ratio), int(aux_per_head)
        k, labels = ctx.num_classes, ctx.labels
        self.is_aux_class = np.arange(k) >= ctx.num_target
        self.is_aux_row = self.is_aux_class[labels]
        # rows grouped by class: rows_sorted[starts[c] : starts[c] + sizes[c]]
        self.rows_sorted = np.argsort(labels, kind="stable")
        self.sizes = np.bincount(labels, minlength=k)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        # neighbor-class quota per target class (ratio rule)
        n = ctx.class_counts[: ctx.num_target]
        bucket = np.where(n > many, 0, np.where(n < few, 2, 1))
        quota = neighbor_class_quota([n[bucket == b].sum() for b in range(3)])
        self.aux_allowed = np.array([self.aux_per_head * quota[b] for b in bucket], dtype=np.int64)

    # ----------------------------------------------------------------- epoch pool

    def rng(self, epoch: int) -> np.random.Generator:
        """The epoch's generator, ``default_rng([seed, epoch])``."""
        return np.random.default_rng([self.ctx.seed, int(epoch)])

    def epoch_pool(self, rng: np.random.Generator) -> np.ndarray:
        """[N] bool: rows usable this epoch. Non-auxiliary rows always; an auxiliary class only when
        exposed by the ratio rule, and then at most ``aux_cap`` of its rows (random per epoch)."""
        ctx = self.ctx
        pool = ~self.is_aux_row
        exposed = np.zeros(ctx.num_classes, dtype=bool)
        aux_classes = np.nonzero(self.is_aux_class)[0]
        if not self.aux_ratio:
            exposed[aux_classes] = True
        else:
            parents = ctx.neighbor_of[aux_classes]
            exposed[aux_classes[parents < 0]] = True  # no recorded parent: not rationed
            for t in np.unique(parents[parents >= 0]):
                mine = aux_classes[parents == t]
                allowed = int(self.aux_allowed[t]) if t < ctx.num_target else len(mine)
                exposed[rng.permutation(mine)[:allowed]] = True
        for a in np.nonzero(exposed & (self.sizes > 0))[0]:
            rows = self.class_rows(a)
            pool[rng.permutation(rows)[: ctx.aux_cap]] = True
        return pool

    def class_rows(self, c: int) -> np.ndarray:
        return self.rows_sorted[self.starts[c]: self.starts[c] + self.sizes[c]]

    def aux_budget(self) -> np.ndarray:
        """[K] appearances left per class: ``aux_cap`` for auxiliary classes, unlimited otherwise."""
        return np.where(self.is_aux_class, self.ctx.aux_cap, np.iinfo(np.int64).max).astype(np.int64)

    # ----------------------------------------------------------------- drawing helpers

    def rows_of(self, rng: np.random.Generator, classes: np.ndarray, pool: np.ndarray) -> np.ndarray:
        """A uniform pool row of each class in ``classes`` [n] -> [n] row indices."""
        rows_sorted = self.rows_sorted[pool[self.rows_sorted]]
        sizes = np.bincount(self.ctx.labels[pool], minlength=self.ctx.num_classes)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        if (sizes[classes] == 0).any():
            raise ValueError(f"{type(self).__name__}: drew a class without rows this epoch")
        return rows_sorted[starts[classes] + (rng.random(classes.size) * sizes[classes]).astype(np.int64)]

    @staticmethod
    def capped_choice(rng: np.random.Generator, n: int, probs: np.ndarray, budget: np.ndarray) -> np.ndarray:
        """``n`` class draws from ``probs`` [K] with class c drawn at most ``budget[c]`` times.

        Draws beyond a class's budget are redrawn from the classes with budget left (renormalised).
        Mutates ``budget`` (subtracts the draws). Returns [n] int64.
        """
        probs = probs.astype(np.float64).copy()
        out = rng.choice(probs.size, size=n, p=probs / probs.sum())
        todo = np.arange(n)
        while True:
            order = todo[np.argsort(out[todo], kind="stable")]
            cls = out[order]
            first = np.searchsorted(cls, cls, side="left")
            rank = np.arange(cls.size) - first
            over = rank >= budget[cls]
            used = np.bincount(cls[~over], minlength=probs.size)
            budget -= used
            if not over.any():
                return out
            probs[budget <= 0] = 0.0
            if probs.sum() <= 0:
                raise ValueError("auxiliary caps leave no class to draw from")
            todo = np.sort(order[over])
            out[todo] = rng.choice(probs.size, size=todo.size, p=probs / probs.sum())

    # ----------------------------------------------------------------- public API

    @abc.abstractmethod
    def plan(self, rng: np.random.Generator, pool: np.ndarray, epoch: int) -> Plan:
        """The whole epoch as arrays: "index" [N_epoch] and optional "partner", "lam_x", "lam_y", "view"."""

    def epoch(self, e: int) -> Iterator[Batch]:
        """Yield ``ceil(N_epoch / batch_size)`` batches of epoch ``e`` (deterministic given seed and e)."""
        rng = self.rng(e)
        plan = self.plan(rng, self.epoch_pool(rng), e)
        n, bs = plan["index"].size, self.ctx.batch_size
        tensors = {k: (torch.from_numpy(np.ascontiguousarray(v)).long() if k in ("index", "partner", "view")
                       else torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)))
                   for k, v in plan.items()}
        for s in range(0, n, bs):
            yield Batch(**{k: v[s: s + bs] for k, v in tensors.items()})

    def feedback(self, index: torch.Tensor, per_sample_loss: torch.Tensor, view: torch.Tensor | None = None) -> None:
        """Per-sample losses of a batch (index [B], loss [B], view [B] or None). No-op by default."""
        return None
