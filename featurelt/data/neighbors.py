"""Offline neighbor-class search by class-name text similarity (METHODS.md section 3, seed 001).

"Granularity matters" extends each medium and few-shot target class with k visually similar
*auxiliary* classes. The paper asks an LLM for them; offline, featurelt takes the names of a user
vocabulary (e.g. WordNet nouns, the iNaturalist species list, another data set's classes) nearest
to each target class name in a text encoder's space (``text:minilm`` by default, or a CLIP text
tower). Names already in the label set are removed, as the paper does.

:func:`neighbor_search` returns one row per (target class, neighbor): the suggestions to collect
images for, then ``featurelt ingest ... --source auxiliary --neighbor-of CLASS``.
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from featurelt.store import Store

BUCKETS = ("many", "medium", "few")


def name_key(name: str) -> str:
    """How names are compared: lower case, ``_`` / ``-`` as spaces, whitespace collapsed
    (``"Ankle_boot"`` and ``"ankle  boot"`` are the same name)."""
    return " ".join(re.sub(r"[_\-]+", " ", name).lower().split())


def read_vocabulary(path: str | os.PathLike[str]) -> list[str]:
    """Candidate class names from a text file: one per line; blank lines and ``#`` comments skipped;
    a name repeated (in :func:`name_key` terms) is kept once, first spelling first."""
    names: list[str] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            name = line.strip()
            if not name or name.startswith("#") or name_key(name) in seen:
                continue
            seen.add(name_key(name))
            names.append(name)
    if not names:
        raise ValueError(f"{path}: no names (one candidate class name per line)")
    return names


def _targets(classes: list[dict[str, Any]], *, buckets: Sequence[str], names: Sequence[str] | None
             ) -> list[dict[str, Any]]:
    """Target (non-auxiliary) classes to extend: those named, else those in ``buckets``."""
    target = [c for c in classes if c["source"] != "auxiliary"]
    if names:
        by_key = {name_key(c["name"]): c for c in target}
        missing = [n for n in names if name_key(n) not in by_key]
        if missing:
            raise ValueError(f"no target class named {missing}; classes: {', '.join(c['name'] for c in target[:20])}"
                             f"{' ...' if len(target) > 20 else ''}")
        return [by_key[name_key(n)] for n in names]
    unknown = [b for b in buckets if b not in BUCKETS]
    if unknown:
        raise ValueError(f"unknown bucket(s) {unknown}; buckets are {', '.join(BUCKETS)}")
    return [c for c in target if c["bucket"] in buckets]


def neighbor_search(store: "Store", vocabulary: Sequence[str] | str | os.PathLike[str], *, k: int = 5,
                    buckets: Sequence[str] = ("medium", "few"), classes: Sequence[str] | None = None,
                    encoder: str = "text:minilm", checkpoint: str | None = None,
                    templates: list[str] | str | os.PathLike[str] | None = None, device: str = "cpu",
                    untrained: bool = False, pretrained: str | None = None) -> list[dict[str, Any]]:
    """The ``k`` vocabulary names nearest (cosine of class-name text embeddings) to each target class.

    vocabulary: names, or a file with one per line (:func:`read_vocabulary`). buckets / classes: which
    target classes to extend (default: medium and few, section 3). pretrained: open_clip tag of a
    ``clip:<model>`` text encoder (its config; its weights when no ``checkpoint``). Names of any class already in the
    store (target or auxiliary) are never suggested. Returns rows ``label, class, bucket, rank (1..k),
    neighbor, cosine``, by label then rank.
    """
    from featurelt.data.classnames import HOW_TO_NAME, unnamed
    from featurelt.encoders import build_text_encoder
    from featurelt.index import VectorIndex

    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if not store.has_table("classes"):
        raise ValueError(f"store {store.root} has no classes table: run `featurelt ingest` first")
    vocab = read_vocabulary(vocabulary) if isinstance(vocabulary, (str, os.PathLike)) else list(vocabulary)
    rows = store.read("classes").sort_by("label").to_pylist()
    targets = _targets(rows, buckets=buckets, names=classes)
    if unnamed(c["name"] for c in targets):
        raise ValueError(f"the target classes are named only by label numbers ({', '.join(c['name'] for c in targets[:3])}"
                         f"{', ...' if len(targets) > 3 else ''}): there are no class names to search near; {HOW_TO_NAME}")
    if not targets:
        raise ValueError(f"no target class in bucket(s) {', '.join(buckets)}: pass --classes NAME,... or other "
                         f"--buckets (see `featurelt classes`)")
    taken = {name_key(c["name"]) for c in rows}
    candidates = [n for n in vocab if name_key(n) not in taken]
    if not candidates:
        raise ValueError(f"every vocabulary name ({len(vocab)}) is already a class of the store")
    text = build_text_encoder(encoder, checkpoint=checkpoint, templates=templates, device=device,
                              untrained=untrained, pretrained=pretrained)
    index = VectorIndex(text.dim)
    index.add(text.encode_classes(candidates).float().cpu().numpy())
    sims, ids = index.search(text.encode_classes([c["name"] for c in targets]).float().cpu().numpy(), k)
    out = []
    for c, row_sims, row_ids in zip(targets, sims, ids):
        for rank, (s, i) in enumerate(zip(row_sims, row_ids), 1):
            out.append({"label": c["label"], "class": c["name"], "bucket": c["bucket"], "rank": rank,
                        "neighbor": candidates[i], "cosine": round(float(s), 4)})
    return out


__all__ = ["neighbor_search", "read_vocabulary", "name_key", "BUCKETS"]
