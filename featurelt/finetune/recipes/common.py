"""What several recipes share: the train rows of the store in head order, paired (mixup) plans, pixel mixing."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TrainRows:
    """Rows of the pinned ``samples`` table a recipe trains on (numpy, N rows, K classes in head order).

    offsets: [N] int64 row offsets into the pinned samples dataset (what the loader's plan holds).
    labels: [N] int64 head indices (target classes first, then auxiliary ones; ``LabelMap``).
    source: [N] str 'original' | 'auxiliary' | 'generated'. sample_ids: [N] str.
    class_counts: [K] float64 n_y (original + auxiliary rows; generated rows do not count).
    neighbor_of: [K] int64 (-1 for target classes). num_target: K_target.
    """

    offsets: np.ndarray
    labels: np.ndarray
    source: np.ndarray
    sample_ids: np.ndarray
    class_counts: np.ndarray
    neighbor_of: np.ndarray
    num_target: int
    text_sim: np.ndarray | None = field(default=None)

    def sampler_context(self, *, batch_size: int, seed: int, aux_cap: int = 50) -> Any:
        from featurelt.samplers import SamplerContext

        return SamplerContext(labels=self.labels, class_counts=self.class_counts, source=self.source,
                              neighbor_of=self.neighbor_of, num_target=self.num_target, text_sim=self.text_sim,
                              num_views=1, batch_size=batch_size, seed=seed, aux_cap=aux_cap)


def train_rows(store: Any, *, split: str = "train", sources: Sequence[str] = ("original",),
               text_set: str | None = None) -> TrainRows:
    """The ``split`` rows of ``samples`` whose source is in ``sources``, with the class statistics.

    Rows of split ``filtered`` (rejected by ``filter-auxiliary`` / ``filter-generated``) are never in
    ``train``, so they can never be drawn. ``text_set``: class text embeddings for ``text_sim`` (LFM).
    """
    from featurelt.train.head import _classes, class_counts_of

    classes, label_map = _classes(store)
    t = store.read("samples", columns=["sample_id", "split", "label", "source"])
    split_col = np.asarray(t.column("split").to_pylist(), dtype=object)
    source = np.asarray(t.column("source").to_pylist(), dtype=object).astype(str)
    keep = (split_col == split) & np.isin(source, list(sources))
    offsets = np.nonzero(keep)[0].astype(np.int64)
    if offsets.size == 0:
        raise ValueError(f"no rows of split '{split}' with source in {tuple(sources)} in samples "
                         f"(store version {store.version})")
    labels = label_map.head(np.asarray(t.column("label").to_pylist(), dtype=np.int64)[offsets],
                            f"split '{split}'")
    k = classes.num_rows
    counts = class_counts_of(labels, source[offsets], k)
    parents = [None if v is None else int(v) for v in classes.column("neighbor_of").to_pylist()]
    neighbor = np.array([-1 if v is None or not 0 <= v < label_map.to_head.size else label_map.to_head[v]
                         for v in parents], dtype=np.int64)
    neighbor[: label_map.num_target] = -1
    neighbor[neighbor >= label_map.num_target] = -1
    text_sim = None
    if text_set:
        from featurelt.data.features import load_text_embeddings

        emb = load_text_embeddings(store, text_set, num_classes=int(label_map.to_store.max()) + 1)[label_map.to_store]
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
        text_sim = emb @ emb.T
    return TrainRows(offsets=offsets, labels=labels, source=source[offsets],
                     sample_ids=np.asarray(t.column("sample_id").to_pylist(), dtype=object)[offsets].astype(str),
                     class_counts=counts, neighbor_of=neighbor, num_target=label_map.num_target, text_sim=text_sim)


@dataclass
class PairedPlan:
    """One epoch of mixup pairs for the loader: batch b reads ``batches[b]`` = [x_i rows..., x_j rows...]
    (2 B_b samples offsets, first half mixed with the second half); ``lam_x[b]`` / ``lam_y[b]`` [B_b]."""

    batches: list[np.ndarray]
    lam_x: list[np.ndarray]
    lam_y: list[np.ndarray]


def paired_plan(sampler: Any, rows: TrainRows, epoch: int) -> PairedPlan:
    """Cut a mixup sampler's epoch (``index``, ``partner``, ``lam_x``, ``lam_y`` over ``rows``) into loader
    batches of samples offsets: each batch holds its x_i rows then their partners (same order)."""
    batches, lx, ly = [], [], []
    for b in sampler.epoch(epoch):
        if b.partner is None or b.lam_x is None or b.lam_y is None:
            raise ValueError(f"{type(sampler).__name__} gives no mixup partners")
        i, j = b.index.numpy(), b.partner.numpy()
        batches.append(np.concatenate([rows.offsets[i], rows.offsets[j]]))
        lx.append(b.lam_x.numpy().astype(np.float32))
        ly.append(b.lam_y.numpy().astype(np.float32))
    return PairedPlan(batches, lx, ly)


def mix_pairs(images: Tensor, targets: Tensor, lam_x: Tensor, lam_y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Pixel-space mixup of a paired batch (METHODS.md sections 4 and 6).

    images: [2B, C, H, W] (x_i then x_j), targets: [2B] long head indices, lam_x / lam_y: [B].
    Returns ``x~ = lam_x x_i + (1 - lam_x) x_j`` [B, C, H, W] and
    ``y~ = lam_y onehot(y_i) + (1 - lam_y) onehot(y_j)`` [B, K] float.
    """
    if images.shape[0] % 2 or targets.shape != (images.shape[0],):
        raise ValueError(f"a paired batch needs 2B images and 2B labels, got images={tuple(images.shape)} "
                         f"targets={tuple(targets.shape)}")
    b = images.shape[0] // 2
    if lam_x.shape != (b,) or lam_y.shape != (b,):
        raise ValueError(f"lam_x / lam_y must be [{b}], got {tuple(lam_x.shape)} / {tuple(lam_y.shape)}")
    lx = lam_x.to(images.device, images.dtype).view(b, *([1] * (images.dim() - 1)))
    ly = lam_y.to(images.device, torch.float32)[:, None]
    x = lx * images[:b] + (1 - lx) * images[b:]
    oh = F.one_hot(targets.long(), num_classes).float()
    y = ly * oh[:b] + (1 - ly) * oh[b:]
    return x, y


class PairedMixin:
    """Hooks part shared by ``ltgc-lora`` and ``lfm-stage1``: plan of pairs, mixing in ``make_batch``."""

    plan: PairedPlan | None = None
    num_classes: int = 0

    def mixed_batch(self, images: Tensor, targets: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        if self.plan is None:
            raise RuntimeError("paired recipe: make_batch before train_plan")
        n = int(batch.batch)
        lam_x = torch.from_numpy(self.plan.lam_x[n])
        lam_y = torch.from_numpy(self.plan.lam_y[n])
        if images.shape[0] != 2 * lam_x.numel():  # a rank's slice of the global batch: x_i / x_j halves kept
            raise ValueError(f"paired batch {n}: {images.shape[0]} images for {lam_x.numel()} pairs")
        return mix_pairs(images, targets, lam_x, lam_y, self.num_classes)
