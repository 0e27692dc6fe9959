"""CLIP encoders through open_clip: ``clip:<model>`` (any ``open_clip.list_models()`` name) and ``clip:tiny``.

Image product ``embedding``: ``model.encode_image(x, normalize=True)``, unit L2 norm, ``embed_dim``
wide -- the feature the zero-shot classifier, the LTGC quality filter (METHODS.md section 4) and the
cosine heads (sections 1, 5, 6) read. Text tower: class text embeddings from prompt templates
(default "a photo of a {}.", METHODS.md sections 5 and 6), ensemble = mean of the unit-norm
template embeddings, renormalised (see :class:`featurelt.encoders.base.TextEncoder`).

Weights: ``checkpoint=FILE`` is passed to ``open_clip.create_model_and_transforms(model,
pretrained=FILE)`` (open_clip's own loader: state-dict conversion, position-embedding resize, strict
load). Without a file, :class:`MissingWeightsError`; ``untrained=True`` builds open_clip's random init
under ``seed``. Preprocessing is open_clip's evaluation transform for the model (``preprocess_cfg``:
size, mean, std, interpolation, resize mode), recorded in the provenance.

``clip:tiny`` is a small seeded random CLIP (open_clip.model.CLIP: embed_dim 64, ViT width 64, 2 layers,
patch 8, image 32; text width 64, 2 layers, 2 heads) with the same code paths; a checkpoint saved from
it (``torch.save(model.state_dict(), f)``) loads through ``open_clip.load_checkpoint``.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Sequence

import torch
from torch import Tensor

from featurelt.encoders.base import Encoder, TextEncoder, resolve_checkpoint, seeded

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,  # joint image-text embedding width
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

HOW_CLIP = ("Download the open_clip weights on a machine with internet (e.g. "
            "`python -c \"import open_clip; open_clip.create_model_and_transforms('ViT-B-32', "
            "pretrained='laion2b_s34b_b79k')\"`, then find open_clip_model.safetensors / *.bin in the "
            "Hugging Face cache) and pass the file with --checkpoint FILE (python: checkpoint=FILE).")


def _open_clip():
    import open_clip

    return open_clip


def _check_model(model: str) -> None:
    models = _open_clip().list_models()
    if model not in models:
        raise KeyError(f"unknown encoder 'clip:{model}': '{model}' is not an open_clip model; available: "
                       f"clip:tiny, " + ", ".join(f"clip:{m}" for m in models))


def clip_products(model: str) -> dict[str, int]:
    cfg = _open_clip().get_model_config(model)
    return {"embedding": int(cfg["embed_dim"])}


def clip_spec(model: str):
    """Registry entry of ``clip:<model>`` (resolved dynamically by ``ENCODERS.get``)."""
    from featurelt.encoders import EncoderSpec

    _check_model(model)
    name = f"clip:{model}"
    return EncoderSpec(
        name, "image", f"open_clip {model}, --checkpoint FILE; unit-norm embedding + text tower", True, "file",
        lambda **kw: build_clip(model, **kw),
        lambda **kw: build_clip_text(model, **kw),
        lambda m: clip_products(model),
    )


def tiny_spec():
    from featurelt.encoders import EncoderSpec

    return EncoderSpec(
        "clip:tiny", "image", "tiny seeded random open_clip CLIP (64-d, image 32) for tests; + text tower",
        False, "file", lambda **kw: build_clip("tiny", **kw), lambda **kw: build_clip_text("tiny", **kw),
        lambda m: {"embedding": TINY_CONFIG["embed_dim"]},
    )


# -- model construction ------------------------------------------------------------------------------
def _tiny_config(image_size: int | None) -> dict[str, Any]:
    cfg = copy.deepcopy(TINY_CONFIG)
    if image_size is not None:
        p = cfg["vision_cfg"]["patch_size"]
        if image_size <= 0 or image_size % p:
            raise ValueError(f"clip:tiny image_size must be a positive multiple of {p}, got {image_size}")
        cfg["vision_cfg"]["image_size"] = int(image_size)
    return cfg


def _load_clip(model: str, *, checkpoint: str | os.PathLike | None, image_size: int | None, seed: int,
               untrained: bool) -> tuple[torch.nn.Module, Any, dict[str, Any], str | None]:
    """Returns (open_clip model, eval transform, architecture dict, resolved checkpoint path or None)."""
    oc = _open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if untrained and checkpoint is not None:
        raise ValueError(f"clip:{model}: pass either checkpoint= or untrained=True, not both")
    if model == "tiny":
        cfg = _tiny_config(image_size)
        with seeded(seed):
            net = oc.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=oc.model.CLIPVisionCfg(**cfg["vision_cfg"]),
                                text_cfg=oc.model.CLIPTextCfg(**cfg["text_cfg"]))
        path = None
        if checkpoint is not None:  # tiny with weights: open_clip's checkpoint loader, strict
            path = resolve_checkpoint("clip:tiny", checkpoint, kind="file", how=HOW_CLIP)
            oc.load_checkpoint(net, str(path), strict=True)
        pp = PreprocessCfg(size=cfg["vision_cfg"]["image_size"])
        transform = image_transform_v2(pp, is_train=False)
        net.visual.preprocess_cfg = _pp_dict(pp)
        arch = {"library": "open_clip", "model": "tiny", "config": cfg}
        return net, transform, arch, None if path is None else str(path)

    _check_model(model)
    if untrained:
        path = None
        with seeded(seed):
            net, _, transform = oc.create_model_and_transforms(model, pretrained=None,
                                                               force_image_size=image_size)
    else:
        path = resolve_checkpoint(f"clip:{model}", checkpoint, kind="file", how=HOW_CLIP)
        net, _, transform = oc.create_model_and_transforms(model, pretrained=str(path),
                                                           force_image_size=image_size)
    cfg = oc.get_model_config(model)
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = int(image_size)
    arch = {"library": "open_clip", "model": model, "config": cfg}
    return net, transform, arch, None if path is None else str(path)


def _pp_dict(pp: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(pp)


def _preprocess_description(net: torch.nn.Module) -> dict[str, Any]:
    cfg = dict(getattr(net.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size")
    if isinstance(size, (tuple, list)):
        size = list(size)
    return {"size": size, "mean": list(cfg.get("mean", ())), "std": list(cfg.get("std", ())),
            "interpolation": cfg.get("interpolation"), "resize_mode": cfg.get("resize_mode"),
            "fill_color": cfg.get("fill_color"), "transform": "open_clip.image_transform_v2(is_train=False)"}


def _image_size(net: torch.nn.Module) -> int:
    size = net.visual.image_size
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square open_clip image size {size} is not supported")
        size = size[0]
    return int(size)


class ClipEncoder(Encoder):
    """open_clip image tower -> unit-norm ``embedding`` [B, embed_dim] (METHODS.md sections 1, 4-6)."""

    family = "clip"
    unit_norm = frozenset({"embedding"})

    def __init__(self, model: str, *, checkpoint: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", image_size: int | None = None, seed: int = 0,
                 untrained: bool = False) -> None:
        net, transform, arch, path = _load_clip(model, checkpoint=checkpoint, image_size=image_size, seed=seed,
                                                untrained=untrained)
        self._arch = arch
        self._pp = _preprocess_description(net)
        dim = int(arch["config"]["embed_dim"])
        super().__init__(f"clip:{model}", products={"embedding": dim}, transform=transform,
                         image_size=_image_size(net), checkpoint=path, trained=path is not None, seed=seed,
                         device=device)
        self._set_model(net)

    def architecture(self) -> dict[str, Any]:
        return copy.deepcopy(self._arch)

    def preprocessing(self) -> dict[str, Any]:
        return dict(self._pp)

    def library_versions(self) -> dict[str, str]:
        return {**super().library_versions(), "open_clip": _open_clip().__version__}

    @torch.inference_mode()
    def encode(self, x: Tensor, *, products: Sequence[str] | None = None) -> dict[str, Tensor]:
        """x: ``[B, 3, S, S]`` preprocessed. Returns ``{"embedding": [B, embed_dim]}`` float32, unit norm."""
        self._select(products)
        x = self._check_input(x)
        emb = self.model.encode_image(x)
        return {"embedding": torch.nn.functional.normalize(emb.float(), dim=-1)}


def build_clip(model: str, *, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               map_size: int = 16, image_size: int | None = None, seed: int = 0,
               untrained: bool = False) -> ClipEncoder:
    """Factory of ``clip:<model>`` / ``clip:tiny`` (``map_size`` unused)."""
    return ClipEncoder(model, checkpoint=checkpoint, device=device, image_size=image_size, seed=seed,
                       untrained=untrained)


class ClipTextEncoder(TextEncoder):
    """open_clip text tower: ``encode_text`` -> unit-norm [N, embed_dim]; class embeddings from templates."""

    family = "clip"

    def __init__(self, model: str, *, checkpoint: str | os.PathLike | None = None,
                 templates: Any = None, device: str | torch.device = "cpu", seed: int = 0,
                 untrained: bool = False) -> None:
        net, _, arch, path = _load_clip(model, checkpoint=checkpoint, image_size=None, seed=seed,
                                        untrained=untrained)
        if hasattr(net, "visual"):
            net.visual = None  # the image tower is not needed for text; frees its memory
        self._arch = arch
        oc = _open_clip()
        if model == "tiny":
            self._tokenizer = oc.SimpleTokenizer(context_length=arch["config"]["text_cfg"]["context_length"])
        else:
            self._tokenizer = oc.get_tokenizer(model)
        super().__init__(f"clip:{model}", dim=int(arch["config"]["embed_dim"]), templates=templates,
                         checkpoint=path, trained=path is not None, seed=seed, device=device)
        net.eval().requires_grad_(False).to(self.device)
        self._model = net

    def architecture(self) -> dict[str, Any]:
        return copy.deepcopy(self._arch)

    def _encode(self, texts: list[str]) -> Tensor:
        tokens = self._tokenizer(texts).to(self.device)
        return self._model.encode_text(tokens)


def build_clip_text(model: str, *, checkpoint: str | os.PathLike | None = None, templates: Any = None,
                    device: str | torch.device = "cpu", seed: int = 0, untrained: bool = False) -> ClipTextEncoder:
    """Factory of the text tower of ``clip:<model>`` / ``clip:tiny``."""
    return ClipTextEncoder(model, checkpoint=checkpoint, templates=templates, device=device, seed=seed,
                           untrained=untrained)
