"""Heads fitted in one pass over the train features, without gradients: ``ncm`` and ``knn``
(METHODS.md section 1, "kNN / nearest-class-mean classifiers over the store with faiss").

- ``ncm``, nearest class mean: prototype ``mu_c = unit(sum_{i: y_i = c} unit(f_i))`` over the train
  rows of class c, logits ``z_c = cos(f, mu_c) / tau``. A class with no train row scores ``-inf``.
- ``knn``: the k train rows most cosine-similar to f (exact search, faiss ``IndexFlatIP``:
  :class:`featurelt.index.VectorIndex`), each voting ``exp(cos / T)`` for its class
  (:func:`featurelt.index.knn_votes`); logits ``z_c = log(votes_c)``, so the softmax is each class's
  share of the vote, and a class without a vote scores ``-inf``.

Both read the features as they are cached (``unit`` of the concatenated sources), so they are the
reference any trained head should beat. The search runs on the CPU (faiss-cpu); features on a GPU
are copied for it. ``knn`` keeps a float32 copy of the train features in host memory (its index, also
saved in the checkpoint), even when train-head streams them from the store.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from featurelt.heads.base import HEADS, Head, HeadContext, check_tau, unit


@HEADS.register("ncm")
class NCMHead(Head):
    """Nearest class mean with cosine logits ``cos(f, mu_c) / tau`` (module docstring)."""

    fitted = True

    def __init__(self, ctx: HeadContext, *, tau: float = 0.05) -> None:
        """tau: temperature of the logits, > 0 (predictions do not depend on it; the scores do)."""
        super().__init__(ctx)
        self.tau = check_tau("tau", tau)
        self.register_buffer("means", torch.zeros(ctx.num_classes, ctx.in_dim))  # [K, D] unit rows
        self.register_buffer("counts", torch.zeros(ctx.num_classes, dtype=torch.long))  # [K] train rows per class

    def fit(self, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Sum each class's unit features (a one-hot matmul: deterministic on CUDA too), then scale."""
        sums = torch.zeros(self.means.shape, dtype=torch.float64, device=self.means.device)
        counts = torch.zeros_like(self.counts)
        for x, y in batches:
            self.check_input(x)
            onehot = torch.nn.functional.one_hot(y.long(), self.num_classes).to(x.dtype)  # [B, K]
            sums += (onehot.T @ unit(x)).double()
            counts += onehot.sum(0).long()
        self.means.copy_(unit(sums).float())
        self.counts.copy_(counts)

    def features(self, x: Tensor) -> Tensor:
        """x: [B, D]. Returns unit(x) [B, D]."""
        return unit(x)

    def classify(self, z: Tensor) -> Tensor:
        if not bool((self.counts > 0).any()):
            raise ValueError("head ncm is not fitted: call fit() with the train features first")
        logits = unit(z) @ self.means.T / self.tau
        return logits.masked_fill(self.counts == 0, float("-inf"))


@HEADS.register("knn")
class KNNHead(Head):
    """Weighted k-nearest-neighbour vote over the train rows (module docstring)."""

    fitted = True

    def __init__(self, ctx: HeadContext, *, k: int = 20, temperature: float = 0.07) -> None:
        """k: neighbours per query, >= 1 (capped at the train rows). temperature: T of the vote
        weights ``exp(cos / T)``, > 0 (T -> 0: the nearest neighbour decides)."""
        super().__init__(ctx)
        if int(k) < 1:
            raise ValueError(f"knn option k must be >= 1, got {k!r}")
        self.k = int(k)
        self.temperature = check_tau("temperature", temperature)
        self.index: Any = None  # featurelt.index.VectorIndex once fitted
        self.labels = np.zeros(0, dtype=np.int64)  # [N] label of each indexed row

    def fit(self, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Index the train features (unit rows, faiss) and keep their labels."""
        from featurelt.index import VectorIndex

        index, labels = VectorIndex(sum(self.in_dims)), []
        for x, y in batches:
            self.check_input(x)
            index.add(x.detach().float().cpu().numpy())
            labels.append(y.detach().cpu().numpy().astype(np.int64))
        self.index, self.labels = index, np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)

    def features(self, x: Tensor) -> Tensor:
        """x: [B, D]. Returns unit(x) [B, D] (the rows the index compares)."""
        return unit(x)

    def classify(self, z: Tensor) -> Tensor:
        from featurelt.index import knn_votes

        if self.index is None or len(self.index) == 0:
            raise ValueError("head knn is not fitted: call fit() with the train features first")
        sims, ids = self.index.search(z.detach().float().cpu().numpy(), self.k)
        votes = knn_votes(sims, self.labels[ids], self.num_classes, temperature=self.temperature)
        with np.errstate(divide="ignore"):
            return torch.from_numpy(np.log(votes)).to(device=z.device, dtype=torch.float32)

    def get_extra_state(self) -> dict[str, Tensor]:
        """The checkpoint holds the fitted index (faiss bytes) and its labels."""
        if self.index is None:
            return {}
        return {"index": torch.from_numpy(self.index.to_bytes()), "labels": torch.from_numpy(self.labels)}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        from featurelt.index import VectorIndex

        if state:
            self.index = VectorIndex.from_bytes(state["index"].numpy())
            self.labels = state["labels"].numpy().astype(np.int64)
