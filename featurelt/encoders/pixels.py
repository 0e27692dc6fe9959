"""``pixels``: resized raw pixels as a feature vector (a model-free baseline for tests and the demo).

* ``pixels``     -- luminance (ITU-R 601-2, PIL ``convert("L")``), resized to ``image_size x
  image_size`` (default 28, the size of MNIST-like data; bilinear, antialiased, aspect ratio
  ignored), scaled to [0, 1], flattened row-major: ``D = image_size**2`` (784 by default).
* ``pixels:rgb`` -- the same with the three RGB channels, channel-major: ``D = 3 * image_size**2``.

``preprocess`` always returns ``[3, H, W]`` (the grey channel repeated three times) so every encoder
takes the same batches; ``encode`` reads channel 0 for ``pixels``. Values are not normalised (no unit
norm). No weights, so ``trained`` is ``false`` and the seed is irrelevant but recorded.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from featurelt.encoders.base import Encoder, Preprocess

DEFAULT_PIXELS_SIZE = 28  # MNIST / Fashion-MNIST resolution


class PixelsEncoder(Encoder):
    """Resized raw pixels in [0, 1], flattened (grey: D = s*s; rgb: D = 3*s*s)."""

    family = "pixels"

    def __init__(self, name: str = "pixels", *, grey: bool = True, image_size: int | None = None,
                 device: str | torch.device = "cpu", seed: int = 0) -> None:
        size = DEFAULT_PIXELS_SIZE if image_size is None else int(image_size)
        if size <= 0:
            raise ValueError(f"pixels: image_size must be > 0, got {image_size}")
        self.grey = grey
        dim = size * size * (1 if grey else 3)
        transform = Preprocess(size=size, interpolation="bilinear", resize_mode="squash", grey=grey)
        super().__init__(name, products={"pixels": dim}, transform=transform, image_size=size,
                         checkpoint=None, trained=False, seed=seed, device=device)
        self._set_model(None)

    def architecture(self) -> dict[str, Any]:
        return {"type": "pixels", "channels": "grey" if self.grey else "rgb", "size": self.image_size,
                "scale": "[0,1]", "order": "row-major" if self.grey else "channel-major, row-major"}

    @torch.inference_mode()
    def encode(self, x: Tensor, *, products: Sequence[str] | None = None) -> dict[str, Tensor]:
        """x: ``[B, 3, s, s]`` in [0, 1]. Returns ``{"pixels": [B, D]}`` float32."""
        self._select(products)
        x = self._check_input(x).float()
        v = x[:, 0] if self.grey else x
        return {"pixels": v.reshape(x.shape[0], -1).contiguous()}


def build_pixels(*, checkpoint: str | None = None, device: str | torch.device = "cpu", map_size: int = 16,
                 image_size: int | None = None, seed: int = 0, untrained: bool = False,
                 grey: bool = True) -> PixelsEncoder:
    """Factory of ``pixels`` / ``pixels:rgb`` (``checkpoint`` must be None; ``map_size`` unused)."""
    if checkpoint is not None:
        raise ValueError("encoder 'pixels' has no weights; do not pass a checkpoint")
    return PixelsEncoder("pixels" if grey else "pixels:rgb", grey=grey, image_size=image_size,
                         device=device, seed=seed)
