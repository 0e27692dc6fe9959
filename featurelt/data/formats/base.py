"""The input-format contract: :class:`Record` / :class:`Input`, the ``FORMATS`` registry and shared path helpers."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from featurelt._registry import Registry

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_NAMES = ("train", "val", "test")


@dataclass(slots=True)
class Record:
    """One input image before validation.

    location: the file, or ``manifest:row`` it came from (named in errors and rejects).
    key: the path that names the sample (path sources: relative to the folder, or as the manifest / list
    writes it); the sample id is then ``<dataset>:<key>``, so identical images at two paths stay two samples.
    sample_id: an id the source gives (wins over ``key``); with neither, the id is the content hash.
    row: 1-based row / line number in a manifest or list, else None.
    class_name: the class key in the registry (a name; integer labels without names become ``str(int)``).
    path: the image file to read (file sources); data: encoded bytes (array sources).
    size: (width, height) when the bytes were encoded here (no decode needed).
    error: a problem found while reading the input (missing file, unknown label, ...).
    """

    location: str
    row: int | None
    class_name: str
    split: str
    path: str | None = None
    data: bytes | None = None
    sample_id: str | None = None
    key: str | None = None
    size: tuple[int, int] | None = None
    description: str | None = None
    error: str | None = None


@dataclass
class Input:
    """What a reader found: dataset name, class names in label order, the lazy records, and a size hint."""

    dataset: str
    classes: list[str]
    records: Iterator[Record]
    total: int | None = None
    files: bool = True  # records point at files (so --reference is possible)
    class_ids: dict[str, int] = field(default_factory=dict)  # integer labels the source gives: name -> label
    named: set[str] = field(default_factory=set)  # of those, names the source states (not just str(label))
    # records per class when the source states no splits at all (every record 'train', e.g. a plain folder
    # of class subfolders): ingest then holds out a stratified test fraction (--test-fraction)
    unsplit_class_counts: dict[str, int] | None = None


class Reader(Protocol):
    """``read(path, *, root=None, split=None) -> Input`` (root: where relative paths start; split: for every row)."""

    def __call__(self, path: Path, *, root: Path | None = None, split: str | None = None) -> Input: ...


@dataclass(frozen=True)
class InputFormat:
    """One registered format: its name, a one-line description, ``detect`` and ``read``.

    detect(path) -> bool: whether ``--format auto`` should pick this format for ``path`` (an existing file
    or folder); formats are asked in ``priority`` order (lower first) and the first yes wins.
    read(path, root=, split=) -> Input: the lazy records (see :class:`Input`).
    """

    name: str
    description: str
    detect: Callable[[Path], bool]
    read: Reader
    priority: int = 50


FORMATS: Registry[InputFormat] = Registry("input format")


def register_format(name: str, description: str, *, detect: Callable[[Path], bool],
                    priority: int = 50) -> Callable[[Reader], Reader]:
    """Decorator on a reader function: registers ``InputFormat(name, description, detect, reader, priority)``."""

    def deco(read: Reader) -> Reader:
        FORMATS.register(name, help=description)(InputFormat(name, description, detect, read, priority))
        return read

    return deco


def has_suffix(*suffixes: str) -> Callable[[Path], bool]:
    """A ``detect`` for files whose lower-case name ends with one of ``suffixes``."""
    return lambda path: path.is_file() and path.name.lower().endswith(suffixes)


# ====================================================================== helpers
def is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def split_from_name(name: str, default: str) -> str:
    low = name.lower()
    for split in SPLIT_NAMES:
        if split in low:
            return split
    if "t10k" in low:
        return "test"
    return default


def within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def resolve_under(rel: str, root: Path, *, check_root: bool) -> tuple[str, str | None]:
    """Absolute path of ``rel`` under ``root`` and an error if it escapes ``root`` or does not exist."""
    p = Path(rel).expanduser()
    full = p if p.is_absolute() else root / p
    if check_root and not within(full, root):
        return str(full), f"path '{rel}' is outside --root {root}"
    if not full.is_file():
        return str(full), f"file not found: {full}"
    return str(full.resolve()), None


def printable(text: str) -> str:
    """``text`` with undecodable file-name bytes (surrogate escapes) shown as ``\\xNN``, safe to store as UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (line endings kept); a line that is not UTF-8 is a ValueError naming
    the file and line number."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: line {n} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                 f"{exc.start + 1}); save the file as UTF-8") from None


def check_not_empty(path: Path) -> None:
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: empty input (0 bytes)")


def int_label_classes(labels: Sequence[int], names: dict[int, str]) -> list[str]:
    return [names.get(i, str(i)) for i in sorted(set(labels))]


class LabelSet:
    """The labels of an input, gathered in a first pass: integer labels (with the names the source states for
    some of them) and class names. Gives the :class:`Input` fields and each row's class key."""

    def __init__(self) -> None:
        self.ints: set[int] = set()
        self.int_names: dict[int, str] = {}
        self.names: set[str] = set()
        self.rows: dict[int | str, int] = {}  # rows per label

    def add(self, label: int | str, name: str | None = None, *, rows: int = 1) -> None:
        """A row's label (an integer, or a class name) and the name it gives an integer label, if any
        (``rows``: that many rows with this label)."""
        self.rows[label] = self.rows.get(label, 0) + rows
        if isinstance(label, int):
            self.ints.add(label)
            if name and label not in self.int_names:
                self.int_names[label] = name
        else:
            self.names.add(label)

    def key(self, label: int | str, name: str | None, *, where: str) -> tuple[str, str | None]:
        """(class key of a row, error): an integer label's name must be the one stated first (``where``)."""
        if not isinstance(label, int):
            return label, None
        key = self.int_names.get(label, str(label))
        if name and name != key:
            return key, f"label {label} is named '{key}' earlier in {where} but '{name}' here"
        return key, None

    def counts(self) -> dict[str, int]:
        """Rows per class key (``Input.unsplit_class_counts``)."""
        out: dict[str, int] = {}
        for label, n in self.rows.items():
            key = self.int_names.get(label, str(label)) if isinstance(label, int) else label
            out[key] = out.get(key, 0) + n
        return out

    def fields(self) -> dict[str, Any]:
        """``classes``, ``class_ids`` and ``named`` of the :class:`Input`."""
        return {"classes": int_label_classes(sorted(self.ints), self.int_names)
                + sorted(self.names - set(self.int_names.values())),
                "class_ids": {self.int_names.get(i, str(i)): i for i in self.ints},
                "named": set(self.int_names.values())}

