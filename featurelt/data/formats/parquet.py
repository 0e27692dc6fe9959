"""Hugging Face ``datasets`` Parquet shards (``--format parquet``), read in Arrow batches.

A shard is what ``datasets.Dataset.to_parquet`` / ``push_to_hub`` write: an image column (feature ``Image``,
stored as a struct ``{bytes, path}``; a plain binary column is accepted too), a label column and the
``huggingface`` key of the Parquet schema metadata, whose ``info.features`` gives the features' types.
The label column is ``label``, else the one ``ClassLabel`` feature. A ``ClassLabel``'s ``names`` are the
class names in label order (all of them are registered, like CIFAR's); a plain integer column gives
unnamed integer labels (name them with ``--class-names``); a string column gives class names. Splits come
from the file names (``train-00000-of-00002.parquet``, ``data/test-*.parquet``, ``validation`` -> ``val``).

Rows are read ``READ_BATCH`` at a time with ``ParquetFile.iter_batches`` (only the image and label
columns), one shard open at a time, so memory does not grow with the number of rows or shards: pyarrow
decodes a row group's column chunk at once, so the peak is about one row group (``datasets`` writes row
groups of at most 100 MB; bench/ingest_formats.py measures it). A row with no label (null, or ``-1``: datasets'
"no label"), a label outside the names, or no image bytes is a bad row (``--skip-bad``: ``rejects``).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurelt.data.formats.base import Input, LabelSet, Record, register_format, resolve_under
from featurelt.data.formats.manifest import _manifest_label
from featurelt.data.formats.shards import dataset_name, has_shards, list_shards, shard_split

SUFFIXES = (".parquet",)
READ_BATCH = 256  # rows per Arrow batch read from a shard


@dataclass(frozen=True)
class Columns:
    """The columns read from every shard: image, label, and the ClassLabel names (None: not a ClassLabel)."""

    image: str
    label: str
    names: tuple[str, ...] | None


def hf_features(schema: pa.Schema, shard: Path) -> dict[str, Any]:
    """``info.features`` of the ``huggingface`` schema metadata (``{}`` when the shard has none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{shard}: the 'huggingface' schema metadata is not valid JSON ({exc.msg})") from None
    feats = doc.get("info", {}).get("features") if isinstance(doc, dict) and isinstance(doc.get("info"), dict) else None
    return feats if isinstance(feats, dict) else {}


def shard_columns(schema: pa.Schema, shard: Path) -> Columns:
    """Which columns of ``shard`` hold the image and the label, and the label's class names."""
    feats = hf_features(schema, shard)

    def typed(kind: str) -> list[str]:
        return [n for n, f in feats.items() if isinstance(f, dict) and f.get("_type") == kind and n in schema.names]

    images = typed("Image") or [n for n in ("image", "img") if n in schema.names]
    if not images:
        raise ValueError(f"{shard}: no image column (a datasets Image feature, or a column named image / img); "
                         f"columns are {schema.names}")
    labels = ["label"] if "label" in schema.names else typed("ClassLabel")
    if len(labels) != 1:
        what = "no label column" if not labels else f"several ClassLabel columns {labels} and none named 'label'"
        raise ValueError(f"{shard}: {what}; columns are {schema.names}")
    image, label = images[0], labels[0]
    itype = schema.field(image).type
    if not (pa.types.is_binary(itype) or pa.types.is_large_binary(itype)
            or (pa.types.is_struct(itype) and itype.get_field_index("bytes") >= 0)):
        raise ValueError(f"{shard}: image column '{image}' must be a struct {{bytes, path}} or binary, got {itype}")
    ltype = schema.field(label).type
    if not (pa.types.is_integer(ltype) or pa.types.is_string(ltype) or pa.types.is_large_string(ltype)):
        raise ValueError(f"{shard}: label column '{label}' must hold integers or class names, got {ltype}")
    names = None
    feat = feats.get(label)
    if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and feat.get("names") is not None:
        names = feat["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{shard}: the ClassLabel names of '{label}' must be a list of non-empty strings, "
                             f"got {names!r:.120}")
        if len(set(names)) != len(names):
            raise ValueError(f"{shard}: the ClassLabel names of '{label}' repeat a name")
        if not pa.types.is_integer(ltype):
            raise ValueError(f"{shard}: ClassLabel column '{label}' must hold integers, got {ltype}")
    return Columns(image=image, label=label, names=tuple(names) if names is not None else None)


def _label_values(shards: list[Path], label: str) -> LabelSet:
    """Integer labels and class names in the label column of every shard (pass 1: that column only)."""
    labels = LabelSet()
    for shard in shards:
        with pq.ParquetFile(shard) as pf:
            for batch in pf.iter_batches(batch_size=65536, columns=[label]):
                for vc in pc.value_counts(batch.column(0)).to_pylist():
                    value, err = _manifest_label({"label": vc["values"]}, "jsonl")
                    if err is None:
                        labels.add(value, rows=vc["counts"])  # type: ignore[arg-type]
    return labels


@register_format("parquet", "Hugging Face datasets Parquet: image {bytes, path}, ClassLabel label, split from file name",
                 detect=lambda path: has_shards(path, SUFFIXES))
def read_parquet(path: Path, *, root: Path | None = None, split: str | None = None) -> Input:
    """The rows of one Parquet file or of every ``*.parquet`` under a folder (train shards first)."""
    shards = list_shards(path, SUFFIXES, kind="Parquet")
    cols: Columns | None = None
    total = 0
    for shard in shards:  # the footers only
        try:
            with pq.ParquetFile(shard) as pf:
                c = shard_columns(pf.schema_arrow, shard)
                total += pf.metadata.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{shard}: not a Parquet file ({exc})") from None
        if cols is not None and c != cols:
            raise ValueError(f"{shard}: columns / class names differ from {shards[0]} ({c} vs {cols})")
        cols = c
    assert cols is not None
    if total == 0:
        raise ValueError(f"{path}: empty input: the Parquet shards hold 0 rows")
    stated = split is not None or any(shard_split(s) is not None for s in shards)
    counted = _label_values(shards, cols.label) if cols.names is None or not stated else None  # one column only
    fields: dict[str, Any] = {"classes": list(cols.names)} if cols.names is not None else counted.fields()
    if not stated:  # no split in any shard name: ingest holds out a stratified test fraction of these counts
        fields["unsplit_class_counts"] = counted.counts() if cols.names is None else {
            cols.names[i]: n for i, n in counted.rows.items() if isinstance(i, int) and 0 <= i < len(cols.names)}

    def label_of(value: Any) -> tuple[str, str | None]:
        if cols.names is not None:
            if value is None or value == -1:
                return "", "missing label" + (" (-1: datasets' 'no label')" if value == -1 else "")
            if not 0 <= value < len(cols.names):
                return "", f"unknown label {value} (the ClassLabel '{cols.label}' has {len(cols.names)} names)"
            return cols.names[value], None
        lab, err = _manifest_label({"label": value}, "jsonl")
        return ("", err) if err else (str(lab), None)

    def shard_records(shard: Path) -> Iterator[Record]:
        sp = split or shard_split(shard) or "train"
        base = root if root is not None else shard.parent
        i = 0
        with pq.ParquetFile(shard) as pf:
            for batch in pf.iter_batches(batch_size=READ_BATCH, columns=[cols.image, cols.label]):
                for img, value in zip(batch.column(cols.image).to_pylist(), batch.column(cols.label).to_pylist()):
                    loc = f"{shard}[{i}]"
                    i += 1
                    name, err = label_of(value)
                    data, ref = (img.get("bytes"), img.get("path")) if isinstance(img, dict) else (img, None)
                    full = None
                    if err is None and data is None:
                        if ref:  # a datasets Image of a local file: bytes null, path set
                            full, err = resolve_under(ref, base, check_root=root is not None)
                        else:
                            err = f"no image: column '{cols.image}' has neither bytes nor a path"
                    elif err is None and not data:
                        err = f"empty image bytes in column '{cols.image}'"
                    yield Record(location=loc, row=i, class_name=name, split=sp, path=full,
                                 data=data if full is None else None, error=err)

    def records() -> Iterator[Record]:
        for shard in shards:
            yield from shard_records(shard)

    return Input(dataset=dataset_name(path), records=records(), total=total, files=False, **fields)

