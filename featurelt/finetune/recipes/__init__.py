"""The seeds' backbone stages as ``featurelt finetune --recipe NAME`` presets (registry ``RECIPES``).

A :class:`Recipe` is a set of finetune option defaults (applied where the user left an option at its
default) plus a :class:`featurelt.finetune.hooks.FinetuneHooks` subclass holding what the method adds to
the generic loop, and the ``train-head`` options of the seed's second stage. One file per recipe:

=============  ====  ========================================================================================
sam-fusion     000   SAM PCA map fused into a ResNet stage (``sam_fusion.py``, METHODS.md section 2)
auxiliary      001   target + auxiliary classes, NS-CE, caps, masked evaluation (``auxiliary.py``, section 3)
ltgc-lora      002   LoRA on the CLIP image tower + BalanceMix on pixels (``ltgc_lora.py``, section 4)
ecvl-stage1    003   image-text InfoNCE + momentum-driven RandAugment (``ecvl_stage1.py``, section 5)
lfm-stage1     004   image tower end to end with LFM pixel mixup, cosine to text (``lfm_stage1.py``, section 6)
=============  ====  ========================================================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from featurelt._registry import Registry
from featurelt.finetune.hooks import FinetuneHooks
from featurelt.finetune.recipes import auxiliary, ecvl_stage1, lfm_stage1, ltgc_lora, sam_fusion


@dataclass(frozen=True)
class Recipe:
    """One seed's backbone stage.

    name: registry name (``--recipe``). seed: the seed paper's number. section: METHODS.md section.
    summary: one line for ``featurelt recipes``. defaults: finetune options the recipe fixes (config field ->
    value; the command line overrides them). hooks: factory ``hooks(**recipe_opts) -> FinetuneHooks``. stage2: ``train-head`` options of
    the seed's second stage on the exported set. needs: what the store must hold first.
    """

    name: str
    seed: str
    section: int
    summary: str
    defaults: dict[str, Any]
    hooks: Callable[..., FinetuneHooks]
    stage2: tuple[str, ...] = ()
    needs: str = ""

    def build_hooks(self, *, store: Any = None, **opts: Any) -> FinetuneHooks:
        """The recipe's hooks with ``opts`` (``--recipe-opt``); ``store`` (Store or root) goes to the recipes
        that read it themselves (``sam-fusion``: the PCA maps)."""
        import inspect

        if "store" in inspect.signature(self.hooks).parameters:
            opts["store"] = store
        try:
            return self.hooks(**opts)
        except TypeError as exc:
            raise TypeError(f"recipe '{self.name}': {exc}") from None


RECIPES: Registry[Recipe] = Registry("recipe")

_ALL = (
    Recipe("sam-fusion", "000", 2, "SAM PCA map fused into ResNet stage --fuse-stage (F_conv * F + F)",
           sam_fusion.DEFAULTS, sam_fusion.SamFusionHooks, ("--head", "linear"),
           "a sam_*_pca_map embedding set (extract sam:... --products pca_map); a timm: ResNet backbone"),
    Recipe("auxiliary", "001", 3, "target + auxiliary neighbor classes, ns-ce, <= 50 aux/class/epoch, masked eval",
           auxiliary.DEFAULTS, auxiliary.AuxiliaryHooks, ("--head", "linear", "--loss", "ns-ce"),
           "auxiliary classes (neighbors + filter-auxiliary)"),
    Recipe("ltgc-lora", "002", 4, "LoRA on the CLIP image tower, BalanceMix of original x generated pixels",
           ltgc_lora.DEFAULTS, ltgc_lora.LTGCLoraHooks, ("--head", "linear", "--sampler", "balancemix"),
           "generated images that passed filter-generated; a clip: backbone"),
    Recipe("ecvl-stage1", "003", 5, "image-text InfoNCE (L_v->l + L_l->v) + momentum-driven RandAugment",
           ecvl_stage1.DEFAULTS, ecvl_stage1.ECVLStage1Hooks,
           ("--head", "adapter", "--loss", "contrastive-vl", "--sampler", "class-balanced"),
           "class text embeddings 'A photo of a {class}' of the backbone's text tower (--text-set)"),
    Recipe("lfm-stage1", "004", 6, "image tower end to end, LFM local sampling + label shift on pixels, cosine to text",
           lfm_stage1.DEFAULTS, lfm_stage1.LFMStage1Hooks, ("--head", "lfm-projection", "--optimizer", "adam",
                                                            "--lr", "0.01", "--epochs", "10"),
           "class text embeddings (--text-set)"),
)
for _r in _ALL:
    RECIPES.register(_r.name, help=_r.summary)(_r)


def get_recipe(name: str) -> Recipe:
    """``RECIPES.get(name)``; an unknown name lists the recipes."""
    return RECIPES.get(name)


def resolve(name: str, base: Any, overrides: dict[str, Any], *, opts: dict[str, Any] | None = None,
            store: Any = None) -> tuple[Any, FinetuneHooks]:
    """(config, hooks) of ``--recipe name``: ``base`` (defaults or --config) < the recipe's defaults <
    ``overrides`` (command-line flags); ``opts`` (``--recipe-opt``) build the hooks and are kept in the
    config (``recipe_opts``) so that a resumed or distributed run rebuilds the same hooks (:func:`hooks_for`)."""
    opts = dict(opts or {})
    hooks = get_recipe(name).build_hooks(store=store, **opts)
    cfg = hooks.apply_defaults(base, {**overrides, "recipe_opts": opts})  # type: ignore[attr-defined]
    return cfg, hooks


def hooks_for(cfg: Any, store: Any) -> FinetuneHooks | None:
    """The hooks of a resolved config's recipe (``cfg.recipe``, ``cfg.recipe_opts``), or None without one."""
    if not getattr(cfg, "recipe", None):
        return None
    return get_recipe(cfg.recipe).build_hooks(store=store, **dict(cfg.recipe_opts))


__all__ = ["RECIPES", "Recipe", "get_recipe", "resolve", "hooks_for"]
