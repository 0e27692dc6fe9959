"""Trainable backbones: ``build_backbone(name, ...) -> Backbone`` for timm, clip, dinov2 and sam names.

A :class:`Backbone` is the module that maps a normalised image batch ``[B, 3, S, S]`` to a pooled
feature ``[B, D]``, with what training needs to know about it: the evaluation transform its authors use
(timm's ``pretrained_cfg`` / open_clip's preprocess config / the DINOv2 and SAM transforms of
``featurelt.encoders``), mean and std, its parameters grouped into layers in depth order (for
``--adapt last-n`` and ``--layer-decay``), the default LoRA target modules and its provenance.

Families (weights: ``checkpoint``, else ``pretrained`` / the family's rule, ``pretrained="none"`` random init):

* ``timm:<name>``  -- :func:`featurelt.encoders.timm.create_timm_model` (num_classes=0, pooled ``forward``);
  layers from timm's ``group_matcher(coarse=True)`` (stem, stages / blocks; the final norm joins the last);
* ``clip:<model>`` / ``clip:tiny`` -- open_clip's image tower ``model.visual`` (projected embedding, not
  normalised); layers: stem (conv1, class / position embeddings, ln_pre), ``transformer.resblocks.i``, the rest;
* ``dinov2:<size>`` / ``dinov2:tiny`` -- transformers ``Dinov2Model``, feature = CLS token of
  ``last_hidden_state`` (the ``cls`` product of extract); layers ``encoder.layer.i``;
* ``sam:<variant>`` / ``sam:tiny`` -- segment-anything ``ImageEncoderViT`` (neck included), feature = mean of the
  neck map over positions (the ``latent`` product); layers ``blocks.i``.

The feature of a backbone built from the same weights equals the extract product named above.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

FAMILIES = ("timm", "clip", "dinov2", "sam")

# default LoRA targets per family (Linear / Conv2d module-name suffixes, peft's target_modules)
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "timm-vit": ("qkv", "proj", "fc1", "fc2"),      # timm ViTs: attention qkv / proj, MLP fc1 / fc2
    "timm-cnn": ("conv1", "conv2", "conv3"),         # timm ResNets: the block convolutions (and the stem conv1)
    "clip": ("c_fc", "c_proj"),                      # open_clip: the MLP Linears (``attn`` opt-in: see adapt.py)
    "dinov2": ("query", "key", "value", "dense", "fc1", "fc2"),
    "sam": ("qkv", "proj", "lin1", "lin2"),
}


@dataclass
class Backbone:
    """A trainable image backbone and what training needs to know about it (module docstring)."""

    name: str                         # e.g. "timm:resnet50", "clip:tiny"
    family: str                       # timm | clip | dinov2 | sam
    module: nn.Module                 # forward(x [B, 3, S, S] normalised) -> [B, feature_dim]
    feature_dim: int                  # D of the pooled feature
    image_size: int                   # S, input side in pixels
    mean: tuple[float, float, float]  # per-channel mean on the [0, 1] scale (normalisation on the device)
    std: tuple[float, float, float]   # per-channel std on the [0, 1] scale
    transform: Any                    # evaluation transform PIL -> float [3, S, S] (split by images.split_transform)
    layers: list[list[str]]           # parameter names of ``module`` per layer group, stem first
    lora_targets: tuple[str, ...]     # default peft target_modules
    provenance: dict[str, Any] = field(default_factory=dict)  # architecture, weights (checkpoint sha256, tag), preprocessing


class _ClipVisual(nn.Module):
    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: Tensor) -> Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out


class _Dinov2Cls(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(pixel_values=x).last_hidden_state[:, 0]


class _SamPooled(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x).mean(dim=(2, 3))


def regex_layers(module: nn.Module, block: str) -> list[list[str]]:
    """Parameter names of ``module`` in layers: those before the first ``block`` match (stem), one layer
    per block index, and the ones after the last block joined to it. ``block``: regex with one group, the index."""
    pattern = re.compile(block)
    stem: list[str] = []
    blocks: dict[int, list[str]] = {}
    tail: list[str] = []
    for name, _ in module.named_parameters():
        m = pattern.match(name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(name)
        elif not blocks:
            stem.append(name)
        else:
            tail.append(name)
    layers = [stem] + [blocks[i] for i in sorted(blocks)]
    layers[-1] = layers[-1] + tail
    return [layer for layer in layers if layer]


def _timm_layers(model: nn.Module) -> list[list[str]]:
    from timm.models import group_parameters

    if hasattr(model, "group_matcher"):
        groups = group_parameters(model, model.group_matcher(coarse=True))
        return [list(v) for _, v in sorted(groups.items())]
    return [[n for n, _ in model.named_parameters()]]


def _split_name(name: str) -> tuple[str, str]:
    if ":" not in name:
        raise KeyError(f"unknown backbone '{name}': use FAMILY:MODEL with FAMILY one of {', '.join(FAMILIES)} "
                       f"(e.g. timm:resnet50, clip:ViT-B-32, dinov2:base, sam:vit_b; tests: timm:test_resnet, clip:tiny)")
    family, model = name.split(":", 1)
    if family not in FAMILIES:
        raise KeyError(f"unknown backbone family '{family}' in '{name}'; families: {', '.join(FAMILIES)}")
    return family, model


def build_backbone(name: str, *, pretrained: str | None = None, checkpoint: str | None = None,
                   image_size: int | None = None, seed: int = 0) -> Backbone:
    """Build the trainable backbone ``name`` (module docstring). ``pretrained="none"``: random init (tiny models
    are random init already); image_size: input side (None: the model's own)."""
    family, model = _split_name(name)
    if pretrained is not None and pretrained.lower() == "default":
        pretrained = None
    untrained = pretrained is not None and pretrained.lower() == "none"
    if family == "timm":
        from featurelt.encoders.timm import create_timm_model, describe_data_config, timm_transform

        built = create_timm_model(model, pretrained=pretrained, checkpoint=checkpoint, image_size=image_size,
                                  seed=seed, untrained=untrained)
        net, data = built.model, built.data_config
        vit = any(n.startswith("blocks.") for n, _ in net.named_parameters())
        prov = {"backbone": name, "family": family,
                "architecture": {"library": "timm", "model": model, "num_features": int(net.num_features)},
                "checkpoint": built.checkpoint, "checkpoint_sha256": built.checkpoint_sha256,
                "pretrained_tag": built.pretrained_tag, "trained": built.trained,
                "seed": None if built.trained else seed, "preprocessing": describe_data_config(data)}
        return Backbone(name, family, net, int(net.num_features), int(data["input_size"][-1]),
                        tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
                        timm_transform(data), _timm_layers(net),
                        LORA_TARGETS["timm-vit" if vit else "timm-cnn"], prov)
    # the project's encoders: build the frozen encoder, then train its module
    from featurelt.encoders import build_encoder
    from featurelt.images.transforms import split_transform

    enc = build_encoder(name, checkpoint=checkpoint, image_size=image_size, seed=seed,
                        untrained=untrained and not model == "tiny",
                        pretrained=None if untrained or pretrained is None else pretrained)
    net = enc.model
    assert net is not None
    if family == "clip":
        module: nn.Module = _ClipVisual(net.visual)
        layers = regex_layers(module, r"^visual\.transformer\.resblocks\.(\d+)\.")
        dim = enc.products["embedding"]
    elif family == "dinov2":
        module = _Dinov2Cls(net)
        layers = regex_layers(module, r"^net\.encoder\.layer\.(\d+)\.")
        dim = enc.products["cls"]
    else:
        module = _SamPooled(net)
        layers = regex_layers(module, r"^encoder\.blocks\.(\d+)\.")
        dim = enc.products["latent"]
    module.requires_grad_(True)
    module.train()
    stages = split_transform(enc.transform)
    if stages is None:
        raise ValueError(f"backbone {name}: its transform cannot be split into worker and device stages")
    prov = {k: v for k, v in enc.provenance().items() if k not in ("products", "unit_norm", "fit", "product_details")}
    prov["backbone"] = name
    return Backbone(name, family, module, int(dim), int(enc.image_size), tuple(stages[1].mean), tuple(stages[1].std),  # type: ignore[arg-type]
                    enc.transform, layers, LORA_TARGETS[family], prov)


__all__ = ["Backbone", "build_backbone", "regex_layers", "LORA_TARGETS", "FAMILIES"]
