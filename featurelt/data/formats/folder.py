"""Input format ``folder``: one subfolder per class (optionally under train / val / test folders)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from featurelt.data.formats.base import (
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    Input,
    Record,
    printable,
    register_format,
    within,
)


@register_format("folder", "PATH/<class>/<image>, or PATH/<split>/<class>/<image> with train/val/test folders",
                 detect=lambda path: path.is_dir(), priority=100)
def read_folder(path: Path, *, root: Path | None = None, split: str | None = None) -> Input:
    """``PATH/<class>/<image>``; also ``PATH/<split>/<class>/<image>`` when every top folder is a split name."""
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    top = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not top:
        raise ValueError(f"{path}: empty input: no class subfolders (expected PATH/<class>/<image files>)")
    split_folders = all(d.name in SPLIT_NAMES for d in top)
    if split_folders:
        roots = [(d, d.name) for d in top]
    else:
        roots = [(path, split or "train")]
    class_dirs: list[tuple[Path, str, str]] = []
    for root, sp in roots:
        for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith(".")):
            class_dirs.append((d, d.name, split or sp))
    for d, name, _ in class_dirs:
        if printable(name) != name:
            raise ValueError(f"{printable(str(d))}: the class folder's name is not valid UTF-8; rename it")
    classes = sorted({name for _, name, _ in class_dirs})

    def files(d: Path) -> list[Path]:
        return sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)

    counts: dict[str, int] = {}
    for d, name, _ in class_dirs:
        counts[name] = counts.get(name, 0) + len(files(d))
    total = sum(counts.values())
    unsplit = counts if not split_folders and split is None else None  # the folder states no splits

    def records() -> Iterator[Record]:
        for d, name, sp in class_dirs:
            for f in files(d):
                # a symlink (or a file under a linked folder) that leads out of PATH is not read
                err = None if within(f, path) else f"symlink to a file outside {path} ({f.resolve()}); not read"
                yield Record(location=str(f), row=None, class_name=name, split=sp, path=str(f.absolute()),
                             key=f.relative_to(path).as_posix(), error=err)

    return Input(dataset=path.resolve().name, classes=classes, records=records(), total=total,
                 unsplit_class_counts=unsplit)

