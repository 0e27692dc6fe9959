"""Memory-bank prototypes and the prototype losses of the SAM-features paper (METHODS.md section 2).

A FIFO :class:`MemoryBank` keeps the M most recent fused features ``z`` of every class; prototype
``c_k`` is their mean and ``sigma_k`` their per-dimension std. With imbalance weights
``w_y = (1/n_y) / max_k (1/n_k)`` in (0, 1] (low for head classes) and ``d(z, c) = ||z - c||^2``:

- ``L_head      = 1/B sum (1 - w_yi) d(z_i, c_yi)            [w_yi < tau_head]``
- ``L_tail-std  = 1/B sum w_yi d(z_i, c_yi +- sigma_yi)       [w_yi > tau_tail_std]`` (random sign per use)
- ``L_tail-dist = -1/B sum w_yi log d(z_i, c_yi)             [w_yi > tau_tail_dist]``

``L_proto = L_head + L_tail-std + L_tail-dist`` times ``beta`` (1e-4 ImageNet-LT, 1e-3 iNat18).
Each term can be switched off with ``terms``. The losses read the bank *before* it is updated
with the current batch, so a sample is never compared with itself.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from featurelt.losses import LossContext

TERMS = ("head", "tail-std", "tail-dist")


def imbalance_weights(class_counts: Tensor) -> Tensor:
    """``w_y = (1/n_y) / max_k(1/n_k)``: 1 for the rarest class, small for head classes. [K] -> [K]."""
    inv = 1.0 / class_counts.float()
    return inv / inv.max()


class MemoryBank(nn.Module):
    """FIFO of the ``size`` (M) most recent features per class (METHODS.md section 2).

    Buffers: ``bank`` [K, M, D], ``filled`` [K] (rows in use, <= M), ``cursor`` [K] (next slot).
    ``update(z [B, D], y [B])``; ``prototypes()`` c_k [K, D]; ``stds()`` sigma_k [K, D];
    ``counts()`` [K]; ``items(k)`` [n, D] oldest first.
    """

    def __init__(self, num_classes: int, dim: int, size: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"memory bank size M must be >= 1, got {size}")
        self.size = size
        self.register_buffer("bank", torch.zeros(num_classes, size, dim))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.long))  # rows in use, <= size
        self.register_buffer("cursor", torch.zeros(num_classes, dtype=torch.long))  # next slot to overwrite

    @torch.no_grad()
    def update(self, z: Tensor, y: Tensor) -> None:
        """z: [B, D], y: [B] long. Push each feature into its class's ring buffer (oldest overwritten first)."""
        if z.dim() != 2 or z.shape[1] != self.bank.shape[2] or y.shape != (z.shape[0],):
            raise ValueError(f"update expects z [B, {self.bank.shape[2]}] and y [B], got z={tuple(z.shape)} y={tuple(y.shape)}")
        if y.numel() == 0:
            return
        y = y.long().to(self.bank.device)
        z = z.detach().to(self.bank)
        order = torch.argsort(y, stable=True)  # batch order kept within each class
        ys, zs = y[order], z[order]
        classes, counts = torch.unique_consecutive(ys, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(ys.numel(), device=ys.device) - torch.repeat_interleave(starts, counts)
        total = torch.repeat_interleave(counts, counts)
        keep = rank >= total - self.size  # only the last M of a class in this batch can survive
        slot = (self.cursor[ys] + rank) % self.size
        self.bank[ys[keep], slot[keep]] = zs[keep]
        self.cursor[classes] = (self.cursor[classes] + counts) % self.size
        self.filled[classes] = (self.filled[classes] + counts).clamp_max(self.size)

    def items(self, cls: int) -> Tensor:
        """The stored features of one class, oldest first. [n, D]."""
        n = int(self.filled[cls])
        if n < self.size:
            return self.bank[cls, :n]
        c = int(self.cursor[cls])
        return torch.cat([self.bank[cls, c:], self.bank[cls, :c]])

    def counts(self) -> Tensor:
        return self.filled.clone()

    def prototypes(self) -> Tensor:
        """Class means c_k [K, D] (zeros for empty classes)."""
        mask = (torch.arange(self.size, device=self.bank.device)[None, :] < self.filled[:, None]).to(self.bank)
        return (self.bank * mask[..., None]).sum(1) / self.filled.clamp_min(1)[:, None].to(self.bank)

    def stds(self) -> Tensor:
        """Per-dimension population std sigma_k [K, D] (zeros for empty classes)."""
        mask = (torch.arange(self.size, device=self.bank.device)[None, :] < self.filled[:, None]).to(self.bank)
        mean = self.prototypes()
        var = (((self.bank - mean[:, None]) ** 2) * mask[..., None]).sum(1) / self.filled.clamp_min(1)[:, None].to(self.bank)
        return var.sqrt()


class ProtoLoss(nn.Module):
    """The prototype add-on ``beta * (L_head + L_tail-std + L_tail-dist)`` (METHODS.md section 2).

    ctx: LossContext; ``w_y = (1/n_y) / max_k(1/n_k)`` from ``ctx.class_counts`` (buffer ``w`` [K]).
    Options (keyword-only):
      dim: feature width D; ``None`` (default) allocates the bank at the first forward from z.
      M: features kept per class (FIFO), >= 1, default 64.
      terms: subset of ("head", "tail-std", "tail-dist"), default all three.
      tau_head: L_head applies where ``w_y < tau_head`` (default 0.5: classes with at least twice the
        rarest class's count, i.e. head side).
      tau_tail_std, tau_tail_dist: the tail terms apply where ``w_y > tau`` (default 0.5 each: classes
        with less than twice the rarest class's count).
      beta: weight of L_proto in the total loss (1e-4 ImageNet-LT default, 1e-3 iNat18).
      eps: guard in ``log(d + eps)`` of L_tail-dist (default 1e-6).
      seed: seed of the CPU ``torch.Generator`` drawing the +-sigma sign (one sign per sample per use).
    forward(z [B, D], y [B]) -> scalar, computed from the bank state BEFORE this batch is pushed;
    classes whose bank is still empty contribute nothing (their samples add 0 to the 1/B sums).
    """

    def __init__(self, ctx: LossContext, *, dim: int | None = None, M: int = 64,
                 terms: Iterable[str] = TERMS, tau_head: float = 0.5, tau_tail_std: float = 0.5,
                 tau_tail_dist: float = 0.5, beta: float = 1e-4, eps: float = 1e-6, seed: int = 0) -> None:
        super().__init__()
        self.terms = tuple(terms)
        unknown = [t for t in self.terms if t not in TERMS]
        if unknown:
            raise ValueError(f"unknown prototype term(s) {unknown}; choose from {', '.join(TERMS)}")
        if M < 1:
            raise ValueError(f"memory bank size M must be >= 1, got {M}")
        self.num_classes, self.M = ctx.num_classes, int(M)
        self.bank: MemoryBank | None = MemoryBank(ctx.num_classes, dim, M) if dim is not None else None
        self.register_buffer("w", imbalance_weights(ctx.class_counts))
        self.tau_head, self.tau_tail_std, self.tau_tail_dist = float(tau_head), float(tau_tail_std), float(tau_tail_dist)
        self.beta, self.eps = float(beta), float(eps)
        self.generator = torch.Generator().manual_seed(seed)

    def _bank_for(self, z: Tensor) -> MemoryBank:
        if self.bank is None:
            self.bank = MemoryBank(self.num_classes, z.shape[1], self.M).to(z.device)
        return self.bank

    def components(self, z: Tensor, y: Tensor) -> dict[str, Tensor]:
        """z [B, D], y [B] -> {"head", "tail-std", "tail-dist"}: each term (already / B) from the current bank."""
        if z.dim() != 2 or y.shape != (z.shape[0],):
            raise ValueError(f"ProtoLoss expects z [B, D] and y [B], got z={tuple(z.shape)} y={tuple(y.shape)}")
        bank = self._bank_for(z)
        y = y.long()
        have = bank.filled[y] > 0  # classes with an empty bank contribute nothing
        c = bank.prototypes()[y].to(z)
        sigma = bank.stds()[y].to(z)
        w = self.w[y].to(z)
        b = z.shape[0]
        zero = z.new_zeros(())
        out = {t: zero for t in TERMS}
        d = ((z - c) ** 2).sum(1)
        if "head" in self.terms:
            out["head"] = ((1 - w) * d * ((w < self.tau_head) & have)).sum() / b
        if "tail-std" in self.terms:
            sign = torch.randint(0, 2, (b, 1), generator=self.generator).to(z) * 2 - 1
            d_std = ((z - (c + sign * sigma)) ** 2).sum(1)
            out["tail-std"] = (w * d_std * ((w > self.tau_tail_std) & have)).sum() / b
        if "tail-dist" in self.terms:
            on = (w > self.tau_tail_dist) & have
            out["tail-dist"] = -(torch.where(on, w * torch.log(d + self.eps), torch.zeros_like(d))).sum() / b
        return out

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        """z: [B, D] fused features, y: [B] labels. Returns ``beta * L_proto`` (scalar), then updates the bank."""
        parts = self.components(z, y)
        self.bank.update(z, y)  # type: ignore[union-attr]
        return self.beta * (parts["head"] + parts["tail-std"] + parts["tail-dist"])
