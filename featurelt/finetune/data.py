"""Images for fine-tuning straight from the store: split rows at the pinned version, the epoch plan, loaders.

* :func:`split_rows` -- the rows of one ``samples`` split (Lance row offsets at the pinned version, labels in
  head order, source, extra columns);
* :func:`epoch_plan` -- the sampler's epoch as global batches (train-row indices, partners and mixing
  weights), exactly as ``train-head`` draws it; :func:`rank_share` -- rank r's part of a global batch,
  ``entries[r::N]`` (the same global order as one process);
* :class:`EvalImage` -- the evaluation ``make_image`` (the backbone's own transform, uint8 in workers);
  training uses ``featurelt.images.augment.TrainTransform`` (``--augment flip-crop | randaugment``), or
  EvalImage for ``--augment none``; both return ``(uint8 [3, S, S], {"box", "flip", "size"})``;
* :func:`make_loader` -- a :class:`~featurelt.images.loader.StoreImageLoader` over plan offsets; normalisation
  happens on the device (:class:`~featurelt.images.transforms.DeviceStage`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from featurelt.store import Store


@dataclass
class TrainRows:
    """Rows of one split: everything indexed by row number 0..N-1 (the sampler's indices)."""

    offsets: np.ndarray      # int64 [N]: row offsets in the pinned samples dataset
    sample_ids: np.ndarray   # str [N]
    labels: np.ndarray       # int64 [N]: head indices (LabelMap: target classes first)
    store_labels: np.ndarray  # int64 [N]: labels as stored
    source: np.ndarray       # str [N]: original | auxiliary | generated
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # requested extra samples columns, [N] each

    def __len__(self) -> int:
        return len(self.offsets)

    def select(self, mask: np.ndarray) -> "TrainRows":
        return TrainRows(self.offsets[mask], self.sample_ids[mask], self.labels[mask], self.store_labels[mask],
                         self.source[mask], {k: v[mask] for k, v in self.extra.items()})


def split_rows(store: Store, split: str, label_map: Any, *, extra_columns: Sequence[str] = ()) -> TrainRows:
    """Rows of ``samples`` with ``split`` at the store's pinned version (labels in head order; a row whose
    label is not in the classes table is a ValueError naming it)."""
    ds = store.dataset("samples")
    cols = list(dict.fromkeys(["sample_id", "split", "label", "source", *extra_columns]))
    missing = [c for c in cols if c not in ds.schema.names]
    if missing:
        raise ValueError(f"samples has no column(s) {missing}; columns: {', '.join(ds.schema.names)}")
    table = ds.to_table(columns=cols)
    splits = np.asarray(table.column("split").to_pylist(), dtype=object)
    rows = np.nonzero(splits == split)[0].astype(np.int64)
    labels = table.column("label").to_numpy(zero_copy_only=False)[rows].astype(np.int64)
    head = label_map.head(labels, f"split '{split}'") if len(rows) else labels
    extra = {c: np.asarray(table.column(c).take(rows).to_pylist(), dtype=object) for c in extra_columns}
    return TrainRows(rows, np.asarray(table.column("sample_id").take(rows).to_pylist(), dtype=object), head, labels,
                     np.asarray(table.column("source").take(rows).to_pylist(), dtype=object).astype(str), extra)


@dataclass
class GlobalBatch:
    """One global batch of the epoch plan: train-row indices and the sampler's mixing fields (numpy)."""

    index: np.ndarray                 # int64 [B] train rows
    partner: np.ndarray | None = None  # int64 [B] mixup partner rows
    lam_x: np.ndarray | None = None    # float32 [B] input weight of index
    lam_y: np.ndarray | None = None    # float32 [B] label weight of index
    view: np.ndarray | None = None     # int64 [B] (cached views; images ignore it)

    def share(self, rank: int, world: int) -> "GlobalBatch":
        """Rank ``rank``'s part of the batch: every field ``[rank::world]``."""
        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rank::world]
        return GlobalBatch(cut(self.index), cut(self.partner), cut(self.lam_x), cut(self.lam_y), cut(self.view))  # type: ignore[arg-type]


def epoch_plan(sampler: Any, epoch: int) -> list[GlobalBatch]:
    """The sampler's batches of ``epoch`` (as train-head draws them) as numpy global batches."""
    out = []
    for b in sampler.epoch(epoch):
        out.append(GlobalBatch(*(None if getattr(b, f) is None else getattr(b, f).numpy()
                                 for f in ("index", "partner", "lam_x", "lam_y", "view"))))
    return out


def rank_share(batch: GlobalBatch, rank: int, world: int) -> GlobalBatch:
    """Rank ``rank`` of ``world``'s entries of a global batch (``[rank::world]``)."""
    return batch.share(rank, world) if world > 1 else batch


def center_crop_box(width: int, height: int, size: int, resize_to: int) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` in original pixels of a resize (shorter side -> ``resize_to``) + center crop ``size``."""
    scale = resize_to / min(width, height)
    half = size / scale / 2
    cx, cy = width / 2, height / 2
    return (max(0.0, cx - half), max(0.0, cy - half), min(float(width), cx + half), min(float(height), cy + half))


class EvalImage:
    """Evaluation ``make_image`` (picklable): the backbone's evaluation transform up to uint8
    (:func:`~featurelt.images.transforms.split_transform`'s host stage) -> ``(uint8 [3, S, S], extras)``
    with extras ``{"box": center-crop box in original pixels, "flip": False, "size": (W, H)}``."""

    def __init__(self, transform: Any, image_size: int) -> None:
        from featurelt.images.transforms import split_transform

        stages = split_transform(transform)
        if stages is None:
            raise ValueError("the backbone's transform cannot be split into worker and device stages")
        self.host = stages[0]
        self.image_size = int(image_size)
        self.resize_to = _resize_to(transform, self.image_size)

    def __call__(self, decoded: Any, row: dict[str, Any], index: int) -> tuple[Any, dict[str, Any]]:
        img = decoded.pil()
        x = self.host(img)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        w, h = img.size
        return x, {"box": center_crop_box(w, h, self.image_size, self.resize_to), "flip": False, "size": (w, h)}


def _resize_to(transform: Any, size: int) -> int:
    from featurelt.images.transforms import Preprocess

    if isinstance(transform, Preprocess):
        return int(transform.resize_to or size)
    for t in getattr(transform, "transforms", []):
        s = getattr(t, "size", None)
        if type(t).__name__ == "Resize" and s is not None:
            return int(s if isinstance(s, int) else s[0])
    return size


class MappedImage:
    """``make_image`` that sees each entry's position in the epoch's *global* plan instead of its position in this
    loader's plan: a rank's share, or the rest of an epoch after a resume, gets the same per-position augmentation
    as one uninterrupted process. ``positions[i]``: global position of loader entry i."""

    def __init__(self, inner: Callable[..., Any], positions: np.ndarray) -> None:
        self.inner, self.positions = inner, np.asarray(positions, dtype=np.int64)

    def __call__(self, decoded: Any, row: dict[str, Any], index: int) -> Any:
        return self.inner(decoded, row, int(self.positions[index]))


def global_positions(plan: list[GlobalBatch], rank: int, world: int) -> list[np.ndarray]:
    """Per global batch, the global plan position of each entry of rank ``rank``'s loader batch: one process
    loads batch b as ``[index, partner]`` from position ``start_b``; rank r loads ``[index[r::N], partner[r::N]]``."""
    out, start = [], 0
    for b in plan:
        n = len(b.index)
        own = np.arange(rank, n, world, dtype=np.int64)
        parts = [start + own] + ([start + n + own] if b.partner is not None else [])
        out.append(np.concatenate(parts))
        start += n * (2 if b.partner is not None else 1)
    return out


def train_image(augment: str, *, transform: Any, image_size: int, seed: int, epoch: int) -> Callable[..., Any]:
    """The train ``make_image`` of ``epoch``: EvalImage for ``none`` (the backbone's evaluation transform), else
    ``featurelt.images.augment.TrainTransform`` (random resized crop + flip, + RandAugment), seeded by
    ``(seed, epoch, plan position)``, resizing with the backbone's interpolation."""
    if augment == "none":
        return EvalImage(transform, image_size)
    from featurelt.images.augment import TrainTransform

    t = TrainTransform(image_size, augment=augment, seed=seed, interpolation=_interpolation(transform))  # type: ignore[arg-type]
    t.set_epoch(epoch)
    return t


def _interpolation(transform: Any) -> str:
    """bilinear | bicubic: the resampling of the backbone's evaluation transform (bilinear when it is another)."""
    from featurelt.images.transforms import Preprocess

    mode = transform.interpolation if isinstance(transform, Preprocess) else next(
        (getattr(t.interpolation, "value", t.interpolation) for t in getattr(transform, "transforms", [])
         if type(t).__name__ == "Resize"), "bilinear")
    return mode if mode in ("bilinear", "bicubic") else "bilinear"


def make_loader(store: Store, plan: list[np.ndarray], make_image: Callable[..., Any], *, columns: Sequence[str],
                num_workers: int, pin_memory: bool) -> Any:
    """A StoreImageLoader over ``plan`` (row offsets per loader batch) of the pinned samples table."""
    from featurelt.images.loader import StoreImageLoader

    return StoreImageLoader(store.root, store.dataset("samples").version, store.storage_options, plan, make_image,
                            columns=tuple(dict.fromkeys(["sample_id", *columns])), num_workers=num_workers,
                            pin_memory=pin_memory)



__all__ = ["TrainRows", "split_rows", "GlobalBatch", "epoch_plan", "rank_share", "EvalImage", "MappedImage",
           "global_positions",
           "train_image", "make_loader", "center_crop_box"]
