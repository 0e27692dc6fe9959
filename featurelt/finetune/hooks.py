"""FinetuneHooks: the no-op extension points a recipe overrides (placeholder of ft16's engine interface)."""
from __future__ import annotations

from typing import Any

import numpy as np


class FinetuneHooks:
    """No-op defaults; a recipe subclasses and overrides what it needs."""

    extra_columns: tuple[str, ...] = ()

    def configure(self, cfg: Any) -> Any:
        return cfg

    def wrap_model(self, model: Any, ctx: Any) -> Any:
        return model

    def train_plan(self, epoch: int, ctx: Any) -> list[np.ndarray] | None:
        return None

    def make_batch(self, images: Any, targets: Any, batch: Any, ctx: Any) -> tuple[Any, Any]:
        return images, targets

    def loss(self, outputs: Any, targets: Any, batch: Any, ctx: Any) -> Any:
        return None

    def after_step(self, per_sample_loss: Any, batch: Any, ctx: Any) -> None:
        return None
