"""Cosine classifiers, optionally over class text embeddings (METHODS.md sections 1, 5, 6).

All three heads score ``logits_k = cos(g(f), c_k) / tau`` (``lfm-projection``: ``scale * cos``, scale = 1/tau):

- ``cosine``: ``g`` = identity, classifier rows ``c_k`` learned; ``init="text"`` starts them as the class
  text embeddings (the zero-shot CLIP classifier, section 1 "semantic init").
- ``adapter``: ECVL stage 2 (section 5), ``f* = lambda ReLU(W^T f + b) + (1 - lambda) f``, ``c_k`` = the
  fixed class text embeddings ``t_k``.
- ``lfm-projection``: LFM stage 2 (section 6), ``f_I = W_I f + c`` with ``W_I`` initialised to the identity
  and c to 0 (updates preconditioned by the train features' std, :meth:`LFMProjectionHead.projection`),
  ``c_k = t_k`` fixed.

Image and text dims: when the cached image features (D) and text embeddings (Dt) have the same width,
the maps above are exactly the papers'. When they differ (e.g. pixel features with a MiniLM text set),
``E = eye(Dt, D)`` -- the rectangular identity, which keeps the first min(D, Dt) coordinates and pads
with zeros -- stands in for the identity: ``W_I`` starts as ``E``, and the adapter's residual branch is
``(1 - lambda) E f``. The learned maps then carry the features into the text space.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from featurelt.heads.base import HEADS, Head, HeadContext, check_tau, unit


@HEADS.register("cosine")
class CosineHead(Head):
    """Cosine classifier with temperature: ``z_k = cos(f, w_k) / tau`` (section 1); --head-opt init=text."""

    def __init__(self, ctx: HeadContext, *, tau: float = 0.05, init: Literal["random", "text"] = "random") -> None:
        """tau: temperature, > 0. init: ``random`` (normal rows) or ``text`` (rows = class text embeddings,
        which needs text embeddings of width D_total)."""
        super().__init__(ctx)
        self.tau = check_tau("tau", tau)
        if init == "text":
            t = ctx.require_text("cosine --head-opt init=text")
            if t.shape[1] != ctx.in_dim:
                raise ValueError(f"cosine init=text needs text embeddings as wide as the features: text "
                                 f"[{t.shape[0]}, {t.shape[1]}] vs features D_total={ctx.in_dim} "
                                 f"(use a text set of the same encoder, or head lfm-projection)")
            weight = unit(t.detach().float().clone())
        elif init == "random":
            weight = unit(torch.randn(ctx.num_classes, ctx.in_dim))
            self.standardize_input = True  # rows learned from scratch (text-initialised rows need raw features)
        else:
            raise ValueError(f"cosine option init must be 'random' or 'text', got {init!r}")
        self.weight = nn.Parameter(weight)  # [K, D]

    def features(self, x: Tensor) -> Tensor:
        """x: [B, D]. Returns unit(x) [B, D]."""
        return unit(x)

    def classify(self, z: Tensor) -> Tensor:
        return unit(z) @ unit(self.weight).T / self.tau


def rect_identity(rows: int, cols: int) -> Tensor:
    """``eye(rows, cols)``: the identity when square, else truncation / zero padding (module docstring)."""
    return torch.eye(rows, cols)


class TextHead(Head):
    """Scores ``cos(g(f), t_k) / tau`` against fixed class text embeddings (buffer ``text``).

    ``g`` starts as the papers' zero-shot map of the raw features; its learned part reads the standardised
    features ``(f - in_mean) / in_std`` (buffers, mean 0 and std 1 until :meth:`set_input_statistics`), so
    that gradient descent is not left predicting one class on features dominated by one mean direction.
    """

    takes_input_statistics = True

    def __init__(self, ctx: HeadContext, name: str, tau: float) -> None:
        super().__init__(ctx)
        self.tau = check_tau("tau", tau)
        self.register_buffer("text", unit(ctx.require_text(name).detach().float().clone()))  # [K, Dt]
        self.register_buffer("in_mean", torch.zeros(ctx.in_dim))
        self.register_buffer("in_std", torch.ones(ctx.in_dim))

    def set_input_statistics(self, mean: Tensor, std: Tensor) -> None:
        """mean, std: [D] per-dimension statistics of the train features (std > 0)."""
        self.in_mean.copy_(mean)
        self.in_std.copy_(std)

    def standardized(self, x: Tensor) -> Tensor:
        """x: [B, D]. Returns ``(x - in_mean) / in_std`` [B, D]."""
        return (x - self.in_mean) / self.in_std

    def classify(self, z: Tensor) -> Tensor:
        return unit(z) @ self.text.T / self.tau


@HEADS.register("adapter")
class AdapterHead(TextHead):
    """ECVL residual adapter ``f* = lambda ReLU(W^T f + b) + (1 - lambda) f``, cosine to text / tau (section 5).

    The adapter branch reads the standardised features (:class:`TextHead`), the residual the raw ones.
    """

    def __init__(self, ctx: HeadContext, *, lam: float = 0.2, tau: float = 0.05) -> None:
        """lam: adapter ratio lambda in [0, 1]. tau: temperature, > 0."""
        super().__init__(ctx, "adapter", tau)
        if not 0 <= float(lam) <= 1:
            raise ValueError(f"adapter option lam must be in [0, 1], got {lam!r}")
        self.lam = float(lam)
        d, dt = ctx.in_dim, self.text.shape[1]
        self.fc = nn.Linear(d, dt)  # W^T f + b
        self.register_buffer("residual", rect_identity(dt, d))  # [Dt, D]; identity when D == Dt

    def features(self, x: Tensor) -> Tensor:
        """x: [B, D]. Returns f* [B, Dt]."""
        res = x if self.residual.shape[0] == self.residual.shape[1] else x @ self.residual.T
        return self.lam * torch.relu(self.fc(self.standardized(x))) + (1 - self.lam) * res


@HEADS.register("lfm-projection")
class LFMProjectionHead(TextHead):
    """LFM stage 2: ``f_I = W_I f`` (W_I initialised to identity), logits ``scale * cos(f_I, t_k)`` (section 6)."""

    def __init__(self, ctx: HeadContext, *, scale: float = 1.0) -> None:
        """scale: factor on the cosine logits, > 0 (default 1). The authors' model (LFM code) feeds the plain
        cosine similarity ``f_I . t_k`` of unit vectors to the cross-entropy, with no temperature or logit
        scale, and predicts its argmax, which no scale changes; 1 reproduces their training signal. A larger
        scale (e.g. 20 = 1/0.05, the cosine head's temperature) sharpens the softmax over classes, which
        trains faster but is not the paper's loss and diverges at learning rates a linear head takes."""
        super().__init__(ctx, "lfm-projection", 1.0 / check_tau("scale", scale))
        self.register_buffer("identity", rect_identity(self.text.shape[1], ctx.in_dim))  # E [Dt, D]
        self.proj = nn.Linear(ctx.in_dim, self.text.shape[1])  # W, b: zero at the start
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def projection(self) -> tuple[Tensor, Tensor]:
        """(W_I [Dt, D], c [Dt]) with ``f_I = W_I f + c``: ``W_I = E + W diag(1 / in_std)``,
        ``c = b - W (in_mean / in_std)``. W_I starts as the identity E and c as 0 (the paper's start); the
        learned W sees standardised features, which preconditions the updates of W_I."""
        w = self.proj.weight / self.in_std
        return self.identity + w, self.proj.bias - w @ self.in_mean

    def features(self, x: Tensor) -> Tensor:
        """x: [B, D]. Returns f_I = E x + W standardized(x) + b [B, Dt] (= W_I x + c, :meth:`projection`)."""
        base = x if self.identity.shape[0] == self.identity.shape[1] else x @ self.identity.T
        return base + self.proj(self.standardized(x))
