"""Recipe ``lfm-stage1`` (seed 004, METHODS.md section 6): the image tower end to end with LFM in pixel space.

Per batch: rows x_i (instance order), partners x_j of class ``j != y_i`` drawn with
``p(j | i) = softmax_j(t_i . t_j / tau)`` (:func:`featurelt.samplers.lfm_partner_probs`), one
``lambda_x ~ Beta(0.2, 0.2)`` per batch, ``x~ = lambda_x x_i + (1 - lambda_x) x_j`` on the pixels and the
label shifted toward the rarer class, ``lambda_y = clamp(lambda_x - alpha (n_i - n_j)/(n_i + n_j), 0, 1)``
(:func:`featurelt.samplers.lfm_label_weight`); soft-target cross-entropy on the prediction, cosine of the
image feature to the fixed class text embeddings (``--head text``; ``W_I`` is the identity and frozen in
stage 1, so it is left out). Stage 2: ``train-head --head lfm-projection`` on the exported set.

Settings follow the authors' code (``rsamf/text-guided-mixup``: ``mixups.py`` / ``lfm.py``,
``train/decoupled_trainer.py``, ``models/lfm_model.py``), which the paper leaves open: Adam, lr 1e-6, cosine
schedule to lr/1000, batch 32, 50 epochs, ``Beta(0.2, 0.2)`` drawn once per batch, tau 0.05, alpha 1.
Where the code differs from this form: its logits are the unit image feature times the *unnormalised* CLIP
text features (no temperature); featurelt stores unit text embeddings, so the text head's temperature
(``head_opts.tau``, default here 0.05) stands in for the text-feature norm.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from featurelt.finetune.hooks import FinetuneHooks
from featurelt.finetune.recipes.common import PairedMixin, PairedPlan, TrainRows, paired_plan, train_rows

DEFAULTS: dict[str, Any] = {
    "adapt": "full",          # F_I trained end to end (stage 1 of the decoupled training)
    "head": "text",           # prediction = cosine to the fixed class text embeddings
    "head_opts": {"tau": 0.05},
    "loss": "ce",             # soft-target cross-entropy on the mixed labels
    "optimizer": "adam",
    "lr": 1e-6,
    "min_lr_ratio": 1e-3,     # cosine schedule to lr / 1000
    "batch_size": 32,
    "epochs": 50,
}


class LFMStage1Hooks(PairedMixin, FinetuneHooks):
    """Plans LFM pairs over the original train rows and mixes them on the device (``make_batch``)."""

    def __init__(self, *, tau: float = 0.05, alpha: float = 1.0, a: float = 0.2, per_sample: bool = False,
                 text_set: str | None = None) -> None:
        self.opts = {"tau": float(tau), "alpha": float(alpha), "a": float(a), "per_sample": bool(per_sample)}
        self.text_set = text_set
        self.rows: TrainRows | None = None
        self.sampler: Any = None
        self.plan: PairedPlan | None = None

    def setup(self, store: Any, *, batch_size: int, seed: int, text_set: str | None = None) -> None:
        from featurelt.samplers import build_sampler

        text_set = text_set or self.text_set
        if not text_set:
            raise ValueError("recipe 'lfm-stage1' needs class text embeddings: pass --text-set NAME "
                             "(featurelt extract-text / extract --text)")
        self.rows = train_rows(store, sources=("original",), text_set=text_set)
        self.num_classes = int(self.rows.class_counts.size)
        self.sampler = build_sampler("lfm", self.rows.sampler_context(batch_size=batch_size, seed=seed), **self.opts)

    def plan_epoch(self, epoch: int) -> list[np.ndarray]:
        assert self.rows is not None
        self.plan = paired_plan(self.sampler, self.rows, epoch)
        return self.plan.batches

    def train_plan(self, epoch: int, ctx: Any) -> list[np.ndarray]:
        if self.sampler is None:
            self.setup(ctx.store, batch_size=ctx.cfg.batch_size, seed=ctx.cfg.seed, text_set=ctx.cfg.text_set)
        return self.plan_epoch(epoch)

    def make_batch(self, images: Tensor, targets: Tensor, batch: Any, ctx: Any) -> tuple[Tensor, Tensor]:
        return self.mixed_batch(images, targets, batch)
