"""Recipe ``ltgc-lora`` (seed 002, METHODS.md section 4): LoRA on the CLIP image tower with BalanceMix on pixels.

Per pair: ``x_i`` drawn class-balanced from the original train rows, ``x_j`` uniformly from the generated
rows that passed ``filter-generated`` (the rejected ones sit in split ``filtered`` and are never read),
one ``lambda ~ Beta(a, a)`` per pair, ``x~ = lambda x_i + (1 - lambda) x_j`` and the same lambda on the
one-hot labels (:class:`featurelt.samplers.mixup.BalanceMixSampler`). Only the LoRA matrices (peft, on the
attention and MLP projections of the image tower) and the head train (``--adapt lora``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from featurelt.finetune.hooks import FinetuneHooks
from featurelt.finetune.recipes.common import PairedMixin, PairedPlan, TrainRows, paired_plan, train_rows

DEFAULTS: dict[str, Any] = {
    "adapt": "lora",          # peft LoRA on the CLIP image tower; head trains too
    "head": "linear",
    "loss": "ce",             # soft (mixed one-hot) targets
    "optimizer": "adamw",
    "lr": 1e-4,
}


class LTGCLoraHooks(PairedMixin, FinetuneHooks):
    """Plans BalanceMix pairs (original x generated) and mixes them on the device (``make_batch``)."""

    def __init__(self, *, a: float = 1.0) -> None:
        self.opts = {"a": float(a)}
        self.rows: TrainRows | None = None
        self.sampler: Any = None
        self.plan: PairedPlan | None = None

    def setup(self, store: Any, *, batch_size: int, seed: int) -> None:
        from featurelt.samplers import build_sampler

        self.rows = train_rows(store, sources=("original", "generated"))
        self.num_classes = int(self.rows.class_counts.size)
        self.sampler = build_sampler("balancemix", self.rows.sampler_context(batch_size=batch_size, seed=seed),
                                     **self.opts)

    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        assert self.rows is not None
        self.plan = paired_plan(self.sampler, self.rows, epoch)
        return self.plan.batches

    def train_plan(self, epoch: int, ctx: Any) -> list[np.ndarray]:
        if self.sampler is None:
            self.setup(ctx.store, batch_size=ctx.cfg.batch_size, seed=ctx.cfg.seed)
        return self.plan_epoch(epoch)

    def make_batch(self, images: Tensor, targets: Tensor, batch: Any, ctx: Any) -> tuple[Tensor, Tensor]:
        return self.mixed_batch(images, targets, batch)
