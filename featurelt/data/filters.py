"""Filters for images added to the train split, over cached features: the auxiliary-class image filter
(METHODS.md section 3, seed 001) and the quality filter of generated images (section 4, seed 002, LTGC).

Both move the train rows they reject to split ``filtered`` (rows and features stay in the store, out of
training) and write one ``rejects`` row per image with its reason, in one transaction; with ``dry_run``
they decide and report without writing. ``classes`` is left as it is: its train counts are of original
rows, and the filters move only auxiliary and generated ones.

Auxiliary images (:func:`filter_auxiliary`). Images collected for an auxiliary class ``a`` (the neighbor
of target class ``i``, ``neighbor_of = i``) are noisy. The paper keeps an image ``r`` only when

- its caption names its class (checked where the sample has a ``description``), and
- ``gamma1 < cos(p_i, f_r) < gamma2``: similar to the target class, but not a near-duplicate of it,

where ``f_r`` is the image's cached feature (DINOv2 in the paper: ``--features dinov2_<size>_cls``) and
the prototype ``p_i = 1/n_i sum_j f_j`` is the mean feature of the original train rows of class ``i``
(:func:`prototype_cosines`).

Generated images (:func:`filter_generated`). LTGC scores a generated image ``x`` of class ``y`` by
``S = cos(CLIP_img(x), CLIP_text(C_y))``, ``C_y`` the text it was generated from (its ``description``;
without one, the prompt ensemble of its class name), and rejects it when ``S < mu``. The image
embedding is the cached one of a ``clip:<model>`` embedding set; the text embedding comes from the
same model's text tower (checked against the set's provenance).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from featurelt.data.features import load_features
from featurelt.data.neighbors import name_key
from featurelt.store import command_line, rejects_table

if TYPE_CHECKING:
    from featurelt.store import Store

FILTERED_SPLIT = "filtered"  # where the train rows a filter rejects go
CHUNK = 8192                 # feature rows read at a time


def prototype_cosines(x: Any, labels: np.ndarray, *, prototype_rows: np.ndarray, query_rows: np.ndarray,
                      query_classes: np.ndarray) -> np.ndarray:
    """``cos(p_c, f_r)`` for each query row ``r`` and its class ``c = query_classes[r]``, where
    ``p_c`` = the mean of ``x`` over the ``prototype_rows`` labelled ``c``.

    x: ``[N, D]`` rows (an array, or a :class:`~featurelt.data.features.StoreRows` read in chunks).
    Returns ``[len(query_rows)]`` float64; NaN where class ``c`` has no prototype row.
    """
    classes = np.unique(query_classes)  # sorted: np.searchsorted gives each class's slot
    sums = np.zeros((len(classes), x.shape[1]), dtype=np.float64)
    counts = np.zeros(len(classes), dtype=np.int64)
    rows = prototype_rows[np.isin(labels[prototype_rows], classes)]
    for start in range(0, len(rows), CHUNK):
        part = rows[start:start + CHUNK]
        slot = np.searchsorted(classes, labels[part])
        np.add.at(sums, slot, np.asarray(x[part], dtype=np.float64))
        np.add.at(counts, slot, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        protos = sums / counts[:, None]
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    out = np.empty(len(query_rows), dtype=np.float64)
    for start in range(0, len(query_rows), CHUNK):
        f = np.asarray(x[query_rows[start:start + CHUNK]], dtype=np.float64)
        f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        p = protos[np.searchsorted(classes, query_classes[start:start + CHUNK])]
        out[start:start + CHUNK] = (f * p).sum(axis=1)
    return out


@dataclass
class FilterResult:
    """What one run of a filter decided."""

    command: str                     # filter-auxiliary | filter-generated
    features: str                    # embedding set(s) the scores were computed on
    thresholds: dict[str, float]     # gamma1, gamma2 (auxiliary) or mu (generated)
    checked: int                     # train rows looked at
    kept: int
    rejected: dict[str, int]         # reason -> rows (caption, dissimilar, near-duplicate; low-score)
    per_class: list[dict[str, Any]] = field(default_factory=list)  # one row per class looked at, with score stats
    store_version: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        what = "would move" if self.dry_run else "moved"
        reasons = ", ".join(f"{n} {k}" for k, n in self.rejected.items() if n) or "none"
        limits = ", ".join(f"{k} {v:g}" for k, v in self.thresholds.items())
        return (f"{self.command} on {self.features} ({limits}): {self.checked} train images, {self.kept} kept; "
                f"{what} {self.checked - self.kept} to split '{FILTERED_SPLIT}' ({reasons})"
                + ("" if self.dry_run else f"; store version {self.store_version}"))


def _classes(store: "Store") -> dict[int, dict[str, Any]]:
    if not store.has_table("classes"):
        raise ValueError(f"store {store.root} has no classes table: run `featurelt ingest` first")
    return {r["label"]: r for r in store.read("classes").to_pylist()}


def _descriptions(store: "Store", source: str) -> dict[str, str | None]:
    t = store.read("samples", columns=["sample_id", "description"], filter=f"source = '{source}' AND split = 'train'")
    return dict(zip(t.column("sample_id").to_pylist(), t.column("description").to_pylist()))


def _per_class(labels: np.ndarray, scores: np.ndarray, sample_ids: np.ndarray, out: set[str],
               classes: dict[int, dict[str, Any]], score: str) -> list[dict[str, Any]]:
    """One row per class: rows checked and kept, and min / mean / max of ``scores`` (NaN left out)."""
    rows = []
    for label in sorted({int(y) for y in labels}):
        mine = labels == label
        s = scores[mine][~np.isnan(scores[mine])]
        stats = {f"{score}_{k}": (round(float(f(s)), 4) if len(s) else None)
                 for k, f in (("min", np.min), ("mean", np.mean), ("max", np.max))}
        neighbor = classes[label]["neighbor_of"]
        rows.append({"label": label, "class": classes[label]["name"],
                     **({"neighbor_of": classes[neighbor]["name"]} if neighbor is not None else {}),
                     "checked": int(mine.sum()), "kept": int(sum(1 for sid in sample_ids[mine] if str(sid) not in out)),
                     **stats})
    return rows


def _move_to_filtered(store: "Store", result: FilterResult, rejects: list[tuple[str, str]],
                      message: str | None) -> FilterResult:
    """Unless a dry run: move the ``(sample_id, reason)`` rows to split ``filtered`` and log them in
    ``rejects``, one transaction; returns ``result`` with the store version."""
    if result.dry_run or not rejects:
        return result
    msg = message or command_line()
    with store.transaction(msg) as tx:
        ids = ", ".join("'" + sid.replace("'", "''") + "'" for sid in sorted({sid for sid, _ in rejects}))
        tx.update("samples", {"split": f"'{FILTERED_SPLIT}'"}, where=f"split = 'train' AND sample_id IN ({ids})")
        tx.append("rejects", rejects_table(command=msg, stage=result.command, rows=[
            {"location": f"samples/{sid}", "sample_id": sid, "reason": reason} for sid, reason in rejects]))
    result.store_version = store.version
    return result


def filter_auxiliary(store: "Store", features: list[str] | tuple[str, ...], *, gamma1: float, gamma2: float,
                     caption: bool = True, dry_run: bool = False, message: str | None = None) -> FilterResult:
    """Filter the auxiliary train rows of ``store`` (module docstring, section 3).

    features: embedding sets (joined on sample_id, like train-head's ``--features``); every train row
    needs a vector. caption: also reject rows whose ``description`` does not name their class (rows
    without a description pass). dry_run: decide and report, write nothing.
    """
    if not -1.0 <= gamma1 < gamma2 <= 1.0:
        raise ValueError(f"need -1 <= gamma1 < gamma2 <= 1 (cosines), got gamma1={gamma1}, gamma2={gamma2}")
    classes = _classes(store)
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
    captions = _descriptions(store, "auxiliary") if caption else {}
    kinds = {"caption": 0, "dissimilar": 0, "near-duplicate": 0}
    rejects: list[tuple[str, str]] = []
    for r, c, t in zip(aux, cos, targets):
        sid, name, target = str(feats.sample_ids[r]), classes[int(feats.labels[r])]["name"], classes[int(t)]["name"]
        text = captions.get(sid)
        if text is not None and name_key(name) not in name_key(text):
            kind, reason = "caption", f"the caption does not name class '{name}': {text[:80]!r}"
        elif np.isnan(c):
            kind, reason = "dissimilar", f"target class '{target}' has no original train rows (no prototype)"
        elif c <= gamma1:
            kind, reason = "dissimilar", f"cos {c:.4f} to the prototype of '{target}' <= gamma1 {gamma1:g}"
        elif c >= gamma2:
            kind, reason = "near-duplicate", f"cos {c:.4f} to the prototype of '{target}' >= gamma2 {gamma2:g}"
        else:
            continue
        kinds[kind] += 1
        rejects.append((sid, reason))
    out = {sid for sid, _ in rejects}
    result = FilterResult("filter-auxiliary", ",".join(features), {"gamma1": gamma1, "gamma2": gamma2}, len(aux),
                          len(aux) - len(out), kinds,
                          _per_class(feats.labels[aux], cos, feats.sample_ids[aux], out, classes, "cos"),
                          store.version, dry_run)
    return _move_to_filtered(store, result, rejects, message)


def _set_provenance(store: "Store", set_name: str) -> dict[str, Any]:
    """The newest ``embedding_sets`` row of ``set_name`` (its provenance parsed), or a clear error."""
    rows = store.read("embedding_sets", filter=f"name = '{set_name}'").to_pylist() \
        if store.has_table("embedding_sets") else []
    if not rows:
        raise ValueError(f"embedding set '{set_name}' has no provenance row in embedding_sets (sets: "
                         f"{', '.join(store.embedding_sets()) or 'none'}); make it with `featurelt extract clip:<model>`")
    row = max(rows, key=lambda r: r["time"])
    return {**row, "provenance": json.loads(row["provenance"])}


def filter_generated(store: "Store", features: str, *, mu: float, checkpoint: str | None = None,
                     templates: list[str] | str | os.PathLike[str] | None = None, device: str = "cpu",
                     dry_run: bool = False, message: str | None = None) -> FilterResult:
    """Filter the generated train rows of ``store`` by their CLIP score (module docstring, section 4).

    features: one embedding set made by a ``clip:<model>`` encoder (its image embeddings); the text
    tower of that model is built with ``checkpoint`` (the same file as the set's, checked by sha256; without
    one, the set's open_clip tag (provenance ``pretrained``) finds the weights in the cache or on the hub)
    to embed each row's description, or, for rows without one, its class name through ``templates``.
    """
    from featurelt.encoders import ENCODERS, build_text_encoder

    if not -1.0 <= mu <= 1.0:
        raise ValueError(f"mu is a cosine threshold in [-1, 1], got {mu}")
    classes = _classes(store)
    prov = _set_provenance(store, features)
    encoder = prov["encoder"]
    if not ENCODERS.get(encoder).has_text:
        raise ValueError(f"embedding set '{features}' was made by {encoder}, which has no text tower: the quality "
                         "filter compares CLIP image and text embeddings (`featurelt extract clip:<model>`)")
    trained = prov["provenance"].get("trained", True)  # a set of random weights: the same seeded random text tower
    text = build_text_encoder(encoder, checkpoint=checkpoint, templates=templates, device=device,
                              untrained=not trained, seed=int(prov["provenance"].get("seed") or 0),
                              pretrained=prov["provenance"].get("pretrained"))
    want, have = prov["provenance"].get("checkpoint_sha256"), text.checkpoint_sha256
    if want != have:
        raise ValueError(f"embedding set '{features}' was made with checkpoint sha256 {want}, the text tower has "
                         f"{have}: pass --checkpoint with the file the set was extracted with")
    feats = load_features(store, [features], split="train")
    gen = np.flatnonzero(feats.source == "generated")
    if len(gen) == 0:
        raise ValueError("the train split has no generated rows (ingest them with --source generated)")
    descriptions = _descriptions(store, "generated")
    texts = [descriptions.get(str(feats.sample_ids[r])) for r in gen]
    labels = feats.labels[gen]
    t = np.zeros((len(gen), text.dim), dtype=np.float32)
    with_text = [i for i, d in enumerate(texts) if d]
    if with_text:
        t[with_text] = text.encode_text([texts[i] for i in with_text]).numpy()
    without = [i for i, d in enumerate(texts) if not d]
    if without:
        names = sorted({int(labels[i]) for i in without})
        by_class = dict(zip(names, text.encode_classes([classes[y]["name"] for y in names]).numpy()))
        t[without] = np.stack([by_class[int(labels[i])] for i in without])
    img = np.asarray(feats.x[gen], dtype=np.float64)
    img /= np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    score = (img * t).sum(axis=1)
    rejects = [(str(feats.sample_ids[r]), f"CLIP score {s:.4f} < mu {mu:g} (text: "
                f"{(texts[i] or 'class ' + repr(classes[int(labels[i])]['name']))[:80]!r})")
               for i, (r, s) in enumerate(zip(gen, score)) if s < mu]
    out = {sid for sid, _ in rejects}
    result = FilterResult("filter-generated", features, {"mu": mu}, len(gen), len(gen) - len(out),
                          {"low-score": len(rejects)},
                          _per_class(labels, score, feats.sample_ids[gen], out, classes, "score"), store.version, dry_run)
    return _move_to_filtered(store, result, rejects, message)


__all__ = ["filter_auxiliary", "filter_generated", "prototype_cosines", "FilterResult", "FILTERED_SPLIT"]
