"""Sharded inputs (Parquet files, WebDataset tars): finding the shards, their split and the data set name."""
from __future__ import annotations

import re
from pathlib import Path

# split words in shard names -> store split ("validation-00000-of-00001.parquet" -> "val")
SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
_HF_SHARD = re.compile(r"^(?P<split>.+?)-\d+-of-\d+$")  # datasets' own "{split}-{i:05d}-of-{n:05d}"


def list_shards(path: Path, suffixes: tuple[str, ...], *, kind: str) -> list[Path]:
    """The shard files of ``path`` (the file itself, or every file under the folder whose name ends with one of
    ``suffixes``), train shards first, then by path."""
    if not path.exists():
        raise FileNotFoundError(f"{kind} input not found: {path}")
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: empty input (0 bytes)")
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise ValueError(f"{path}: empty input: no {kind} shards ({' / '.join('*' + s for s in suffixes)}) in the folder")
    order = {"train": 0, None: 0, "val": 1, "test": 2}
    return sorted(found, key=lambda p: (order.get(shard_split(p), len(order)), str(p)))


def shard_split(shard: Path) -> str | None:
    """Split of a shard by its name: datasets' ``{split}-00000-of-00004``, else the first split word of the
    name (``train-000000.tar``, ``imagenet-val-0001.tar``), else its folder's name (``train/0000.parquet``),
    else None (the input states no split). validation / valid become ``val``."""
    stem = shard.name.lower()
    for suffix in (".gz", ".tar", ".parquet"):
        stem = stem.removesuffix(suffix)
    m = _HF_SHARD.match(stem)
    if m:
        split = m.group("split")
        return SPLIT_WORDS.get(split, split)
    for name in (stem, shard.parent.name.lower()):
        for token in re.split(r"[-_.\s]+", name):
            if token in SPLIT_WORDS:
                return SPLIT_WORDS[token]
    return None


def dataset_name(path: Path) -> str:
    """``samples.dataset`` of a sharded input: the folder's name (its parent's when it is called ``data``), or for
    one shard file the name of the folder that holds it."""
    folder = path.resolve() if path.is_dir() else path.resolve().parent
    if folder.name.lower() in ("data", *SPLIT_WORDS) and folder.parent != folder:
        folder = folder.parent
    return folder.name or "dataset"


def has_shards(path: Path, suffixes: tuple[str, ...]) -> bool:
    """``detect`` of a sharded format: a file named ``*<suffix>``, or a folder with such files at its top or one
    level down (``data/train-00000-of-00001.parquet``); a listing, no recursion into deeper folders."""
    if path.is_file():
        return path.name.lower().endswith(suffixes)
    if not path.is_dir():
        return False
    for pattern in ("*", "*/*"):
        if any(p.name.lower().endswith(suffixes) and p.is_file() for p in path.glob(pattern)):
            return True
    return False
