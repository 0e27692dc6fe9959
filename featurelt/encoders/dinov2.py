"""DINOv2 features through transformers: ``dinov2:small|base|large|giant`` and ``dinov2:tiny``.

Products (both read from ``last_hidden_state``, which ``Dinov2Model`` returns after its final
LayerNorm; not unit-normalised -- heads that need cosine similarity normalise themselves):

* ``cls``        -- the CLS token ``last_hidden_state[:, 0]`` (the DINOv2 prototype feature of
  METHODS.md section 3's image filter, and a fusion source of section 2);
* ``mean_patch`` -- the mean of the patch tokens ``last_hidden_state[:, 1:].mean(1)``.

Hub ids: ``dinov2:ORG/NAME`` (e.g. ``dinov2:facebook/dinov2-base``) takes config, preprocessor config and
``model.safetensors`` from the local Hugging Face cache when there (``local_files_only``), else from the hub
(:mod:`featurelt.encoders.hub`: offline decided per call); ``checkpoint=DIR`` overrides with a local folder.

Weights: ``checkpoint=DIR`` is a local Hugging Face folder (``config.json`` + ``model.safetensors``,
e.g. ``hf download facebook/dinov2-base --local-dir DIR``), loaded with
``Dinov2Model.from_pretrained(DIR, local_files_only=True)``. Preprocessing is the folder's
``preprocessor_config.json`` when present (DINOv2: shorter side 256, bicubic, center crop 224,
ImageNet mean/std), else that default, scaled to ``image_size`` (crop ``s``, shorter side
``round(s * 256 / 224)``). ``dinov2:tiny``: ``Dinov2Config(hidden_size=64, num_hidden_layers=2,
num_attention_heads=2, image_size=56, patch_size=14)`` with seeded random init; ``save_pretrained``
of it loads back through the same ``from_pretrained`` path.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from featurelt.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    Preprocess,
    resolve_checkpoint,
    seeded,
)

# size -> Dinov2Config fields of facebook/dinov2-<size> (used for untrained=True and for dims)
DINOV2_CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "giant": {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "use_swiglu_ffn": True},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56},
}
DEFAULT_CROP = 224  # evaluation crop of the released models
RESIZE_RATIO = 256 / 224  # shorter side before the crop / crop
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample ids in preprocessor_config.json


def _how(size: str) -> str:
    return (f"Download the Hugging Face model on a machine with internet (`hf download "
            f"facebook/dinov2-{size} --local-dir dinov2-{size}`) and pass the folder with --checkpoint "
            f"dinov2-{size} (python: checkpoint=DIR).")


def dinov2_products(size: str) -> dict[str, int]:
    d = DINOV2_CONFIGS[size]["hidden_size"]
    return {"cls": d, "mean_patch": d}


def specs() -> list[Any]:
    from featurelt.encoders import EncoderSpec

    out = []
    for size in ("small", "base", "large", "giant", "tiny"):
        tiny = size == "tiny"
        d = DINOV2_CONFIGS[size]["hidden_size"]
        help_ = ("tiny seeded random DINOv2 (64-d, image 56) for tests: cls + mean_patch" if tiny else
                 f"DINOv2 {size} from a local Hugging Face folder (--checkpoint DIR): cls + mean_patch, {d}-d")
        out.append(EncoderSpec(f"dinov2:{size}", "image", help_, not tiny, "dir", partial(build_dinov2, size),
                               None, lambda m, size=size: dinov2_products(size),
                               notes="" if tiny else f"hub id: dinov2:facebook/dinov2-{size} (local cache, else the hub)"))
    return out


HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors"]  # what a hub id fetches


def _hub_hidden(repo: str, config: dict[str, Any]) -> int:
    """The hidden size (dim of both products) of a hub repo's DINOv2 config."""
    if config.get("model_type") != "dinov2":
        raise ValueError(f"dinov2:{repo}: config.json has model_type {config.get('model_type')!r}, not 'dinov2'")
    return int(config["hidden_size"])


def hub_spec(repo: str) -> Any:
    """Registry entry of ``dinov2:ORG/NAME`` (a Hugging Face hub id, resolved by ``ENCODERS.get``):
    products read from the hub config (the local cache first, then the network)."""
    from featurelt.encoders import EncoderSpec

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise KeyError(f"unknown encoder 'dinov2:{repo}': a hub id is dinov2:ORG/NAME, e.g. dinov2:facebook/dinov2-base")

    def products(m: int) -> dict[str, int]:
        from featurelt.encoders import hub

        cfg = json.loads(Path(hub.hub_file(f"dinov2:{repo}", repo, ["config.json"], how=_how_hub(repo))).read_text())
        d = _hub_hidden(repo, cfg)
        return {"cls": d, "mean_patch": d}

    return EncoderSpec(f"dinov2:{repo}", "image", f"DINOv2 {repo} from the Hugging Face cache or hub: cls + mean_patch",
                       True, "dir", partial(build_dinov2, repo), None, products)


def _how_hub(repo: str) -> str:
    return (f"(python -c \"from huggingface_hub import snapshot_download; snapshot_download('{repo}')\" on a "
            f"machine with network fills the cache; or pass --checkpoint DIR of `hf download {repo} --local-dir DIR`.)")


def _preprocess(folder: Path | None, image_size: int | None, patch: int) -> Preprocess:
    crop, short, interp = DEFAULT_CROP, None, "bicubic"
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    cfg_file = None if folder is None else folder / "preprocessor_config.json"
    if cfg_file is not None and cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        cs = cfg.get("crop_size", {})
        crop = int(cs.get("height", crop)) if isinstance(cs, dict) else int(cs)
        sz = cfg.get("size", {})
        short = int(sz.get("shortest_edge")) if isinstance(sz, dict) and "shortest_edge" in sz else None
        interp = _RESAMPLE.get(cfg.get("resample", 3), "bicubic")
        mean = tuple(cfg.get("image_mean", mean))  # type: ignore[assignment]
        std = tuple(cfg.get("image_std", std))  # type: ignore[assignment]
    if image_size is not None:
        crop, short = int(image_size), None
    if crop % patch:
        raise ValueError(f"DINOv2 image_size must be a multiple of the patch size {patch}, got {crop}")
    if short is None:
        short = round(crop * RESIZE_RATIO)
    return Preprocess(size=crop, mean=mean, std=std, interpolation=interp,  # type: ignore[arg-type]
                      resize_mode="shortest_crop", resize_to=short)


class Dinov2Encoder(Encoder):
    """transformers ``Dinov2Model`` -> ``cls`` and ``mean_patch`` [B, hidden_size] (METHODS.md sections 2, 3)."""

    family = "dinov2"

    def __init__(self, size: str, *, checkpoint: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", image_size: int | None = None, seed: int = 0,
                 untrained: bool = False) -> None:
        from transformers import Dinov2Config, Dinov2Model

        repo = size if "/" in size else None  # a hub id: facebook/dinov2-base
        if repo is None and size not in DINOV2_CONFIGS:
            raise KeyError(f"unknown DINOv2 size '{size}'; available: {', '.join(DINOV2_CONFIGS)}, or a hub id "
                           f"ORG/NAME")
        name = f"dinov2:{size}"
        folder: Path | None = None
        folder_cfg: Path | None = None  # untrained hub id: its config / preprocessor, random weights
        if repo is not None:  # config (+ weights) from the cache, else the hub; a local folder wins
            from featurelt.encoders import hub

            if untrained and checkpoint is not None:
                raise ValueError(f"{name}: pass either checkpoint= or untrained=True, not both")
            if checkpoint is None:
                checkpoint = hub.hub_snapshot(name, repo, allow_patterns=["config.json", "preprocessor_config.json"]
                                              if untrained else HUB_FILES, how=_how_hub(repo),
                                              required=["config.json"] if untrained else
                                              ["config.json", "model.safetensors"])
            cfg_file = Path(checkpoint) / "config.json"
            if cfg_file.is_file():
                _hub_hidden(repo, json.loads(cfg_file.read_text()))
            if untrained:
                folder_cfg, checkpoint = Path(checkpoint), None
        if repo is None and size == "tiny" and checkpoint is None or untrained:
            if untrained and checkpoint is not None:
                raise ValueError(f"{name}: pass either checkpoint= or untrained=True, not both")
            config = (Dinov2Config.from_pretrained(str(folder_cfg)) if repo is not None else
                      Dinov2Config(**{"image_size": 518, "patch_size": 14, **DINOV2_CONFIGS[size]}))
            with seeded(seed):
                net = Dinov2Model(config)
        else:
            folder = resolve_checkpoint(name, checkpoint, kind="dir", how=_how_hub(repo) if repo else _how(size))
            if not (folder / "config.json").is_file():
                raise ValueError(f"{name}: {checkpoint} has no config.json (expected a Hugging Face "
                                 f"save_pretrained / download folder)")
            net = Dinov2Model.from_pretrained(str(folder), local_files_only=True)
            config = net.config
        hidden = int(config.hidden_size)
        expected = hidden if repo is not None else DINOV2_CONFIGS[size]["hidden_size"]
        if hidden != expected:
            raise ValueError(f"{name}: checkpoint {checkpoint} has hidden_size {hidden}, expected {expected} "
                             f"for dinov2:{size}")
        self.hub_id = repo
        self._config = {k: v for k, v in config.to_dict().items()
                        if k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size",
                                 "patch_size", "mlp_ratio", "use_swiglu_ffn", "layer_norm_eps", "model_type",
                                 "hidden_act", "num_channels", "layerscale_value")}
        pp_folder = folder or folder_cfg  # its preprocessor_config.json, when present, is the preprocessing
        has_pp = pp_folder is not None and (pp_folder / "preprocessor_config.json").is_file()
        transform = _preprocess(pp_folder, image_size if image_size is not None else
                                (config.image_size if size == "tiny" and not has_pp else None), int(config.patch_size))
        super().__init__(name, products={"cls": hidden, "mean_patch": hidden}, transform=transform,
                         image_size=transform.size, checkpoint=folder, trained=folder is not None, seed=seed,
                         device=device)
        self._set_model(net)

    def architecture(self) -> dict[str, Any]:
        return {"library": "transformers", "module": "Dinov2Model", "config": dict(self._config),
                **({"hub_id": self.hub_id} if self.hub_id else {}),
                "products": {"cls": "last_hidden_state[:, 0] (after layernorm)",
                             "mean_patch": "last_hidden_state[:, 1:].mean(1)"}}

    def library_versions(self) -> dict[str, str]:
        import transformers

        return {**super().library_versions(), "transformers": transformers.__version__}

    @torch.inference_mode()
    def encode(self, x: Tensor, *, products: Sequence[str] | None = None) -> dict[str, Tensor]:
        """x: ``[B, 3, S, S]``. Returns ``cls`` and/or ``mean_patch`` ``[B, hidden_size]`` float32."""
        wanted = self._select(products)
        h = self.model(pixel_values=self._check_input(x)).last_hidden_state.float()
        out = {"cls": h[:, 0], "mean_patch": h[:, 1:].mean(1)}
        return {p: out[p].contiguous() for p in wanted}


def build_dinov2(size: str, *, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 map_size: int = 16, image_size: int | None = None, seed: int = 0,
                 untrained: bool = False) -> Dinov2Encoder:
    """Factory of ``dinov2:<size>`` (``map_size`` unused)."""
    return Dinov2Encoder(size, checkpoint=checkpoint, device=device, image_size=image_size, seed=seed,
                         untrained=untrained)
