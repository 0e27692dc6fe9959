"""Recipe ``ltgc-lora`` (seed 002, METHODS.md section 4): LoRA on the CLIP image tower with BalanceMix on pixels.

What the recipe fixes: ``--adapt lora`` (peft on the image tower's attention and MLP projections; only the
LoRA matrices and the head train), sampler ``balancemix``: per pair ``x_i`` drawn class-balanced from the
original train rows, ``x_j`` uniformly from the generated train rows, one ``lambda ~ Beta(a, a)`` per pair,
``x~ = lambda x_i + (1 - lambda) x_j`` on the pixels and the same lambda on the one-hot labels (the engine
mixes the pair on the device). Generated images that ``filter-generated`` rejected sit in split
``filtered`` and are never drawn.
"""
from __future__ import annotations

from typing import Any

from featurelt.finetune.recipes.base import RecipeHooks

DEFAULTS: dict[str, Any] = {
    "adapt": "lora",           # peft LoRA on the CLIP image tower; the head trains too
    "head": "linear",
    "loss": "ce",              # on the mixed one-hot targets
    "sampler": "balancemix",
    "sampler_opts": {"a": 1.0},  # lambda ~ Beta(a, a); a = 1: uniform
    "optimizer": "adamw",
    "lr": 1e-4,
}


class LTGCLoraHooks(RecipeHooks):
    """Checks the backbone (a ``clip:`` image tower) and that generated train rows exist."""

    name = "ltgc-lora"
    defaults = DEFAULTS

    def check(self, cfg: Any) -> None:
        if not str(cfg.backbone).startswith("clip:"):
            raise ValueError(f"recipe 'ltgc-lora' fine-tunes a CLIP image tower: --backbone clip:<model>, got {cfg.backbone!r}")

    def wrap_model(self, model: Any, ctx: Any) -> Any:
        if not (ctx.train.source == "generated").any():
            raise ValueError("recipe 'ltgc-lora' needs generated train images (ingest --source generated, then "
                             "filter-generated); the train split has none")
        return model
