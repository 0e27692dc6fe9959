"""Class-name text embeddings: the ``text_embeddings`` rows of a text encoder or an image-text encoder's text tower."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from featurelt.extract.device import resolve_device
from featurelt.extract.plan import sql_str
from featurelt.store import Store, StoreError


@dataclass
class TextExtractResult:
    """What one text extraction did."""

    encoder: str
    set_name: str
    rows_added: int
    rows_skipped: int
    store_version: int

    def summary(self) -> str:
        return (f"extract {self.encoder}: {self.rows_added} class text embeddings added to text_embeddings "
                f"set '{self.set_name}', {self.rows_skipped} skipped (already embedded); "
                f"store version {self.store_version}")


def read_classes(store: Store) -> tuple[list[int], list[str]]:
    if not store.has_table("classes"):
        raise StoreError(f"store {store.root} has no classes table; class text embeddings need class names "
                         "(run `featurelt ingest` first)")
    t = store.read("classes", columns=["label", "name"]).sort_by("label")
    return [int(v) for v in t.column("label").to_pylist()], [str(v) for v in t.column("name").to_pylist()]


def read_templates(path: str | os.PathLike[str] | None) -> list[str] | None:
    """Prompt templates from a file, one per line, each with one ``{}`` (blank lines and ``#`` skipped)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as fh:
        lines = [ln.strip() for ln in fh]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    if not templates:
        raise ValueError(f"{path}: no templates (one per line, e.g. 'a photo of a {{}}.')")
    for i, t in enumerate(templates, 1):
        if t.count("{}") != 1:
            raise ValueError(f"{path}: template {i} {t!r} must contain exactly one '{{}}' for the class name")
    return templates


def text_rows_of(store: Store, text_encoder: Any, encoder_name: str, set_name: str) -> tuple[pa.Table | None, int, bool]:
    """Rows for ``text_embeddings`` that are missing for this set and fingerprint.

    Returns ``(table or None, rows skipped, replace)``; ``replace`` means the set exists with another
    fingerprint, so its old rows must be deleted first (one set = one encoder configuration).
    """
    labels, names = read_classes(store)
    fp = text_encoder.fingerprint("embedding")
    done: set[int] = set()
    replace = False
    if store.has_table("text_embeddings"):
        old = store.read("text_embeddings", columns=["label", "fingerprint"], filter=f"set_name = {sql_str(set_name)}")
        fps = set(old.column("fingerprint").to_pylist())
        if fps and fps != {fp}:
            replace = True
        else:
            done = set(old.column("label").to_pylist())
    todo = [(lab, nm) for lab, nm in zip(labels, names) if lab not in done]
    if not todo:
        return None, len(done), False
    vecs = text_encoder.encode_classes([nm for _, nm in todo])
    vecs = vecs.detach().float().cpu().numpy()
    if vecs.shape[0] != len(todo):
        raise ValueError(f"text encoder {encoder_name} returned {vecs.shape[0]} vectors for {len(todo)} class names")
    templates = getattr(text_encoder, "templates", None) or ["{}"]
    table = pa.table({
        "set_name": [set_name] * len(todo), "encoder": [encoder_name] * len(todo),
        "label": pa.array([lab for lab, _ in todo], pa.int32()), "class_name": [nm for _, nm in todo],
        "templates": [" | ".join(templates)] * len(todo), "dim": pa.array([vecs.shape[1]] * len(todo), pa.int32()),
        "vector": pa.array([v.tolist() for v in vecs], pa.list_(pa.float32())), "fingerprint": [fp] * len(todo)})
    return table, len(done), replace


def write_text(tx: Any, table: pa.Table | None, set_name: str, replace: bool) -> int:
    if replace:
        tx.delete("text_embeddings", f"set_name = {sql_str(set_name)}")
    if table is None:
        return 0
    return tx.append("text_embeddings", table)


def extract_text(store: Store, encoder_name: str, *, name: str | None = None, checkpoint: str | None = None,
                 templates: list[str] | str | os.PathLike[str] | None = None, device: str = "auto",
                 seed: int = 0, untrained: bool = False, message: str | None = None,
                 pretrained: str | None = None) -> TextExtractResult:
    """Class-name text embeddings (METHODS.md sections 1, 3 and 6) into ``text_embeddings``.

    One row per class of the ``classes`` table, for a text encoder (``text:minilm``) or the text
    tower of an image-text encoder (``clip:<model>``), averaged over prompt ``templates`` (a list, or
    a file with one template per line). Labels already embedded with the same fingerprint are
    skipped; a set that exists with another fingerprint is replaced. ``pretrained``: open_clip tag of a
    ``clip:<model>`` text tower (as for :func:`featurelt.extract.extract`).
    """
    from featurelt.encoders import build_text_encoder

    if isinstance(templates, (str, os.PathLike)):
        templates = read_templates(templates)
    dev = resolve_device(device)
    enc = build_text_encoder(encoder_name, checkpoint=checkpoint, templates=templates, device=dev, seed=seed,
                             untrained=untrained, pretrained=pretrained)
    set_name = name or enc.default_set_name()
    table, skipped, replace = text_rows_of(store, enc, encoder_name, set_name)
    added = 0
    if table is not None or replace:
        with store.transaction(message) as tx:
            added = write_text(tx, table, set_name, replace)
    return TextExtractResult(encoder_name, set_name, added, skipped, store.version)
