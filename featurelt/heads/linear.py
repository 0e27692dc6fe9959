"""Plain classifiers on the concatenated features: ``linear`` and ``mlp`` (METHODS.md section 1)."""
from __future__ import annotations

from torch import Tensor, nn

from featurelt.heads.base import HEADS, Head, HeadContext


@HEADS.register("linear")
class LinearHead(Head):
    """Linear classifier ``z = W f + b`` on the concatenated features (section 1 baseline)."""

    def __init__(self, ctx: HeadContext) -> None:
        super().__init__(ctx)
        self.fc = nn.Linear(ctx.in_dim, ctx.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x: [B, D_total]. Returns x itself (the linear classifier reads the cached features)."""
        return x

    def classify(self, z: Tensor) -> Tensor:
        return self.fc(z)


@HEADS.register("mlp")
class MLPHead(Head):
    """Two-layer perceptron: Linear -> ReLU -> Dropout -> Linear; the hidden layer is the latent."""

    def __init__(self, ctx: HeadContext, *, hidden: int = 512, dropout: float = 0.0) -> None:
        """hidden: width of the hidden layer, >= 1. dropout: probability in [0, 1) after the ReLU."""
        super().__init__(ctx)
        if int(hidden) < 1:
            raise ValueError(f"mlp option hidden must be >= 1, got {hidden!r}")
        if not 0 <= float(dropout) < 1:
            raise ValueError(f"mlp option dropout must be in [0, 1), got {dropout!r}")
        self.body = nn.Sequential(nn.Linear(ctx.in_dim, int(hidden)), nn.ReLU(), nn.Dropout(float(dropout)))
        self.fc = nn.Linear(int(hidden), ctx.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x: [B, D_total]. Returns [B, hidden]."""
        return self.body(x)

    def classify(self, z: Tensor) -> Tensor:
        return self.fc(z)
