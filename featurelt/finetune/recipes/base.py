"""RecipeHooks: FinetuneHooks plus the recipe's option defaults and its checks of the resolved config."""
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

    def apply_defaults(self, cfg: Any, overrides: dict[str, Any] | None = None) -> Any:
        """``cfg`` < the recipe's defaults < ``overrides`` (``*_opts`` dicts merged key by key), in one step
        (a default such as ``head: text`` may need a flag such as ``--text-set`` to be a valid config)."""
        from featurelt.finetune.config import merge

        overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
        changes = {**self.defaults, "recipe": self.name}
        for part in ("loss", "sampler"):  # a flag picking another loss / sampler drops the recipe's options of it
            if part in overrides and overrides[part] != self.defaults.get(part):
                changes.pop(f"{part}_opts", None)
        for k, v in overrides.items():
            if k.endswith("_opts") and isinstance(v, dict) and isinstance(changes.get(k), dict):
                v = {**changes[k], **v}
            changes[k] = v
        return merge(cfg, changes, source=f"recipe '{self.name}'")

    def check(self, cfg: Any) -> None:
        """Refuse a resolved config the recipe cannot run (one line naming the option); none by default."""
        return None

    def configure(self, cfg: Any) -> Any:
        self.check(cfg)
        return cfg
