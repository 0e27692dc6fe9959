"""Input format ``inat``: iNaturalist-2018 COCO-style JSON (``images``, ``annotations``, ``categories``)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featurelt.data.formats.base import (
    Input,
    Record,
    check_not_empty,
    has_suffix,
    register_format,
    resolve_under,
    split_from_name,
    text_lines,
)


@register_format("inat", "iNaturalist-2018 COCO-style JSON (images, annotations, categories); image id = sample id",
                 detect=has_suffix(".json"))
def read_inat(path: Path, *, root: Path | None = None, split: str | None = None) -> Input:
    """iNaturalist-2018 COCO-style JSON: ``images`` (id, file_name), ``annotations`` (image_id,
    category_id), ``categories`` (id, name). The image id becomes the sample id (``<dataset>:<id>``)."""
    if not path.is_file():
        raise FileNotFoundError(f"iNaturalist JSON not found: {path}")
    check_not_empty(path)
    try:
        doc = json.loads("".join(text_lines(path)))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{path}: expected a COCO-style object with 'images', 'annotations', 'categories'")
    images = doc["images"]
    if not images:
        raise ValueError(f"{path}: empty input: 'images' is empty")
    cats = {}
    for c in doc.get("categories") or []:
        if isinstance(c, dict) and isinstance(c.get("id"), int):
            cats[c["id"]] = str(c.get("name", c["id"]))
    ann: dict[Any, Any] = {}
    for a in doc.get("annotations") or []:
        if isinstance(a, dict):
            ann[a.get("image_id")] = a.get("category_id")
    base = root if root is not None else path.parent
    sp = split or split_from_name(path.stem, "train")
    used = sorted({c for c in ann.values() if isinstance(c, int)} | set(cats))
    classes = [cats.get(c, str(c)) for c in used]
    dataset = "inat2018" if "2018" in path.stem else path.stem

    def records() -> Iterator[Record]:
        for i, img in enumerate(images, start=1):
            loc = f"{path}:images[{i - 1}]"
            if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or "id" not in img:
                yield Record(location=loc, row=i, class_name="", split=sp,
                             error=f"image entry needs 'id' and a string 'file_name', got {img!r:.80}")
                continue
            cat = ann.get(img["id"])
            if not isinstance(cat, int):
                yield Record(location=loc, row=i, class_name="", split=sp,
                             error=f"image id {img['id']} has no annotation with an integer category_id (got {cat!r})")
                continue
            if cats and cat not in cats:
                yield Record(location=loc, row=i, class_name="", split=sp,
                             error=f"unknown label: category_id {cat} is not in 'categories'")
                continue
            full, err = resolve_under(img["file_name"], base, check_root=root is not None)
            yield Record(location=loc, row=i, class_name=cats.get(cat, str(cat)), split=sp, path=full,
                         sample_id=f"{dataset}:{img['id']}", error=err)

    return Input(dataset=dataset, classes=classes, records=records(), total=len(images))

