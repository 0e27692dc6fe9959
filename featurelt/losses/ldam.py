"""LDAM loss with deferred re-weighting (Cao et al. 2019; METHODS.md section 1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from featurelt.losses import LOSSES, Loss, LossContext
from featurelt.losses.softmax import effective_number_weights


@LOSSES.register("ldam")
class LDAM(Loss):
    """LDAM: CE on ``s * (z - m_y e_y)``, margin ``m_y = C / n_y^{1/4}`` with C set so max_k m_k = max_m.

    Options (METHODS.md section 1):
      max_m: largest margin, > 0 (default 0.5);
      s: logit scale, > 0 (default 30);
      drw_epoch: deferred re-weighting starts at this epoch (default 160, the paper's 160 of 200;
        pass about 0.8 * epochs; a negative value disables DRW);
      drw_beta: beta of the class-balanced DRW weights ``(1-beta)/(1-beta^n)``, normalised to sum K
        (default 0.9999). Before ``drw_epoch`` every weight is 1.
    Per-class loss (label k): ``-log softmax(s (z - m_k e_k))_k``; batch loss = plain mean.
    """

    def __init__(self, ctx: LossContext, *, max_m: float = 0.5, s: float = 30.0, drw_epoch: int = 160,
                 drw_beta: float = 0.9999) -> None:
        super().__init__(ctx)
        if max_m <= 0 or s <= 0:
            raise ValueError(f"ldam needs max_m > 0 and s > 0, got max_m={max_m}, s={s}")
        m = 1.0 / self.class_counts.double().pow(0.25)
        self.register_buffer("margins", (m * (max_m / m.max())).float())
        self.s = float(s)
        self.drw_epoch = int(drw_epoch)
        self.register_buffer("drw_weights", effective_number_weights(self.class_counts, drw_beta))

    def per_class(self, logits: Tensor, *, epoch: int = 0) -> Tensor:
        # L_k = -(a_k - d_k) + log(sum_{j!=k} e^{a_j} + e^{a_k - d_k}),  a = s z, d = s m
        #     = -(a_k - d_k) + lse(a) + log1p(-p_k (1 - e^{-d_k})),        p = softmax(a)  (stable)
        a = self.s * logits
        d = self.s * self.margins.to(logits)
        lse = torch.logsumexp(a, dim=1, keepdim=True)
        p = F.softmax(a, dim=1)
        return -(a - d) + lse + torch.log1p(-p * (-torch.expm1(-d)))

    def class_weights(self, *, epoch: int = 0) -> Tensor | None:
        if self.drw_epoch >= 0 and epoch >= self.drw_epoch:
            return self.drw_weights
        return None
