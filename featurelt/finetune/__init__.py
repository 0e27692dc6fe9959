"""Backbone fine-tuning from the store (``featurelt finetune``): config, backbones, adaptation, model, data, loop.

Public API: :func:`finetune` (``featurelt.finetune.train``), :class:`FinetuneCfg`, :class:`FinetuneHooks` (the
recipes' extension points), :class:`FinetuneResult`, :func:`build_backbone`, :func:`apply_adapt`.
Modules: ``config`` (FinetuneCfg), ``backbones`` (timm / clip / dinov2 / sam trainable backbones), ``adapt``
(full | lora | last-n | ln | bias | frozen), ``model`` (backbone + linear | cosine | text head), ``data`` (split
rows, epoch plans, rank shares, loaders over StoreImageLoader), ``hooks`` (FinetuneHooks), ``train`` (the loop),
``checkpoint`` (atomic checkpoints, resume), ``runs`` (finetune_runs rows, the finishing transaction),
``export`` (``emb_ft_<run_id>``), ``launch`` (torchrun / Ray Train).
"""
from __future__ import annotations

from featurelt.finetune.config import FinetuneCfg
from featurelt.finetune.hooks import FinetuneHooks, HookContext

__all__ = ["FinetuneCfg", "FinetuneHooks", "HookContext", "finetune", "FinetuneResult", "build_backbone",
           "apply_adapt"]


def __getattr__(name: str):  # torch-heavy parts load on first use
    if name in ("finetune", "FinetuneResult"):
        from featurelt.finetune import train

        return getattr(train, name)
    if name == "build_backbone":
        from featurelt.finetune.backbones import build_backbone

        return build_backbone
    if name == "apply_adapt":
        from featurelt.finetune.adapt import apply_adapt

        return apply_adapt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
