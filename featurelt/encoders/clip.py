"""CLIP encoders through open_clip: ``clip:<model>`` (``open_clip.list_models()``), ``clip:hf-hub:ORG/NAME``, ``clip:tiny``.

Image product ``embedding``: ``model.encode_image(x, normalize=True)``, unit L2 norm, ``embed_dim``
wide -- the feature the zero-shot classifier, the LTGC quality filter (METHODS.md section 4) and the
cosine heads (sections 1, 5, 6) read. Text tower: class text embeddings from prompt templates
(default "a photo of a {}.", METHODS.md sections 5 and 6), ensemble = mean of the unit-norm
template embeddings, renormalised (see :class:`featurelt.encoders.base.TextEncoder`).

Weights and configs (METHODS.md section 1 reads the same features whichever way they arrive):

* ``pretrained=TAG`` (``--pretrained``): open_clip's pretrained tag (``open_clip.list_pretrained()``),
  whose config decides the activation (QuickGELU for OpenAI's weights) and the preprocessing (mean /
  std, resize mode, interpolation), exactly as ``open_clip.create_model_and_transforms(model,
  pretrained=TAG, force_quick_gelu=<tag's quick_gelu>)`` builds it (open_clip itself only warns on a
  QuickGELU mismatch). Weights: ``checkpoint=FILE`` when given, else the local Hugging Face / open_clip
  cache (``local_files_only``), else downloaded (:mod:`featurelt.encoders.hub`, offline per call).
* ``checkpoint=FILE`` alone: when the model's tags all build it the same way, that way; when they
  disagree (``ViT-B-32``: ``openai`` is QuickGELU, ``laion2b_s34b_b79k`` is not) a ``ValueError``
  lists the tags and asks for ``pretrained=``. A model without tags uses its config's defaults.
* ``clip:hf-hub:ORG/NAME``: ``open_clip_config.json`` (model and preprocessing config) and
  ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin`` of that hub repo, from the cache or
  the hub; ``checkpoint=`` a local folder of that layout, or a weights file (config from the hub).
* ``untrained=True``: open_clip's random init under ``seed`` (with the tag's config when given).

The tag is recorded in the provenance (``pretrained``), so it is part of every fingerprint; the weights
file's sha256 too. Preprocessing is open_clip's evaluation transform of the resulting
``preprocess_cfg`` (size, mean, std, interpolation, resize mode), recorded in the provenance.

``clip:tiny`` is a small seeded random CLIP (open_clip.model.CLIP: embed_dim 64, ViT width 64, 2 layers,
patch 8, image 32; text width 64, 2 layers, 2 heads) with the same code paths; a checkpoint saved from
it (``torch.save(model.state_dict(), f)``) loads through ``open_clip.load_checkpoint``.
"""
from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from featurelt.encoders.base import Encoder, MissingWeightsError, TextEncoder, resolve_checkpoint, seeded

HUB_PREFIX = "hf-hub:"  # clip:hf-hub:ORG/NAME: an open_clip model on the Hugging Face hub

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
    if model.startswith(HUB_PREFIX):
        repo = model[len(HUB_PREFIX):]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise KeyError(f"unknown encoder 'clip:{model}': a hub id is clip:hf-hub:ORG/NAME")
        return
    models = _open_clip().list_models()
    if model not in models:
        raise KeyError(f"unknown encoder 'clip:{model}': '{model}' is not an open_clip model; available: "
                       f"clip:tiny, clip:hf-hub:ORG/NAME, " + ", ".join(f"clip:{m}" for m in models))


def clip_products(model: str) -> dict[str, int]:
    if model.startswith(HUB_PREFIX):  # the hub config (cache first, then the network)
        from featurelt.encoders import hub

        repo = model[len(HUB_PREFIX):]
        cfg = json.loads(Path(hub.hub_file(f"clip:{model}", repo, ["open_clip_config.json"])).read_text())
        return {"embedding": int(cfg["model_cfg"]["embed_dim"])}
    cfg = _open_clip().get_model_config(model)
    return {"embedding": int(cfg["embed_dim"])}


def clip_spec(model: str):
    """Registry entry of ``clip:<model>`` (resolved dynamically by ``ENCODERS.get``)."""
    from featurelt.encoders import EncoderSpec

    _check_model(model)
    name = f"clip:{model}"
    how = ("hub id: config + weights from the local Hugging Face cache or the hub, or --checkpoint DIR|FILE"
           if model.startswith(HUB_PREFIX) else "--pretrained TAG and/or --checkpoint FILE")
    return EncoderSpec(
        name, "image", f"open_clip {model}, {how}; unit-norm embedding + text tower", True, "file",
        lambda **kw: build_clip(model, **kw),
        lambda **kw: build_clip_text(model, **kw),
        lambda m: clip_products(model), takes_pretrained=not model.startswith(HUB_PREFIX),
    )


def tiny_spec():
    from featurelt.encoders import EncoderSpec

    return EncoderSpec(
        "clip:tiny", "image", "tiny seeded random open_clip CLIP (64-d, image 32) for tests; + text tower",
        False, "file", lambda **kw: build_clip("tiny", **kw), lambda **kw: build_clip_text("tiny", **kw),
        lambda m: {"embedding": TINY_CONFIG["embed_dim"]},
    )


# -- model construction ------------------------------------------------------------------------------
def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (OpenAI's original CLIP ``.pt`` files): torch.load refuses them
    with ``weights_only=True`` and hands them to ``torch.jit.load``; every other file keeps the safe
    weights-only load."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _tiny_config(image_size: int | None) -> dict[str, Any]:
    cfg = copy.deepcopy(TINY_CONFIG)
    if image_size is not None:
        p = cfg["vision_cfg"]["patch_size"]
        if image_size <= 0 or image_size % p:
            raise ValueError(f"clip:tiny image_size must be a positive multiple of {p}, got {image_size}")
        cfg["vision_cfg"]["image_size"] = int(image_size)
    return cfg


@dataclass
class LoadedClip:
    """What :func:`_load_clip` built: the model, its eval transform and what to record."""

    net: torch.nn.Module
    transform: Any
    arch: dict[str, Any]
    path: str | None  # weights file (checkpoint sha256 is taken of it); None for random weights
    pretrained: str | None  # open_clip tag whose config was used (None: a bare file / hub id / random)
    tokenizer_name: str  # what open_clip.get_tokenizer takes ('local-dir:...' for hub ids)


def _tag_variant(model: str, cfg: dict[str, Any]) -> tuple[Any, ...]:
    """(quick_gelu, mean, std, interpolation, resize_mode, fill_color) a tag builds ``model`` with."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    mcfg = _open_clip().get_model_config(model) or {}
    pp = merge_preprocess_dict(PreprocessCfg(), cfg)
    return (bool(mcfg.get("quick_gelu", False) or cfg.get("quick_gelu", False)), tuple(pp["mean"]),
            tuple(pp["std"]), pp["interpolation"], pp["resize_mode"], pp["fill_color"])


def _describe_variant(v: tuple[Any, ...]) -> str:
    qg, mean, std, interp, mode, _ = v
    return (f"{'QuickGELU' if qg else 'GELU'}, mean {list(mean)}, std {list(std)}, {interp}, "
            f"resize {mode}")


def open_clip_tags(model: str) -> list[str]:
    """open_clip's pretrained tags of ``model``, in open_clip's order."""
    return list(_open_clip().list_pretrained_tags_by_model(model))


def tag_variants(model: str) -> dict[tuple[Any, ...], list[str]]:
    """variant (see :func:`_tag_variant`) -> open_clip pretrained tags of ``model`` that use it."""
    from open_clip.pretrained import get_pretrained_cfg

    out: dict[tuple[Any, ...], list[str]] = {}
    for tag in _open_clip().list_pretrained_tags_by_model(model):
        out.setdefault(_tag_variant(model, get_pretrained_cfg(model, tag)), []).append(tag)
    return out


def tag_config(model: str, tag: str) -> dict[str, Any]:
    """open_clip's pretrained config of (``model``, ``tag``); ValueError listing the tags when unknown."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model, tag)
    if not cfg:
        tags = _open_clip().list_pretrained_tags_by_model(model)
        raise ValueError(f"clip:{model}: unknown pretrained tag '{tag}'; tags of {model}: "
                         f"{', '.join(tags) if tags else '(none: pass --checkpoint FILE alone)'}")
    return cfg


def _bare_file_variant(model: str, tag: str | None) -> tuple[tuple[Any, ...] | None, str | None]:
    """The variant a file is built with: the tag's; else the one all tags share; else refuse."""
    if tag is not None:
        return _tag_variant(model, tag_config(model, tag)), tag
    variants = tag_variants(model)
    if len(variants) > 1:
        listing = "; ".join(f"{', '.join(tags)}: {_describe_variant(v)}" for v, tags in variants.items())
        raise ValueError(f"clip:{model}: its pretrained tags disagree on activation or preprocessing, so a "
                         f"bare --checkpoint file is ambiguous: pass --pretrained TAG (python: pretrained=TAG) "
                         f"naming the tag the file was trained as. Tags: {listing}")
    return (next(iter(variants)) if variants else None), None


def _tag_weights(model: str, tag: str, cfg: dict[str, Any]) -> str:
    """Weights of a pretrained tag: the local cache when there, else downloaded (featurelt.encoders.hub)."""
    from featurelt.encoders import hub

    how = f"(tag {tag}: " + (f"hub {cfg['hf_hub']}" if cfg.get("hf_hub") else f"url {cfg.get('url')}") + ")"
    if cfg.get("file"):
        return str(cfg["file"])
    hub_names: tuple[str, list[str]] | None = None
    if cfg.get("hf_hub"):
        hf = str(cfg["hf_hub"])  # 'org/name/' (default file names) or 'org/name/file.bin'
        repo, fn = (hf[:-1], "") if hf.endswith("/") else os.path.split(hf)
        hub_names = (repo, [HF_SAFE, HF_BIN] if not fn else _safe_alternatives(fn) + [fn])
    url = cfg.get("url") or None
    # either cache first (a file open_clip once fetched by URL counts), then the network, hub preferred
    if hub_names is not None:
        for fn in hub_names[1]:
            if (path := hub.cached_file(hub_names[0], fn)) is not None:
                return path
    if url is not None and (cached := hub.cached_url_file(url)) is not None:
        return cached
    if hub_names is not None:
        return hub.hub_file(f"clip:{model}", hub_names[0], hub_names[1], how=how)
    if url is not None:
        return hub.url_file(f"clip:{model}", url, how=how)
    raise ValueError(f"clip:{model}: tag '{tag}' names no hub repo or url; pass --checkpoint FILE")


HF_SAFE, HF_BIN = "open_clip_model.safetensors", "open_clip_pytorch_model.bin"


def _safe_alternatives(fn: str) -> list[str]:
    if fn == HF_BIN:
        return [HF_SAFE]
    return [fn[:-4] + ".safetensors"] if fn.endswith((".bin", ".pth")) else []


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" log line while a model is
    created to be loaded right after (it would tell the user the opposite of what happens)."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("No pretrained weights loaded")

    drop, root = _Drop(), logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _hub_clip(repo: str, *, checkpoint: str | os.PathLike | None, image_size: int | None, seed: int,
              untrained: bool) -> LoadedClip:
    """``clip:hf-hub:ORG/NAME``: open_clip_config.json (+ weights) from the cache or the hub, or
    ``checkpoint`` = a local folder of that layout / a weights file."""
    oc = _open_clip()
    from featurelt.encoders import hub

    name = f"clip:hf-hub:{repo}"
    path: str | None = None
    if untrained and checkpoint is not None:
        raise ValueError(f"{name}: pass either checkpoint= or untrained=True, not both")
    if checkpoint is not None and Path(checkpoint).is_dir():
        folder = resolve_checkpoint(name, checkpoint, kind="dir", how=HOW_CLIP)
        if not (folder / "open_clip_config.json").is_file():
            raise ValueError(f"{name}: {checkpoint} has no open_clip_config.json (expected a copy of the hub repo)")
        config = folder / "open_clip_config.json"
        weights = next((str(folder / f) for f in (HF_SAFE, HF_BIN) if (folder / f).is_file()), None)
        if weights is None and not untrained:
            raise MissingWeightsError(name, checkpoint=checkpoint, how=f"{folder} has neither {HF_SAFE} nor {HF_BIN}.")
    else:
        config = Path(hub.hub_file(name, repo, ["open_clip_config.json"], how=HOW_CLIP))
        weights = None
        if checkpoint is not None:
            weights = str(resolve_checkpoint(name, checkpoint, kind="file", how=HOW_CLIP))
        elif not untrained:
            weights = hub.hub_file(name, repo, [HF_SAFE, HF_BIN], how=HOW_CLIP)
    local = f"local-dir:{config.parent}"
    with seeded(seed), _quiet_random_init():  # random init (seeded for untrained), then the weights, strictly
        net, _, transform = oc.create_model_and_transforms(local, load_weights=False, pretrained_text=False,
                                                           force_image_size=image_size)
    if not untrained:
        assert weights is not None
        oc.load_checkpoint(net, weights, strict=True)
        path = weights
    cfg = json.loads(config.read_text())["model_cfg"]
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = int(image_size)
    arch = {"library": "open_clip", "model": f"hf-hub:{repo}", "config": cfg}
    return LoadedClip(net, transform, arch, path, None, local)


def _load_clip(model: str, *, checkpoint: str | os.PathLike | None, image_size: int | None, seed: int,
               untrained: bool, pretrained: str | None = None) -> LoadedClip:
    """Build ``clip:<model>`` (see the module docstring for where weights and configs come from)."""
    oc = _open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if untrained and checkpoint is not None:
        raise ValueError(f"clip:{model}: pass either checkpoint= or untrained=True, not both")
    if model == "tiny":
        if pretrained is not None:
            raise ValueError("clip:tiny is a seeded random model for tests: it has no pretrained tags")
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
        return LoadedClip(net, transform, arch, None if path is None else str(path), None, "")
    if model.startswith(HUB_PREFIX):
        if pretrained is not None:
            raise ValueError(f"clip:{model}: a hub id carries its own config; --pretrained does not apply")
        return _hub_clip(model[len(HUB_PREFIX):], checkpoint=checkpoint, image_size=image_size, seed=seed,
                         untrained=untrained)

    _check_model(model)
    tag_cfg = tag_config(model, pretrained) if pretrained is not None else None
    if untrained:
        path = None
        variant = _tag_variant(model, tag_cfg) if tag_cfg is not None else None
    elif checkpoint is not None:
        path = str(resolve_checkpoint(f"clip:{model}", checkpoint, kind="file", how=HOW_CLIP))
        variant, pretrained = _bare_file_variant(model, pretrained)
    elif tag_cfg is not None:
        path = _tag_weights(model, str(pretrained), tag_cfg)
        variant = _tag_variant(model, tag_cfg)
    else:
        tags = oc.list_pretrained_tags_by_model(model)
        raise MissingWeightsError(f"clip:{model}", checkpoint=None,
                                  how=(f"Pass --pretrained TAG (weights from the local cache, or downloaded; tags "
                                       f"of {model}: {', '.join(tags)}) and/or " if tags else "") + HOW_CLIP)
    kw: dict[str, Any] = {}
    if variant is not None:  # the tag's activation and preprocessing, exactly as open_clip's tag path sets them
        qg, mean, std, interp, mode, _fill = variant
        kw = dict(force_quick_gelu=qg, image_mean=mean, image_std=std, image_interpolation=interp,
                  image_resize_mode=mode)
    if path is not None and is_torchscript(path):  # OpenAI's original .pt files: torch.jit.load, not pickle
        kw["weights_only"] = False
    with seeded(seed):
        net, _, transform = oc.create_model_and_transforms(model, pretrained=path, force_image_size=image_size,
                                                           **kw)
    cfg = oc.get_model_config(model)
    if variant is not None and variant[0]:
        cfg["quick_gelu"] = True
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = int(image_size)
    arch = {"library": "open_clip", "model": model, "config": cfg}
    return LoadedClip(net, transform, arch, path, pretrained, model)


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
                 untrained: bool = False, pretrained: str | None = None) -> None:
        loaded = _load_clip(model, checkpoint=checkpoint, image_size=image_size, seed=seed, untrained=untrained,
                            pretrained=pretrained)
        net, transform, arch, path = loaded.net, loaded.transform, loaded.arch, loaded.path
        self.pretrained = loaded.pretrained
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

    def provenance(self) -> dict[str, Any]:
        """The base provenance plus ``pretrained``: the open_clip tag whose config and preprocessing
        were used; absent when none was (a bare file of a model whose tags all agree, a hub id, random weights)."""
        prov = super().provenance()
        if self.pretrained is not None:  # absent otherwise: fingerprints of earlier sets stay valid
            prov["pretrained"] = self.pretrained
        return prov

    @torch.inference_mode()
    def encode(self, x: Tensor, *, products: Sequence[str] | None = None) -> dict[str, Tensor]:
        """x: ``[B, 3, S, S]`` preprocessed. Returns ``{"embedding": [B, embed_dim]}`` float32, unit norm."""
        self._select(products)
        x = self._check_input(x)
        emb = self.model.encode_image(x)
        return {"embedding": torch.nn.functional.normalize(emb.float(), dim=-1)}


def build_clip(model: str, *, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               map_size: int = 16, image_size: int | None = None, seed: int = 0,
               untrained: bool = False, pretrained: str | None = None) -> ClipEncoder:
    """Factory of ``clip:<model>`` / ``clip:tiny`` / ``clip:hf-hub:ORG/NAME`` (``map_size`` unused)."""
    return ClipEncoder(model, checkpoint=checkpoint, device=device, image_size=image_size, seed=seed,
                       untrained=untrained, pretrained=pretrained)


class ClipTextEncoder(TextEncoder):
    """open_clip text tower: ``encode_text`` -> unit-norm [N, embed_dim]; class embeddings from templates."""

    family = "clip"

    def __init__(self, model: str, *, checkpoint: str | os.PathLike | None = None,
                 templates: Any = None, device: str | torch.device = "cpu", seed: int = 0,
                 untrained: bool = False, pretrained: str | None = None) -> None:
        loaded = _load_clip(model, checkpoint=checkpoint, image_size=None, seed=seed, untrained=untrained,
                            pretrained=pretrained)
        net, arch, path = loaded.net, loaded.arch, loaded.path
        self.pretrained = loaded.pretrained
        if hasattr(net, "visual"):
            net.visual = None  # the image tower is not needed for text; frees its memory
        self._arch = arch
        oc = _open_clip()
        if model == "tiny":
            self._tokenizer = oc.SimpleTokenizer(context_length=arch["config"]["text_cfg"]["context_length"])
        else:
            self._tokenizer = oc.get_tokenizer(loaded.tokenizer_name)
        super().__init__(f"clip:{model}", dim=int(arch["config"]["embed_dim"]), templates=templates,
                         checkpoint=path, trained=path is not None, seed=seed, device=device)
        net.eval().requires_grad_(False).to(self.device)
        self._model = net

    def architecture(self) -> dict[str, Any]:
        return copy.deepcopy(self._arch)

    def provenance(self) -> dict[str, Any]:
        """The base text provenance plus ``pretrained`` (the open_clip tag, as for the image tower)."""
        prov = super().provenance()
        if self.pretrained is not None:  # absent otherwise: fingerprints of earlier sets stay valid
            prov["pretrained"] = self.pretrained
        return prov

    def _encode(self, texts: list[str]) -> Tensor:
        tokens = self._tokenizer(texts).to(self.device)
        return self._model.encode_text(tokens)


def build_clip_text(model: str, *, checkpoint: str | os.PathLike | None = None, templates: Any = None,
                    device: str | torch.device = "cpu", seed: int = 0, untrained: bool = False,
                    pretrained: str | None = None) -> ClipTextEncoder:
    """Factory of the text tower of ``clip:<model>`` / ``clip:tiny`` / ``clip:hf-hub:ORG/NAME``."""
    return ClipTextEncoder(model, checkpoint=checkpoint, templates=templates, device=device, seed=seed,
                           untrained=untrained, pretrained=pretrained)
