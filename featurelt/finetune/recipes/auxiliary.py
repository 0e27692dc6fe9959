"""Recipe ``auxiliary`` (seed 001, METHODS.md section 3): fine-tune on target + kept auxiliary classes with NS-CE.

What the recipe fixes (the engine does the rest, as ``train-head`` does on cached features):
- train rows: split ``train``, original and auxiliary rows (images ``filter-auxiliary`` rejected sit in split
  ``filtered`` and are never read);
- loss ``ns-ce`` (lambda_s 0.1; with lambda_s = 1 it is balanced softmax exactly);
- sampler ``instance`` with the auxiliary rules of :mod:`featurelt.samplers`: at most ``aux_cap`` = 50
  samples of an auxiliary class per epoch and the neighbor-ratio rule (head : medium : tail targets expose
  1 : ceil(N_h/N_m) : ceil(N_h/N_t) neighbor classes);
- evaluation on the K target columns only (the paper's "mask"; the engine scores target classes only).
"""
from __future__ import annotations

from typing import Any

from featurelt.finetune.recipes.base import RecipeHooks

DEFAULTS: dict[str, Any] = {
    "loss": "ns-ce",                       # METHODS.md section 3
    "loss_opts": {"lambda_s": 0.1},        # weight of a silenced (auxiliary, neighbor) pair
    "sampler": "instance",
    "aux_cap": 50,                         # auxiliary samples per class per epoch (paper: 50)
}


class AuxiliaryHooks(RecipeHooks):
    """Refuses a store without auxiliary classes (the recipe would silently be balanced softmax)."""

    name = "auxiliary"
    defaults = DEFAULTS

    def wrap_model(self, model: Any, ctx: Any) -> Any:
        k = len(ctx.class_counts)
        if ctx.num_target == k or not (ctx.train.source == "auxiliary").any():
            raise ValueError("recipe 'auxiliary' needs auxiliary classes with train rows: run `featurelt neighbors`, "
                             "ingest their images with --source auxiliary and `filter-auxiliary` first")
        return model
