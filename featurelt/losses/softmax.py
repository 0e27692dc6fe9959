"""Softmax-family baselines: ce, balanced-softmax, logit-adjust, class-balanced, focal (METHODS.md section 1).

Per-class losses (loss of sample b if its label were k), ``p = softmax(z)``:

- ``ce``:               ``-log p_k``
- ``balanced-softmax``: ``-log(n_k e^{z_k} / sum_j n_j e^{z_j})``
- ``logit-adjust``:     ``-log softmax(z + tau log pi)_k`` (Menon et al.; tau = 1 is balanced softmax)
- ``class-balanced``:   ``w_k * (-log p_k)``, ``w_k = (1-beta)/(1-beta^{n_k})`` normalised to sum K
- ``focal``:            ``-alpha_k (1 - p_k)^gamma log p_k`` (alpha: none = 1, class-balanced = ``w_k`` above, or a list)

Soft targets: ``sum_k y_k * per-class loss``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from featurelt.losses import LOSSES, Loss, LossContext


@LOSSES.register("ce")
class CrossEntropy(Loss):
    """Plain softmax cross-entropy ``-log softmax(z)_y`` (METHODS.md section 1)."""

    def __init__(self, ctx: LossContext) -> None:
        super().__init__(ctx)

    def per_class(self, logits: Tensor, *, epoch: int = 0) -> Tensor:
        return -F.log_softmax(logits, dim=1)

    def forward(self, logits: Tensor, target: Tensor, *, epoch: int = 0) -> Tensor:
        """Hard labels go through ``F.cross_entropy`` (one fused kernel path); soft targets through the base."""
        if target.dim() == 1 and not target.dtype.is_floating_point:
            self._check(logits)
            return F.cross_entropy(logits, target.long())
        return super().forward(logits, target, epoch=epoch)


@LOSSES.register("balanced-softmax")
class BalancedSoftmax(Loss):
    """Balanced softmax ``-log(n_y e^{z_y} / sum_j n_j e^{z_j})`` (METHODS.md section 1)."""

    def __init__(self, ctx: LossContext) -> None:
        super().__init__(ctx)

    def per_class(self, logits: Tensor, *, epoch: int = 0) -> Tensor:
        return -F.log_softmax(logits + self.log_prior.to(logits), dim=1)


@LOSSES.register("logit-adjust")
class LogitAdjust(Loss):
    """Training-time logit adjustment ``-log softmax(z + tau log pi)_y`` (METHODS.md section 1).

    tau: float >= 0 (default 1.0, which equals balanced softmax; tau = 0 is plain CE).
    """

    def __init__(self, ctx: LossContext, *, tau: float = 1.0) -> None:
        super().__init__(ctx)
        if tau < 0:
            raise ValueError(f"logit-adjust tau must be >= 0, got {tau}")
        self.tau = float(tau)

    def per_class(self, logits: Tensor, *, epoch: int = 0) -> Tensor:
        return -F.log_softmax(logits + self.tau * self.log_prior.to(logits), dim=1)


def effective_number_weights(class_counts: Tensor, beta: float) -> Tensor:
    """Class-balanced weights ``(1 - beta) / (1 - beta^n)`` normalised to sum K (Cui et al.; section 1).

    class_counts: [K] > 0; beta in [0, 1). Returns [K] float32 (beta = 0 gives all ones).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"class-balanced beta must be in [0, 1), got {beta}")
    n = class_counts.double()
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * n.numel()).float()


@LOSSES.register("class-balanced")
class ClassBalanced(Loss):
    """Cross-entropy weighted by the effective number of samples (METHODS.md section 1).

    beta: in [0, 1), default 0.9999. Per-class loss ``w_k * (-log p_k)``; the batch loss is the plain
    mean of the weighted per-sample losses ``sum_i w_yi l_i / B`` (not ``F.cross_entropy(weight=)``'s
    ``/ sum_i w_yi``): Cui et al.'s reference code (``cifar_main.py``) passes the per-sample weights to
    ``tf.losses.softmax_cross_entropy``, whose default reduction divides by the number of non-zero weights,
    i.e. B, with the weights normalised to sum K as here.
    """

    def __init__(self, ctx: LossContext, *, beta: float = 0.9999) -> None:
        super().__init__(ctx)
        self.register_buffer("weights", effective_number_weights(self.class_counts, beta))

    def per_class(self, logits: Tensor, *, epoch: int = 0) -> Tensor:
        return -F.log_softmax(logits, dim=1)

    def class_weights(self, *, epoch: int = 0) -> Tensor:
        return self.weights


@LOSSES.register("focal")
class Focal(Loss):
    """Focal loss ``-alpha_y (1 - p_y)^gamma log p_y`` (Lin et al.; class-balanced focal: Cui et al. 2019;
    METHODS.md section 1).

    gamma: >= 0, default 2.
    alpha: class weights ``alpha_k``: ``"none"`` (default, all 1), ``"class-balanced"``
      (``(1 - beta) / (1 - beta^{n_k})`` normalised to sum K, the class-balanced focal loss), or K
      numbers > 0 (a list, or a comma-separated string: ``--loss-opt alpha=0.5,1,2``).
    beta: in [0, 1), default 0.9999; the effective-number beta of ``alpha=class-balanced``.
    The batch loss is the plain mean ``sum_i alpha_yi l_i / B``, as the focal loss of Cui et al.'s
    reference code (normalised by the number of positive labels, B).
    """

    def __init__(self, ctx: LossContext, *, gamma: float = 2.0, alpha: str | list[float] | None = "none",
                 beta: float = 0.9999) -> None:
        super().__init__(ctx)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        weights = focal_alpha(alpha, self.class_counts, beta)
        if weights is None:
            self.alpha = None
        else:
            self.register_buffer("alpha", weights)

    def per_class(self, logits: Tensor, *, epoch: int = 0) -> Tensor:
        logp = F.log_softmax(logits, dim=1)
        return -((-torch.expm1(logp)).clamp_min(0) ** self.gamma) * logp

    def class_weights(self, *, epoch: int = 0) -> Tensor | None:
        return self.alpha


def focal_alpha(alpha: str | list[float] | tuple[float, ...] | None, class_counts: Tensor, beta: float) -> Tensor | None:
    """The focal loss's ``alpha`` option as [K] float32 weights (None = all 1); see :class:`Focal`."""
    k = int(class_counts.numel())
    if alpha is None or (isinstance(alpha, str) and alpha.strip().lower() in ("none", "")):
        return None
    if isinstance(alpha, str) and alpha.strip().lower() == "class-balanced":
        return effective_number_weights(class_counts, beta)
    values: list[object]
    if isinstance(alpha, str):
        values = [v.strip() for v in alpha.strip().strip("[]").split(",") if v.strip()]
    elif isinstance(alpha, (list, tuple)):
        values = list(alpha)
    else:
        values = [alpha]
    try:
        w = torch.tensor([float(v) for v in values], dtype=torch.float32)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"focal alpha must be 'none', 'class-balanced' or {k} numbers, got {alpha!r}") from None
    if w.numel() != k or not bool((w > 0).all()):
        raise ValueError(f"focal alpha must be 'none', 'class-balanced' or {k} numbers > 0 (one per class), "
                         f"got {alpha!r}")
    return w
