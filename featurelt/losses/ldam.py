"""LDAM loss with deferred re-weighting (Cao et al. 2019; METHODS.md section 1)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from featurelt.losses import LOSSES, Loss, LossContext
from featurelt.losses.softmax import effective_number_weights

DRW_FRACTION = 0.8  # DRW starts at ceil(0.8 * epochs): epoch 160 of 200 in the LDAM-DRW code


def default_drw_epoch(epochs: int | None) -> int:
    """``ceil(0.8 * epochs)``; 160 (the LDAM-DRW code's 160 of 200) when the run length is unknown."""
    return 160 if epochs is None else math.ceil(DRW_FRACTION * epochs)


@LOSSES.register("ldam")
class LDAM(Loss):
    """LDAM: CE on ``s * (z - m_y e_y)``, margin ``m_y = C / n_y^{1/4}`` with C set so max_k m_k = max_m.

    Options (METHODS.md section 1):
      max_m: largest margin, > 0 (default 0.5);
      s: logit scale, > 0 (default 30);
      drw_epoch: deferred re-weighting starts at this epoch (default ``ceil(0.8 * epochs)`` of the run,
        ``LossContext.epochs``: the LDAM-DRW code's 160 of 200; 160 when the context has no epochs;
        a negative value disables DRW);
      drw_beta: beta of the class-balanced DRW weights ``(1-beta)/(1-beta^n)``, normalised to sum K
        (default 0.9999). Before ``drw_epoch`` every weight is 1.
    Per-sample loss: the LDAM-DRW code's ``F.cross_entropy(s * (z - m * onehot_y), y, weight=w)``, and the
    batch loss under DRW is its weighted mean ``sum_i w_yi l_i / sum_i w_yi`` (``weighted_mean``). The
    per-class loss (label k) ``-log softmax(s (z - m_k e_k))_k`` is computed as
    ``softplus(lse_{j != k}(s z_j) - s (z_k - m_k))``: the same value, but it stays > 0 with a non-zero
    gradient in float32 where a float32 ``log_softmax`` rounds ``1 - p_y`` away (``p_y`` within ~1e-7 of 1).
    """

    weighted_mean = True

    def __init__(self, ctx: LossContext, *, max_m: float = 0.5, s: float = 30.0, drw_epoch: int | None = None,
                 drw_beta: float = 0.9999) -> None:
        super().__init__(ctx)
        if max_m <= 0 or s <= 0:
            raise ValueError(f"ldam needs max_m > 0 and s > 0, got max_m={max_m}, s={s}")
        m = 1.0 / self.class_counts.double().pow(0.25)
        self.register_buffer("margins", (m * (max_m / m.max())).float())
        self.s = float(s)
        self.drw_epoch = default_drw_epoch(ctx.epochs) if drw_epoch is None else int(drw_epoch)
        self.register_buffer("drw_weights", effective_number_weights(self.class_counts, drw_beta))

    def per_class(self, logits: Tensor, *, epoch: int = 0) -> Tensor:
        # L_k = softplus(lse_{j != k}(a_j) - (a_k - d_k)),  a = s z, d = s m.
        # lse over j != k: for k not the row maximum, M + log(S - e_k) with e = exp(a - M), S = sum e; the
        # difference is >= 1 (it holds the maximum's term), so it loses no precision. For the maximum's
        # column, a logsumexp with that entry masked out.
        a = self.s * logits
        u = a - self.s * self.margins.to(logits)
        if self.num_classes == 1:
            return torch.zeros_like(a)
        top = a.argmax(dim=1, keepdim=True)
        is_max = torch.zeros_like(a, dtype=torch.bool).scatter_(1, top, True)
        m = a.gather(1, top)
        e = torch.exp(a - m)
        rest = m + torch.log(e.sum(1, keepdim=True) - e.masked_fill(is_max, 0.0))  # finite in the max column
        rest_of_max = torch.logsumexp(a.masked_fill(is_max, float("-inf")), dim=1, keepdim=True)
        return F.softplus(torch.where(is_max, rest_of_max, rest) - u)

    def schedule_notes(self, epochs: int) -> list[str]:
        """When deferred re-weighting starts (epochs counted from 0), or that it never does."""
        if self.drw_epoch < 0:
            return ["ldam: deferred re-weighting is off (drw_epoch < 0)"]
        if self.drw_epoch >= epochs:
            return [f"ldam: deferred re-weighting would start at epoch {self.drw_epoch}, but the run has {epochs} "
                    f"epochs (0..{epochs - 1}): it never applies (--loss-opt drw_epoch=N)"]
        return [f"ldam: deferred re-weighting starts at epoch {self.drw_epoch} of 0..{epochs - 1} "
                f"(class-balanced weights, {epochs - self.drw_epoch} epoch(s) re-weighted)"]

    def class_weights(self, *, epoch: int = 0) -> Tensor | None:
        if self.drw_epoch >= 0 and epoch >= self.drw_epoch:
            return self.drw_weights
        return None
