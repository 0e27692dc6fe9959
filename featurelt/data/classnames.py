"""Class names for integer labels (``ingest --class-names FILE``): reading the file, naming an input's labels,
and telling names from label numbers.

Split lists (ImageNet-LT, Places-LT), plain IDX files, Parquet shards without a ClassLabel and WebDataset
``.cls`` files give integer labels only; without names their classes are called ``"0"``, ``"1"``, ... and a
text encoder would embed those numbers. A names file gives one name per label, in one of three layouts
(chosen for the whole file; blank lines and lines starting with ``#`` are skipped):

- ``name`` per line: line i (counting names only, from 0) is label i (``imagenet_classes.txt``);
- ``i name``, ``i,name`` or ``i<TAB>name``: the label first;
- ``name i``: the label last (Places365's ``categories_places365.txt``: ``/a/airfield 0``).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from featurelt.data.ingest import Input, Record

_FIRST = re.compile(r"^(\d+)\s*[,\t ]\s*(\S.*)$")
_LAST = re.compile(r"^(\S.*?)\s+(\d+)$")

HOW_TO_NAME = ("name them: `featurelt ingest INPUT --class-names FILE` with the same input (it adds no rows again, "
               "it renames the classes; FILE has one name per line, line i = label i, or 'i name' / 'i,name' lines)")


def is_label_number(name: str) -> bool:
    """A class name that is only a label number (``"17"``): the class has no name."""
    return name.strip().isdigit()


def unnamed(names: Iterable[str]) -> bool:
    """Every class name is a label number (and there is at least one)."""
    names = list(names)
    return bool(names) and all(is_label_number(n) for n in names)


def read_class_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """``{label: name}`` from a names file (see the module docstring for the layouts)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--class-names file not found: {p}")
    with open(p, encoding="utf-8") as fh:
        lines = [(i, ln.strip()) for i, ln in enumerate(fh, start=1)]
    lines = [(i, ln) for i, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{p}: no class names (one name per line, line i = label i)")
    pairs: list[tuple[int, int, str]]  # (line, label, name)
    if all(_FIRST.match(ln) for _, ln in lines):
        pairs = [(i, int(m.group(1)), m.group(2).strip()) for i, ln in lines if (m := _FIRST.match(ln))]
    elif all(_LAST.match(ln) and not is_label_number(ln.split()[0]) for _, ln in lines):
        pairs = [(i, int(m.group(2)), m.group(1).strip()) for i, ln in lines if (m := _LAST.match(ln))]
    else:
        pairs = [(i, label, ln) for label, (i, ln) in enumerate(lines)]
    names: dict[int, str] = {}
    where: dict[str, int] = {}
    for line, label, name in pairs:
        if label in names:
            raise ValueError(f"{p}:line {line}: label {label} is named twice ('{names[label]}' and '{name}')")
        if name in where:
            raise ValueError(f"{p}:line {line}: name '{name}' is given to labels {where[name]} and {label}")
        names[label] = name
        where[name] = label
    return names


def name_input(inp: "Input", names: dict[int, str], *, source: str) -> "Input":
    """``inp`` with its integer labels named from ``names`` (read from file ``source``), in place.

    Only inputs with integer labels can be named; a name the input itself states must agree with the file.
    """
    if not inp.class_ids:
        raise ValueError(f"--class-names names integer labels, but {inp.dataset} names its classes itself "
                         f"({', '.join(inp.classes[:5])}{', ...' if len(inp.classes) > 5 else ''})")
    missing = sorted(i for i in inp.class_ids.values() if i not in names)
    if missing:
        raise ValueError(f"{source}: labels {missing[:10]}{' ...' if len(missing) > 10 else ''} of {inp.dataset} "
                         f"have no name ({len(names)} names in the file)")
    rename = {}
    for key, label in inp.class_ids.items():
        if key in inp.named and key != names[label]:
            raise ValueError(f"{source}: label {label} is '{names[label]}', but {inp.dataset} names it '{key}'")
        rename[key] = names[label]
    clash = sorted(set(rename.values()) & (set(inp.classes) - set(rename)))
    if clash:
        raise ValueError(f"{source}: names {clash[:5]} are also class names that {inp.dataset} gives other rows")

    def records(recs: Iterator["Record"]) -> Iterator["Record"]:
        for rec in recs:
            if rec.error is None:
                rec.class_name = rename.get(rec.class_name, rec.class_name)
            yield rec

    inp.records = records(inp.records)
    inp.classes = [rename.get(c, c) for c in inp.classes]
    inp.class_ids = {rename[k]: v for k, v in inp.class_ids.items()}
    inp.named = set(inp.class_ids)
    if inp.unsplit_class_counts is not None:
        inp.unsplit_class_counts = {rename.get(k, k): n for k, n in inp.unsplit_class_counts.items()}
    return inp
