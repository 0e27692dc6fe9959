"""Arrow rows extraction writes: embedding rows (minus those already present) and rejects rows."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from featurelt.store import rejects_table


def embedding_batch(sample_ids: list[str], views: list[int], strengths: list[float], fingerprint: str,
                    vectors: np.ndarray, dtype: str) -> pa.RecordBatch:
    """Rows of an ``emb_<name>`` table: vector as ``fixed_size_list<float32|float16>[D]``."""
    if vectors.ndim != 2 or vectors.shape[0] != len(sample_ids):
        raise ValueError(f"expected vectors [{len(sample_ids)}, D], got shape={vectors.shape}")
    np_dtype = np.float16 if dtype == "float16" else np.float32
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np_dtype).reshape(-1))
    return pa.RecordBatch.from_arrays(
        [pa.array(sample_ids, pa.string()), pa.array(views, pa.int32()), pa.array(strengths, pa.float32()),
         pa.array([fingerprint] * len(sample_ids), pa.string()),
         pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])],
        names=["sample_id", "view", "aug_strength", "fingerprint", "vector"])


def new_rows(batch: dict[str, Any], vectors: np.ndarray, done: dict[str, set[int]], fingerprint: str,
             dtype: str) -> pa.RecordBatch | None:
    """The rows of an encoded batch for one product, minus the (sample, view) pairs in ``done``
    (already in the set with this fingerprint); None when nothing is new."""
    sids, vlist, strengths = batch["sample_id"], batch["view"], batch["aug_strength"]
    keep = _missing(sids, vlist, done)
    if not keep:
        return None
    if len(keep) != len(sids):
        sids, vlist, strengths = [sids[i] for i in keep], [vlist[i] for i in keep], [strengths[i] for i in keep]
        vectors = vectors[keep]
    return embedding_batch(sids, vlist, strengths, fingerprint, vectors, dtype)


def drop_done(rows: pa.RecordBatch, done: dict[str, set[int]]) -> pa.RecordBatch | None:
    """``rows`` of an ``emb_<name>`` table minus the (sample, view) pairs in ``done``; None when none is left."""
    keep = _missing(rows.column("sample_id").to_pylist(), rows.column("view").to_pylist(), done)
    if not keep:
        return None
    return rows if len(keep) == rows.num_rows else rows.take(pa.array(keep, pa.int64()))


def _missing(sample_ids: list[str], views: list[int], done: dict[str, set[int]]) -> list[int]:
    """Indices of the (sample_id, view) pairs not in ``done``."""
    return [i for i, (s, v) in enumerate(zip(sample_ids, views)) if v not in done.get(s, ())]


def rejects_rows(rejects: list[tuple[str, str]], message: str) -> pa.Table:
    """``rejects`` rows of samples that failed to decode: ``(sample_id, reason)`` pairs."""
    return rejects_table(command=message, stage="extract",
                         rows=[{"location": f"samples/{sid}", "sample_id": sid, "reason": r} for sid, r in rejects])
