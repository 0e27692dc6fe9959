"""RecipeHooks: FinetuneHooks plus the recipe's option defaults, its checks, and a hook before evaluation forwards."""
from __future__ import annotations

from typing import Any

from featurelt.finetune.hooks import FinetuneHooks


class RecipeHooks(FinetuneHooks):
    """A recipe's hooks.

    ``defaults``: finetune config fields the recipe sets. They are applied by :meth:`apply_defaults` where the
    command resolves the config (defaults < --config < recipe < command-line flags), so a flag still wins;
    ``configure`` only checks the resolved config (:meth:`check`).
    """

    name: str = ""
    defaults: dict[str, Any] = {}

    def apply_defaults(self, cfg: Any) -> Any:
        """``cfg`` with the recipe's defaults (``*_opts`` dicts merged key by key) and ``recipe`` = the name."""
        from featurelt.finetune.config import merge

        return merge(cfg, {**self.defaults, "recipe": self.name}, source=f"recipe '{self.name}'")

    def check(self, cfg: Any) -> None:
        """Refuse a resolved config the recipe cannot run (one line naming the option); none by default."""
        return None

    def configure(self, cfg: Any) -> Any:
        self.check(cfg)
        return cfg

    def before_forward(self, images: Any, batch: Any, ctx: Any) -> None:
        """Called before each evaluation / export forward (``batch``: the loader batch; no-op by default)."""
        return None
