"""Input formats ``csv`` and ``jsonl``: a manifest of ``path,label[,split][,class_name][,sample_id][,description]``.

``label`` is a class name or an integer (an integer *is* the store label); relative paths are resolved
against ``--root`` (default: the manifest's folder, and then paths may point anywhere).
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from featurelt.data.formats.base import (
    Input,
    LabelSet,
    Record,
    check_not_empty,
    has_suffix,
    is_int,
    register_format,
    resolve_under,
    text_lines,
)

_MANIFEST_COLUMNS = ("path", "label", "split", "class_name", "sample_id", "description")


def _manifest_rows(path: Path, kind: Literal["csv", "jsonl"]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, raw dict) of a CSV (header row 1, data from row 2) or JSONL (line number) manifest."""
    lines = text_lines(path)
    try:
        if kind == "csv":
            reader = csv.DictReader(lines)
            header = reader.fieldnames or []
            missing = [c for c in ("path", "label") if c not in header]
            if missing:
                raise ValueError(f"{path}: manifest needs columns path,label[,split][,class_name][,sample_id]; "
                                 f"missing {missing}, header is {header}")
            for i, row in enumerate(reader, start=2):
                yield i, {k: v for k, v in row.items() if k is not None}
        else:
            for i, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield i, {"__error__": f"not valid JSON ({exc.msg})"}
                    continue
                if not isinstance(obj, dict):
                    yield i, {"__error__": f"expected a JSON object, got {type(obj).__name__}"}
                    continue
                yield i, obj
    finally:
        lines.close()


def _manifest_label(raw: dict[str, Any], kind: str) -> tuple[int | str | None, str | None]:
    """(label as int or name, error) of one manifest row."""
    value = raw.get("label")
    if value is None or value == "":
        return None, "missing label"
    if kind == "jsonl":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return None, f"label must be an integer or a class name, got {type(value).__name__} {value!r}"
        if isinstance(value, int):
            return (value, None) if value >= 0 else (None, f"label must be >= 0, got {value}")
    value = str(value).strip()
    if is_int(value):
        n = int(value)
        return (n, None) if n >= 0 else (None, f"label must be >= 0, got {value}")
    try:
        float(value)
    except ValueError:
        return value, None
    return None, f"label must be an integer or a class name, got number {value!r}"


def _manifest_str(raw: dict[str, Any], key: str) -> tuple[str | None, str | None]:
    value = raw.get(key)
    if value is None or value == "":
        return None, None
    if key == "sample_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    if not isinstance(value, str):
        return None, f"column '{key}' must be a string, got {type(value).__name__} {value!r}"
    return value, None


def read_manifest(path: Path, *, kind: Literal["csv", "jsonl"], root: Path | None = None,
                  split: str | None = None) -> Input:
    """CSV / JSONL manifest: ``path,label[,split][,class_name][,sample_id][,description]``."""
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    check_not_empty(path)
    base = root if root is not None else path.parent
    # pass 1 (text only): the class list, so labels are assigned in a stable order
    labels = LabelSet()
    has_splits = False
    n = 0
    for _, raw in _manifest_rows(path, kind):
        n += 1
        if "__error__" in raw:
            continue
        has_splits = has_splits or raw.get("split") not in (None, "")
        label, err = _manifest_label(raw, kind)
        cname, cerr = _manifest_str(raw, "class_name")
        if err or cerr:
            continue
        labels.add(label, cname)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"{path}: empty input: the manifest has no rows")

    def records() -> Iterator[Record]:
        for i, raw in _manifest_rows(path, kind):
            loc = f"{path}:row {i}"
            if "__error__" in raw:
                yield Record(location=loc, row=i, class_name="", split="", error=raw["__error__"])
                continue
            errors = [k for k in raw if k not in _MANIFEST_COLUMNS and kind == "jsonl"]
            rel, perr = _manifest_str(raw, "path")
            label, lerr = _manifest_label(raw, kind)
            sp, serr = _manifest_str(raw, "split")
            cname, cerr = _manifest_str(raw, "class_name")
            sid, iderr = _manifest_str(raw, "sample_id")
            desc, derr = _manifest_str(raw, "description")
            err = perr or lerr or serr or cerr or iderr or derr
            if errors and not err:
                err = f"unknown field(s) {errors}; manifest fields are {list(_MANIFEST_COLUMNS)}"
            if rel is None and not err:
                err = "missing path"
            if err:
                yield Record(location=loc, row=i, class_name="", split="", error=err)
                continue
            full, ferr = resolve_under(rel, base, check_root=root is not None)  # type: ignore[arg-type]
            name, nerr = labels.key(label, cname, where="the manifest")  # type: ignore[arg-type]
            ferr = ferr or nerr
            yield Record(location=loc, row=i, class_name=name, split=split or sp or "train", path=full,
                         key=Path(os.path.normpath(rel)).as_posix(), sample_id=sid, description=desc, error=ferr)

    unsplit = labels.counts() if not has_splits and split is None else None  # no split column (or all empty)
    return Input(dataset=path.stem, records=records(), total=n, unsplit_class_counts=unsplit, **labels.fields())



@register_format("csv", "CSV manifest: path,label[,split][,class_name][,sample_id][,description] (header row)",
                 detect=has_suffix(".csv"))
def read_csv(path: Path, *, root: Path | None = None, split: str | None = None) -> Input:
    """A CSV manifest (header row, then one image per row)."""
    return read_manifest(path, kind="csv", root=root, split=split)


@register_format("jsonl", "JSON-lines manifest: one object per line with the CSV manifest's fields",
                 detect=has_suffix(".jsonl"))
def read_jsonl(path: Path, *, root: Path | None = None, split: str | None = None) -> Input:
    """A JSON-lines manifest (one object per line)."""
    return read_manifest(path, kind="jsonl", root=root, split=split)
