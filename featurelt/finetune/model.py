"""Backbone + head: ``FinetuneModel`` (linear | cosine | text head) and its layer map for layer-wise lr decay.

Heads on the pooled feature f = backbone(x) [B, D]:

* ``linear`` -- ``W f + b``;
* ``cosine`` -- ``s * cos(f, w_k)`` with learned rows w_k (METHODS.md section 1's cosine classifier);
* ``text``   -- ``s * cos(f, t_k)`` with the fixed class text embeddings t_k of ``--text-set`` (the LFM / ECVL
  form, sections 5 and 6); no parameters. A recipe may set ``text_tower`` (a module returning [K, D] class text
  embeddings, e.g. ECVL's trained CLIP text tower): the text head then uses its output instead of the fixed rows.

``group_matcher`` gives timm's optimizer factory (``param_groups_layer_decay``) the layer of each
parameter: the backbone's layer groups in depth order, the head last.
"""
from __future__ import annotations

from typing import Callable


import torch.nn.functional as F
from torch import Tensor, nn

from featurelt.finetune.backbones import Backbone


class FinetuneModel(nn.Module):
    """``forward(x) -> logits [B, K]``; ``features(x) -> [B, D]`` (the exported vector)."""

    def __init__(self, backbone: Backbone, num_classes: int, *, head: str = "linear", scale: float = 16.0,
                 text: Tensor | None = None) -> None:
        super().__init__()
        self.backbone = backbone.module
        self.head_kind = head
        self.scale = float(scale)
        d = backbone.feature_dim
        if head == "linear":
            self.head = nn.Linear(d, num_classes)
        elif head == "cosine":
            self.head = nn.Linear(d, num_classes, bias=False)
        elif head == "text":
            if text is None:
                raise ValueError("--head text needs class text embeddings (--text-set)")
            if tuple(text.shape) != (num_classes, d):
                raise ValueError(f"--head text: the text set has shape {tuple(text.shape)}, the backbone needs "
                                 f"[{num_classes}, {d}] (one row per class, the backbone's feature dim)")
            self.head = nn.Identity()
            self.register_buffer("text", F.normalize(text.float(), dim=1))
        else:
            raise ValueError(f"unknown --head '{head}'; choose from linear, cosine, text")
        self.text_tower: nn.Module | None = None  # text head: trained class text embeddings () -> [K, D]
        self._layers = {n: i for i, layer in enumerate(backbone.layers) for n in layer}
        self._modules_layer = {n.rsplit(".", 1)[0]: i for n, i in self._layers.items()}
        self.num_layers = len(backbone.layers) + 1  # + the head

    def features(self, x: Tensor) -> Tensor:
        """x: [B, 3, S, S] normalised. Returns the pooled feature [B, D]."""
        return self.backbone(x)

    def classify(self, f: Tensor) -> Tensor:
        """f: [B, D]. Returns logits [B, K]."""
        if self.head_kind == "linear":
            return self.head(f)
        if self.head_kind == "text":
            w = self.text if self.text_tower is None else self.text_tower()
        else:
            w = self.head.weight
        return self.scale * F.normalize(f.float(), dim=1) @ F.normalize(w.float(), dim=1).T

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))

    def layer_of(self, name: str) -> int:
        """Layer index of parameter ``name`` of this model (head: the last)."""
        if not name.startswith("backbone."):
            return self.num_layers - 1
        n = name[len("backbone."):].replace(".base_layer", "")
        if n in self._layers:
            return self._layers[n]
        prefix = n.split(".lora_", 1)[0] if ".lora_" in n else n.rsplit(".", 1)[0]
        while prefix:
            if prefix in self._modules_layer:
                return self._modules_layer[prefix]
            prefix = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        return 0

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int]]:
        """timm's hook for layer-wise lr decay: parameter name -> (layer index,)."""
        return lambda name: (self.layer_of(name),)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


__all__ = ["FinetuneModel", "count_parameters"]
