"""Exact cosine nearest-neighbour search over cached embeddings, with faiss (METHODS.md sections 1, 3).

- :class:`VectorIndex`: faiss's exact inner-product index (``IndexFlatIP``) over rows scaled to unit
  norm, so a search returns the k most cosine-similar rows.
- :func:`knn_votes`: the weighted vote of a kNN classifier on frozen features. Each of a query's k
  neighbours adds ``exp(cos / T)`` to its class (T = 0.07 by default), as in the kNN evaluation of
  self-supervised features (Wu et al. 2018; DINO, DINOv2).

Pure numpy and faiss, no torch. Used by the ``knn`` head (:mod:`featurelt.heads.neighbors`, ``featurelt
train-head --head knn``) and the neighbor-class search (:mod:`featurelt.data.neighbors`, ``featurelt neighbors``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

SEARCH_ROWS = 16384  # queries per faiss search call: bounds the [rows, k] result buffers


def unit_rows(x: np.ndarray, *, what: str = "vectors") -> np.ndarray:
    """A float32 copy of ``x`` [N, D] with rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [N, D] array, got shape={x.shape}")
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        row = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise ValueError(f"{what} row {row} has a non-finite value (NaN or inf)")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


class VectorIndex:
    """Exact cosine kNN: faiss ``IndexFlatIP`` over unit-norm float32 rows, in the order added.

    ``add`` may be called once per batch (stream a large table with ``Store.scan``); ``search``
    returns ``(cosines [N, k], row ids [N, k])``, best first, with ``k`` capped at the rows held.
    """

    def __init__(self, dim: int) -> None:
        import faiss

        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim!r}")
        self.dim = int(dim)
        self._index = faiss.IndexFlatIP(self.dim)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        """vectors: [N, dim]; stored as ``unit(vectors)``, ids ``len(self) .. len(self) + N - 1``."""
        x = unit_rows(vectors)
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors must be [N, {self.dim}], got shape={x.shape}")
        self._index.add(x)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: [N, dim] (scaled to unit norm here). Returns (cosines [N, k'] float32, ids [N, k']
        int64), ``k' = min(k, len(self))``, each row sorted by decreasing cosine."""
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        if len(self) == 0:
            raise ValueError("the index is empty: add vectors before searching")
        q = unit_rows(queries, what="queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got shape={q.shape}")
        kk = min(int(k), len(self))
        sims = np.empty((len(q), kk), dtype=np.float32)
        ids = np.empty((len(q), kk), dtype=np.int64)
        for start in range(0, len(q), SEARCH_ROWS):
            stop = start + SEARCH_ROWS
            sims[start:stop], ids[start:stop] = self._index.search(q[start:stop], kk)
        return sims, ids

    def to_bytes(self) -> np.ndarray:
        """The index serialised by faiss (uint8 array), for checkpoints."""
        import faiss

        return faiss.serialize_index(self._index)

    @classmethod
    def from_bytes(cls, data: Any) -> "VectorIndex":
        """Inverse of :meth:`to_bytes`."""
        import faiss

        index = faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
        out = cls.__new__(cls)
        out.dim, out._index = int(index.d), index
        return out


def knn_votes(sims: np.ndarray, neighbor_labels: np.ndarray, num_classes: int, *,
              temperature: float = 0.07) -> np.ndarray:
    """Weighted kNN vote: ``votes[n, c] = sum_{j: label_j = c} exp(sims[n, j] / T)``.

    sims: [N, k] cosines of each query's neighbours; neighbor_labels: [N, k] their labels in
    ``0..num_classes - 1``. Returns [N, num_classes] float64 (0 for a class no neighbour has).
    """
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(neighbor_labels)
    if sims.ndim != 2 or labels.shape != sims.shape:
        raise ValueError(f"sims and neighbor_labels must both be [N, k], got shapes {sims.shape} and {labels.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"neighbor_labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    votes = np.zeros((len(sims), int(num_classes)), dtype=np.float64)
    rows = np.repeat(np.arange(len(sims)), sims.shape[1])
    np.add.at(votes, (rows, labels.reshape(-1)), np.exp(sims / temperature).reshape(-1))
    return votes


__all__ = ["VectorIndex", "knn_votes", "unit_rows", "SEARCH_ROWS"]
