"""Exact cosine nearest-neighbour search over cached embeddings, with faiss (METHODS.md sections 1, 3).

- :class:`VectorIndex`: exact inner-product search over rows scaled to unit norm, so a search returns
  the k most cosine-similar rows: faiss's GPU index when faiss has CUDA and a GPU is visible (the ``gpu``
  extra), else a torch matmul + top-k on the CUDA device, else faiss's ``IndexFlatIP`` on the CPU
  (``backend=`` forces one).
- :func:`knn_votes`: the weighted vote of a kNN classifier on frozen features. Each of a query's k
  neighbours adds ``exp(cos / T)`` to its class (T = 0.07 by default), as in the kNN evaluation of
  self-supervised features (Wu et al. 2018; DINO, DINOv2).

numpy and faiss; torch only inside the torch backend (imported lazily). Used by the ``knn`` head (:mod:`featurelt.heads.neighbors`, ``featurelt
train-head --head knn``) and the neighbor-class search (:mod:`featurelt.data.neighbors`, ``featurelt neighbors``).
"""
from __future__ import annotations

from typing import Any, Literal

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


Backend = Literal["auto", "faiss-gpu", "torch", "faiss-cpu"]
BACKENDS: tuple[str, ...] = ("auto", "faiss-gpu", "torch", "faiss-cpu")
TORCH_BLOCK = 1 << 27  # torch backend: queries per step so that the [queries, rows] scores stay <= 512 MiB


def faiss_gpus() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu builds or without a visible GPU)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> ``faiss-gpu`` when faiss has GPU support and sees a GPU, else ``torch`` when torch
    sees a CUDA device, else ``faiss-cpu``. A forced backend that cannot run is a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kNN backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "faiss-gpu" if faiss_gpus() > 0 else "torch" if _cuda_available() else "faiss-cpu"
    if backend == "faiss-gpu" and faiss_gpus() == 0:
        raise ValueError("backend 'faiss-gpu' needs faiss built with CUDA and a visible GPU "
                         "(pip install 'featurelt[gpu]'); the installed faiss sees none")
    return backend


class VectorIndex:
    """Exact cosine kNN over unit-norm float32 rows, in the order added, on one of three backends:

    * ``faiss-gpu`` -- faiss ``GpuIndexFlatIP`` (the ``gpu`` extra: faiss with CUDA, and a visible GPU);
    * ``torch`` -- the rows as one float32 tensor on ``device`` (default ``cuda``), search = ``queries @
      rows.T`` then ``torch.topk``, in blocks of queries (the same neighbours as faiss: exact search);
    * ``faiss-cpu`` -- faiss ``IndexFlatIP`` on the CPU.

    ``backend="auto"`` (default) takes the first that can run (:func:`resolve_backend`); ``self.backend``
    says which. ``add`` may be called once per batch (stream a large table with ``Store.scan``);
    ``search`` returns ``(cosines [N, k], row ids [N, k])``, best first, with ``k`` capped at the rows
    held. torch is imported only by the torch backend (this module stays importable without it).
    """

    def __init__(self, dim: int, *, backend: Backend | str = "auto", device: str | None = None) -> None:
        import faiss

        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim!r}")
        self.dim = int(dim)
        self.backend = resolve_backend(backend)
        self._rows: list[Any] = []  # torch backend: added blocks, concatenated at the first search
        self._n = 0
        if self.backend == "torch":
            import torch

            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self._index = None
        elif self.backend == "faiss-gpu":
            self.device = device or "cuda:0"
            self._resources = faiss.StandardGpuResources()
            gpu = int(str(self.device).split(":")[1]) if ":" in str(self.device) else 0
            self._index = faiss.GpuIndexFlatIP(self._resources, self.dim, _gpu_config(faiss, gpu))
        else:
            self.device = "cpu"
            self._index = faiss.IndexFlatIP(self.dim)

    def __len__(self) -> int:
        return self._n if self.backend == "torch" else int(self._index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        """vectors: [N, dim]; stored as ``unit(vectors)``, ids ``len(self) .. len(self) + N - 1``."""
        x = unit_rows(vectors)
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors must be [N, {self.dim}], got shape={x.shape}")
        if self.backend == "torch":
            import torch

            self._rows.append(torch.from_numpy(x).to(self.device))
            self._n += len(x)
        else:
            self._index.add(x)

    def _matrix(self) -> Any:
        import torch

        if len(self._rows) != 1:
            self._rows = [torch.cat(self._rows) if self._rows else torch.empty(0, self.dim, device=self.device)]
        return self._rows[0]

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
        if self.backend == "torch":
            self._search_torch(q, kk, sims, ids)
            return sims, ids
        for start in range(0, len(q), SEARCH_ROWS):
            stop = start + SEARCH_ROWS
            sims[start:stop], ids[start:stop] = self._index.search(q[start:stop], kk)
        return sims, ids

    def _search_torch(self, q: np.ndarray, k: int, sims: np.ndarray, ids: np.ndarray) -> None:
        import torch

        rows = self._matrix()
        step = max(1, min(SEARCH_ROWS, TORCH_BLOCK // max(1, len(self))))
        # exact float32 products (no TF32 on Ampere+), as faiss computes them
        with torch.inference_mode(), _no_tf32(torch):
            for start in range(0, len(q), step):
                block = torch.from_numpy(q[start:start + step]).to(self.device, non_blocking=True)
                val, idx = torch.topk(block @ rows.T, k, dim=1, largest=True, sorted=True)
                sims[start:start + step] = val.cpu().numpy()
                ids[start:start + step] = idx.cpu().numpy()

    def _cpu_index(self) -> Any:
        import faiss

        if self.backend == "faiss-cpu":
            return self._index
        if self.backend == "faiss-gpu":
            return faiss.index_gpu_to_cpu(self._index)
        index = faiss.IndexFlatIP(self.dim)
        if len(self):
            index.add(np.ascontiguousarray(self._matrix().cpu().numpy()))
        return index

    def to_bytes(self) -> np.ndarray:
        """The index serialised by faiss (uint8 array of a CPU ``IndexFlatIP``, whatever the backend),
        for checkpoints."""
        import faiss

        return faiss.serialize_index(self._cpu_index())

    @classmethod
    def from_bytes(cls, data: Any, *, backend: Backend | str = "faiss-cpu", device: str | None = None) -> "VectorIndex":
        """Inverse of :meth:`to_bytes` (default: a CPU faiss index, as saved; ``backend=`` moves it)."""
        import faiss

        index = faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
        out = cls(int(index.d), backend=backend, device=device)
        if out.backend == "faiss-cpu":
            out._index = index
        elif index.ntotal:
            out.add(index.reconstruct_n(0, index.ntotal))
        return out


def _gpu_config(faiss: Any, gpu: int) -> Any:
    cfg = faiss.GpuIndexFlatConfig()
    cfg.device = gpu
    return cfg


class _no_tf32:
    """Context: float32 matmuls in full precision on CUDA (torch may use TF32 when allowed globally)."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def __enter__(self) -> None:
        self.prev = self.torch.backends.cuda.matmul.allow_tf32
        self.torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: Any) -> None:
        self.torch.backends.cuda.matmul.allow_tf32 = self.prev


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


__all__ = ["VectorIndex", "knn_votes", "unit_rows", "resolve_backend", "faiss_gpus", "BACKENDS", "SEARCH_ROWS"]
