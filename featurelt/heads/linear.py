"""Plain classifiers on the concatenated features: ``linear`` and ``mlp`` (METHODS.md section 1).

Both end in one linear layer ``fc``, so both can be tau-normalised at inference (Kang et al. 2020,
section 1): :func:`tau_normalised` rows ``w_k / ||w_k||^tau`` and no bias (``train-head --tau-norm``).
"""
from __future__ import annotations

from torch import Tensor, nn

from featurelt.heads.base import HEADS, Head, HeadContext


def tau_normalised(weight: Tensor, tau: float) -> Tensor:
    """weight: [K, D] classifier rows. Returns ``w_k / ||w_k||^tau`` [K, D]: tau = 0 leaves them, tau = 1
    gives unit rows (head classes, whose rows grow larger, stop dominating; METHODS.md section 1)."""
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)


class LinearClassifierHead(Head):
    """A head whose classifier is the linear layer ``fc`` on its latent: it can be tau-normalised."""

    fc: nn.Linear
    standardize_input = True

    def classify(self, z: Tensor) -> Tensor:
        return self.fc(z)

    def tau_normalised_logits(self, x: Tensor, tau: float) -> Tensor:
        """x: [B, D_total]. Returns [B, K] logits ``features(x) @ tau_normalised(W, tau)^T``, bias left out."""
        self.check_input(x)
        return self.features(x) @ tau_normalised(self.fc.weight, tau).T


@HEADS.register("linear")
class LinearHead(LinearClassifierHead):
    """Linear classifier ``z = W f + b`` on the concatenated features (section 1 baseline)."""

    def __init__(self, ctx: HeadContext) -> None:
        super().__init__(ctx)
        self.fc = nn.Linear(ctx.in_dim, ctx.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x: [B, D_total]. Returns x itself (the linear classifier reads the cached features)."""
        return x


@HEADS.register("mlp")
class MLPHead(LinearClassifierHead):
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
