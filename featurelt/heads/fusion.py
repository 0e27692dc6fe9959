"""Latent fusion head over several cached sources (METHODS.md section 2, SAM features).

``z_SAM = FC(SelfAttention(v_concat))``, ``z_backbone = FC(v_backbone)``,
``z = (1 - alpha) z_SAM + alpha z_backbone``. Self-attention over vectors is read as in METHODS.md:
each source vector is projected to a common width and becomes one token; multi-head self-attention
with a residual connection and LayerNorm mixes the tokens; the tokens are flattened (dropout 0.5)
and a fully connected layer gives ``z_SAM``. The backbone is the first source in ``--features``.
Works for any number of sources (one source = one token).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from featurelt.heads.base import HEADS, Head, HeadContext


@HEADS.register("fusion")
class FusionHead(Head):
    """Self-attention over cached sources as tokens, alpha-mixed with a linear head on the first source (section 2)."""

    standardize_input = True

    def __init__(self, ctx: HeadContext, *, width: int = 256, num_heads: int = 4, alpha: float = 0.5,
                 dropout: float = 0.5) -> None:
        """width: common token width, divisible by num_heads. num_heads: attention heads, >= 1.
        alpha: weight of z_backbone in [0, 1]. dropout: probability on the flattened tokens, [0, 1)."""
        super().__init__(ctx)
        width, num_heads = int(width), int(num_heads)
        if num_heads < 1 or width < 1 or width % num_heads:
            raise ValueError(f"fusion options: width ({width}) must be a positive multiple of num_heads ({num_heads})")
        if not 0 <= float(alpha) <= 1:
            raise ValueError(f"fusion option alpha must be in [0, 1], got {alpha!r}")
        if not 0 <= float(dropout) < 1:
            raise ValueError(f"fusion option dropout must be in [0, 1), got {dropout!r}")
        self.alpha = float(alpha)
        self.width = width
        self.proj = nn.ModuleList(nn.Linear(d, width) for d in self.in_dims)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(float(dropout))
        self.fc_fused = nn.Linear(width * len(self.in_dims), ctx.num_classes)
        self.fc_backbone = nn.Linear(self.in_dims[0], ctx.num_classes)

    def split(self, x: Tensor) -> list[Tensor]:
        """x: [B, D_total]. Returns the per-source blocks [B, in_dims[i]]."""
        return list(torch.split(x, self.in_dims, dim=1))

    def features(self, x: Tensor) -> Tensor:
        """x: [B, D_total]. Returns the fused latent [B, S * width] (flattened attended tokens)."""
        self.check_input(x)
        tokens = torch.stack([p(v) for p, v in zip(self.proj, self.split(x))], dim=1)  # [B, S, width]
        attended, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.norm(tokens + attended).flatten(1)

    def fused_logits(self, z: Tensor) -> Tensor:
        """z: [B, S * width] fused latent. Returns z_SAM [B, K]."""
        return self.fc_fused(self.drop(z))

    def backbone_logits(self, x: Tensor) -> Tensor:
        """x: [B, D_total]. Returns z_backbone = FC(first source) [B, K]."""
        return self.fc_backbone(x[:, : self.in_dims[0]])

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, D_total]. Returns ((1 - alpha) z_SAM + alpha z_backbone [B, K], fused latent [B, S * width])."""
        z = self.features(x)
        return (1 - self.alpha) * self.fused_logits(z) + self.alpha * self.backbone_logits(x), z
