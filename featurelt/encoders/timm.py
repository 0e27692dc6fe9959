"""timm encoders: ``timm:<name>`` (any ``timm.list_models()`` name), and the one place that builds timm models.

Image product ``embedding``: the model's pooled feature (``timm.create_model(name, num_classes=0)``,
``forward`` = ``forward_head(forward_features(x), pre_logits=True)``), ``num_features`` wide, not normalised.
Preprocessing is timm's evaluation transform of the model's ``pretrained_cfg`` (``resolve_data_config`` +
``create_transform``: mean, std, interpolation, crop_pct, input size), recorded in the provenance.

Weights, in this order: ``checkpoint=FILE`` (a state dict, ``.safetensors`` or ``torch.save``; loaded
strictly after dropping the classifier), else timm's own pretrained weights (``pretrained=TAG`` picks
``<name>.<TAG>``) from the local Hugging Face cache or, with network, downloaded; not cached and no network is a
:class:`MissingWeightsError` ("not cached, run with network or pass --checkpoint"). ``untrained=True``
(``--pretrained none`` / ``--untrained``) builds timm's random init under ``seed``, recorded ``trained: false``.
``featurelt.finetune.backbones`` builds its ``timm:`` backbones with :func:`create_timm_model`.
"""
from __future__ import annotations


import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from featurelt.encoders.base import Encoder, MissingWeightsError, checkpoint_sha256, seeded

HOW_TIMM = ("timm's pretrained weights are not in the local Hugging Face cache: run once with network (timm "
            "downloads them), or pass the weights file with --checkpoint FILE (python: checkpoint=FILE).")


def _timm():
    import timm

    return timm


def check_model(model: str) -> None:
    """Raise ``KeyError`` naming close timm models when ``model`` (name or name.tag) is unknown."""
    timm = _timm()
    base = model.split(".", 1)[0]
    if not timm.is_model(base):
        close = timm.list_models(f"*{base[:4]}*")[:20]
        raise KeyError(f"unknown encoder 'timm:{model}': '{base}' is not a timm model (timm.list_models()); "
                       f"similar: {', '.join(close) or '(none)'}")


@dataclass
class TimmModel:
    """What :func:`create_timm_model` built."""

    model: torch.nn.Module          # num_classes=0: forward(x) -> pooled [B, num_features]
    data_config: dict[str, Any]     # timm resolve_data_config: input_size, mean, std, interpolation, crop_pct, crop_mode
    checkpoint: str | None          # weights file given (None: timm's pretrained weights or random init)
    checkpoint_sha256: str | None   # sha256 of the weights file (or of timm's cached file), None for random init
    pretrained_tag: str | None      # timm tag of the pretrained weights (None: checkpoint file or random init)
    trained: bool                   # False: random init


def _cached_weights(name: str, tag: str | None) -> str | None:
    """The local file of timm's pretrained weights of ``name[.tag]`` in the Hugging Face cache, or None."""
    timm = _timm()
    try:
        cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}" if tag else name)
    except Exception:  # noqa: BLE001  (an unknown tag: no cached file)
        return None
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub:
        return None
    from huggingface_hub import try_to_load_from_cache

    for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(hub, fname)
        if isinstance(path, str) and os.path.exists(path):
            return path
    return None


def _load_state(path: str) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} does not hold a state dict ({type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def create_timm_model(model: str, *, pretrained: str | None = None, checkpoint: str | os.PathLike | None = None,
                      image_size: int | None = None, seed: int = 0, untrained: bool = False) -> TimmModel:
    """Build timm model ``model`` without classifier (the module docstring says where weights come from).

    image_size: input side; models with a fixed input size (ViTs) are built for it (``img_size=``), the data
    config's input size follows it. pretrained: timm tag, ``"none"`` = ``untrained``.
    """
    timm = _timm()
    name, _, tag = model.partition(".")
    tag = tag or None
    if pretrained is not None and pretrained.lower() == "none":
        untrained, pretrained = True, None
    if pretrained:
        tag = pretrained
    check_model(name)
    if untrained and checkpoint is not None:
        raise ValueError(f"timm:{model}: pass either a checkpoint or --pretrained none, not both")
    full = f"{name}.{tag}" if tag else name
    kwargs: dict[str, Any] = {"num_classes": 0}
    base_cfg = timm.models.get_pretrained_cfg(full) or timm.models.get_pretrained_cfg(name)
    fixed = bool(getattr(base_cfg, "fixed_input_size", False)) if base_cfg is not None else False
    if image_size is not None and fixed:
        kwargs["img_size"] = int(image_size)
    path, sha, trained, used_tag = None, None, True, None
    if untrained:
        with seeded(seed):
            net = timm.create_model(full, pretrained=False, **kwargs)
        trained = False
    elif checkpoint is not None:
        p = os.fspath(checkpoint)
        if not os.path.isfile(p):
            raise MissingWeightsError(f"timm:{model}", checkpoint=checkpoint, how=HOW_TIMM)
        with seeded(seed):
            net = timm.create_model(full, pretrained=False, **kwargs)
        state = _load_state(p)
        own = net.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.startswith(("fc.", "head.", "classifier."))}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise ValueError(f"checkpoint {p} does not fit timm:{model} (another architecture?): {first}") from None
        path, sha = str(os.path.abspath(p)), checkpoint_sha256(p)
    else:
        cached = _cached_weights(name, tag)
        try:
            net = timm.create_model(full, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001  (offline hub errors come in many types)
            raise MissingWeightsError(f"timm:{model}", checkpoint=None,
                                      how=f"{HOW_TIMM} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        cached = cached or _cached_weights(name, tag)
        sha = checkpoint_sha256(cached) if cached else None
        used_tag = getattr(net, "pretrained_cfg", {}).get("tag") or tag
    data = timm.data.resolve_data_config({}, model=net)
    if image_size is not None:
        data["input_size"] = (3, int(image_size), int(image_size))
    return TimmModel(net, dict(data), path, sha, used_tag, trained)


def timm_transform(data_config: dict[str, Any]) -> Any:
    """timm's evaluation transform for ``data_config`` (a torchvision ``Compose``; picklable)."""
    return _timm().data.create_transform(**data_config, is_training=False)


def describe_data_config(data: dict[str, Any]) -> dict[str, Any]:
    return {"input_size": list(data["input_size"]), "mean": list(data["mean"]), "std": list(data["std"]),
            "interpolation": data.get("interpolation"), "crop_pct": data.get("crop_pct"),
            "crop_mode": data.get("crop_mode"), "transform": "timm.data.create_transform(is_training=False)"}


class TimmEncoder(Encoder):
    """timm model -> pooled ``embedding`` [B, num_features] (not normalised)."""

    family = "timm"

    def __init__(self, model: str, *, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 image_size: int | None = None, seed: int = 0, untrained: bool = False,
                 pretrained: str | None = None) -> None:
        built = create_timm_model(model, pretrained=pretrained, checkpoint=checkpoint, image_size=image_size,
                                  seed=seed, untrained=untrained)
        self._built = built
        self._data = built.data_config
        super().__init__(f"timm:{model}", products={"embedding": int(built.model.num_features)},
                         transform=timm_transform(built.data_config), image_size=int(built.data_config["input_size"][-1]),
                         checkpoint=None, trained=built.trained, seed=seed, device=device)
        self.checkpoint = built.checkpoint
        self.checkpoint_sha256 = built.checkpoint_sha256
        self._set_model(built.model)

    def architecture(self) -> dict[str, Any]:
        return {"library": "timm", "model": self.name[len("timm:"):], "pretrained_tag": self._built.pretrained_tag,
                "num_features": self.products["embedding"]}

    def preprocessing(self) -> dict[str, Any]:
        return describe_data_config(self._data)

    def library_versions(self) -> dict[str, str]:
        return {**super().library_versions(), "timm": _timm().__version__}

    @torch.inference_mode()
    def encode(self, x: Tensor, *, products: Sequence[str] | None = None) -> dict[str, Tensor]:
        """x: ``[B, 3, S, S]`` preprocessed. Returns ``{"embedding": [B, num_features]}`` float32."""
        self._select(products)
        x = self._check_input(x)
        return {"embedding": self.model(x).float()}


def build_timm(model: str, *, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               map_size: int = 16, image_size: int | None = None, seed: int = 0,
               untrained: bool = False, pretrained: str | None = None) -> TimmEncoder:
    """Factory of ``timm:<model>`` (``map_size`` unused; ``pretrained``: timm's weights tag)."""
    return TimmEncoder(model, checkpoint=checkpoint, device=device, image_size=image_size, seed=seed,
                       untrained=untrained, pretrained=pretrained)


def timm_spec(model: str):
    """Registry entry of ``timm:<model>`` (resolved dynamically by ``ENCODERS.get``)."""
    from featurelt.encoders import EncoderSpec

    check_model(model)

    def products(m: int) -> dict[str, int]:
        with seeded(0):
            net = _timm().create_model(model.split(".", 1)[0], pretrained=False, num_classes=0)
        return {"embedding": int(net.num_features)}

    return EncoderSpec(f"timm:{model}", "image", f"timm {model}: pooled embedding; pretrained_cfg preprocessing; "
                       "--checkpoint FILE or timm's cached weights", True, "file",
                       lambda **kw: build_timm(model, **kw), None, products, takes_pretrained=True)


__all__ = ["create_timm_model", "TimmModel", "TimmEncoder", "build_timm", "timm_spec", "timm_transform", "HOW_TIMM"]

