"""Batch samplers over cached feature rows (registry ``SAMPLERS``).

A sampler is built as ``SAMPLERS.get(name)(ctx, **opts)`` from a :class:`SamplerContext`; options are
keyword-only and an unknown option raises ``TypeError`` naming every unknown key. ``epoch(e)`` yields
``ceil(N_epoch / batch_size)`` :class:`Batch` es, deterministic given ``ctx.seed`` and ``e`` (and, for
``momentum``, the losses fed back before); ``feedback(index, per_sample_loss, view)`` reports the
per-sample losses of a batch (used by ``momentum``, a no-op elsewhere).

Auxiliary classes (labels >= num_target, METHODS.md section 3) are limited in every sampler: per
epoch, a target class of bucket b exposes at most ``aux_per_head * quota_b`` of its auxiliary
neighbor classes (``quota`` from :func:`neighbor_class_quota`, the 1 : ceil(N_h/N_m) : ceil(N_h/N_t)
rule; chosen at random per epoch), and an exposed auxiliary class contributes at most ``aux_cap``
rows and at most ``aux_cap`` appearances (index and partner together) per epoch.

Families (one file each): ``basic.py`` (instance, class-balanced, sqrt), ``mixup.py`` (lfm, section 6;
balancemix, section 4), ``momentum.py`` (momentum, section 5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
from torch import Tensor

from featurelt._registry import Registry

SAMPLERS: Registry[type["Sampler"]] = Registry("sampler")

SOURCES = ("original", "auxiliary", "generated")
Kind = Literal["instance", "class-balanced", "sqrt"]


@dataclass(frozen=True)
class SamplerContext:
    """What a sampler knows about the training rows (numpy; N rows, K classes incl. auxiliary).

    labels: [N] int64 class of each row.
    class_counts: [K] train counts of the original split (auxiliary classes with their own counts).
    source: [N] str, 'original' | 'auxiliary' | 'generated'.
    neighbor_of: [K] int64, -1 for target classes; for auxiliary class a the target it was queried from.
    num_target: K_target; labels >= num_target are auxiliary (METHODS.md section 3).
    text_sim: [K, K] cosine similarity of the class text embeddings, or None (needed by ``lfm``).
    num_views: cached views per row, view 0 plain included (1 = no augmented views).
    batch_size: rows per batch, >= 1.
    seed: base seed; epoch e uses ``np.random.default_rng([seed, e])``.
    aux_cap: most rows / appearances of one auxiliary class per epoch (paper: 50), >= 0.
    """

    labels: np.ndarray
    class_counts: np.ndarray
    source: np.ndarray
    neighbor_of: np.ndarray
    num_target: int
    text_sim: np.ndarray | None
    num_views: int
    batch_size: int
    seed: int
    aux_cap: int = 50

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got shape={labels.shape} dtype={labels.dtype}")
        counts = np.asarray(self.class_counts, dtype=np.float64)
        if counts.ndim != 1 or (counts < 0).any():
            raise ValueError(f"class_counts must be a 1-D array of counts >= 0, got shape={counts.shape}")
        k = counts.size
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"labels must be in 0..{k - 1}, got min={labels.min()} max={labels.max()}")
        source = np.asarray(self.source).astype(str)
        if source.shape != labels.shape:
            raise ValueError(f"source must be [N={labels.size}], got shape={source.shape}")
        bad = sorted(set(np.unique(source)) - set(SOURCES))
        if bad:
            raise ValueError(f"source values must be one of {SOURCES}, got {bad[:5]}")
        nb = np.asarray(self.neighbor_of, dtype=np.int64)
        if nb.shape != (k,) or ((nb < -1) | (nb >= k)).any():
            raise ValueError(f"neighbor_of must be [K={k}] with entries -1 or a class index, got shape={nb.shape}")
        if not 0 < int(self.num_target) <= k:
            raise ValueError(f"num_target must be in 1..{k}, got {self.num_target}")
        sim = None
        if self.text_sim is not None:
            sim = np.asarray(self.text_sim, dtype=np.float64)
            if sim.shape != (k, k):
                raise ValueError(f"text_sim must be [K, K] = [{k}, {k}], got shape={sim.shape}")
        for name in ("num_views", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.aux_cap) < 0:
            raise ValueError(f"aux_cap must be >= 0, got {self.aux_cap}")
        for name, value in (("labels", labels.astype(np.int64)), ("class_counts", counts), ("source", source),
                            ("neighbor_of", nb), ("text_sim", sim), ("num_target", int(self.num_target)),
                            ("num_views", int(self.num_views)), ("batch_size", int(self.batch_size)),
                            ("seed", int(self.seed)), ("aux_cap", int(self.aux_cap))):
            object.__setattr__(self, name, value)

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.size)


@dataclass
class Batch:
    """One batch of row indices (torch, CPU).

    index: [B] long rows; partner: [B] long mixup partner rows or None;
    lam_x: [B] float input weight of ``index`` (partner gets 1 - lam_x) or None;
    lam_y: [B] float label weight of index's label (partner's label gets 1 - lam_y) or None;
    view: [B] long cached view per row (0 = plain) or None (= view 0).
    """

    index: Tensor
    partner: Tensor | None = None
    lam_x: Tensor | None = None
    lam_y: Tensor | None = None
    view: Tensor | None = None


def class_sampling_probs(counts: np.ndarray | Sequence[float], kind: Kind) -> np.ndarray:
    """Class probabilities [K] for ``kind``: instance ∝ n, class-balanced ∝ 1, sqrt ∝ sqrt(n).

    Classes with n <= 0 get probability 0 (METHODS.md sections 1 and 5).
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1:
        raise ValueError(f"counts must be 1-D [K], got shape={n.shape}")
    power = {"instance": 1.0, "class-balanced": 0.0, "sqrt": 0.5}
    if kind not in power:
        raise ValueError(f"unknown sampling kind {kind!r}; choose from {', '.join(power)}")
    w = np.where(n > 0, np.power(np.clip(n, 0, None), power[kind]), 0.0)
    if w.sum() <= 0:
        raise ValueError("class_sampling_probs: no class has a positive count")
    return w / w.sum()


def neighbor_class_quota(bucket_counts: Sequence[float]) -> tuple[int, int, int]:
    """Neighbor classes for head : medium : tail targets = ``1 : ceil(N_h/N_m) : ceil(N_h/N_t)``.

    bucket_counts: (N_h, N_m, N_t) total train rows of the many / medium / few target classes
    (METHODS.md section 3). An empty bucket gets 0; with no head rows the first non-empty bucket is
    the reference (quota 1).
    """
    if len(bucket_counts) != 3:
        raise ValueError(f"bucket_counts must be (N_h, N_m, N_t), got {bucket_counts!r}")
    n = [float(x) for x in bucket_counts]
    if any(x < 0 for x in n):
        raise ValueError(f"bucket counts must be >= 0, got {bucket_counts!r}")
    ref = next((x for x in n if x > 0), None)
    if ref is None:
        return (0, 0, 0)
    return tuple(int(math.ceil(ref / x - 1e-12)) if x > 0 else 0 for x in n)  # type: ignore[return-value]


def check_options(cls: type, opts: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming every key of ``opts`` that ``cls.__init__`` does not accept."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    allowed = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(allowed)}")


from featurelt.samplers.base import Sampler  # noqa: E402
from featurelt.samplers import basic, mixup, momentum  # noqa: E402,F401  (register the families)
from featurelt.samplers.mixup import lfm_label_weight, lfm_partner_probs  # noqa: E402
from featurelt.samplers.momentum import momentum_strength, momentum_update  # noqa: E402


def build_sampler(name: str, ctx: SamplerContext, **opts: Any) -> "Sampler":
    """``SAMPLERS.get(name)(ctx, **opts)``; the error of a bad option names the sampler."""
    return SAMPLERS.build(name, ctx, **opts)


__all__ = ["SAMPLERS", "SamplerContext", "Batch", "Sampler", "build_sampler", "class_sampling_probs",
           "neighbor_class_quota", "lfm_label_weight", "lfm_partner_probs", "momentum_update",
           "momentum_strength"]
