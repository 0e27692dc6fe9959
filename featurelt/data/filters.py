"""The image filter for auxiliary classes, over cached features (METHODS.md section 3, seed 001).

Images collected for an auxiliary class ``a`` (the neighbor of target class ``i``, ``neighbor_of = i``)
are noisy. The paper keeps an image ``r`` only when

- its caption names its class (checked where the sample has a ``description``), and
- ``gamma1 < cos(p_i, f_r) < gamma2``: similar to the target class, but not a near-duplicate of it,

where ``f_r`` is the image's cached feature (DINOv2 in the paper: ``--features dinov2_<size>_cls``) and
the prototype ``p_i = 1/n_i sum_j f_j`` is the mean feature of the original train rows of class ``i``.

:func:`filter_auxiliary` moves the rejected train rows to split ``filtered`` (rows and features stay
in the store, out of training) and writes one ``rejects`` row per image with its reason, in one
transaction that also rebuilds ``classes``. The math is :func:`prototype_cosines`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from featurelt.data.classes import rebuild_classes
from featurelt.data.features import load_features
from featurelt.data.neighbors import name_key
from featurelt.store import command_line, rejects_table

if TYPE_CHECKING:
    from featurelt.store import Store

FILTERED_SPLIT = "filtered"  # where rejected auxiliary train rows go
CHUNK = 8192                 # feature rows read at a time


def prototype_cosines(x: Any, labels: np.ndarray, *, prototype_rows: np.ndarray, query_rows: np.ndarray,
                      query_classes: np.ndarray) -> np.ndarray:
    """``cos(p_c, f_r)`` for each query row ``r`` and its class ``c = query_classes[r]``, where
    ``p_c`` = the mean of ``x`` over the ``prototype_rows`` labelled ``c``.

    x: ``[N, D]`` rows (an array, or a :class:`~featurelt.data.features.StoreRows` read in chunks).
    Returns ``[len(query_rows)]`` float64; NaN where class ``c`` has no prototype row.
    """
    classes = np.unique(query_classes)
    index = {int(c): k for k, c in enumerate(classes)}
    sums = np.zeros((len(classes), x.shape[1]), dtype=np.float64)
    counts = np.zeros(len(classes), dtype=np.int64)
    rows = prototype_rows[np.isin(labels[prototype_rows], classes)]
    for start in range(0, len(rows), CHUNK):
        part = rows[start:start + CHUNK]
        slot = np.array([index[int(c)] for c in labels[part]], dtype=np.int64)
        np.add.at(sums, slot, np.asarray(x[part], dtype=np.float64))
        np.add.at(counts, slot, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        protos = sums / counts[:, None]
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    out = np.empty(len(query_rows), dtype=np.float64)
    for start in range(0, len(query_rows), CHUNK):
        f = np.asarray(x[query_rows[start:start + CHUNK]], dtype=np.float64)
        f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        p = protos[[index[int(c)] for c in query_classes[start:start + CHUNK]]]
        out[start:start + CHUNK] = (f * p).sum(axis=1)
    return out


@dataclass
class FilterResult:
    """What one run of the auxiliary filter decided."""

    features: str                    # embedding set(s) the cosines were computed on
    gamma1: float
    gamma2: float
    checked: int                     # auxiliary train rows looked at
    kept: int
    rejected: dict[str, int]         # reason -> rows: caption, dissimilar (cos <= gamma1), near-duplicate (cos >= gamma2)
    per_class: list[dict[str, Any]] = field(default_factory=list)  # one row per auxiliary class
    store_version: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        what = "would move" if self.dry_run else "moved"
        reasons = ", ".join(f"{n} {k}" for k, n in self.rejected.items() if n) or "none"
        return (f"filter-auxiliary on {self.features} (gamma1 {self.gamma1:g}, gamma2 {self.gamma2:g}): "
                f"{self.checked} auxiliary train images, {self.kept} kept; {what} {self.checked - self.kept} to "
                f"split '{FILTERED_SPLIT}' ({reasons})" + ("" if self.dry_run else f"; store version {self.store_version}"))


def filter_auxiliary(store: "Store", features: list[str] | tuple[str, ...], *, gamma1: float, gamma2: float,
                     caption: bool = True, dry_run: bool = False, message: str | None = None) -> FilterResult:
    """Filter the auxiliary train rows of ``store`` (module docstring).

    features: embedding sets (joined on sample_id, like train-head's ``--features``); every train row
    needs a vector. caption: also reject rows whose ``description`` does not name their class (rows
    without a description pass). dry_run: decide and report, write nothing.
    """
    if not -1.0 <= gamma1 < gamma2 <= 1.0:
        raise ValueError(f"need -1 <= gamma1 < gamma2 <= 1 (cosines), got gamma1={gamma1}, gamma2={gamma2}")
    classes = {r["label"]: r for r in store.read("classes").to_pylist()} if store.has_table("classes") else {}
    if not classes:
        raise ValueError(f"store {store.root} has no classes table: run `featurelt ingest` first")
    feats = load_features(store, list(features), split="train")
    aux = np.flatnonzero(feats.source == "auxiliary")
    if len(aux) == 0:
        raise ValueError("the train split has no auxiliary rows (ingest them with --source auxiliary --neighbor-of CLASS)")
    orphans = sorted({int(y) for y in feats.labels[aux] if classes[int(y)]["neighbor_of"] is None})
    if orphans:
        raise ValueError(f"auxiliary classes {[classes[y]['name'] for y in orphans]} have no neighbor_of target class "
                         "(ingest them with --neighbor-of CLASS)")
    targets = np.array([classes[int(y)]["neighbor_of"] for y in feats.labels[aux]], dtype=np.int64)
    cos = prototype_cosines(feats.x, feats.labels, prototype_rows=np.flatnonzero(feats.source == "original"),
                            query_rows=aux, query_classes=targets)
    captions: dict[str, str | None] = {}
    if caption:
        t = store.read("samples", columns=["sample_id", "description"], filter="source = 'auxiliary' AND split = 'train'")
        captions = dict(zip(t.column("sample_id").to_pylist(), t.column("description").to_pylist()))

    rejects: list[tuple[str, str, str]] = []  # (sample_id, kind, reason)
    for r, c, t in zip(aux, cos, targets):
        sid, label = str(feats.sample_ids[r]), int(feats.labels[r])
        name, target = classes[label]["name"], classes[int(t)]["name"]
        text = captions.get(sid)
        if text is not None and name_key(name) not in name_key(text):
            rejects.append((sid, "caption", f"the caption does not name class '{name}': {text[:80]!r}"))
        elif np.isnan(c):
            rejects.append((sid, "dissimilar", f"target class '{target}' has no original train rows (no prototype)"))
        elif c <= gamma1:
            rejects.append((sid, "dissimilar", f"cos {c:.4f} to the prototype of '{target}' <= gamma1 {gamma1:g}"))
        elif c >= gamma2:
            rejects.append((sid, "near-duplicate",
                            f"cos {c:.4f} to the prototype of '{target}' >= gamma2 {gamma2:g}"))
    kinds = {k: sum(1 for _, kind, _ in rejects if kind == k) for k in ("caption", "dissimilar", "near-duplicate")}
    out = set(sid for sid, _, _ in rejects)
    per_class = []
    for label in sorted({int(y) for y in feats.labels[aux]}):
        mine = feats.labels[aux] == label
        c = cos[mine][~np.isnan(cos[mine])]
        stats = {f"cos_{k}": (round(float(f(c)), 4) if len(c) else None)
                 for k, f in (("min", np.min), ("mean", np.mean), ("max", np.max))}
        per_class.append({"label": label, "class": classes[label]["name"],
                          "neighbor_of": classes[classes[label]["neighbor_of"]]["name"], "checked": int(mine.sum()),
                          "kept": int(sum(1 for sid in feats.sample_ids[aux][mine] if str(sid) not in out)), **stats})
    result = FilterResult(",".join(features), gamma1, gamma2, len(aux), len(aux) - len(out), kinds, per_class,
                          store.version, dry_run)
    if dry_run or not rejects:
        return result
    msg = message or command_line()
    with store.transaction(msg) as tx:
        ids = ", ".join("'" + sid.replace("'", "''") + "'" for sid in sorted(out))
        tx.update("samples", {"split": f"'{FILTERED_SPLIT}'"}, where=f"split = 'train' AND sample_id IN ({ids})")
        tx.append("rejects", rejects_table(command=msg, stage="filter-auxiliary", rows=[
            {"location": f"samples/{sid}", "sample_id": sid, "reason": reason} for sid, _, reason in rejects]))
        rebuild_classes(tx)
    result.store_version = store.version
    return result


__all__ = ["filter_auxiliary", "prototype_cosines", "FilterResult", "FILTERED_SPLIT"]
