"""Input format ``split-list``: ImageNet-LT / Places-LT lists (``relative/path label`` per line, under --root)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from featurelt.data.formats.base import (
    Input,
    Record,
    check_not_empty,
    has_suffix,
    is_int,
    register_format,
    resolve_under,
    split_from_name,
    text_lines,
)


@register_format("split-list", "ImageNet-LT / Places-LT list: 'relative/path label' per line, paths under --root",
                 detect=has_suffix(".txt"))
def read_split_list(path: Path, *, root: Path | None = None, split: str | None = None) -> Input:
    """ImageNet-LT / Places-LT split list: ``relative/path label`` per line, paths under ``root``."""
    if root is None:
        raise ValueError(f"{path}: a split list needs --root (the folder its relative paths start from)")
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder")
    check_not_empty(path)

    def parse(line: str) -> tuple[str | None, int | None, str | None]:
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            return None, None, f"expected 'relative/path label', got {line.strip()!r}"
        rel, lab = parts
        if not is_int(lab) or int(lab) < 0:
            return rel, None, f"unknown label {lab!r} (split lists need integer labels >= 0)"
        return rel, int(lab), None

    labels: set[int] = set()
    n = 0
    for line in text_lines(path):
        if line.strip():
            n += 1
            _, lab, err = parse(line)
            if lab is not None:
                labels.add(lab)
    if n == 0:
        raise ValueError(f"{path}: empty input: the split list has no lines")
    sp = split or split_from_name(path.stem, "train")

    def records() -> Iterator[Record]:
        for i, line in enumerate(text_lines(path), start=1):
            if not line.strip():
                continue
            loc = f"{path}:line {i}"
            rel, lab, err = parse(line)
            if err:
                yield Record(location=loc, row=i, class_name="", split=sp, error=err)
                continue
            full, ferr = resolve_under(rel, root, check_root=True)  # type: ignore[arg-type]
            yield Record(location=loc, row=i, class_name=str(lab), split=sp, path=full,
                         key=Path(os.path.normpath(rel)).as_posix(), error=ferr)

    dataset = path.stem.split("_")[0] if "_" in path.stem else path.stem
    return Input(dataset=dataset, classes=[str(i) for i in sorted(labels)], records=records(), total=n,
                 class_ids={str(i): i for i in labels})
