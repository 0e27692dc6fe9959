"""ECVL contrastive vision-language loss on cosine-to-text logits (METHODS.md section 5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from featurelt.losses import LOSSES, Loss, LossContext, soft_targets


@LOSSES.register("contrastive-vl")
class ContrastiveVL(Loss):
    """ECVL ``L_v->l`` (+ optional ``L_l->v``) on logits = cos(f*, t_k) / tau from the head (section 5).

    ``L_v->l``: CE over the K class texts, per class ``-log softmax_k(logits)``.
    l2v_weight: >= 0 (default 0) weight of ``L_l->v``: for each class k present in the batch,
    ``-mean_{i: y_i = k} log softmax_over_batch_images(logits[:, k])_i``, averaged over present
    classes. With soft targets image i counts for class k with weight y_ik (a class is present when
    its column sums to > 0), which equals the hard version for one-hot input.
    ``per_sample`` spreads ``L_l->v`` over the images so that ``per_sample.mean() == forward``.
    """

    def __init__(self, ctx: LossContext, *, l2v_weight: float = 0.0) -> None:
        super().__init__(ctx)
        if l2v_weight < 0:
            raise ValueError(f"contrastive-vl l2v_weight must be >= 0, got {l2v_weight}")
        self.l2v_weight = float(l2v_weight)

    def per_class(self, logits: Tensor, *, epoch: int = 0) -> Tensor:
        return -F.log_softmax(logits, dim=1)

    def text_to_image_terms(self, logits: Tensor, target: Tensor) -> Tensor:
        """[B] contributions c_i with ``c.sum() = L_l->v`` (0 for an empty batch)."""
        y = soft_targets(target, self.num_classes).to(logits)
        logp = F.log_softmax(logits, dim=0)  # over the images of the batch, per class column
        mass = y.sum(0)  # [K]
        present = mass > 0
        n_present = present.sum().clamp_min(1)
        contrib = torch.where(y != 0, -y * logp, torch.zeros_like(logp)) / mass.clamp_min(1e-12)
        return contrib[:, present].sum(1) / n_present

    def per_sample(self, logits: Tensor, target: Tensor, *, epoch: int = 0) -> Tensor:
        """logits [B, K], target [B] or [B, K] -> [B]: ``L_v->l,i + l2v_weight * B * c_i``."""
        loss = super().per_sample(logits, target, epoch=epoch)
        if self.l2v_weight:
            loss = loss + self.l2v_weight * logits.shape[0] * self.text_to_image_terms(logits, target)
        return loss
