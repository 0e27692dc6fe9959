"""RecipeHooks: FinetuneHooks plus the recipe's option defaults and a hook before evaluation / export forwards."""
from __future__ import annotations

from typing import Any

from featurelt.finetune.hooks import FinetuneHooks


class RecipeHooks(FinetuneHooks):
    """A recipe's hooks. ``defaults``: finetune config fields the recipe sets (``configure``); the command
    line still overrides them (config order: defaults < --config < recipe < CLI flags)."""

    name: str = ""
    defaults: dict[str, Any] = {}

    def configure(self, cfg: Any) -> Any:
        return cfg.replace(**self.defaults)

    def before_forward(self, images: Any, batch: Any, ctx: Any) -> None:
        """Called before each evaluation / export forward (``batch``: the loader batch; no-op by default)."""
        return None
