"""Extraction's image batches: the todo rows and views through StoreImageLoader, as encoder batches with rejects.

Each loader batch holds the rows of ``batch_size // (views + 1)`` samples (``batch_size`` without
views), each row once per view it still needs (the loader reads and decodes it once); the
:class:`~featurelt.extract.views.ViewMaker` learns each plan entry's view from its position.
A sample with any entry that fails is rejected whole (one ``rejects`` row, no view of it written).
"""
from __future__ import annotations

import copy
from typing import Any, Iterator

import numpy as np

from featurelt.extract.plan import Plan
from featurelt.extract.views import ViewMaker, view_strength


def loader_plan(plan: Plan, *, batch_size: int, views: int) -> tuple[list[np.ndarray], np.ndarray | None, list[int]]:
    """``(row offsets per loader batch, view of each plan entry or None when every entry is view 0,
    samples per loader batch)``: entries sample-major, each sample's views in ascending order."""
    per_read = max(1, batch_size // (views + 1)) if views else batch_size
    n = len(plan.positions)
    starts = list(range(0, n, per_read))
    samples = [min(per_read, n - s) for s in starts]
    if all(t == (0,) for t in plan.needed):
        return [plan.positions[s:s + per_read] for s in starts], None, samples
    counts = np.fromiter((len(t) for t in plan.needed), dtype=np.int64, count=n)
    entries = np.repeat(plan.positions, counts)
    entry_views = np.fromiter((v for t in plan.needed for v in t), dtype=np.int16, count=int(counts.sum()))
    bounds = np.concatenate([[0], np.cumsum(counts)])[starts + [n]]
    return [entries[a:b] for a, b in zip(bounds[:-1], bounds[1:])], entry_views, samples


def view_batches(root: str, samples_version: int, storage_options: dict[str, str] | None, plan: Plan,
                 make_view: ViewMaker, *, batch_size: int, views: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """The plan's images in encoder batches of ``batch_size`` at most, in plan order: dicts with
    ``x`` (the images, None when none is left), ``sample_id``, ``view``, ``aug_strength`` (one per
    image), ``rejects`` (``(sample_id, reason)`` of the samples that failed), ``samples`` (samples
    of the plan this batch covers) and ``embedded`` (of them, those not rejected)."""
    from featurelt.images.loader import StoreImageLoader
    from featurelt.images.packing import PackedImages, collate

    offsets, entry_views, samples = loader_plan(plan, batch_size=batch_size, views=views)
    make_view = copy.copy(make_view)
    make_view.entry_views = entry_views
    loader = StoreImageLoader(root, samples_version, storage_options, offsets, make_view, columns=("sample_id",),
                              num_workers=num_workers, pin_memory=False)  # launch_batch pins the images
    for lb in loader:
        rejects: dict[str, str] = {}
        for _, sid, reason in lb.failed:
            rejects.setdefault(sid, reason)
        x, sids, index = lb.images, lb.columns["sample_id"], lb.index
        keep = [i for i, sid in enumerate(sids) if sid not in rejects]
        if len(keep) != len(sids):  # a sample with a failed view: none of its views is written
            images = x.unpack() if isinstance(x, PackedImages) else list(x)
            x = collate([images[i] for i in keep]) if keep else None
            sids, index = [sids[i] for i in keep], index[keep]
        vlist = [0] * len(sids) if entry_views is None else entry_views[index].tolist()
        strengths = [view_strength(v, views) for v in vlist]
        n = samples[lb.batch]
        for s in range(0, max(len(sids), 1), batch_size):
            part = x if len(sids) <= batch_size else (x[s:s + batch_size] if x is not None else None)
            yield {"x": part, "sample_id": sids[s:s + batch_size], "view": vlist[s:s + batch_size],
                   "aug_strength": strengths[s:s + batch_size], "rejects": list(rejects.items()) if s == 0 else [],
                   "samples": n if s == 0 else 0, "embedded": n - len(rejects) if s == 0 else 0}
