"""Classification losses for long-tailed heads (registry ``LOSSES``).

Every loss is an ``nn.Module`` built as ``LOSSES.get(name)(ctx, **opts)`` from a
:class:`LossContext` (class statistics, never a dataset); options are keyword-only and an unknown
option raises ``TypeError`` naming every unknown key and the accepted ones.

``forward(logits [B, K], target, *, epoch=0) -> scalar`` takes hard labels ``[B]`` (long) or soft
(mixup) targets ``[B, K]``. Every loss defines :meth:`Loss.per_class` ``[B, K]``, the loss sample b
would have if its label were k (class weights included); a soft target gives
``sum_k y_k * per_class[:, k]``, so a one-hot soft target reproduces the hard-label loss exactly.
``per_sample(logits, target, *, epoch=0) -> [B]`` satisfies ``reduce(per_sample(...), target) == forward(...)``
(used by the ECVL momentum sampler, METHODS.md section 5). ``reduce`` is the plain batch mean, except for a
loss with ``weighted_mean = True`` (ldam with deferred re-weighting): there it is PyTorch's weighted mean
``sum_i w_i l_i / sum_i w_i`` with ``w_i = sum_k y_ik w_k`` (``F.cross_entropy(weight=...)``, as in the
LDAM-DRW reference code).

Families (one file each): ``softmax.py`` (ce, balanced-softmax, logit-adjust, class-balanced, focal;
METHODS.md section 1), ``ldam.py`` (section 1), ``neighbor.py`` (ns-ce, section 3),
``contrastive.py`` (contrastive-vl, section 5). ``prototype.py`` holds the prototype add-on of
section 2 (not a registered loss: it reads features, not logits).
"""
from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurelt._registry import Registry

LOSSES: Registry[type["Loss"]] = Registry("loss")


@dataclass(frozen=True)
class LossContext:
    """Class statistics a loss may use (METHODS.md sections 1 and 3).

    class_counts: [K] float, train counts of the original split; auxiliary classes carry their own
        counts. Every count must be > 0 (log-priors and margins are undefined otherwise).
    neighbor_of: [K] long, -1 for target classes; for auxiliary class a the target class it was
        queried from. ``None`` means "no auxiliary classes" (all -1).
    num_target: K_target; labels >= num_target are auxiliary. ``None`` means K.
    """

    class_counts: Tensor
    neighbor_of: Tensor | None = field(default=None)
    num_target: int | None = field(default=None)
    epochs: int | None = field(default=None)  # epochs of the run (schedules such as ldam's DRW start); None = unknown

    def __post_init__(self) -> None:
        counts = torch.as_tensor(self.class_counts)
        if counts.dim() != 1 or counts.numel() == 0:
            raise ValueError(f"class_counts must be 1-D [K], got shape={tuple(counts.shape)}")
        if (counts <= 0).any():
            bad = torch.nonzero(counts <= 0).flatten().tolist()
            raise ValueError(f"class_counts must be > 0 for every class; classes {bad[:10]} have no train rows")
        k = counts.numel()
        nb = torch.full((k,), -1, dtype=torch.long) if self.neighbor_of is None else torch.as_tensor(self.neighbor_of).long()
        if nb.shape != (k,):
            raise ValueError(f"neighbor_of must be [K={k}], got shape={tuple(nb.shape)}")
        if ((nb < -1) | (nb >= k)).any():
            raise ValueError(f"neighbor_of entries must be -1 or a class index < {k}, got {nb.tolist()[:20]}")
        num_target = k if self.num_target is None else int(self.num_target)
        if not 0 < num_target <= k:
            raise ValueError(f"num_target must be in 1..{k}, got {self.num_target}")
        if (nb[:num_target] != -1).any():
            raise ValueError("neighbor_of must be -1 for target classes (labels < num_target)")
        if self.epochs is not None and int(self.epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        object.__setattr__(self, "class_counts", counts.float())
        object.__setattr__(self, "neighbor_of", nb)
        object.__setattr__(self, "num_target", num_target)

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.numel())


def check_options(cls: type, opts: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming every key of ``opts`` that ``cls.__init__`` does not accept."""
    params = inspect.signature(cls.__init__).parameters
    allowed = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(allowed) or '(none)'}")


def soft_targets(target: Tensor, num_classes: int) -> Tensor:
    """[B] long labels -> [B, K] one-hot float; a [B, K] soft target passes through (shape checked)."""
    if target.dim() == 1:
        if target.dtype.is_floating_point:
            raise ValueError(f"hard targets must be integer labels, got dtype={target.dtype}")
        # checked on the host only: on an accelerator it would sync every step; there F.one_hot's
        # scatter raises a device-side assert for an out-of-range label instead (as in PyTorch itself)
        if target.numel() and target.device.type == "cpu" and (target.min() < 0 or target.max() >= num_classes):
            raise ValueError(f"labels must be in 0..{num_classes - 1}, got min={int(target.min())} max={int(target.max())}")
        return F.one_hot(target.long(), num_classes).float()
    if target.dim() != 2 or target.shape[1] != num_classes:
        raise ValueError(f"target must be [B] labels or [B, {num_classes}] soft labels, got shape={tuple(target.shape)}")
    return target.float()


def post_hoc_logit_adjust(logits: Tensor, class_counts: Tensor, tau: float = 1.0) -> Tensor:
    """Post-hoc logit adjustment ``z_j - tau * log(pi_j)`` at inference (METHODS.md section 1).

    logits: [..., K'] with K' <= K; class_counts: [K] (pi = counts / counts.sum() over all K classes;
    when auxiliary columns were masked away, the first K' priors are used). Returns [..., K'].
    """
    counts = torch.as_tensor(class_counts).to(device=logits.device, dtype=torch.float64)
    if counts.dim() != 1 or logits.shape[-1] > counts.numel():
        raise ValueError(f"class_counts [K] must cover the {logits.shape[-1]} logit columns, got shape={tuple(counts.shape)}")
    if (counts[: logits.shape[-1]] <= 0).any():
        raise ValueError("post_hoc_logit_adjust: class_counts must be > 0")
    log_prior = torch.log(counts / counts.sum())[: logits.shape[-1]].to(logits.dtype)
    return logits - tau * log_prior


class Loss(nn.Module):
    """Base class: subclasses implement :meth:`per_class`; targets, weighting and reduction live here.

    Buffers (move with ``.to(device)``): ``class_counts`` [K], ``log_prior`` [K] = log(n / sum n).
    ``weighted_mean``: False = the batch loss is the plain mean of the (weighted) per-sample losses;
    True = ``sum_i w_i l_i / sum_i w_i`` when :meth:`class_weights` gives weights (see :meth:`reduce`).
    """

    weighted_mean: bool = False

    def __new__(cls, ctx: LossContext | None = None, *args: Any, **opts: Any) -> "Loss":
        check_options(cls, opts)
        return super().__new__(cls)

    def __init__(self, ctx: LossContext) -> None:
        super().__init__()
        if not isinstance(ctx, LossContext):
            raise TypeError(f"{type(self).__name__} needs a LossContext, got {type(ctx).__name__}")
        self.num_classes = ctx.num_classes
        self.num_target = int(ctx.num_target)  # type: ignore[arg-type]
        self.register_buffer("class_counts", ctx.class_counts.float().clone())
        self.register_buffer("log_prior", torch.log(self.class_counts / self.class_counts.sum()))

    @abc.abstractmethod
    def per_class(self, logits: Tensor, *, epoch: int = 0) -> Tensor:
        """logits [B, K] -> [B, K]: entry (b, k) is the unweighted loss of sample b if its label were k."""

    def class_weights(self, *, epoch: int = 0) -> Tensor | None:
        """Optional per-class weights [K] multiplying the per-class loss (None = all 1)."""
        return None

    def schedule_notes(self, epochs: int) -> list[str]:
        """Lines for the run's log about epoch-dependent behaviour over ``epochs`` epochs (none by default)."""
        return []

    def _check(self, logits: Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"{type(self).__name__}: expected logits [B, {self.num_classes}], got shape={tuple(logits.shape)}")

    def per_sample(self, logits: Tensor, target: Tensor, *, epoch: int = 0) -> Tensor:
        """logits: [B, K]; target: [B] long or [B, K] soft. Returns [B]: ``sum_k y_k w_k per_class[:, k]``."""
        self._check(logits)
        losses = self.per_class(logits, epoch=epoch)
        w = self.class_weights(epoch=epoch)
        if target.dim() == 1 and not target.dtype.is_floating_point:
            # hard labels: pick the label's column (same value as the one-hot sum, fewer kernels)
            if target.numel() and target.device.type == "cpu" and (target.min() < 0 or target.max() >= self.num_classes):
                raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got min={int(target.min())} max={int(target.max())}")
            idx = target.long()[:, None]
            picked = losses.gather(1, idx).squeeze(1)
            return picked * w.to(logits)[idx.squeeze(1)] if w is not None else picked
        y = soft_targets(target, self.num_classes).to(logits)
        if w is not None:
            losses = losses * w.to(logits)
        # y_k = 0 entries must not turn an infinite per-class loss into nan
        return torch.where(y != 0, y * losses, torch.zeros_like(losses)).sum(1)

    def reduce(self, per_sample: Tensor, target: Tensor, *, epoch: int = 0) -> Tensor:
        """Batch loss from :meth:`per_sample` [B]: the mean, or (``weighted_mean`` and class weights at
        ``epoch``) ``sum_i w_i l_i / sum_i w_i`` with ``w_i = w_{y_i}`` (soft target: ``sum_k y_ik w_k``)."""
        w = self.class_weights(epoch=epoch) if self.weighted_mean else None
        if w is None:
            return per_sample.mean()
        w = w.to(per_sample)
        if target.dim() == 1 and not target.dtype.is_floating_point:
            return per_sample.sum() / w[target.long()].sum()
        return per_sample.sum() / (soft_targets(target, self.num_classes).to(per_sample) @ w).sum()

    def forward(self, logits: Tensor, target: Tensor, *, epoch: int = 0) -> Tensor:
        """:meth:`reduce` of :meth:`per_sample` over the batch. Returns a scalar tensor."""
        return self.reduce(self.per_sample(logits, target, epoch=epoch), target, epoch=epoch)


from featurelt.losses import contrastive, ldam, neighbor, softmax  # noqa: E402, F401  (register the families)
from featurelt.losses.contrastive import ContrastiveVL  # noqa: E402
from featurelt.losses.ldam import LDAM  # noqa: E402
from featurelt.losses.neighbor import NeighborSilencedCE, silencing_pairs  # noqa: E402
from featurelt.losses.softmax import (  # noqa: E402
    BalancedSoftmax, ClassBalanced, CrossEntropy, Focal, LogitAdjust, effective_number_weights)


def build_loss(name: str, ctx: LossContext, **opts: Any) -> Loss:
    """``LOSSES.get(name)(ctx, **opts)``; the error of a bad option names the loss."""
    return LOSSES.build(name, ctx, **opts)


__all__ = ["LOSSES", "LossContext", "Loss", "build_loss", "check_options", "post_hoc_logit_adjust",
           "soft_targets", "effective_number_weights", "silencing_pairs", "CrossEntropy",
           "BalancedSoftmax", "LogitAdjust", "ClassBalanced", "Focal", "LDAM", "NeighborSilencedCE",
           "ContrastiveVL"]
