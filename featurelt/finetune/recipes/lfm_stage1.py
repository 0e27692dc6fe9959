"""Recipe ``lfm-stage1`` (seed 004, METHODS.md section 6): the image tower end to end with LFM in pixel space.

What the recipe fixes: sampler ``lfm`` -- rows x_i in instance order, partners x_j of class ``j != y_i`` drawn
with ``p(j | i) = softmax_j(t_i . t_j / tau)`` (:func:`featurelt.samplers.lfm_partner_probs`), one
``lambda_x ~ Beta(0.2, 0.2)`` per batch, ``x~ = lambda_x x_i + (1 - lambda_x) x_j`` on the pixels (the engine
mixes the pair on the device) and the label shifted toward the rarer class,
``lambda_y = clamp(lambda_x - alpha (n_i - n_j)/(n_i + n_j), 0, 1)`` (:func:`featurelt.samplers.lfm_label_weight`);
soft-target cross-entropy on ``--head text``: the cosine of the image feature to the fixed class text
embeddings (``W_I`` is the identity and frozen in stage 1, so it is left out); ``--adapt full``.
Stage 2: ``train-head --head lfm-projection`` on the exported set (Adam lr 0.01, 10 epochs in their code).

Settings follow the authors' code (``rsamf/text-guided-mixup``: ``mixups.py``, ``train/decoupled_trainer.py``,
``models/lfm_model.py``) where the paper is silent: Adam, lr 1e-6 with a cosine schedule to lr/1000 (the code's
``CosineAnnealingLR(eta_min=1e-7)`` at its config's lr 1e-4; the recipe keeps the ratio), batch 32,
50 epochs, ``Beta(0.2, 0.2)`` drawn once per batch, tau 0.05, alpha 1. One difference from that code: its
logits are the unit image feature times the *unnormalised* CLIP text features (no temperature); featurelt
stores unit text embeddings, so the text head's ``head_scale`` stands in for the text-feature norm. The
code steps its cosine per epoch, the engine per optimizer step.
"""
from __future__ import annotations

from typing import Any

from featurelt.finetune.recipes.base import RecipeHooks

DEFAULTS: dict[str, Any] = {
    "adapt": "full",           # F_I trained end to end (stage 1 of the decoupled training)
    "head": "text",            # prediction = cosine to the fixed class text embeddings
    "loss": "ce",              # soft-target cross-entropy on the mixed, label-shifted targets
    "sampler": "lfm",
    "sampler_opts": {"tau": 0.05, "alpha": 1.0, "a": 0.2, "per_sample": False},
    "optimizer": "adam",
    "weight_decay": 0.0,
    "lr": 1e-6,
    "min_lr_ratio": 1e-3,      # cosine schedule to lr / 1000
    "batch_size": 32,
    "epochs": 50,
}


class LFMStage1Hooks(RecipeHooks):
    """Needs ``--text-set`` (the class text embeddings give both the head and the partner probabilities)."""

    name = "lfm-stage1"
    defaults = DEFAULTS

    def check(self, cfg: Any) -> None:
        if not cfg.text_set:
            raise ValueError("recipe 'lfm-stage1' needs class text embeddings: --text-set NAME "
                             "(a text_embeddings set of the backbone's text tower, 'a photo of a {class}')")
