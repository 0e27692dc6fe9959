"""Recipe ``auxiliary`` (seed 001, METHODS.md section 3): fine-tune on target + kept auxiliary classes with NS-CE.

- Train rows: split ``train`` of sources ``original`` and ``auxiliary`` (images ``filter-auxiliary`` rejected sit
  in split ``filtered`` and are never read; ``generated`` rows are not part of this method).
- Plan: the configured sampler (default ``instance``) over those rows with the auxiliary rules of
  :mod:`featurelt.samplers`: at most ``aux_cap`` (50) samples of an auxiliary class per epoch and the
  neighbor-ratio rule (head : medium : tail targets expose 1 : ceil(N_h/N_m) : ceil(N_h/N_t) neighbor classes).
- Loss: ``ns-ce`` (lambda_s 0.1); with lambda_s = 1 it is balanced softmax exactly.
- Evaluation: only the K target columns of the classifier (:func:`mask_logits`, the paper's "mask").
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from featurelt.finetune.hooks import FinetuneHooks
from featurelt.finetune.recipes.common import TrainRows, train_rows

DEFAULTS: dict[str, Any] = {
    "loss": "ns-ce",          # METHODS.md section 3
    "loss_opts": {"lambda_s": 0.1},
    "sampler": "instance",
    "aux_cap": 50,            # auxiliary samples per class per epoch (paper: 50)
}


def mask_logits(logits: Tensor, num_target: int) -> Tensor:
    """Inference on target classes only: logits [B, K] -> [B, K_target] (auxiliary rows dropped)."""
    if logits.dim() != 2 or not 0 < num_target <= logits.shape[1]:
        raise ValueError(f"mask_logits: logits [B, K >= {num_target}] expected, got shape={tuple(logits.shape)}")
    return logits[:, :num_target]


class AuxiliaryHooks(FinetuneHooks):
    """Plan over original + auxiliary train rows with the section-3 caps; evaluation masks auxiliary columns."""

    def __init__(self, *, sampler: str = "instance", aux_cap: int = 50, aux_per_head: int = 1,
                 aux_ratio: bool = True) -> None:
        if aux_cap < 0:
            raise ValueError(f"aux_cap must be >= 0, got {aux_cap}")
        self.sampler_name, self.aux_cap = sampler, int(aux_cap)
        self.sampler_opts = {"aux_per_head": int(aux_per_head), "aux_ratio": bool(aux_ratio)}
        self.rows: TrainRows | None = None
        self.sampler: Any = None

    def setup(self, store: Any, *, batch_size: int, seed: int) -> None:
        from featurelt.samplers import build_sampler

        self.rows = train_rows(store, sources=("original", "auxiliary"))
        if self.rows.num_target == self.rows.class_counts.size:
            raise ValueError("recipe 'auxiliary' needs auxiliary classes: run `featurelt neighbors` and ingest / "
                             "`filter-auxiliary` their images first (the classes table has none)")
        ctx = self.rows.sampler_context(batch_size=batch_size, seed=seed, aux_cap=self.aux_cap)
        self.sampler = build_sampler(self.sampler_name, ctx, **self.sampler_opts)

    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        """Loader batches of samples offsets for ``epoch``."""
        assert self.rows is not None
        return [self.rows.offsets[b.index.numpy()] for b in self.sampler.epoch(epoch)]

    def train_plan(self, epoch: int, ctx: Any) -> list[np.ndarray]:
        if self.sampler is None:
            self.setup(ctx.store, batch_size=ctx.cfg.batch_size, seed=ctx.cfg.seed)
        return self.plan_epoch(epoch)

    def eval_logits(self, logits: Tensor) -> Tensor:
        assert self.rows is not None
        return mask_logits(logits, self.rows.num_target)
