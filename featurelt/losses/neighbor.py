"""Neighbor-silencing cross-entropy NS-CE (Granularity Matters; METHODS.md section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from featurelt.losses import LOSSES, Loss, LossContext


def silencing_pairs(neighbor_of: Tensor) -> tuple[Tensor, Tensor]:
    """The silenced pairs: (aux [A], target [A]) with ``neighbor_of[aux] = target`` (section 3)."""
    aux = torch.nonzero(neighbor_of >= 0).flatten()
    return aux, neighbor_of[aux].long()


@LOSSES.register("ns-ce")
class NeighborSilencedCE(Loss):
    """NS-CE ``log(1 + sum_{j != i} lambda_ij exp(log n_j - log n_i + z_j - z_i))`` (METHODS.md section 3).

    lambda_s: > 0 (default 0.1), the weight ``lambda_ij`` of a pair where one class is auxiliary and
    is the other's neighbor (``neighbor_of``); every other pair has lambda = 1, and then the loss is
    balanced softmax exactly. With ``u = z + log n`` and ``q = softmax(u)`` the loss for label i is
    ``lse(u) - u_i + log1p(-(1 - lambda_s) * sum_{j in N(i)} q_j)``, N(i) = silenced partners of i
    (computed with gathers, no [K, K] matrix). Soft targets: ``sum_i y_i * loss_i``.
    """

    def __init__(self, ctx: LossContext, *, lambda_s: float = 0.1) -> None:
        super().__init__(ctx)
        if lambda_s <= 0:
            raise ValueError(f"ns-ce lambda_s must be > 0, got {lambda_s}")
        self.lambda_s = float(lambda_s)
        aux, tgt = silencing_pairs(ctx.neighbor_of)  # type: ignore[arg-type]
        self.register_buffer("aux", aux)
        self.register_buffer("tgt", tgt)

    def per_class(self, logits: Tensor, *, epoch: int = 0) -> Tensor:
        u = logits + self.log_prior.to(logits)
        base = -F.log_softmax(u, dim=1)  # lse(u) - u_i: balanced softmax
        if self.aux.numel() == 0 or self.lambda_s == 1.0:
            return base
        q = F.softmax(u, dim=1)
        silenced = torch.zeros_like(q)
        silenced.index_add_(1, self.tgt, q[:, self.aux])  # target t: mass of its auxiliary neighbors
        silenced[:, self.aux] += q[:, self.tgt]             # auxiliary a: mass of its target
        return base + torch.log1p(-(1.0 - self.lambda_s) * silenced)
