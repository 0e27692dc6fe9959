"""WebDataset tar shards (``--format webdataset``), streamed member by member with :mod:`tarfile`.

A sample is the run of consecutive tar members that share a key (the member path up to the first dot of
its file name, as the ``webdataset`` package groups them): one image (``key.jpg`` / ``jpeg`` / ``png`` /
``webp`` / ...), a label in ``key.cls`` (an integer as text) or in ``key.json`` (field ``label``, ``cls``
or ``class``: an integer or a class name; ``class_name`` names an integer label), and optionally
``key.txt`` (stored as the sample's description). Integer labels without names are named with
``--class-names``. Splits come from the shard names (``train-000000.tar``) or ``--split``.

Pass 1 reads the labels only (tar headers are skipped over, image bytes are not read in uncompressed
shards) to register the classes; pass 2 streams the samples. Nothing is extracted to disk, and
memory is one sample (``TarFile.members`` is emptied as it goes). A truncated shard, a sample without an
image or label, or one with several images is a bad row (``--skip-bad``: ``rejects``).
"""
from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featurelt.data.formats.base import IMAGE_EXTENSIONS, Input, LabelSet, Record, register_format
from featurelt.data.formats.manifest import _manifest_label
from featurelt.data.formats.shards import dataset_name, has_shards, list_shards, shard_split

SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
LABEL_FIELDS = ("label", "cls", "class")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key, extension


def _samples(shard: Path, *, wanted: set[str] | None) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """``(key, {extension: bytes}, error)`` of each sample of a shard, in tar order; only the extensions in
    ``wanted`` are read (None: all). A damaged shard ends with an error entry."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(shard, "r:*") as tf:
            while (member := tf.next()) is not None:
                tf.members.clear()  # TarFile keeps every header it read: memory would grow with the shard
                m = _KEY.match(member.name)
                if not member.isfile() or m is None or Path(member.name).name.startswith("."):
                    continue
                k, ext = m.group(1), m.group(2).lower()
                if k != key:
                    if key is not None:
                        yield key, parts, None
                    key, parts = k, {}
                if wanted is None or ext in wanted:
                    fh = tf.extractfile(member)
                    parts[ext] = fh.read() if fh is not None else b""
                else:
                    parts[ext] = b""
            # tarfile ends silently at a header cut short: a plain tar whose last bytes are part of a header
            if shard.name.lower().endswith(".tar") and 0 < shard.stat().st_size - tf.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"the file ends inside a tar header at byte {tf.offset}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        if key is not None:
            yield key, parts, f"damaged shard after sample {key}: {exc}"
        else:
            yield "", {}, f"not a readable tar shard ({exc})"
        return
    if key is not None:
        yield key, parts, None


def _label(parts: dict[str, bytes]) -> tuple[int | str | None, str | None, str | None]:
    """(label as int or name, the name given for an integer label, error) of a sample's ``cls`` / ``json``."""
    if "cls" in parts:
        text = parts["cls"].decode("utf-8", "replace").strip()
        value, err = _manifest_label({"label": text}, "csv")
        return (None, None, f"key.cls must hold an integer label, got {text!r:.40}") if err or isinstance(value, str) \
            else (value, None, None)
    if "json" not in parts:
        return None, None, "missing label: no key.cls and no key.json"
    try:
        doc: Any = json.loads(parts["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, None, f"key.json is not valid JSON ({exc})"
    if not isinstance(doc, dict):
        return None, None, f"key.json must be an object, got {type(doc).__name__}"
    field = next((f for f in LABEL_FIELDS if doc.get(f) is not None), None)
    if field is None:
        return None, None, f"missing label: key.json has none of the fields {list(LABEL_FIELDS)}"
    value, err = _manifest_label({"label": doc[field]}, "jsonl")
    cname = doc.get("class_name")
    if err is None and cname is not None and (not isinstance(cname, str) or not cname):
        err = f"key.json class_name must be a non-empty string, got {cname!r:.40}"
    return value, cname if isinstance(value, int) else None, err


@register_format("webdataset", "WebDataset tar shards: key.jpg|png|webp + key.cls or key.json label, split from shard name",
                 detect=lambda path: has_shards(path, SUFFIXES))
def read_webdataset(path: Path, *, root: Path | None = None, split: str | None = None) -> Input:
    """The samples of one tar shard or of every ``*.tar`` (``.tar.gz``) under a folder (train shards first)."""
    shards = list_shards(path, SUFFIXES, kind="WebDataset")
    # pass 1: labels only -> the class list, so labels are assigned in a stable order
    labels = LabelSet()
    total = 0
    for shard in shards:
        for key, parts, err in _samples(shard, wanted={"cls", "json"}):
            if err is not None and not key:
                raise ValueError(f"{shard}: {err}")
            if err is not None:
                continue
            total += 1
            label, cname, lerr = _label(parts)
            if lerr is None:
                labels.add(label, cname)  # type: ignore[arg-type]
    if total == 0:
        raise ValueError(f"{path}: empty input: the WebDataset shards hold no samples")
    stated = split is not None or any(shard_split(s) is not None for s in shards)

    def records() -> Iterator[Record]:
        for shard in shards:
            sp = split or shard_split(shard) or "train"
            for i, (key, parts, err) in enumerate(_samples(shard, wanted=None), start=1):
                loc = f"{shard}:{key}" if key else str(shard)
                if err is not None:
                    yield Record(location=loc, row=i, class_name="", split=sp, error=err)
                    continue
                images = sorted(e for e in parts if e in IMAGE_EXTS)
                label, cname, err = _label(parts)
                if not images:
                    err = f"no image: expected {key}.jpg|jpeg|png|webp, the sample has {sorted(parts)}"
                elif len(images) > 1:
                    err = f"several images {images} in one sample"
                name = ""
                if err is None:
                    name, err = labels.key(label, cname, where="the shards")  # type: ignore[arg-type]
                text = parts.get("txt")
                yield Record(location=loc, row=i, class_name=name, split=sp,
                             data=parts[images[0]] if images else None, error=err,
                             description=text.decode("utf-8", "replace").strip() or None if text else None)

    return Input(dataset=dataset_name(path), records=records(), total=total, files=False,
                 unsplit_class_counts=None if stated else labels.counts(), **labels.fields())

