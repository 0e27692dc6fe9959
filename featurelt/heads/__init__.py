"""Heads trained on cached features: ``HEADS`` registry, one family per file.

Every head is built as ``HEADS.get(name)(ctx, **opts)`` from a :class:`HeadContext` and keyword
options, and is an ``nn.Module`` with

- ``forward(x: Tensor[B, D_total]) -> Tensor[B, K]`` logits over all K classes (target + auxiliary;
  evaluation keeps the first K_target columns, METHODS.md section 3);
- ``features(x: Tensor[B, D_total]) -> Tensor[B, D_latent]``: the latent the classifier reads (what the
  prototype losses of section 2 pull together).

Families: ``linear.py`` (linear, mlp), ``text.py`` (cosine, adapter, lfm-projection: classifiers over
class text embeddings, sections 1, 5, 6), ``fusion.py`` (self-attention over cached sources, section 2),
``neighbors.py`` (ncm, knn: fitted in one pass over the train features instead of trained, section 1).
"""
from __future__ import annotations

from featurelt.heads.base import HEADS, Head, HeadContext
from featurelt.heads import fusion, linear, neighbors, text  # noqa: F401  (register the heads)

__all__ = ["HEADS", "Head", "HeadContext"]
