"""SAM image-encoder features (METHODS.md section 2): ``sam:vit_b|vit_l|vit_h`` and ``sam:tiny``.

SAM's image encoder (segment-anything ``ImageEncoderViT``, neck included) maps a preprocessed image
to ``F_SAM`` in R^{C x H0 x W0} (C = 256; ViT-B/L/H at 1024 px: 256 x 64 x 64). Two products:

* ``latent``  -- ``v_SAM = AvgPool(F_SAM)`` in R^256 (mean over the H0 x W0 positions);
* ``pca_map`` -- ``F_PCA``: one-component PCA over the C channels (every spatial position of every
  train-split map is one C-dim sample), i.e. ``F_PCA[h, w] = u . (F_SAM[:, h, w] - mu)``, resized to
  ``map_size x map_size`` (bilinear, antialiased, align_corners=False) and flattened row-major:
  D = map_size**2. Projection and resize are both linear, so the order does not matter.

The PCA is *fitted*: ``fit(batches)`` streams the train split (image batches ``[B, 3, S, S]`` or
neck maps ``[B, 256, h, w]``), accumulating the channel sum and the C x C second-moment matrix in
float64 (exact PCA, independent of batch order), then takes the top eigenvector ``u`` of the
covariance with a fixed sign (its largest-magnitude entry positive). The basis ``(mu, u)`` is the
product's ``fit_state`` and is part of the provenance and fingerprint, so later runs restore it with
``load_fit_state`` and project new rows onto the same basis.

Weights: named models load ``segment_anything.sam_model_registry[variant](checkpoint=FILE)`` (the
official ``sam_vit_b_01ec64.pth`` etc.) and keep only ``image_encoder``. ``sam:tiny`` is a seeded
random ``ImageEncoderViT`` (image 64, patch 16, width 64, depth 2, heads 2, neck 256); its checkpoint
(``torch.save`` of a state dict with SAM's ``image_encoder.`` key prefix, or bare encoder keys)
loads strictly with ``torch.load(weights_only=True)``.

The official checkpoints' sha256 are :data:`SAM_SHA256` (listed by ``featurelt encoders``); a file with
another sha256 loads (fine-tuned weights are legitimate) with a warning, and the provenance says so
(``checksum_note``).

Preprocessing follows SAM: resize the longer side to the model's image size (bilinear), normalise
with the ImageNet mean/std, zero-pad bottom/right to a square.
"""
from __future__ import annotations

import os
import warnings
from functools import partial
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from featurelt.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    Preprocess,
    resolve_checkpoint,
    seeded,
)

NECK_CHANNELS = 256  # SAM's neck output channels (prompt_embed_dim); every variant keeps it

# variant -> (embed_dim, depth, heads, global_attn_indexes, image_size, patch_size, window_size)
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": [2, 5, 8, 11],
              "img_size": 1024, "patch_size": 16, "window_size": 14},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": [5, 11, 17, 23],
              "img_size": 1024, "patch_size": 16, "window_size": 14},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": [7, 15, 23, 31],
              "img_size": 1024, "patch_size": 16, "window_size": 14},
    "tiny": {"embed_dim": 64, "depth": 2, "num_heads": 2, "global_attn_indexes": [1],
             "img_size": 64, "patch_size": 16, "window_size": 2},
}

SAM_CHECKPOINTS = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
# sha256 of the official files at https://dl.fbaipublicfiles.com/segment_anything/<file> (the 6 hex digits in
# the file name are the start of its md5); `featurelt encoders` lists them, a different file gets a warning
SAM_SHA256 = {
    "vit_b": "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    "vit_l": "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    "vit_h": "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
}


def checksum_note(variant: str, sha256: str | None) -> str | None:
    """None when ``sha256`` is the official checkpoint's of ``variant`` (or there is none to compare);
    else the one-line notice printed as a warning and kept in the provenance."""
    official = SAM_SHA256.get(variant)
    if official is None or sha256 is None or sha256 == official:
        return None
    return (f"sam:{variant}: checkpoint sha256 {sha256[:12]}... is not the official {SAM_CHECKPOINTS[variant]} "
            f"({official[:12]}...): a fine-tuned or different file; its features are recorded under its own sha256")


def _how(variant: str) -> str:
    f = SAM_CHECKPOINTS.get(variant, "sam_<variant>.pth")
    return (f"Download the official checkpoint (https://dl.fbaipublicfiles.com/segment_anything/{f}) on a "
            f"machine with internet and pass it with --checkpoint {f} (python: checkpoint=PATH).")


def sam_products(map_size: int) -> dict[str, int]:
    return {"latent": NECK_CHANNELS, "pca_map": int(map_size) ** 2}


def specs() -> list[Any]:
    from featurelt.encoders import EncoderSpec

    out = []
    for v in ("vit_b", "vit_l", "vit_h", "tiny"):
        tiny = v == "tiny"
        help_ = ("tiny seeded random SAM image encoder (image 64) for tests: latent 256 + pca_map map_size**2"
                 if tiny else f"SAM {v} image encoder, --checkpoint {SAM_CHECKPOINTS[v]}: latent 256 (avg-pooled "
                 f"neck) + pca_map map_size**2 (1-component PCA over channels, fitted on train)")
        out.append(EncoderSpec(f"sam:{v}", "image", help_, not tiny, "file",
                               partial(build_sam, v), None, sam_products,
                               notes="" if tiny else f"official {SAM_CHECKPOINTS[v]} sha256 {SAM_SHA256[v]}"))
    return out


# -- pure math ---------------------------------------------------------------------------------------
def channel_pca_project(maps: Tensor, mean: Tensor, component: Tensor) -> Tensor:
    """maps: ``[B, C, h, w]``; mean, component: ``[C]``. Returns ``[B, h, w]`` = component . (maps - mean)."""
    if maps.ndim != 4 or maps.shape[1] != mean.shape[0] or component.shape != mean.shape:
        raise ValueError(f"expected maps [B, C, h, w] with C = {mean.shape[0]}, got shape={tuple(maps.shape)}")
    return torch.einsum("bchw,c->bhw", maps - mean.view(1, -1, 1, 1), component)


def resize_flat(m: Tensor, size: int) -> Tensor:
    """m: ``[B, h, w]`` -> bilinear (antialiased, align_corners=False) ``[B, size*size]`` row-major."""
    if m.shape[-2:] != (size, size):
        m = F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[:, 0]
    return m.reshape(m.shape[0], -1)


class ChannelPCA:
    """Streaming exact one-component PCA over channels: ``update(maps)`` then ``finish()``."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.n = 0
        self.s = np.zeros(channels, dtype=np.float64)
        self.ss = np.zeros((channels, channels), dtype=np.float64)

    def update(self, maps: Tensor) -> None:
        """maps: ``[B, C, h, w]``; every (b, h, w) position is one C-dim sample."""
        if maps.ndim != 4 or maps.shape[1] != self.channels:
            raise ValueError(f"expected maps [B, {self.channels}, h, w], got shape={tuple(maps.shape)}")
        x = maps.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, self.channels).numpy()
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += x.T @ x

    def finish(self) -> dict[str, Any]:
        """The fitted state: mean, component (unit norm, largest-|entry| positive), variances."""
        if self.n < 2:
            raise ValueError(f"PCA needs at least 2 positions, got {self.n}")
        mean = self.s / self.n
        cov = (self.ss - self.n * np.outer(mean, mean)) / (self.n - 1)
        evals, evecs = np.linalg.eigh(cov)
        u = evecs[:, -1]
        if u[np.argmax(np.abs(u))] < 0:
            u = -u
        total = float(np.clip(evals, 0, None).sum())
        return {
            "method": "pca", "n_components": 1, "fit_split": "train", "n_positions": int(self.n),
            "mean": [float(v) for v in mean.astype(np.float32)],
            "component": [float(v) for v in u.astype(np.float32)],
            "explained_variance": float(evals[-1]),
            "explained_variance_ratio": float(evals[-1] / total) if total > 0 else 0.0,
        }


# -- model ---------------------------------------------------------------------------------------
def _tiny_encoder(cfg: dict[str, Any]) -> torch.nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                           depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=4.0, out_chans=NECK_CHANNELS,
                           qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                           window_size=cfg["window_size"], global_attn_indexes=tuple(cfg["global_attn_indexes"]))


def load_image_encoder_state(encoder: torch.nn.Module, path: str | os.PathLike) -> None:
    """Strictly load a SAM checkpoint's image encoder (keys ``image_encoder.*``, or bare encoder keys)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"SAM checkpoint {path} does not hold a state dict (got {type(state).__name__})")
    prefixed = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    encoder.load_state_dict(prefixed or state, strict=True)


class SamEncoder(Encoder):
    """SAM image encoder -> ``latent`` [B, 256] and ``pca_map`` [B, map_size**2] (METHODS.md section 2)."""

    family = "sam"

    def __init__(self, variant: str, *, checkpoint: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", map_size: int = 16, image_size: int | None = None,
                 seed: int = 0, untrained: bool = False) -> None:
        if variant not in SAM_VARIANTS:
            raise KeyError(f"unknown SAM variant '{variant}'; available: {', '.join(SAM_VARIANTS)}")
        if map_size <= 0:
            raise ValueError(f"map_size must be > 0, got {map_size}")
        cfg = dict(SAM_VARIANTS[variant])
        name = f"sam:{variant}"
        if untrained and checkpoint is not None:
            raise ValueError(f"{name}: pass either checkpoint= or untrained=True, not both")
        if variant == "tiny":
            if image_size is not None:
                if image_size <= 0 or image_size % cfg["patch_size"]:
                    raise ValueError(f"sam:tiny image_size must be a positive multiple of 16, got {image_size}")
                cfg["img_size"] = int(image_size)
            with seeded(seed):
                net = _tiny_encoder(cfg)
            path = None
            if checkpoint is not None:
                path = resolve_checkpoint(name, checkpoint, kind="file", how=_how(variant))
                load_image_encoder_state(net, path)
        else:
            if image_size is not None and image_size != cfg["img_size"]:
                raise ValueError(f"{name} runs at image_size {cfg['img_size']} (its position embedding is fixed), "
                                 f"got image_size={image_size}")
            from segment_anything import sam_model_registry

            if untrained:
                path = None
                with seeded(seed):
                    net = sam_model_registry[variant](checkpoint=None).image_encoder
            else:
                path = resolve_checkpoint(name, checkpoint, kind="file", how=_how(variant))
                net = sam_model_registry[variant](checkpoint=str(path)).image_encoder
        self._cfg = cfg
        self.map_size = int(map_size)
        self._pca: dict[str, Any] | None = None
        self._basis: tuple[Tensor, Tensor] | None = None
        transform = Preprocess(size=cfg["img_size"], mean=IMAGENET_MEAN, std=IMAGENET_STD,
                               interpolation="bilinear", resize_mode="longest_pad")
        super().__init__(name, products=sam_products(map_size), transform=transform, image_size=cfg["img_size"],
                         checkpoint=path, trained=path is not None, seed=seed, device=device)
        self.checksum_note = checksum_note(variant, self.checkpoint_sha256)
        if self.checksum_note is not None:
            warnings.warn(self.checksum_note, UserWarning, stacklevel=2)
        self._set_model(net)

    def provenance(self) -> dict[str, Any]:
        """The base provenance; plus ``checksum_note`` when the checkpoint is not the official file."""
        prov = super().provenance()
        if self.checksum_note is not None:
            prov["checksum_note"] = self.checksum_note
        return prov

    def architecture(self) -> dict[str, Any]:
        return {"library": "segment_anything", "module": "ImageEncoderViT", "variant": self.name.split(":")[1],
                **self._cfg, "out_chans": NECK_CHANNELS, "mlp_ratio": 4.0, "use_rel_pos": True}

    def product_details(self, product: str) -> dict[str, Any] | None:
        self._check_product(product)
        if product == "latent":
            return {"pool": "mean over the neck map positions"}
        return {"map_size": self.map_size, "projection": "component . (F_SAM[:, h, w] - mean)",
                "resize": "bilinear, antialias, align_corners=False", "order": "row-major"}

    def library_versions(self) -> dict[str, str]:
        import segment_anything

        return {**super().library_versions(), "segment_anything": getattr(segment_anything, "__version__", "1.0")}

    # -- features ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def feature_maps(self, x: Tensor) -> Tensor:
        """x: ``[B, 3, S, S]`` preprocessed. Returns the neck output ``F_SAM`` ``[B, 256, S/16, S/16]`` float32."""
        return self.model(self._check_input(x)).float()

    @torch.inference_mode()
    def encode(self, x: Tensor, *, products: Sequence[str] | None = None) -> dict[str, Tensor]:
        """x: ``[B, 3, S, S]``. Returns ``latent`` ``[B, 256]`` and/or ``pca_map`` ``[B, map_size**2]``."""
        wanted = self._select(products)
        maps = self.feature_maps(x)
        out: dict[str, Tensor] = {}
        if "latent" in wanted:
            out["latent"] = maps.mean(dim=(2, 3))
        if "pca_map" in wanted:
            mean, comp = self._basis_on(maps.device)
            out["pca_map"] = resize_flat(channel_pca_project(maps, mean, comp), self.map_size)
        return out

    def _basis_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        assert self._basis is not None
        mean, comp = self._basis
        return mean.to(device), comp.to(device)

    # -- fitted PCA ------------------------------------------------------------------------------
    def requires_fit(self, product: str) -> bool:
        """True for ``pca_map`` until :meth:`fit` or :meth:`load_fit_state` ran."""
        self._check_product(product)
        return product == "pca_map" and self._pca is None

    def fit(self, maps_iter: Iterable[Tensor]) -> None:
        """Fit the channel PCA of ``pca_map`` on train-split data: an iterable of image batches
        ``[B, 3, S, S]`` (run through the encoder) or neck maps ``[B, 256, h, w]``."""
        pca = ChannelPCA(NECK_CHANNELS)
        for batch in maps_iter:
            if not isinstance(batch, Tensor) or batch.ndim != 4 or batch.shape[1] not in (3, NECK_CHANNELS):
                shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
                raise ValueError(f"{self.name}.fit expects image batches [B, 3, S, S] or neck maps "
                                 f"[B, {NECK_CHANNELS}, h, w], got {shape}")
            pca.update(self.feature_maps(batch) if batch.shape[1] == 3 else batch)
        if pca.n == 0:
            raise ValueError(f"{self.name}.fit got no batches: the train split is empty")
        self.load_fit_state("pca_map", pca.finish())

    def fit_state(self, product: str) -> dict[str, Any] | None:
        self._check_product(product)
        return None if product != "pca_map" or self._pca is None else dict(self._pca)

    def load_fit_state(self, product: str, state: dict[str, Any]) -> None:
        """Restore the PCA basis of ``pca_map`` from a :meth:`fit_state` dict (e.g. a set's provenance)."""
        if product != "pca_map":
            raise RuntimeError(f"product '{product}' of encoder '{self.name}' has no fitted state")
        if state.get("method") != "pca" or state.get("n_components") != 1:
            raise ValueError(f"{self.name}: not a one-component PCA state: method={state.get('method')!r}, "
                             f"n_components={state.get('n_components')!r}")
        mean = torch.tensor(state["mean"], dtype=torch.float32)
        comp = torch.tensor(state["component"], dtype=torch.float32)
        if mean.shape != (NECK_CHANNELS,) or comp.shape != (NECK_CHANNELS,):
            raise ValueError(f"{self.name}: PCA state must have {NECK_CHANNELS}-d mean and component, got "
                             f"{tuple(mean.shape)} and {tuple(comp.shape)}")
        self._pca = dict(state)
        self._basis = (mean, comp)


def build_sam(variant: str, *, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
              map_size: int = 16, image_size: int | None = None, seed: int = 0, untrained: bool = False) -> SamEncoder:
    """Factory of ``sam:<variant>``."""
    return SamEncoder(variant, checkpoint=checkpoint, device=device, map_size=map_size, image_size=image_size,
                      seed=seed, untrained=untrained)
