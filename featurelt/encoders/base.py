"""The encoder contract: image ``Encoder``, ``TextEncoder``, provenance and fingerprints, prompt templates.

Every encoder is a thin frozen wrapper around a model from its own library (open_clip,
segment-anything, transformers, sentence-transformers). It owns

* ``transform`` -- a picklable :class:`~featurelt.images.transforms.Preprocess` (or library transform) turning a PIL image into a
  ``[3, H, W]`` float tensor; ``preprocess(img)`` calls it. Pass ``encoder.transform`` (not the bound
  method, which would pickle the model too) to DataLoader workers;
* ``encode(x)`` -- ``[B, 3, H, W]`` -> ``{product: [B, D] float32}`` on the encoder's device;
* ``provenance()`` -- everything that determines the numbers: architecture, checkpoint sha256,
  preprocessing, trained or random init, seed, fitted state of stateful products;
* ``fingerprint(product)`` -- sha256 over the provenance (without the checkpoint *path*, so moving a
  file does not invalidate cached rows) and the product.

Stateful products (SAM ``pca_map``, METHODS.md section 2) must be fitted on train-split maps first:
``requires_fit(product)`` says so, ``fit(maps_iter)`` fits, ``fit_state(product)`` returns the
fitted state (JSON-able, stored with the embedding set's provenance) and ``load_fit_state(product,
state)`` restores it so a later run reuses the same basis.

A named model without weights raises :class:`~featurelt.encoders.weights.MissingWeightsError`; random weights are only built
when asked for with ``untrained=True`` (benchmarks, tests) and are recorded as ``trained: false``.

The image pipeline that feeds ``encode`` (decoding, the worker / device split of ``transform``,
packing, the loader over store rows) is :mod:`featurelt.images`; checkpoint helpers are
:mod:`featurelt.encoders.weights`. Their names that encoders import are re-exported here
(``Preprocess``, ``IMAGENET_MEAN`` / ``IMAGENET_STD``, ``MissingWeightsError``, ``checkpoint_sha256``,
``resolve_checkpoint``, ``seeded``) so that an encoder module needs one import line.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import Tensor

from featurelt.encoders.weights import (  # noqa: F401  (re-exported for encoder modules)
    MissingWeightsError,
    checkpoint_sha256,
    resolve_checkpoint,
    seeded,
)
from featurelt.images.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: F401  (re-exported)

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)  # METHODS.md sections 5 and 6


def sanitize(text: str) -> str:
    """``clip:ViT-B-32`` -> ``clip_vit_b_32``: lower case, runs of other characters -> ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class _Provenanced(abc.ABC):
    """Shared provenance / fingerprint logic of image and text encoders."""

    name: str
    products: dict[str, int]
    # provenance keys that do not change the numbers and stay out of the fingerprint
    _not_fingerprinted: ClassVar[tuple[str, ...]] = ("checkpoint", "library_versions")

    @abc.abstractmethod
    def provenance(self) -> dict[str, Any]:
        """The provenance dict recorded with every embedding set."""

    def fingerprint(self, product: str) -> str:
        """sha256 hex of the provenance (checkpoint path and library versions excluded; checkpoint
        sha256 included) and ``product``. Changes when the weights, the preprocessing, the seed of
        an untrained model or a fitted state change."""
        self._check_product(product)
        prov = {k: v for k, v in self.provenance().items() if k not in self._not_fingerprinted}
        # only this product's own parts: fitting pca_map must not change latent's fingerprint
        prov["products"] = {product: self.products[product]}
        for key in ("fit", "product_details"):
            if key in prov:
                prov[key] = prov[key].get(product)
        prov["unit_norm"] = product in prov.get("unit_norm", [])
        return _sha256_json({"provenance": prov, "product": product, "dim": self.products[product]})

    def _check_product(self, product: str) -> None:
        if product not in self.products:
            raise KeyError(f"encoder '{self.name}' has no product '{product}'; products: "
                           f"{', '.join(self.products)}")


class Encoder(_Provenanced):
    """A frozen image encoder (see the module docstring for the contract)."""

    family: ClassVar[str] = ""          # "clip", "sam", "dinov2", "pixels"
    unit_norm: ClassVar[frozenset[str]] = frozenset()  # products returned with unit L2 norm
    exact_resize: ClassVar[bool] = False  # True: extract --resize-on auto resizes on the host (PIL: the reference exactly)

    def __init__(self, name: str, *, products: dict[str, int], transform: Any, image_size: int,
                 checkpoint: str | os.PathLike | None, trained: bool, seed: int,
                 device: str | torch.device = "cpu") -> None:
        self.name = name
        self.products = dict(products)
        self.transform = transform
        self.image_size = int(image_size)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.checkpoint_sha256 = None if checkpoint is None else checkpoint_sha256(checkpoint)
        self.trained = bool(trained)
        self.seed = int(seed)
        self.device = torch.device(device)

    # -- model ------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module | None:
        """The wrapped frozen module (``None`` for model-free encoders such as ``pixels``)."""
        return getattr(self, "_model", None)

    def _set_model(self, model: torch.nn.Module | None) -> None:
        if model is not None:
            model.eval()
            model.requires_grad_(False)
            model.to(self.device)
        self._model = model

    def to(self, device: str | torch.device) -> "Encoder":
        """Move the model to ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps`` ...); returns self."""
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        return self

    # -- preprocessing --------------------------------------------------------------------
    def preprocess(self, img: Any) -> Tensor:
        """PIL image -> ``[3, H, W]`` float32 tensor (``self.transform``, picklable)."""
        return self.transform(img)

    def preprocessing(self) -> dict[str, Any]:
        """The provenance ``preprocessing`` entry."""
        t = self.transform
        if hasattr(t, "describe"):
            return t.describe()
        raise TypeError(f"{type(self).__name__}: its transform must have describe() for the provenance")

    # -- encoding ---------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"encoder '{self.name}' expects a [B, 3, H, W] tensor, got {shape}")
        if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            raise ValueError(f"encoder '{self.name}' expects images of {self.image_size}x{self.image_size} "
                             f"(use encoder.preprocess), got {tuple(x.shape)}")
        return x.to(self.device, non_blocking=True)

    def _select(self, products: Sequence[str] | None) -> list[str]:
        wanted = list(self.products) if products is None else list(products)
        for p in wanted:
            self._check_product(p)
        for p in wanted:
            if self.requires_fit(p):
                raise RuntimeError(f"product '{p}' of encoder '{self.name}' must be fitted first: call "
                                   f"encoder.fit(...) on train-split data or load_fit_state(...), or pass "
                                   f"products=[...] without it")
        return wanted

    @abc.abstractmethod
    def encode(self, x: Tensor, *, products: Sequence[str] | None = None) -> dict[str, Tensor]:
        """x: ``[B, 3, H, W]`` preprocessed images. Returns ``{product: [B, D] float32}`` on the
        encoder's device for ``products`` (default: all). Runs without gradients."""

    # -- stateful products --------------------------------------------------------------------
    def requires_fit(self, product: str) -> bool:
        """True when ``product`` is stateful and not fitted yet (default: no stateful products)."""
        self._check_product(product)
        return False

    def fit(self, maps_iter: Iterable[Tensor]) -> None:
        """Fit the stateful products on train-split data (see the subclass)."""
        raise RuntimeError(f"encoder '{self.name}' has no product that needs fitting")

    def fit_state(self, product: str) -> dict[str, Any] | None:
        """JSON-able fitted state of ``product`` (``None`` for stateless or unfitted products)."""
        self._check_product(product)
        return None

    def load_fit_state(self, product: str, state: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`fit_state` (e.g. read back from an embedding set's provenance)."""
        raise RuntimeError(f"product '{product}' of encoder '{self.name}' has no fitted state")

    # -- provenance ---------------------------------------------------------------------------
    @abc.abstractmethod
    def architecture(self) -> dict[str, Any]:
        """Model architecture description (subclasses)."""

    def product_details(self, product: str) -> dict[str, Any] | None:
        """How ``product`` is computed from the model output when that has options (e.g. SAM's map size)."""
        self._check_product(product)
        return None

    def library_versions(self) -> dict[str, str]:
        import torch as _torch

        return {"torch": _torch.__version__}

    def provenance(self) -> dict[str, Any]:
        """Everything that determines this encoder's numbers. Keys: encoder, family, architecture,
        checkpoint (path or None), checkpoint_sha256 (None for untrained), trained, seed (None when
        trained: the weights come from the checkpoint), preprocessing, products (name -> dim),
        unit_norm (products returned unit-norm), product_details (product -> options), fit (product ->
        fitted state), library_versions. ``fingerprint(p)`` keeps only product p's entries."""
        fit = {p: s for p in self.products if (s := self.fit_state(p)) is not None}
        details = {p: d for p in self.products if (d := self.product_details(p)) is not None}
        return {
            "encoder": self.name,
            "family": self.family,
            "architecture": self.architecture(),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "trained": self.trained,
            "seed": None if self.trained else self.seed,
            "preprocessing": self.preprocessing(),
            "image_size": self.image_size,
            "products": dict(self.products),
            "unit_norm": sorted(p for p in self.products if p in self.unit_norm),
            "product_details": details,
            "fit": fit,
            "library_versions": self.library_versions(),
        }

    def fingerprint(self, product: str) -> str:
        if self.requires_fit(product):
            raise RuntimeError(f"product '{product}' of encoder '{self.name}' is not fitted yet; its "
                               f"fingerprint depends on the fitted state (call fit or load_fit_state first)")
        return super().fingerprint(product)

    def default_set_name(self, product: str) -> str:
        """Embedding set name ``<family>_<model>_<product>`` sanitised; the product is left out for
        single-product encoders (``clip_tiny``, ``pixels``, ``sam_tiny_latent``, ``dinov2_tiny_cls``)."""
        self._check_product(product)
        base = sanitize(self.name)
        return base if len(self.products) == 1 else f"{base}_{sanitize(product)}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, products={self.products}, "
                f"image_size={self.image_size}, trained={self.trained}, device={str(self.device)!r})")


def load_templates(templates: str | os.PathLike | Sequence[str] | None) -> tuple[str, ...]:
    """Prompt templates: ``None`` -> ("a photo of a {}.",); a sequence of strings; or a file path with
    one template per line (blank lines and lines starting with ``#`` skipped). Each must contain ``{}``."""
    if templates is None:
        out: tuple[str, ...] = DEFAULT_TEMPLATES
    elif isinstance(templates, (str, os.PathLike)) and "{}" not in str(templates):
        p = Path(templates)
        if not p.is_file():
            raise FileNotFoundError(f"templates file not found: {templates}")
        out = tuple(ln.strip() for ln in p.read_text().splitlines()
                    if ln.strip() and not ln.strip().startswith("#"))
        if not out:
            raise ValueError(f"templates file has no templates: {templates}")
    elif isinstance(templates, str):
        out = (templates,)
    else:
        out = tuple(str(t) for t in templates)
    if not out:
        raise ValueError("templates must not be empty")
    bad = [t for t in out if "{}" not in t]
    if bad:
        raise ValueError(f"every template must contain '{{}}' for the class name; got {bad}")
    return out


class TextEncoder(_Provenanced):
    """A frozen text encoder: ``encode_text(texts) -> [N, D]`` unit-norm float32 (on CPU) and
    ``encode_classes(names)`` = the prompt-template ensemble of METHODS.md sections 5 and 6: for each
    class the mean of the unit-norm embeddings of every template filled with the name, renormalised."""

    family: ClassVar[str] = ""

    def __init__(self, name: str, *, dim: int, templates: str | os.PathLike | Sequence[str] | None,
                 checkpoint: str | os.PathLike | None, trained: bool, seed: int | None,
                 device: str | torch.device = "cpu") -> None:
        self.name = name
        self.products = {"embedding": int(dim)}
        self.templates = load_templates(templates)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.checkpoint_sha256 = None if checkpoint is None else checkpoint_sha256(checkpoint)
        self.trained = bool(trained)
        self.seed = seed
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return self.products["embedding"]

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.device = torch.device(device)
        model = getattr(self, "_model", None)
        if model is not None:
            model.to(self.device)
        return self

    @abc.abstractmethod
    def _encode(self, texts: list[str]) -> Tensor:
        """Raw (not necessarily normalised) embeddings [N, D]."""

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], *, batch_size: int = 256) -> Tensor:
        """texts: N strings. Returns ``[N, D]`` float32 unit-norm on CPU."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_text expects a list of strings")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        out = [self._encode(texts[i:i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def encode_classes(self, class_names: Sequence[str]) -> Tensor:
        """class_names: K names. Returns ``[K, D]`` unit-norm class text embeddings (template ensemble)."""
        names = list(class_names)
        prompts = [t.format(n) for n in names for t in self.templates]
        e = self.encode_text(prompts).view(len(names), len(self.templates), self.dim)
        return torch.nn.functional.normalize(e.mean(1), dim=-1)

    @abc.abstractmethod
    def architecture(self) -> dict[str, Any]:
        """Text model architecture description (subclasses)."""

    def provenance(self) -> dict[str, Any]:
        """encoder, family, architecture, checkpoint, checkpoint_sha256, trained, seed, templates, products."""
        return {
            "encoder": self.name,
            "family": self.family,
            "kind": "text",
            "architecture": self.architecture(),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "trained": self.trained,
            "seed": None if self.trained else self.seed,
            "templates": list(self.templates),
            "products": dict(self.products),
            "unit_norm": ["embedding"],
        }

    def default_set_name(self, product: str = "embedding") -> str:
        """``text_embeddings.set_name``: ``minilm`` for text:minilm, ``clip_tiny`` for clip:tiny."""
        self._check_product(product)
        n = self.name[len("text:"):] if self.name.startswith("text:") else self.name
        return sanitize(n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, templates={len(self.templates)})"
